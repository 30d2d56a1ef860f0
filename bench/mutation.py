"""Mutation testing of the code the decode core and training rest on: does the suite fail when the code changes?

Not part of CI (it runs the selected tests once per mutant: tens of minutes on 2 cores). mutmut 2 rewrites a
source file in place for each mutant (and restores it), so run it in a scratch checkout, never in a working tree
you are editing:

    git worktree add --detach /tmp/ivl-mut HEAD && cd /tmp/ivl-mut
    python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 triton==3.7.1 "setuptools>=70.1" wheel \\
        && .venv/bin/pip install --no-build-isolation -e ".[test]" && .venv/bin/pip install mutmut==2.5.1 whatthepatch
    .venv/bin/python bench/mutation.py [TARGET ...] [--out bench/results/mutation.json]

Each target names the lines to mutate (whole files, or the functions that make up the decode step and the
training loss and schedule) and the tests that cover them. mutmut mutates only those lines (a patch file that
"adds" exactly them is written for ``--use-patch-file``) and runs the target's tests against every mutant, stopping
at the first failure. A mutant is killed when a test fails, survives when all pass, and times out when the tests
run past mutmut's limit (an infinite loop: counted as detected). The results JSON holds, per target, the counts,
the kill rate (killed + timeout over all tested) and every survivor's diff with the judgement recorded for it in
bench/mutation_judgements.json (why a survivor is equivalent, or which test should have caught it).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PYTEST_ARGS = "-x -q -p no:cacheprovider"

# the slowest distribution tests of the samplers (9-13 s each): the same warpers are checked by faster cases
SLOW_SAMPLER_TESTS = [
    "--deselect",
    "tests/test_combine_and_sample.py::test_distribution_through_a_vocab_map",
    "--deselect",
    "tests/test_combine_and_sample.py::test_distribution_v111[temperature=1.0,top_p=0.8]",
]

# name -> files to mutate ({path: None for every line, or the functions "Class.method" / "function"}) and tests
TARGETS: dict[str, dict] = {
    "sampling": {
        "scope": {"ivl_fast/sampling.py": {"names": None, "line_fraction": 0.4}},
        "tests": ["tests/test_sampling.py", "tests/test_combine_and_sample.py", *SLOW_SAMPLER_TESTS],
    },
    "combine_and_sample": {
        "scope": {
            "ivl_fast/ops/combine_and_sample.py": {"names": None, "line_fraction": 0.4},
            "ivl_fast/ops/_backend.py": {"names": None, "line_fraction": 0.4},
            # the kernel and its launcher (_aot_spec is the ahead-of-time build for GPUs, tests/test_kernels_aot.py)
            "kernels/combine_and_sample.py": {
                "names": ["_keys", "_block", "_pick", "_combine_sample_kernel", "launch"],
                "line_fraction": 0.25,
            },
        },
        "tests": ["tests/test_combine_and_sample.py", "tests/test_sampling.py", *SLOW_SAMPLER_TESTS],
    },
    "fused_ce_l1": {
        "scope": {
            "ivl_fast/ops/fused_ce_l1.py": {"names": None, "line_fraction": 0.4},
            "kernels/fused_ce_l1.py": {"names": ["_ce_l1_kernel", "ce_l1_rows"], "line_fraction": 0.4},
        },
        "tests": ["tests/test_fused_ce_l1.py"],
    },
    "decode_step": {
        "scope": {
            "ivl_fast/decoder.py": {
                "names": [
                    "_set_rows",
                    "_Run._kv_len",
                    "_Run._logits",
                    "_Run._sample",
                    "_Run._emit",
                    "_Run._start",
                    "_Run.__iter__",
                    "_Run._check",
                    "_Run._check_stop_strings",
                    "_CrossVocabRun._base_ids",
                    "_CrossVocabRun._logits",
                ],
                "line_fraction": 0.4,
            }
        },
        "tests": ["tests/test_cross_vocab.py", "tests/test_decoder.py"],
    },
    "trainer": {
        "scope": {
            "ivl_fast/train/trainer.py": {
                "names": ["StepPlan", "_lr_lambda", "micro_batch_loss", "_optimizer_step", "_follow_schedule"],
                "line_fraction": 0.6,
            }
        },
        "tests": [
            "tests/test_train_optim.py",
            "tests/test_train.py",
            # two-process DDP/FSDP equality (17 s); DDP's no_sync and gradients stay covered by test_train_runs.py
            "--deselect",
            "tests/test_train.py::test_ddp_and_fsdp_two_processes_equal_one_process_with_same_global_batch",
        ],
    },
}


def _spans(path: Path, names: list[str] | None) -> list[tuple[int, int]]:
    """1-based inclusive line spans of the named functions/classes (decorators included); the whole file if None."""
    src = path.read_text()
    if names is None:
        return [(1, len(src.splitlines()))]
    found: dict[str, tuple[int, int]] = {}

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + node.name
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                found[name] = (first, node.end_lineno)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name + ".")

    visit(ast.parse(src).body, "")
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"{path}: no function or class named {missing}")
    return sorted(found[n] for n in names)


def scope_lines(rel: str, spec) -> list[int]:
    """The 1-based line numbers of ``rel`` in scope: every line (None), the named functions (a list), or a seeded
    sample of the lines of the named functions or of the whole file ({"names": [...] | None, "line_fraction": f})."""
    names, fraction = (spec["names"], spec["line_fraction"]) if isinstance(spec, dict) else (spec, 1.0)
    lines = [n for a, b in _spans(ROOT / rel, names) for n in range(a, b + 1)]
    if fraction < 1.0:
        lines = sorted(random.Random(f"{rel}:{fraction}").sample(lines, round(len(lines) * fraction)))
    return lines


def scope_patch(scope: dict) -> str:
    """A unified diff that adds exactly the lines in scope (mutmut --use-patch-file mutates added lines only)."""
    out = []
    for rel, spec in scope.items():
        text = (ROOT / rel).read_text().splitlines()
        out += [f"diff -u {rel} {rel}", f"--- {rel}", f"+++ {rel}"]  # paths as mutmut names the files
        for n in scope_lines(rel, spec):  # one hunk per line: its new side is that line, added
            out += [f"@@ -{n - 1},0 +{n},1 @@", "+" + text[n - 1]]
    return "\n".join(out) + "\n"


def _statuses(cache: Path) -> list[dict]:
    con = sqlite3.connect(cache)
    rows = con.execute(
        "SELECT m.id, m.status, s.filename, l.line_number, l.line FROM mutant m "
        "JOIN line l ON m.line = l.id JOIN sourcefile s ON l.sourcefile = s.id ORDER BY m.id"
    ).fetchall()
    con.close()
    return [dict(zip(("id", "status", "file", "line_number", "line"), r, strict=True)) for r in rows]


def run_target(name: str, judgements: dict, mutmut: str, time_limit_s: float | None) -> dict:
    spec = TARGETS[name]
    patch = ROOT / f".mutmut-{name}.patch"
    patch.write_text(scope_patch(spec["scope"]))
    cache = ROOT / ".mutmut-cache"
    if cache.exists():
        cache.unlink()  # a cache belongs to one runner command; each target starts fresh
    sock = f"/tmp/ivl-mutation-{os.getpid()}.sock"
    server = subprocess.Popen([sys.executable, str(ROOT / "bench/mutation_forkserver.py"), "serve", sock], cwd=ROOT)
    for _ in range(600):  # wait for the warm process to listen
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    client = f"{sys.executable} {ROOT / 'bench/mutation_forkserver.py'} run {sock} --"
    runner = f"{client} {PYTEST_ARGS} {' '.join(spec['tests'])}"
    cmd = [
        mutmut,
        "run",
        "--paths-to-mutate",
        ",".join(spec["scope"]),
        "--use-patch-file",
        str(patch),
        "--runner",
        runner,
        "--no-progress",
        "--simple-output",
    ]
    t0 = time.time()
    log = open(ROOT / f".mutmut-{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    stopped_early = False
    try:
        proc.wait(timeout=time_limit_s)
    except subprocess.TimeoutExpired:  # stop cleanly: mutmut restores the mutated file on SIGINT
        stopped_early = True
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        server.kill()
        server.wait()
        log.close()
    seconds = time.time() - t0
    if proc.returncode & 1 and not stopped_early:  # bit 1: a fatal error (e.g. the tests fail without mutation)
        raise SystemExit(f"mutmut failed for {name}: see .mutmut-{name}.log")
    rows = _statuses(cache)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    survivors = []
    for r in rows:
        if r["status"] != "bad_survived":
            continue
        diff = subprocess.run([mutmut, "show", str(r["id"])], cwd=ROOT, capture_output=True, text=True).stdout
        key = f"{r['file']}:{r['line'].strip()}"
        survivors.append({**r, "diff": diff, "judgement": judgements.get(key)})
    tested = sum(v for k, v in counts.items() if k in ("ok_killed", "bad_survived", "bad_timeout", "ok_suspicious"))
    detected = counts.get("ok_killed", 0) + counts.get("bad_timeout", 0) + counts.get("ok_suspicious", 0)
    os.replace(cache, ROOT / f".mutmut-cache-{name}")  # kept for `mutmut show`/`html` on this target
    return {
        "files": spec["scope"],
        "tests": spec["tests"],
        "pytest_args": f"{PYTEST_ARGS} {' '.join(spec['tests'])}",
        "mutants": len(rows),
        "counts": counts,
        "kill_rate": detected / tested if tested else None,
        "stopped_at_time_limit": stopped_early,  # then "untested" counts the mutants not reached
        "seconds": seconds,
        "survivors": survivors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=list(TARGETS), help=f"any of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--out", default="bench/results/mutation.json", help="results JSON (merged with an earlier one)")
    ap.add_argument("--time-limit", type=float, default=None, help="minutes per target; then stop and report so far")
    args = ap.parse_args()
    bad = [t for t in args.targets if t not in TARGETS]
    if bad:
        ap.error(f"unknown target(s) {bad}; choose from {list(TARGETS)}")
    mutmut = str(Path(sys.executable).parent / "mutmut")
    jpath = ROOT / "bench/mutation_judgements.json"
    judgements = json.loads(jpath.read_text()) if jpath.exists() else {}
    out = ROOT / args.out
    results = json.loads(out.read_text()) if out.exists() else {}
    from ivl_fast.provenance import provenance

    for name in args.targets:
        res = run_target(name, judgements, mutmut, args.time_limit * 60 if args.time_limit else None)
        limit = f" --time-limit {args.time_limit:g}" if args.time_limit else ""
        res["provenance"] = provenance(f"python bench/mutation.py {name}{limit}")
        results.setdefault("targets", {})[name] = res
        c = res["counts"]
        print(
            f"{name:20s} mutants {res['mutants']:4d}  killed {c.get('ok_killed', 0):4d}  survived "
            f"{c.get('bad_survived', 0):3d}  timeout {c.get('bad_timeout', 0):3d}  "
            f"kill rate {(res['kill_rate'] or 0):.1%}  ({res['seconds'] / 60:.1f} min)",
            flush=True,
        )
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
