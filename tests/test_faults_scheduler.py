"""Whatever fails inside the scheduler, every request it took off the queue gets an answer (never silence): faults
injected into a real in-process server (uvicorn on loopback) while a burst of clients is in flight — every admission
failing, a whole admission round failing, every check failing, every round failing, and the worker thread itself
breaking — each client, streaming or not, completions or chat, n > 1 or not, gets an error within a few seconds,
and the server goes on (or, when its worker is gone, refuses at once with a 503 and /health says so). Then SIGINT
(Ctrl-C) stops a real `ivl-fast serve` process with requests in flight (SIGTERM: tests/test_faults_server.py), and a
real process refuses a transformers-adapter model on one line before loading it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_fixtures import Server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SETTLE_S = 10.0  # every client answered within this (a tiny model on 2 shared cores; the answers take well under 1 s)


@pytest.fixture(scope="module")
def dirs(pair):
    return pair[2], pair[3]


def _server(dirs) -> Server:
    return Server(
        "--base", dirs[0], "--value", dirs[1], "--served-model-name", "ivl", "--max-batch-size", 2,
        "--max-model-len", 128,
    )  # fmt: skip


@pytest.fixture(scope="module")
def srv(dirs):
    s = _server(dirs)
    yield s
    s.stop()


# the burst: more sequences than slots (2), so some wait in the queue when the fault hits
def _jobs():
    comp = {"model": "ivl", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    chat = {"model": "ivl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "ignore_eos": True}
    return [
        ("/v1/completions", {**comp, "prompt": "def main"}),
        ("/v1/completions", {**comp, "prompt": "import os"}),
        ("/v1/completions", {**comp, "prompt": "class A:", "n": 2, "temperature": 0.8, "seed": 1}),
        ("/v1/completions", {**comp, "prompt": "The for statement", "stream": True}),
        ("/v1/completions", {**comp, "prompt": ["while True", "return x"]}),
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True, "n": 2}),
    ]


def _ask(url: str, path: str, body: dict) -> tuple[int, list[dict]]:
    """(status, [error objects]) of one request: the body's error, or the error chunks of a stream (which must end
    with [DONE])."""
    if not body.get("stream"):
        r = httpx.post(f"{url}{path}", json=body, timeout=SETTLE_S + 20)
        got = r.json()
        return r.status_code, [got["error"]] if "error" in got else []
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=SETTLE_S + 20) as r:
        lines = [ln for ln in r.iter_lines() if ln]
        status = r.status_code
    if status != 200:
        return status, [json.loads("".join(lines))["error"]]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    return status, [c["error"] for c in chunks if "error" in c]


def _burst(url: str) -> list[tuple[int, list[dict]]]:
    """Every job at once; asserts they are all answered within SETTLE_S seconds."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(_jobs())) as pool:
        results = list(pool.map(lambda job: _ask(url, *job), _jobs()))
    took = time.monotonic() - t0
    assert took < SETTLE_S, f"the burst took {took:.1f} s to be answered"
    return results


def _assert_every_client_failed(results, needle: str, status: int | tuple = 500) -> None:
    """Every client got an error naming ``needle``; a non-streaming one with ``status`` (one of them, a tuple)."""
    allowed = status if isinstance(status, tuple) else (status,)
    for (path, body), (code, errors) in zip(_jobs(), results, strict=True):
        where = f"{path} {body.get('prompt', 'chat')!r} stream={body.get('stream', False)}"
        assert errors, f"{where}: answered {code} without an error"
        if not body.get("stream"):
            assert code in allowed, (where, code, errors)
        for e in errors:
            assert needle in e["message"], (where, e)


def _assert_goes_on(srv) -> None:
    """The fault removed: the server answers, and nothing is left running or waiting."""
    deadline = time.monotonic() + 5
    while not (srv.scheduler.idle and srv.scheduler.running == 0):
        assert time.monotonic() < deadline, "sequences left in the batch after the fault"
        time.sleep(0.02)
    code, errors = _ask(srv.url, "/v1/completions", {"model": "ivl", "prompt": "def main", "max_tokens": 4})
    assert code == 200 and not errors
    assert httpx.get(f"{srv.url}/health").status_code == 200


def _boom(*args, **kwargs):
    raise RuntimeError("injected fault")


def test_every_admission_failing_answers_every_client(srv, monkeypatch):
    """admit_many fails for every request (the scheduler's one-at-a-time retry fails too): each client gets a 500
    (a stream: its error chunk, then [DONE])."""
    monkeypatch.setattr(type(srv.scheduler.batch), "admit_many", _boom)
    _assert_every_client_failed(_burst(srv.url), "injected fault")
    monkeypatch.undo()
    _assert_goes_on(srv)


def test_a_whole_admission_round_failing_answers_every_client(srv, monkeypatch):
    """The scheduler's admission of a round fails as a whole, outside the batch's admit_many (no per-request retry
    there): every sequence taken off the queue in that round is answered, round after round."""
    monkeypatch.setattr(srv.scheduler, "_admit", _boom)
    _assert_every_client_failed(_burst(srv.url), "injected fault")
    monkeypatch.undo()
    _assert_goes_on(srv)


def test_every_request_check_failing_answers_every_client(srv, monkeypatch):
    monkeypatch.setattr(type(srv.scheduler.batch), "check_request", _boom)
    _assert_every_client_failed(_burst(srv.url), "injected fault")
    monkeypatch.undo()
    _assert_goes_on(srv)


def test_every_round_failing_answers_every_client(srv, monkeypatch):
    """Admission works, every decode round fails: each admitted row is failed by its first round, and the waiting
    ones are admitted and failed in turn."""
    monkeypatch.setattr(type(srv.scheduler.batch), "step", _boom)
    _assert_every_client_failed(_burst(srv.url), "injected fault")
    monkeypatch.undo()
    _assert_goes_on(srv)


class WorkerBug(BaseException):
    """Not an Exception: escapes the per-round handler, as a bug in the worker loop itself would."""


def test_a_broken_worker_answers_everything_and_refuses_from_then_on(dirs, monkeypatch):
    """The worker thread itself breaks mid-round with rows running and others queued: every client gets a 500 naming
    it; from then on a request is refused at once (503, not queued forever), and /health answers 503."""
    srv = _server(dirs)  # its own: this one's worker does not come back
    try:
        sched = srv.scheduler
        real_round = type(sched)._round

        def round_(self):
            if self.running == 2 and not self._waiting.empty():  # both slots busy, requests waiting: break now
                raise WorkerBug("injected worker bug")
            return real_round(self)

        monkeypatch.setattr(sched, "_round", round_.__get__(sched))
        results = _burst(srv.url)
        # a request the worker held (running or queued) gets a 500; one whose POST arrived after the worker broke
        # (a loaded machine delays some of the burst) a 503 at once: both name the bug
        _assert_every_client_failed(results, "decoding worker stopped (WorkerBug: injected worker bug)", (500, 503))
        assert sum(code != 503 for code, _ in results) >= 2, results  # the two running rows at least were held
        assert isinstance(sched.failed, WorkerBug)
        t0 = time.monotonic()
        code, errors = _ask(srv.url, "/v1/completions", {"model": "ivl", "prompt": "def main", "max_tokens": 4})
        assert code == 503 and errors[0]["code"] == "worker_stopped" and time.monotonic() - t0 < 2, errors
        assert httpx.get(f"{srv.url}/health").status_code == 503
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- SIGINT, as its own process
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_sigint_stops_a_serve_process_with_requests_in_flight(pair, twice):
    """Ctrl-C (SIGINT) drains like SIGTERM: once, the requests in flight get --drain-timeout (0.05 s here) and then
    a 503; twice, they end at once even with a 60 s drain. Either way the process exits 0 within a few seconds, every
    client has its answer, and nothing prints a traceback."""
    import os
    import signal

    from serve_fixtures import ServeProcess, ended_by_the_drain, long_requests

    # NOTE: a 1 s drain was too long: an idle 2-core machine decodes the 1000 tokens of these four requests on one
    # slot within it (seen once in CI), and then nothing is left for the drain to end
    srv = ServeProcess(pair, "--max-batch-size", 1, "--max-model-len", 256, "--drain-timeout", 60 if twice else 0.05)
    try:
        stream, queued, lines, pool = long_requests(srv.url, 3)
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGINT)
        if twice:
            time.sleep(0.2)
            os.kill(srv.proc.pid, signal.SIGINT)
        assert srv.proc.wait(timeout=30) == 0, "".join(srv.lines)
        took = time.monotonic() - t0
        assert took < 8, took
        ended = ended_by_the_drain(stream, queued, lines, 10)
        assert any(ended), "1000 tokens on one slot cannot all finish in a 0.05 s drain"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=2)
        out = "".join(srv.lines)
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
        assert "ivl-fast serve: stopped" in out, out
        pool.shutdown()
    finally:
        srv.kill()


# ----------------------------------------------------------------------------- adapter models, as a real process
def test_a_serve_process_refuses_an_adapter_model_on_one_line(pair, save_checkpoint):
    """GPT-NeoX (no lean engine): `ivl-fast serve` exits 2 with one stderr line naming the flag, the architecture and
    the lean engine, before loading any weights (no fallback notice), and no banner; in-process with GPT-2 as the
    base: tests/test_faults_server.py."""
    import subprocess
    import sys

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    neox = save_checkpoint(GPTNeoXForCausalLM(cfg), "neox_serve")
    cmd = [sys.executable, "-m", "ivl_fast.cli", "serve", "--base", str(pair[2]), "--value", str(neox), "--port", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("ivl-fast serve: error: --value ") and "GPTNeoXForCausalLM" in lines[0], lines
    assert "lean engine" in lines[0] and "http://" not in r.stderr, lines
