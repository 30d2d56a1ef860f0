"""`ivl-fast serve`: a real uvicorn server on loopback, driven with the official `openai` client (and raw HTTP for
the wire format): completions, chat, streaming, concurrency over continuous batching (greedy results equal each
request decoded alone), per-request alpha, the OpenAI error shapes, disconnects, a failing request failing alone,
and /metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ivl_fast import FastIVLDecoder  # noqa: E402
from ivl_fast.cli import build_parser  # noqa: E402
from ivl_fast.cli.serve import load  # noqa: E402

PROMPTS = ["def main", "The for statement", "import os", "class A:", "while True", "return x"]


class Server:
    """``ivl-fast serve`` flags -> a running server in a thread (uvicorn on a free loopback port)."""

    def __init__(self, *flags):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = build_parser().parse_args(["serve", *map(str, flags), "--port", str(self.port)])
        self.scheduler, app = load(args)
        self.scheduler.start()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.scheduler.shutdown(timeout=5)


@pytest.fixture(scope="module")
def served(pair):
    _, _, base_dir, value_dir = pair
    srv = Server(
        "--base",
        base_dir,
        "--value",
        value_dir,
        "--served-model-name",
        "ivl",
        "--max-batch-size",
        4,
        "--max-model-len",
        128,
    )
    yield srv, FastIVLDecoder.from_pretrained(base_dir, value_dir)
    srv.stop()


def test_models_and_health(served):
    srv, _ = served
    assert [m.id for m in srv.client().models.list().data] == ["ivl"]
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_completion_greedy_equals_the_decoder_alone(served):
    srv, dec = served
    for p in PROMPTS[:3]:
        r = srv.client().completions.create(model="ivl", prompt=p, max_tokens=12, temperature=0)
        assert r.choices[0].text == dec.generate_text(p, max_new_tokens=12)
        assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
        n_prompt = len(dec.tokenizer(p)["input_ids"])
        assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens


def test_chat_greedy_and_streaming_equal_the_decoder_alone(served):
    srv, dec = served
    msgs = [{"role": "user", "content": "Where does Kalo live?"}]
    want = dec.generate_text(msgs, chat=True, max_new_tokens=10)
    c = srv.client()
    r = c.chat.completions.create(model="ivl", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="ivl", messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # the wire format: server-sent events of chunk objects, then data: [DONE]
    body = {
        "model": "ivl",
        "messages": msgs,
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1


def test_concurrent_requests_share_the_batch_and_each_equals_alone(served):
    """More requests than slots (4): some wait, all join running batches; every greedy answer is its own."""
    srv, dec = served
    jobs = [(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)] * 2
    want = {(p, n): dec.generate_text(p, max_new_tokens=n) for p, n in set(jobs)}

    def ask(job):
        p, n = job
        return srv.client().completions.create(model="ivl", prompt=p, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [want[j] for j in jobs]


def test_alpha_per_request_in_one_batch(served, pair):
    srv, _ = served
    base_dir = pair[2]
    alone = FastIVLDecoder.from_pretrained(base_dir, None, scheme="base")
    half = FastIVLDecoder.from_pretrained(base_dir, pair[3], alpha=0.5)

    def ask(alpha):
        extra = {"alpha": alpha}
        r = srv.client().completions.create(
            model="ivl", prompt="def main", max_tokens=10, temperature=0, extra_body=extra
        )
        return r.choices[0].text

    with ThreadPoolExecutor(3) as pool:
        zero, one, mid = pool.map(ask, (0.0, 1.0, 0.5))
    assert zero == alone.generate_text("def main", max_new_tokens=10)
    assert mid == half.generate_text("def main", max_new_tokens=10)
    assert one != zero


def test_stop_strings_and_sampling_fields(served):
    srv, dec = served
    full = dec.generate_text("def main", max_new_tokens=16, eos_token_id=[])
    stop = full[5:8]
    r = srv.client().completions.create(
        model="ivl", prompt="def main", max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = srv.client().completions.create(
        model="ivl",
        prompt="def main",
        max_tokens=8,
        temperature=0.8,
        top_p=0.9,
        n=3,
        presence_penalty=0.5,
        extra_body={"top_k": 5, "min_p": 0.05},
    )
    assert len(r.choices) == 3 and r.usage.completion_tokens >= 3


def _error(srv, path, body, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{srv.url}{path}", json=body, headers=headers, timeout=60)
    return r.status_code, r.json()["error"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"seed": "3"}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": 500}, "max_tokens"),  # beyond the context of 128
    ],
)
def test_bad_parameters_are_400_naming_the_field(served, body, param):
    srv, _ = served
    status, err = _error(srv, "/v1/completions", {"model": "ivl", "prompt": "hi", **body})
    assert status == 400 and err["param"] == param and err["type"] == "invalid_request_error", err


def test_unknown_model_is_404_and_long_prompts_400(served):
    srv, _ = served
    status, err = _error(
        srv, "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 404 and err["param"] == "model" and err["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        srv.client().completions.create(model="ivl", prompt="word " * 400, max_tokens=4)


def test_streaming_client_that_disconnects_frees_its_slot(served):
    srv, _ = served
    body = {
        "model": "ivl",
        "prompt": "def main",
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while srv.scheduler.running:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.02)


def test_metrics(served):
    srv, _ = served
    srv.client().completions.create(model="ivl", prompt="hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{srv.url}/metrics").text
    for name in (
        "ivl_requests_total",
        "ivl_generated_tokens_total",
        "ivl_queue_depth",
        "ivl_batch_occupancy",
        "ivl_time_to_first_token_seconds_bucket",
        "ivl_time_per_output_token_seconds_bucket",
    ):
        assert name in text, name


def test_api_key_and_a_full_queue(pair):
    _, _, base_dir, value_dir = pair
    srv = Server(
        "--base",
        base_dir,
        "--value",
        value_dir,
        "--served-model-name",
        "ivl",
        "--api-key",
        "sekrit",
        "--max-batch-size",
        1,
        "--max-queue",
        1,
        "--max-model-len",
        256,
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        status, err = _error(srv, "/v1/completions", {"model": "ivl", "prompt": "hi"})
        assert status == 401 and err["type"] == "authentication_error"
        assert [m.id for m in srv.client("sekrit").models.list().data] == ["ivl"]

        def ask(_):
            try:
                srv.client("sekrit").completions.create(
                    model="ivl", prompt="def main", max_tokens=200, temperature=0, extra_body={"ignore_eos": True}
                )
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        with ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(ask, range(4)))
        assert 503 in codes and 200 in codes, codes  # one decoding, one waiting, the rest refused
    finally:
        srv.stop()


def test_a_failing_request_fails_alone(pair, save_checkpoint, tmp_path):
    """A request whose logits go NaN gets a 500 in OpenAI's shape; a request running beside it is unaffected."""
    import copy

    import torch

    base, value, base_dir, _ = pair
    poisoned = copy.deepcopy(value)
    with torch.no_grad():
        poisoned.model.embed_tokens.weight[99] = float("nan")
    pdir = save_checkpoint(poisoned, "poisoned_value")
    srv = Server("--base", base_dir, "--value", pdir, "--served-model-name", "ivl", "--max-model-len", 128)
    try:
        good_want = FastIVLDecoder.from_pretrained(base_dir, pdir).generate_text("def main", max_new_tokens=12)

        def good(_):
            return (
                srv.client()
                .completions.create(model="ivl", prompt="def main", max_tokens=12, temperature=0)
                .choices[0]
                .text
            )

        with ThreadPoolExecutor(2) as pool:
            fut = pool.submit(good, 0)
            status, err = _error(srv, "/v1/completions", {"model": "ivl", "prompt": [5, 99, 6], "max_tokens": 5})
            assert fut.result() == good_want
        assert status == 500 and "non-finite" in err["message"]
        assert good(0) == good_want  # the server goes on
    finally:
        srv.stop()


def test_serving_across_vocabularies_with_a_vocab_map(tmp_path, tokenizer, save_checkpoint):
    """--vocab-map: the value network on its tokenizer steers a base with another one; concurrent completions and
    chat requests (more than the slots) each equal the decoder's own cross-vocabulary answer alone."""
    from conftest import build_model

    from ivl_fast.tiny import corpus_text, train_tokenizer
    from ivl_fast.vocab import VocabMap

    base_tok = train_tokenizer(700, max_chars=150_000)
    base = build_model("llama", seed=0, vocab_size=len(base_tok), hidden_size=96, num_attention_heads=6)
    bdir = tmp_path / "xbase"
    base.save_pretrained(bdir)
    base_tok.save_pretrained(bdir)
    vdir = save_checkpoint(build_model("llama", seed=1, vocab_size=len(tokenizer)), "xvalue")
    VocabMap.build(base_tok, tokenizer, [corpus_text()[200_000:260_000]], top_k=3).save(tmp_path / "m.safetensors")
    dec = FastIVLDecoder.from_pretrained(bdir, vdir, tmp_path / "m.safetensors")
    srv = Server(
        "--base",
        bdir,
        "--value",
        vdir,
        "--vocab-map",
        tmp_path / "m.safetensors",
        "--served-model-name",
        "x",
        "--max-batch-size",
        2,
        "--max-model-len",
        96,
    )
    try:
        jobs = [(p, 5 + 2 * i) for i, p in enumerate(PROMPTS[:5])]
        msgs = [{"role": "user", "content": "Where does Kalo live?"}]

        def ask(job):
            p, n = job
            return srv.client().completions.create(model="x", prompt=p, max_tokens=n, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(jobs) + 1) as pool:
            chat = pool.submit(
                lambda: srv.client().chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
            )
            got = list(pool.map(ask, jobs))
        assert got == [dec.generate_text(p, max_new_tokens=n) for p, n in jobs]
        assert chat.result().choices[0].message.content == dec.generate_text(msgs, chat=True, max_new_tokens=8)
    finally:
        srv.stop()


def test_serving_with_a_draft_model(pair, save_checkpoint):
    """--draft: the batch decodes in speculative rounds; concurrent greedy requests (more than the slots, joining
    running rounds) each equal plain decoding alone, streamed or not; what one alpha and one random stream cannot
    give is a 400 naming the field."""
    from conftest import build_model

    _, _, base_dir, value_dir = pair
    draft_dir = save_checkpoint(build_model("llama", seed=2), "serve-draft")
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    srv = Server(
        "--base",
        base_dir,
        "--value",
        value_dir,
        "--draft",
        draft_dir,
        "--num-draft-tokens",
        3,
        "--served-model-name",
        "d",
        "--max-batch-size",
        3,
        "--max-model-len",
        96,
    )
    try:
        jobs = [(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)]

        def ask(job):
            p, n = job
            return srv.client().completions.create(model="d", prompt=p, max_tokens=n, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(ask, jobs))
        assert got == [dec.generate_text(p, max_new_tokens=n) for p, n in jobs]
        msgs = [{"role": "user", "content": "Where does Kalo live?"}]
        chunks = srv.client().chat.completions.create(
            model="d", messages=msgs, max_tokens=10, temperature=0, stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == dec.generate_text(msgs, chat=True, max_new_tokens=10)
        r = srv.client().completions.create(model="d", prompt="def main", max_tokens=6, temperature=0.8, n=2)
        assert len(r.choices) == 2 and r.usage.completion_tokens >= 2
        for body, param in (
            ({"seed": 3, "temperature": 0.7}, "seed"),
            ({"alpha": 0.5}, "alpha"),
            ({"logprobs": 2}, "logprobs"),
        ):
            status, err = _error(srv, "/v1/completions", {"model": "d", "prompt": "hi", **body})
            assert status == 400 and err["param"] == param, err
    finally:
        srv.stop()


def test_sigterm_lets_the_running_request_finish_and_exits_cleanly(pair):
    """`ivl-fast serve` as its own process: SIGTERM while a request streams -> the stream still ends with
    data: [DONE] (running requests finish), and the process exits with 0."""
    import os
    import signal
    import subprocess
    import sys

    _, _, base_dir, value_dir = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "ivl_fast.cli",
        "serve",
        "--base",
        str(base_dir),
        "--value",
        str(value_dir),
        "--port",
        str(port),
        "--served-model-name",
        "ivl",
        "--max-model-len",
        "256",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        body = {
            "model": "ivl",
            "prompt": "def main",
            "max_tokens": 150,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line and not lines:
                    os.kill(proc.pid, signal.SIGTERM)  # mid-stream
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        texts = [json.loads(x[6:])["choices"][0] for x in lines[:-1]]
        assert texts[-1]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_lm_evals_local_chat_completions_equals_ivl_fast_eval(served, pair, tmp_path, monkeypatch):
    """lm-eval's own `local-chat-completions` model pointed at the server gives the generations and the metric
    that `ivl-fast eval --apply-chat-template` (the "ivl" model) gives on the same local task."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalChatCompletion
    from lm_eval.tasks import TaskManager
    from test_lm_eval import write_tasks

    from ivl_fast.lm_eval import IVLLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    srv, _ = served
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks")
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    kw = dict(tasks=["ivl_gen"], task_manager=manager, apply_chat_template=True, limit=4, log_samples=True)
    api = LocalChatCompletion(base_url=f"{srv.url}/v1/chat/completions", model="ivl", tokenized_requests=False)
    theirs = lm_eval.simple_evaluate(model=api, **kw)
    ours = lm_eval.simple_evaluate(model=IVLLM(base=str(pair[2]), value=str(pair[3])), **kw)
    got = [s["filtered_resps"] for s in theirs["samples"]["ivl_gen"]]
    want = [s["filtered_resps"] for s in ours["samples"]["ivl_gen"]]
    assert got == want and len(got) == 4 and any(g[0] for g in got)  # real text, not empty answers
    assert theirs["results"]["ivl_gen"] == ours["results"]["ivl_gen"]


def test_several_prompts_in_one_completion_request(served):
    """OpenAI's list of prompts: choices run prompt by prompt (index = prompt * n + sample), each its own answer;
    usage counts every prompt n times."""
    srv, dec = served
    prompts = PROMPTS[:3]
    r = srv.client().completions.create(model="ivl", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    want = [dec.generate_text(p, max_new_tokens=6) for p in prompts]
    assert [c.text for c in r.choices] == [w for w in want for _ in range(2)]
    assert r.usage.prompt_tokens == 2 * sum(len(dec.tokenizer(p)["input_ids"]) for p in prompts)
    ids = [dec.tokenizer(p)["input_ids"] for p in prompts[:2]]
    r = srv.client().completions.create(model="ivl", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == want[:2]
    status, err = _error(srv, "/v1/completions", {"model": "ivl", "prompt": ["a", 3]})
    assert status == 400 and err["param"] == "prompt"


def test_a_seed_reproduces_a_sampled_answer_whatever_else_runs(served):
    """A sampled request with a seed gets the same choices alone and amid concurrent sampled traffic (its rows
    draw from their own streams); its n choices differ (choice i draws from seed + i, vLLM's rule), and another
    seed gives other answers."""
    srv, _ = served

    def ask(seed, prompt="def main", n=2):
        r = srv.client().completions.create(model="ivl", prompt=prompt, max_tokens=12, temperature=1.2, n=n, seed=seed)
        return [c.text for c in r.choices]

    alone = ask(42)
    assert alone[0] != alone[1]
    with ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(ask, None, p) for p in PROMPTS[:4]]
        again = [pool.submit(ask, 42) for _ in range(2)]
        [f.result() for f in noise]
        assert [f.result() for f in again] == [alone, alone]
    assert ask(43) != alone
    # one choice with seed s + 1 is the second choice of seed s
    assert ask(43, n=1) == [alone[1]] and ask(42, n=1) == [alone[0]]


def test_logprobs_and_top_logprobs_in_openai_shape(served):
    """chat: logprobs=true + top_logprobs=k gives per token the k most likely alternatives, most likely first,
    the greedy token first among them with its own logprob; completions: logprobs=k gives {token: logprob} dicts
    holding the sampled token."""
    srv, dec = served
    c = srv.client()
    msgs = [{"role": "user", "content": "Where does Kalo live?"}]
    r = c.chat.completions.create(
        model="ivl", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        alts = t.top_logprobs
        assert len(alts) == 4 and [a.logprob for a in alts] == sorted((a.logprob for a in alts), reverse=True)
        assert alts[0].token == t.token and abs(alts[0].logprob - t.logprob) < 1e-5
        assert sum(2.718281828**a.logprob for a in alts) <= 1 + 1e-4
        assert alts[0].bytes == list(alts[0].token.encode())
    # streamed: the same alternatives, chunk by chunk
    chunks = c.chat.completions.create(
        model="ivl", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4, stream=True
    )
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [[a.token for a in t.top_logprobs] for t in content]
    r = c.completions.create(model="ivl", prompt="def main", max_tokens=5, temperature=0.9, seed=1, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) == len(lp.token_logprobs)
    for tok_s, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # up to k + 1 entries; fewer when alternatives decode to the same text (byte tokens: "\ufffd")
        assert tok_s in top and abs(top[tok_s] - tok_lp) < 1e-5 and 1 <= len(top) <= 3
    status, err = _error(srv, "/v1/chat/completions", {"model": "ivl", "messages": msgs, "top_logprobs": 2})
    assert status == 400 and err["param"] == "top_logprobs"
    status, err = _error(
        srv, "/v1/chat/completions", {"model": "ivl", "messages": msgs, "logprobs": True, "top_logprobs": 21}
    )
    assert status == 400 and err["param"] == "top_logprobs"


@pytest.mark.parametrize("budget", [None, 14])
def test_max_num_batched_tokens_bounds_each_steps_tokens(pair, budget):
    """--max-num-batched-tokens: one token per running row + the prompt tokens admitted before a step stay within
    the budget (a request alone may exceed it: prompts are not split); without it a burst is admitted at once.
    Every answer is still its own."""
    import asyncio

    from ivl_fast.sampling import SamplingParams
    from ivl_fast.serve.scheduler import Finished, Scheduler, SequenceRequest

    dec = FastIVLDecoder.from_pretrained(pair[2], pair[3])
    sched = Scheduler(dec, max_batch_size=4, max_model_len=64, max_queue=8, max_num_batched_tokens=budget)
    prompts = [dec.tokenizer(p)["input_ids"] for p in PROMPTS]
    admitted = []
    admit = sched.batch.admit_many

    def spy(reqs):
        admitted.append((sched.running, [len(r.prompt_ids) for r in reqs]))
        return admit(reqs)

    sched.batch.admit_many = spy

    async def run():
        loop = asyncio.get_running_loop()
        seqs = [sched.submit(SequenceRequest(p, 5, SamplingParams(False)), loop) for p in prompts]
        sched.start()
        out = []
        for s in seqs:
            toks = []
            while not isinstance(ev := await s.events.get(), Finished):
                toks += ev.token_ids
            out.append(toks)
        return out

    try:
        got = asyncio.run(run())
    finally:
        sched.shutdown(timeout=5)
    want = [dec.generate([p], max_new_tokens=5, eos_token_id=[]).sequences[0, len(p) :].tolist() for p in prompts]
    assert got == want
    if budget is None:
        assert admitted[0][1] == [len(p) for p in prompts[:4]]  # the burst at once (4 slots)
    else:
        assert len(admitted) > 2
        for running, lens in admitted:
            assert len(lens) == 1 or running + sum(lens) <= budget, admitted
