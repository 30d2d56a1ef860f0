"""`ivl-fast serve`: a real uvicorn server on loopback, driven with the official `openai` client (and raw HTTP for
the wire format): completions, chat, streaming, concurrency over continuous batching (greedy results equal each
request decoded alone), per-request alpha, the OpenAI error shapes, disconnects, a failing request failing alone,
and /metrics."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_fixtures import PROMPTS, Server, _error  # noqa: E402

from ivl_fast import FastIVLDecoder  # noqa: E402


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
    from lm_eval_tasks import write_tasks

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
