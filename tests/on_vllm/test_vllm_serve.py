"""`vllm serve` of an exported pair, driven by the official ``openai`` client on loopback: completions and chat
equal to FastIVLDecoder's greedy text, streaming, n, seeds, stop strings and log-probabilities. One server for
the module (a real `vllm serve` process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vllm_fixtures import MAX_MODEL_LEN, reference

from ivl_fast import FastIVLDecoder
from ivl_fast.chat import load_tokenizer, render_chat
from ivl_fast.tiny import make_tiny_pair
from ivl_fast.vllm import export_pair

openai = pytest.importorskip("openai")

START_TIMEOUT_S = 420  # a tiny model loads in 30-100 s on 2 loaded cores (torch.compile warm-up included)
PROMPT = "A while loop repeats until the condition is false, and"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, served directory, decoder, tokenizer): `vllm serve` of the tiny pair on a loopback port."""
    d = tmp_path_factory.mktemp("vllm_serve")
    paths = make_tiny_pair(d / "ckpt", vocab_size=512, seed=0)
    out = export_pair(paths["base"], paths["value"], d / "pair")
    port = _free_port()
    log = open(d / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(out), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {proc.returncode}:\n{(d / 'server.log').read_text()[-4000:]}"
                )
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve did not answer in {START_TIMEOUT_S} s") from None
                time.sleep(2)
        dec = FastIVLDecoder.from_pretrained(paths["base"], paths["value"])
        yield client, str(out), dec, load_tokenizer(out)
    finally:
        _stop(proc)
        log.close()


def _stop(proc) -> None:
    """SIGTERM to the server's process group (vLLM's engine processes with it), SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_pair_is_the_served_model(server):
    client, out, _, _ = server
    assert [m.id for m in client.models.list().data] == [out]


def test_completion_equals_fast_ivl_decoder(server):
    client, out, dec, tok = server
    ids = tok(PROMPT).input_ids
    want, want_lp = reference(dec, ids, 32)
    got = client.completions.create(
        model=out, prompt=PROMPT, max_tokens=32, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    choice = got.choices[0]
    assert choice.text == tok.decode(want)
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 32
    assert choice.finish_reason == "length"
    # the sampled token's log-probability, and two alternatives per position (the sampled one may be among them)
    assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, want_lp, strict=True)) < 1e-4
    assert all(2 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)


def test_chat_renders_the_pairs_template(server):
    """vLLM renders the chat with the template the export wrote (the one `ivl-fast serve` uses) and decodes the
    pair's greedy answer."""
    client, out, dec, tok = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a while loop?"}]
    ids = tok(render_chat(tok, messages), add_special_tokens=False).input_ids
    want, _ = reference(dec, ids, 24)
    got = client.chat.completions.create(
        model=out, messages=messages, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.content == tok.decode(want, skip_special_tokens=True)


def test_streaming_gives_the_same_text(server):
    client, out, _, _ = server
    whole = client.completions.create(
        model=out, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.completions.create(
            model=out, prompt=PROMPT, max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_n_and_seeds(server):
    """n samples per request; a request's seed fixes its samples (vLLM's per-request generator)."""
    client, out, _, _ = server

    def sample(seed):
        r = client.completions.create(model=out, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=seed)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample(11)
    assert len(first) == 3 and len(set(first)) > 1  # random weights, temperature 1: samples differ
    assert sample(11) == first
    assert sample(12) != first


def test_stop_string(server):
    client, out, _, _ = server
    full = client.completions.create(
        model=out, prompt=PROMPT, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(model=out, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
