"""Faults injected into a real server (uvicorn on loopback, the official ``openai`` client): poisoned requests,
failing admissions and rounds, huge and malformed bodies, slow tokenization, clients that leave. Every victim
running beside a fault must finish with exactly the answer it gets alone, and nothing taken is left unanswered."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from cli_fixtures import one_line
from serve_fixtures import ServeProcess, Server, ended_by_one_drain, ended_by_the_drain, long_requests

from ivl_fast import FastIVLDecoder
from ivl_fast.sampling import SamplingParams
from ivl_fast.serve.scheduler import Scheduler
from ivl_fast.serve.sequence import Failed, Finished, SequenceRequest

VICTIMS = ["def main", "The for statement", "import os"]
CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def srv(pair):
    _, _, base_dir, value_dir = pair
    s = Server(
        "--base", base_dir, "--value", value_dir, "--served-model-name", "ivl", "--max-batch-size", 4,
        "--max-model-len", 128,
    )  # fmt: skip
    yield s
    s.stop()


def _complete(srv, prompt, **kw) -> str:
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    r = srv.client().completions.create(model="ivl", prompt=prompt, extra_body={"ignore_eos": True}, **kw)
    return r.choices[0].text


def _stream(srv, prompt, gaps: list | None = None, **kw) -> str:
    """A streamed completion's text; ``gaps`` collects the seconds between its chunks."""
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    out, last = [], time.perf_counter()
    chunks = srv.client().completions.create(
        model="ivl", prompt=prompt, stream=True, extra_body={"ignore_eos": True}, **kw
    )
    for c in chunks:
        now = time.perf_counter()
        if gaps is not None:
            gaps.append(now - last)
        last = now
        out.append(c.choices[0].text)
    return "".join(out)


def _post(srv, path, body: dict):
    """(status, JSON answer); the body as ASCII JSON, so that a lone surrogate travels as its \\ud800 escape."""
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{srv.url}{path}", content=json.dumps(body).encode(), headers=headers, timeout=60)
    return r.status_code, r.json()


@pytest.fixture(scope="module")
def alone(srv):
    """Each victim's answer when it runs alone."""
    return {p: _complete(srv, p) for p in VICTIMS}


def _poisons(vocab: int):
    long_chat = {"messages": CHAT}
    return [
        ("/v1/completions", {"prompt": [1, 2, 999999]}, "prompt"),
        ("/v1/completions", {"prompt": [-1, 5]}, "prompt"),
        ("/v1/completions", {"prompt": [2**70]}, "prompt"),
        ("/v1/completions", {"prompt": [5, vocab]}, "prompt"),  # the vocabulary size itself
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e308}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "alpha": -1e300}, "alpha"),
        ("/v1/completions", {"prompt": "x", "temperature": 1e-50}, "temperature"),
        ("/v1/completions", {"prompt": "\ud800 lone surrogate"}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, None),
        ("/v1/chat/completions", {**long_chat, "alpha": -1e300}, "alpha"),
        ("/v1/chat/completions", {**long_chat, "repetition_penalty": 1e308}, "repetition_penalty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages"),
    ]


def test_poisoned_requests_are_400s_and_the_victims_beside_them_are_exact(srv, alone):
    vocab = srv.scheduler.vocab_size
    poisons = _poisons(vocab)
    with ThreadPoolExecutor(len(VICTIMS) + 2) as pool:
        streams = {p: pool.submit(_stream, srv, p) for p in VICTIMS[:2]}
        plain = pool.submit(_complete, srv, VICTIMS[2])
        results = [_post(srv, path, {"model": "ivl", **body}) for path, body, _ in poisons]
        assert {p: f.result() for p, f in streams.items()} == {p: alone[p] for p in VICTIMS[:2]}
        assert plain.result() == alone[VICTIMS[2]]
    for (path, body, param), (status, got) in zip(poisons, results, strict=True):
        assert status == 400, (path, body, got)
        err = got["error"]
        assert err["type"] == "invalid_request_error" and (param is None or err["param"] == param), (body, err)
    assert srv.scheduler.idle and srv.scheduler.running == 0
    assert _complete(srv, VICTIMS[0]) == alone[VICTIMS[0]]  # and the server goes on


def test_a_top_k_above_any_vocabulary_keeps_every_token(srv):
    # transformers' rule (min(top_k, V)); neither size overflows the batch's buffers
    kw = dict(temperature=1.0, seed=11, max_tokens=12)
    want = _complete(srv, "def main", **kw)
    for top_k in (10**30, 10**400):
        status, got = _post(
            srv,
            "/v1/completions",
            {"model": "ivl", "prompt": "def main", "top_k": top_k, "ignore_eos": True, **kw},
        )
        assert status == 200 and got["choices"][0]["text"] == want, got


def test_malformed_bodies_are_openai_shaped_400s(srv):
    nested = ("[" * 100_000 + "]" * 100_000).encode()
    r = httpx.post(f"{srv.url}/v1/completions", content=nested, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/completions", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def _scheduler(pair, **kw) -> Scheduler:
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    return Scheduler(dec, max_batch_size=4, max_model_len=128, max_queue=16, **kw)


async def _ends(seqs) -> list:
    """The last event of each sequence (Finished or Failed), with the text it streamed."""
    out = []
    for seq in seqs:
        text = []
        while True:
            ev = await asyncio.wait_for(seq.events.get(), timeout=60)
            if isinstance(ev, Failed | Finished):
                out.append((ev, "".join(text)))
                break
            text.append(ev.text)
    return out


def _request(tok, prompt: str, n: int = 16) -> SequenceRequest:
    return SequenceRequest(tok(prompt)["input_ids"], n, SamplingParams(), None, stop_token_ids=frozenset())


def test_a_request_whose_admission_fails_fails_alone_in_the_same_step(pair, monkeypatch):
    """Three sequences queued before the worker starts are taken in one step; the admission of one of them fails
    (a fault injected into the prefill): it alone gets the error, the other two decode exactly as alone."""
    _, _, base_dir, value_dir = pair
    alone = FastIVLDecoder.from_pretrained(base_dir, value_dir)  # not the scheduler's: its batch owns the caches
    want = {p: alone.generate_text(p, max_new_tokens=16, eos_token_id=[]) for p in VICTIMS[:2]}
    sched = _scheduler(pair)
    tok = sched.tokenizer
    poisoned_ids = tok("import os")["input_ids"]
    real_admit = type(sched.batch)._admit
    calls = []

    def admit(self, slots, prompt, mask, requests):
        calls.append(len(slots))
        if isinstance(requests, list) and any(list(r.prompt_ids) == poisoned_ids for r in requests):
            raise RuntimeError("injected: the prefill failed")
        return real_admit(self, slots, prompt, mask, requests)

    monkeypatch.setattr(type(sched.batch), "_admit", admit)

    async def run():
        loop = asyncio.get_running_loop()
        seqs = [sched.submit(_request(tok, p), loop) for p in (VICTIMS[0], "import os", VICTIMS[1])]
        sched.start()
        try:
            return await _ends(seqs)
        finally:
            sched.shutdown(timeout=5)

    (a, ta), (bad, _), (b, tb) = asyncio.run(run())
    assert calls[0] == 3, calls  # all three in one prefill first; then one at a time
    assert isinstance(bad, Failed) and bad.status == 500 and "injected" in str(bad.error)
    assert isinstance(a, Finished) and isinstance(b, Finished)
    assert (ta, tb) == (want[VICTIMS[0]], want[VICTIMS[1]])


def test_a_failing_round_answers_its_rows_and_the_server_goes_on(srv, alone, monkeypatch):
    batch = srv.scheduler.batch
    real_step = type(batch).step
    fail = threading.Event()

    def step(self):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected: the round failed")
        return real_step(self)

    monkeypatch.setattr(type(batch), "step", step)
    fail.set()
    with pytest.raises(openai.InternalServerError, match="injected"):
        _complete(srv, VICTIMS[0])
    assert srv.scheduler.running == 0
    assert _complete(srv, VICTIMS[0]) == alone[VICTIMS[0]]


def test_a_body_over_the_limit_is_413_at_once_and_streams_go_on(pair):
    _, _, base_dir, value_dir = pair
    s = Server("--base", base_dir, "--value", value_dir, "--served-model-name", "ivl", "--max-model-len", 128,
               "--max-body-bytes", 100_000)  # fmt: skip
    try:
        want = _complete(s, VICTIMS[0], max_tokens=40)
        with ThreadPoolExecutor(2) as pool:
            victim = pool.submit(_stream, s, VICTIMS[0], max_tokens=40)
            t0 = time.perf_counter()
            status, got = _post(s, "/v1/completions", {"model": "ivl", "prompt": "x" * 10_000_000})
            took = time.perf_counter() - t0
            assert victim.result() == want
        assert status == 413 and got["error"]["code"] == "too_large", got
        assert took < 5, took
        # under the body limit but longer than the context can hold whatever it tokenizes to: refused untokenized
        status, got = _post(s, "/v1/completions", {"model": "ivl", "prompt": "ab " * 30_000})
        assert status == 400 and "characters" in got["error"]["message"] and got["error"]["param"] == "prompt"
    finally:
        s.stop()


def test_tokenizing_a_long_prompt_never_stalls_the_other_streams(srv, alone, monkeypatch):
    """A tokenization made to take 1.5 s (a fault injected into the tokenizer) runs off the event loop: a stream
    running meanwhile keeps getting its chunks."""
    tok_cls = type(srv.scheduler.tokenizer)
    real_call = tok_cls.__call__

    def slow_call(self, text, *a, **k):
        if isinstance(text, str) and text.startswith("SLOW"):
            time.sleep(1.5)
        return real_call(self, text, *a, **k)

    monkeypatch.setattr(tok_cls, "__call__", slow_call)
    gaps = []
    with ThreadPoolExecutor(2) as pool:
        victim = pool.submit(_stream, srv, VICTIMS[1], gaps, max_tokens=100)
        time.sleep(0.2)
        slow = pool.submit(_complete, srv, "SLOW prompt", max_tokens=2)
        assert slow.result() is not None
        text = victim.result()
    assert text.startswith(alone[VICTIMS[1]])
    assert max(gaps[1:]) < 1.0, max(gaps[1:])  # a blocked event loop would hold a chunk back for 1.5 s


def test_a_non_streaming_client_that_leaves_cancels_its_request(srv, monkeypatch):
    batch = srv.scheduler.batch
    real_step = type(batch).step

    def slow_step(self):  # 20 ms a round: 100 tokens would take 2 s
        time.sleep(0.02)
        return real_step(self)

    monkeypatch.setattr(type(batch), "step", slow_step)
    tokens = srv.scheduler.metrics.tokens
    before = tokens._value.get()
    body = {"model": "ivl", "prompt": "def main", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 1.5
    while srv.scheduler.running:
        assert time.monotonic() < deadline, "the request kept decoding after its client left"
        time.sleep(0.02)
    assert tokens._value.get() - before < 100
    deadline = time.monotonic() + 5  # the handler counts it once its cancellation reaches it
    while 'ivl_requests_total{endpoint="/v1/completions",status="499"}' not in httpx.get(f"{srv.url}/metrics").text:
        assert time.monotonic() < deadline, "the cancelled request was never counted"
        time.sleep(0.05)


def test_metrics_count_each_request_when_it_ends_with_its_status(srv, monkeypatch):
    import ivl_fast.serve.routes as routes_mod

    def count(status):
        for line in httpx.get(f"{srv.url}/metrics").text.splitlines():
            if line.startswith(f'ivl_requests_total{{endpoint="/v1/completions",status="{status}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = {s: count(s) for s in ("200", "400", "500")}
    _complete(srv, "hi", max_tokens=2)
    _post(srv, "/v1/completions", {"model": "ivl", "prompt": [999999]})

    def crash(*a, **k):
        raise KeyError("injected handler crash")

    monkeypatch.setattr(routes_mod, "completion_logprobs", crash)
    status, got = _post(srv, "/v1/completions", {"model": "ivl", "prompt": "hi", "max_tokens": 2, "logprobs": 1})
    assert status == 500 and got["error"]["type"] == "server_error" and "injected" in got["error"]["message"]
    after = {s: count(s) for s in ("200", "400", "500")}
    assert {s: after[s] - before[s] for s in after} == {"200": 1, "400": 1, "500": 1}


def test_adapter_models_are_refused_when_the_server_starts(save_checkpoint, capsys):
    """A transformers-adapter model (GPT-2 here) cannot take requests into a continuous batch: `serve` says so on
    one line and exits 2 (it used to answer /health and hang every completion)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ivl_fast.cli import main

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    d = save_checkpoint(gpt2, "gpt2_serve")
    capsys.readouterr()
    rc = main(["serve", "--base", str(d), "--value", str(d), "--port", "0"])
    err = capsys.readouterr().err
    one_line(rc, err, "lean engine", "GPT2LMHeadModel")
    assert "http://" not in err


def test_serve_with_a_draft_starts_with_its_default_flags(pair, save_checkpoint):
    """The default --max-model-len leaves the draft's look-ahead free (it used to ask for the whole context)."""
    from conftest import build_model

    from ivl_fast.cli import build_parser
    from ivl_fast.cli.serve import load

    _, _, base_dir, value_dir = pair
    draft = save_checkpoint(build_model("llama", seed=3, num_hidden_layers=1), "draft_serve")
    args = build_parser().parse_args(["serve", "--base", str(base_dir), "--value", str(value_dir), "--draft",
                                      str(draft)])  # fmt: skip
    sched, _ = load(args)
    assert sched.max_model_len == sched.dec.max_batch_len < sched.dec.max_context


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--drain-timeout", "-1"], "--drain-timeout"),
        (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'"),
    ],
)
def test_bad_server_flags_are_one_line(pair, capsys, flags, message):
    from ivl_fast.cli import main

    _, _, base_dir, value_dir = pair
    rc = main(["serve", "--base", str(base_dir), "--value", str(value_dir), *flags])
    one_line(rc, capsys.readouterr().err, message)


def test_a_busy_port_is_one_line_before_any_banner(pair, capsys):
    import socket

    from ivl_fast.cli import main

    _, _, base_dir, value_dir = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = main(["serve", "--base", str(base_dir), "--value", str(value_dir), "--port", str(port)])
    err = capsys.readouterr().err
    one_line(rc, err, f"--port {port}: cannot bind")
    assert "http://" not in err


def test_stream_options_must_be_a_bool(srv):
    body = {"model": "ivl", "prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}
    status, got = _post(srv, "/v1/completions", body)
    assert status == 400 and got["error"]["param"] == "stream_options"
    body["stream_options"]["include_usage"] = True
    r = httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 2


# ----------------------------------------------------------------------------- SIGTERM, as its own process
def test_sigterm_with_a_poisoned_request_in_flight_drains_by_its_deadline_and_exits_0(pair):
    import os
    import signal

    # a drain far shorter than 750 tokens take on one slot, even on an idle machine (test_faults_scheduler's note)
    srv = ServeProcess(pair, "--max-batch-size", 1, "--max-model-len", 256, "--drain-timeout", 0.05)
    try:
        stream, queued, lines, pool = long_requests(srv.url, 2)
        poisoned = httpx.post(f"{srv.url}/v1/completions", json={"model": "ivl", "prompt": [1, 2, 999999]})
        assert poisoned.status_code == 400
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0, "".join(srv.lines)
        took = time.monotonic() - t0
        ended = ended_by_the_drain(stream, queued, lines, 30)
        assert any(ended), "750 tokens on one slot cannot all finish in a 0.05 s drain"
        assert took < 10, took
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=2)
        assert "Traceback" not in "".join(srv.lines)
        pool.shutdown()
    finally:
        srv.kill()


def test_a_second_sigterm_ends_the_drain_at_once(pair):
    import os
    import signal

    srv = ServeProcess(pair, "--max-batch-size", 1, "--max-model-len", 256, "--drain-timeout", 60)
    try:
        stream, queued, lines, pool = long_requests(srv.url, 2)
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0, "".join(srv.lines)
        assert time.monotonic() - t0 < 10  # not the 60 s drain
        stream.result(timeout=30)
        statuses = [f.result(timeout=30)[0] for f in queued]
        assert ended_by_one_drain(lines) or 503 in statuses, statuses
        pool.shutdown()
    finally:
        srv.kill()
