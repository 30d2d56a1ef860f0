"""Load on `ivl-fast serve` (CPU, the demo's large base + value network): 64 concurrent streaming clients, each
sending several chat requests, against the same requests sent one at a time, on loopback; the server runs in its
own process, the clients in this one (asyncio + httpx). Every answer is checked against the decoder's own greedy
answer for that question (nothing lost or mixed up). Reported: throughput (generated tokens/s over the wall time,
the tokens counted by the server's `usage`), time to first token and per-token latency p50 / p99, for both runs.

Per-token latency is the gap between consecutive tokens of a stream: the server sends one chunk per decoded token,
also for a token whose text is empty (the demo's models emit runs of `</s>` once EOS is ignored), and every stream
is checked to carry exactly `max_tokens` token chunks. The gaps between chunks with visible text are reported too
("per_text_chunk_ms"): they span the empty tokens, so they measure the model's output as much as the server.

    IVL_DEMO_DIR=ivl-demo IVL_BENCH_OUT=bench/results/serve_cpu.json \
        pytest -q -p no:cacheprovider bench/test_serve.py -s

Bounded: IVL_SERVE_CLIENTS (default 64) clients x IVL_SERVE_REQUESTS (default 3) requests of IVL_SERVE_TOKENS (default
32) tokens each (EOS ignored, so every answer has the same length), a 600 s limit. The server's admission:
IVL_SERVE_PREFILL_TOKENS (--max-prefill-tokens, default 256), IVL_SERVE_BATCHED_TOKENS (a comma list of
--max-num-batched-tokens settings, each measured with its own server: default "none,80").
Goal (issue #17): >= 4x the one-at-a-time throughput at 64 clients, with per-token p99 <= 3x its p50.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_results, spread

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

CLIENTS = int(os.environ.get("IVL_SERVE_CLIENTS", "64"))
REQUESTS = int(os.environ.get("IVL_SERVE_REQUESTS", "3"))
TOKENS = int(os.environ.get("IVL_SERVE_TOKENS", "32"))
PREFILL = int(os.environ.get("IVL_SERVE_PREFILL_TOKENS", "256"))  # the server's --max-prefill-tokens
# the server's --max-num-batched-tokens settings measured one after the other ("none": no per-step token bound,
# --max-prefill-tokens alone)
BATCHED = [
    None if b.strip() == "none" else int(b) for b in os.environ.get("IVL_SERVE_BATCHED_TOKENS", "none,80").split(",")
]
RUNS = int(os.environ.get("IVL_SERVE_RUNS", "3"))  # each run: the sequential pass, then the concurrent one


def _demo_dir() -> Path:
    from ivl_fast.demo import DemoConfig, run_demo

    work = Path(os.environ.get("IVL_DEMO_DIR", "ivl-demo"))
    if not (work / "results.json").is_file():
        run_demo(DemoConfig(work_dir=str(work)))
    return work


def _questions() -> list[str]:
    from ivl_fast.demo import DemoConfig, make_world

    world = make_world(DemoConfig().n_people, 0)
    return [f"Where does {p} live?" for p in world["eval_people"]] + [
        f"What color does {p} like?" for p in world["eval_people"]
    ]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _ask(client, url: str, question: str) -> dict:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    stamps, text_stamps, text, usage = [], [], [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if not chunk["choices"]:
                continue
            delta = chunk["choices"][0]["delta"]
            if "role" in delta or "content" not in delta:  # the opening chunk, or the one with the finish reason
                continue
            stamps.append(now)  # one chunk per decoded token, its text possibly empty
            if delta["content"]:
                text_stamps.append(now)
                text.append(delta["content"])
    assert len(stamps) == TOKENS == usage["completion_tokens"], (len(stamps), usage)
    return {"question": question, "text": "".join(text), "t0": t0, "stamps": stamps, "text_stamps": text_stamps}


async def _run(url: str, jobs: list[list[str]]) -> tuple[list[dict], float]:
    """Each inner list is one client's requests, sent one after the other; the clients run at once."""
    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one_client(qs):
            return [await _ask(client, url, q) for q in qs]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(qs) for qs in jobs))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def _gaps(results: list[dict], key: str) -> list[float]:
    return [1e3 * (b - a) for r in results for a, b in zip(r[key], r[key][1:], strict=False)]


def _stats(results: list[dict], wall: float) -> dict:
    ttft = [1e3 * (r["stamps"][0] - r["t0"]) for r in results]
    gaps, text_gaps = _gaps(results, "stamps"), _gaps(results, "text_stamps")
    tokens = sum(len(r["stamps"]) for r in results)
    return {
        "requests": len(results),
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": _pct(ttft, 0.5), "p99": _pct(ttft, 0.99), "mean": statistics.mean(ttft)},
        "per_token_ms": {"p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99), "mean": statistics.mean(gaps)},
        "per_text_chunk_ms": {
            "p50": _pct(text_gaps, 0.5),
            "p99": _pct(text_gaps, 0.99),
            "mean": statistics.mean(text_gaps),
        },
    }


def _start_server(work: Path, batched: int | None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "ivl_fast.cli",
        "serve",
        "--base",
        str(work / "large"),
        "--value",
        str(work / "value"),
        "--served-model-name",
        "demo",
        "--port",
        str(port),
        "--max-batch-size",
        str(CLIENTS),
        "--max-model-len",
        "256",
        "--device",
        "cpu",
        "--max-prefill-tokens",
        str(PREFILL),
    ] + ([] if batched is None else ["--max-num-batched-tokens", str(batched)])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def _figures(run: dict, want: dict) -> dict:
    figures = {}
    for name, (results, wall) in run.items():
        assert len(results) == CLIENTS * REQUESTS
        wrong = [r["question"] for r in results if r["text"] != want[r["question"]]]
        assert not wrong, f"{name}: {len(wrong)} answers differ from the decoder's, e.g. {wrong[:3]}"
        figures[name] = _stats(results, wall)
    seq, con = figures["sequential"], figures["concurrent"]
    figures["throughput_ratio"] = con["tokens_per_s"] / seq["tokens_per_s"]
    figures["per_token_p99_over_p50"] = con["per_token_ms"]["p99"] / con["per_token_ms"]["p50"]
    return figures


def _summary(per_run: list[dict]) -> dict:
    def over_runs(*path):
        vals = []
        for f in per_run:
            for k in path:
                f = f[k]
            vals.append(f)
        return spread(vals)

    return {
        "runs": per_run,
        "summary": {
            name: {
                "tokens_per_s": over_runs(name, "tokens_per_s"),
                "ttft_ms_p50": over_runs(name, "ttft_ms", "p50"),
                "ttft_ms_p99": over_runs(name, "ttft_ms", "p99"),
                "per_token_ms_p50": over_runs(name, "per_token_ms", "p50"),
                "per_token_ms_p99": over_runs(name, "per_token_ms", "p99"),
                "per_text_chunk_ms_p50": over_runs(name, "per_text_chunk_ms", "p50"),
                "per_text_chunk_ms_p99": over_runs(name, "per_text_chunk_ms", "p99"),
            }
            for name in ("sequential", "concurrent")
        },
        "throughput_ratio": over_runs("throughput_ratio"),
        "per_token_p99_over_p50": over_runs("per_token_p99_over_p50"),
    }


def test_serve_load_cpu(benchmark):
    from ivl_fast import FastIVLDecoder

    work = _demo_dir()
    questions = _questions()
    jobs = [[questions[(c * REQUESTS + i) % len(questions)] for i in range(REQUESTS)] for c in range(CLIENTS)]
    flat = [q for qs in jobs for q in qs]
    dec = FastIVLDecoder.from_pretrained(work / "large", work / "value", device="cpu")
    want = {
        q: dec.generate_text([{"role": "user", "content": q}], chat=True, max_new_tokens=TOKENS, eos_token_id=[])
        for q in set(flat)
    }
    settings: list[dict] = []

    def measure_all():
        for batched in BATCHED:
            proc, url = _start_server(work, batched)
            try:
                asyncio.run(_run(url, [[questions[0]]] * 4))  # warm-up
                runs = []
                for _ in range(RUNS):
                    run = {
                        "sequential": asyncio.run(_run(url, [flat])),  # one client: one request at a time
                        "concurrent": asyncio.run(_run(url, jobs)),
                    }
                    runs.append(_figures(run, want))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            for f in runs:
                s_, c_ = f["sequential"], f["concurrent"]
                print(
                    f"\n--max-num-batched-tokens {batched}: one at a time {s_['tokens_per_s']:.0f} tokens/s, "
                    f"concurrent {c_['tokens_per_s']:.0f} tokens/s ({f['throughput_ratio']:.2f}x), ttft p50 "
                    f"{c_['ttft_ms']['p50']:.1f} ms p99 {c_['ttft_ms']['p99']:.1f} ms, per token p50 "
                    f"{c_['per_token_ms']['p50']:.2f} ms p99 {c_['per_token_ms']['p99']:.2f} ms "
                    f"(p99/p50 {f['per_token_p99_over_p50']:.2f}); between chunks with text p99 "
                    f"{c_['per_text_chunk_ms']['p99']:.2f} ms"
                )
            settings.append({"max_num_batched_tokens": batched, **_summary(runs)})

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    save_results(
        {
            "benchmark": "ivl-fast serve under load: concurrent streaming clients vs one request at a time",
            "config": {
                "models": "the demo's large 4x128 base + value 2x64 (ivl-fast demo, seed 0), fp32, CPU",
                "clients": CLIENTS,
                "requests_per_client": REQUESTS,
                "tokens_per_request": TOKENS,
                "max_batch_size": CLIENTS,
                "max_prefill_tokens": PREFILL,
                "workload": "chat, greedy, EOS ignored, the demo's held-out questions",
                "server_and_clients": "two processes on the same machine, loopback",
            },
            "settings": settings,
            "every_answer_checked": True,
        }
    )
