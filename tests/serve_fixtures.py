"""What the server tests share: a real `ivl-fast serve` in a thread on a loopback port, and error reads."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import uvicorn

from ivl_fast.cli import build_parser
from ivl_fast.cli.serve import load

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


def _error(srv, path, body, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{srv.url}{path}", json=body, headers=headers, timeout=60)
    return r.status_code, r.json()["error"]


# ------------------------------------------------------- `ivl-fast serve` as its own process, and its drain on SIGTERM
class ServeProcess:
    """`ivl-fast serve` in a process of its own on a port it picks (read from its banner); stderr kept."""

    def __init__(self, pair, *flags):
        import subprocess
        import sys

        _, _, base_dir, value_dir = pair
        cmd = [sys.executable, "-m", "ivl_fast.cli", "serve", "--base", str(base_dir), "--value", str(value_dir),
               "--port", "0", "--served-model-name", "ivl", *map(str, flags)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        banner = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "ivl-fast serve: http://" in line:
                    banner.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            assert banner.wait(120), "".join(self.lines)
            (port,) = re.findall(r"http://127\.0\.0\.1:(\d+)/v1", "".join(self.lines))
            self.url = f"http://127.0.0.1:{port}"
            # the banner comes once the socket listens: the first request is taken, never refused
            assert httpx.get(f"{self.url}/health", timeout=30).status_code == 200
        except BaseException:
            self.kill()
            raise

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()


def long_requests(url, n_queued: int):
    """One long stream and ``n_queued`` long requests behind it (one slot), started in threads -> (the stream's
    lines, the queued requests' (status, body), a thread pool, an event set at the stream's first chunk)."""
    body = {"model": "ivl", "prompt": "def main", "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    first, lines = threading.Event(), []

    def stream():
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    def queued():
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        return r.status_code, r.json()

    pool = ThreadPoolExecutor(n_queued + 1)
    s = pool.submit(stream)
    q = [pool.submit(queued) for _ in range(n_queued)]
    assert first.wait(60)
    # the queued requests taken by the server (waiting for the slot) before the caller signals it: on a loaded machine
    # a POST may still be on its way, and a request the server never took is not the server's to answer
    deadline = time.monotonic() + 60
    while _taken(url) < n_queued + 1:
        assert time.monotonic() < deadline, "the queued requests never reached the server"
        time.sleep(0.05)
    return s, q, lines, pool


def _taken(url) -> float:
    """Completion requests the server has taken (one slot): waiting + decoding + ended (ivl_queue_depth,
    ivl_batch_occupancy, ivl_requests_total of /v1/completions), from /metrics."""
    n = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("ivl_queue_depth ", "ivl_batch_occupancy ")) or (
            line.startswith("ivl_requests_total{") and 'endpoint="/v1/completions"' in line
        ):
            n += float(line.split()[-1])
    return n


def ended_by_one_drain(lines: list[str]) -> bool:
    """The stream ended properly: [DONE] last, after its finish or a 'shutting down' error chunk."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][6:])
    if "error" in last:
        assert last["error"]["code"] == "shutting_down", last
        return True
    assert last["choices"][0]["finish_reason"] == "length", last
    return False


def ended_by_the_drain(stream, queued, lines, timeout: float) -> list[bool]:
    """Whether each request of long_requests was ended by the drain (the stream, then each queued one), each
    checked to have ended properly: finished, or a 503 'shutting_down'."""
    stream.result(timeout=timeout)
    ended = [ended_by_one_drain(lines)]
    for f in queued:
        status, got = f.result(timeout=timeout)
        assert status == 200 or (status == 503 and got["error"]["code"] == "shutting_down"), (status, got)
        ended.append(status == 503)
    return ended
