"""What the server tests share: a real `ivl-fast serve` in a thread on a loopback port, and error reads."""

from __future__ import annotations

import socket
import threading
import time

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
