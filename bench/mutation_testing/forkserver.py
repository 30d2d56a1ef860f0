"""A warm process that runs pytest once per mutant: ``serve`` imports torch, transformers and triton once, then
forks a child per request that imports the (mutated) project fresh and runs pytest; ``run`` is the client
(bench/mutation_testing/run.py calls it in-process; the command line form exits with pytest's status).

Why: a fresh interpreter per mutant pays seconds for importing torch + transformers + triton, more than most killed
mutants' tests. The child imports nothing of ivl_fast before the mutant is on disk, so a mutated kernel is compiled
(interpreted) from its mutated source.

    python bench/mutation_testing/forkserver.py serve SOCKET &        # from the checkout under test
    python bench/mutation_testing/forkserver.py run SOCKET -- PYTEST_ARGS...
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def serve(path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import pytest  # noqa: F401  (warm: imported once, shared by every child)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import triton  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: F401

    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        conn, _ = srv.accept()
        req = json.loads(conn.makefile().readline())
        pid = os.fork()
        if pid == 0:  # child: run pytest in the request's directory and report its status
            srv.close()
            os.chdir(req["cwd"])
            sys.path.insert(0, req["cwd"])
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest as pt

            code = int(pt.main(req["args"]))
            conn.sendall(f"{code}\n".encode())
            os._exit(0)
        # parent: if the client goes away first (mutmut's timeout killed it), kill the child too
        conn.setblocking(True)
        import select

        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            r, _, _ = select.select([conn], [], [], 0.05)
            if r and not conn.recv(1, socket.MSG_PEEK):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
        conn.close()


def run(path: str, args: list[str], timeout: float | None = None, cwd: str | None = None) -> int | None:
    """pytest's exit status for ``args``, run by the warm server; None when it ran past ``timeout`` seconds (the
    server then kills the child as soon as this side closes the connection)."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.settimeout(timeout)
    try:
        c.sendall((json.dumps({"cwd": cwd or os.getcwd(), "args": args}) + "\n").encode())
        reply = c.makefile().readline().strip()
    except TimeoutError:
        return None
    finally:
        c.close()
    return int(reply) if reply else 3  # no reply: the child died (pytest's "internal error" status)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("serve", "run"):
        sys.exit("usage: mutation_forkserver.py serve SOCKET | run SOCKET -- PYTEST_ARGS...")
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        rest = sys.argv[3:]
        sys.exit(run(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
