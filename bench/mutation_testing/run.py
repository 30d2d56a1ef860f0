"""Mutation testing of the code the decode core and training rest on: does the suite fail when the code changes?

Not part of CI (it runs the selected tests once per mutant: about an hour on 2 cores). Each mutant is written to
the source file on disk while its tests run (and the file restored after), so run it in a scratch checkout, never
in a working tree you are editing:

    git worktree add --detach /tmp/ivl-mut HEAD && cd /tmp/ivl-mut
    python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 triton==3.7.1 "setuptools>=70.1" wheel \\
        && .venv/bin/pip install --no-build-isolation -e ".[test]" && .venv/bin/pip install mutmut==2.5.1
    .venv/bin/python bench/mutation_testing/run.py [TARGET ...] [--time-limit MIN] [--out bench/results/mutation.json]

Each target names the lines to mutate (whole files, or the functions that make up the decode step and the
training loss and schedule, or a seeded sample of their lines) and the tests that cover them. mutmut's mutation
engine makes the mutants (operators, numbers, comparisons, keywords, strings, arguments: one change each); every
mutant's tests run in a child of a warm process (bench/mutation_testing/forkserver.py) and stop at the first failure. A
mutant is killed when a test fails, survives when all pass, and times out when its tests run past 3x the
unmutated run plus 10 s (a hang: counted as detected). The results JSON holds, per target, the counts, the kill
rate (killed + timed out over all tested), and every mutant's diff and outcome; a survivor carries the judgement
recorded for its line in bench/mutation_testing/judgements.json (why it is equivalent, or which test now catches it).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PYTEST_ARGS = "-x -q -p no:cacheprovider"

# the slowest distribution tests of the samplers (9-13 s each): the same warpers are checked by faster cases
SLOW_SAMPLER_TESTS = [
    "--deselect",
    "tests/test_combine_and_sample.py::test_distribution_through_a_vocab_map",
    "--deselect",
    "tests/test_combine_and_sample.py::test_distribution_v111[temperature=1.0,top_p=0.8]",
]

# the slowest decode tests (5-10 s each): the same paths are driven by faster cases in the selection (the eager
# variant of the seeded-request test stays: it alone checks that a seeded slot draws from its own stream)
SLOW_DECODE_TESTS = [
    "--deselect",
    "tests/test_slots.py::test_a_seeded_request_draws_the_same_tokens_in_any_batch_and_slot[emulate]",
    "--deselect",
    "tests/test_decoder.py::test_decoder_with_the_fused_triton_sampler",
    "--deselect",
    "tests/test_graphs.py::test_emulated_graphs_with_the_fused_triton_sampler_sample_identically",
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
    # the decode core, one target per part (each with the tests of its own interface first: they fail fastest)
    "decode_step": {
        "scope": {
            "ivl_fast/decode/step.py": {
                "names": ["_kw", "_with_terms", "into_slots", "prefill_logits", "decode_logits"]
                + ["_early_eos", "_ban_early_eos", "_records", "_components", "sample", "emit"],
                "line_fraction": 0.5,
            },
        },
        "tests": [
            "tests/test_decode_loop.py",
            "tests/test_generate_transformers_args.py",
            "tests/test_decoder.py",
            "tests/test_slots.py",
            "tests/test_logit_terms.py",
            "tests/test_graphs.py",
            "tests/test_probe.py",
            "tests/test_components.py",
            "tests/test_train.py::test_cascade_schemes_train_and_decode_exactly",  # the cascade schemes' prefill
            *SLOW_DECODE_TESTS,
        ],
    },
    "decode_loop": {
        "scope": {
            "ivl_fast/decode/loop.py": {
                "names": [
                    "DecodeLoop.admit_many",
                    "DecodeLoop._undo_admit",
                    "DecodeLoop._admit",
                    "DecodeLoop.kv_need",
                    "DecodeLoop._emitted",
                    "DecodeLoop.note_rounds",
                    "DecodeLoop._eager_round",
                    "DecodeLoop.__iter__",
                    "DecodeLoop._chunk",
                    "DecodeLoop._replay",
                    "DecodeLoop.check",
                    "DecodeLoop.finish_reasons",
                ],
                "line_fraction": 0.5,
            },
            "ivl_fast/decode/slot_table.py": {"names": None, "line_fraction": 0.6},
        },
        "tests": [
            "tests/test_slot_table.py",
            "tests/test_decode_loop.py",
            "tests/test_generate_transformers_args.py",
            "tests/test_slots.py",
            "tests/test_cross_vocab.py",
            "tests/test_cross_vocab_reads.py",
            "tests/test_decoder.py",
            "tests/test_graphs.py",
            *SLOW_DECODE_TESTS,
        ],
    },
    "speculative": {
        "scope": {
            "ivl_fast/decode/speculative.py": {
                "names": ["distribution", "race", "accept", "_combine", "_per_position", "_penalize"]
                + ["speculative_round", "_emit"],
                "line_fraction": 0.5,
            },
        },
        "tests": ["tests/test_speculative.py"],
    },
    "cross_vocab": {
        "scope": {
            "ivl_fast/decode/cross_vocab.py": {"names": None, "line_fraction": 0.5},
            "ivl_fast/decode/cross_vocab_feed.py": {"names": None, "line_fraction": 0.5},
        },
        "tests": [
            "tests/test_cross_vocab.py",
            "tests/test_cross_vocab_reads.py",
            "tests/test_cross_vocab_scoring.py",
            "tests/test_boundary.py",
            "tests/test_vocab_segment.py",
            "tests/test_special_tokens.py",
        ],
    },
    "scheduler": {
        "scope": {
            "ivl_fast/serve/scheduler.py": {
                "names": [
                    "Scheduler._admit",
                    "Scheduler._admit_checked",
                    "Scheduler._collect",
                    "Scheduler._advance",
                    "Scheduler._send",
                    "Scheduler._finish",
                    "Scheduler._round",
                    "Scheduler._take",
                    "Scheduler._admit_waiting",
                    "Scheduler._retire_cancelled",
                ],
                "line_fraction": 0.5,
            },
        },
        "tests": ["tests/test_scheduler.py", "tests/test_faults_scheduler.py", "tests/test_serve.py"],
    },
    "vocab_push_forward": {
        "scope": {"ivl_fast/vocab/__init__.py": {"names": ["VocabMap.ell", "VocabMap.apply"], "line_fraction": 1.0}},
        "tests": ["tests/test_vocab_map.py", "tests/test_cross_vocab.py", "tests/test_cross_vocab_reads.py"],
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


class _MutmutConfig:
    """What mutmut's mutation engine reads of its config: the lines it may mutate and the mutation types."""

    def __init__(self, covered: dict[str, set[int]]):
        import mutmut

        self.covered_lines_by_filename = covered
        self.dict_synonyms: list[str] = []
        self.mutation_types_to_apply = set(mutmut.mutations_by_type)


def mutants_of(scope: dict) -> tuple[list[tuple[str, object]], dict[str, set[int]]]:
    """(file, mutmut's mutation id) of every mutant in scope, in file and line order, and the lines in scope."""
    from mutmut import Context, list_mutations

    covered = {rel: set(scope_lines(rel, spec)) for rel, spec in scope.items()}
    out = []
    for rel in scope:
        src = (ROOT / rel).read_text()
        out += [(rel, m) for m in list_mutations(Context(source=src, filename=rel, config=_MutmutConfig(covered)))]
    return out, covered


def _diff(rel: str, before: str, after: str) -> str:
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), f"a/{rel}", f"b/{rel}", n=1, lineterm="")
    return "\n".join(lines)


def _start_warm_tests() -> tuple[subprocess.Popen, str]:
    """The warm process that forks a pytest run per request (bench/mutation_testing/forkserver.py), once it listens."""
    sock = f"/tmp/ivl-mutation-{os.getpid()}-{time.monotonic_ns()}.sock"  # a new path per target: the last
    # target's server left its socket file behind, and waiting for a stale file connected to no one
    if os.path.exists(sock):
        os.unlink(sock)
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench/mutation_testing/forkserver.py"), "serve", sock],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    return server, sock


def run_target(name: str, judgements: dict, time_limit_s: float | None, out_path: Path, results: dict) -> dict:
    """Mutate each line in scope with mutmut's mutation engine, one mutant at a time on disk, run the target's
    tests against it (stopping at the first failure) and restore the file. mutmut's own runner and cache are not
    used: mutmut 2.5.1's cache asserts on a line it recorded while that line was mutated (seen here), and its
    runner starts a fresh interpreter per mutant."""
    from forkserver import run as run_tests
    from mutmut import Context, mutate

    spec = TARGETS[name]
    server, sock = _start_warm_tests()
    args = [*PYTEST_ARGS.split(), *spec["tests"]]
    res = {"files": spec["scope"], "tests": spec["tests"], "pytest_args": " ".join(args)}
    try:
        t0 = time.time()
        if run_tests(sock, args, cwd=str(ROOT)) != 0:
            raise SystemExit(f"{name}: the tests fail without any mutation")
        baseline = time.time() - t0
        timeout = 3 * baseline + 10  # a mutant that makes the tests run 3x longer is taken as a hang
        todo, covered = mutants_of(spec["scope"])
        cfg = _MutmutConfig(covered)
        originals = {rel: (ROOT / rel).read_text() for rel in spec["scope"]}
        records, start = [], time.time()
        res.update(baseline_seconds=baseline, timeout_seconds=timeout, mutants=len(todo), records=records)
        for rel, mid in todo:
            rec = {"file": rel, "line_number": mid.line_number, "line": mid.line.strip(), "index": mid.index}
            if time_limit_s is not None and time.time() - start > time_limit_s:
                records.append({**rec, "status": "untested"})
                continue
            mutated, _ = mutate(Context(source=originals[rel], mutation_id=mid, filename=rel, config=cfg))
            (ROOT / rel).write_text(mutated)
            try:
                t1 = time.time()
                rc = run_tests(sock, args, timeout=timeout, cwd=str(ROOT))
            finally:
                (ROOT / rel).write_text(originals[rel])
            status = "timeout" if rc is None else ("survived" if rc == 0 else "killed")
            rec.update(status=status, seconds=round(time.time() - t1, 2), diff=_diff(rel, originals[rel], mutated))
            if status == "survived":
                rec["judgement"] = judgements.get(f"{rel}:{rec['line']}")
            records.append(rec)
            _summarise(res, time.time() - start)
            results.setdefault("targets", {})[name] = res
            out_path.write_text(json.dumps(results, indent=2) + "\n")  # progress survives an interruption
    finally:
        server.kill()
        server.wait()
    _summarise(res, time.time() - start)
    return res


def _summarise(res: dict, seconds: float) -> None:
    counts: dict[str, int] = {}
    for r in res["records"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    tested = sum(v for k, v in counts.items() if k != "untested")
    detected = counts.get("killed", 0) + counts.get("timeout", 0)
    res.update(counts=counts, kill_rate=detected / tested if tested else None, seconds=seconds)
    res["survivors"] = [r for r in res["records"] if r["status"] == "survived"]


def _find_line(source: str, record: dict) -> int:
    """Where a survivor's line is today: its recorded number, or, when code above it moved it, the one line whose
    text is the recorded line's (and whose neighbours the recorded diff shows); SystemExit when it changed or is
    not unique (recheck needs that code)."""
    lines = source.splitlines()
    n = record["line_number"]
    if n < len(lines) and lines[n].strip() == record["line"]:
        return n
    context = [x[1:] for x in record["diff"].splitlines()[3:] if x.startswith(" ")]  # unchanged lines around it
    found = [
        i
        for i, x in enumerate(lines)
        if x.strip() == record["line"] and all(c in lines[max(0, i - 3) : i + 4] for c in context)
    ]
    if len(found) != 1:
        raise SystemExit(f"{record['file']}:{n} changed since the run ({len(found)} places hold its line now)")
    return found[0]


def _hunks(diff: str) -> list[str]:
    """A unified diff without its line numbers (a mutant of a moved line has the same hunks elsewhere)."""
    return [x for x in diff.splitlines() if not x.startswith("@@")]


def recheck(out: Path, only: list[str] | None = None) -> None:
    """Run every survivor in ``out`` again against today's tests (the ones added since the run), each with its
    target's test selection, and record what happens to it as ``recheck`` (killed / survived / timeout).
    ``only``: the targets to recheck (default: every target in ``out``)."""
    from forkserver import run as run_tests
    from mutmut import ALL, Context, RelativeMutationID, mutate

    results = json.loads(out.read_text())
    server, sock = _start_warm_tests()
    try:
        for name, t in results["targets"].items():
            if only and name not in only:
                continue
            args = [*PYTEST_ARGS.split(), *TARGETS[name]["tests"]]
            t0 = time.time()  # today's selection may differ from the run's: its own clean run sets the timeout
            if run_tests(sock, args, cwd=str(ROOT)) != 0:
                raise SystemExit(f"{name}: the tests fail without any mutation")
            t["recheck_timeout_seconds"] = timeout = 3 * (time.time() - t0) + 10
            t["recheck_pytest_args"] = " ".join(args)
            covered = {rel: set(scope_lines(rel, spec)) for rel, spec in TARGETS[name]["scope"].items()}
            cfg = _MutmutConfig(covered)
            for r in t["records"]:
                if r["status"] != "survived":
                    continue
                original = (ROOT / r["file"]).read_text()
                number = _find_line(original, r)
                line = original.splitlines()[number]  # mutmut counts lines from 0
                if number != r["line_number"]:  # code above it moved: the mutant is the same change of that line
                    cfg = _MutmutConfig({**covered, r["file"]: covered.get(r["file"], set()) | {number + 1}})
                mid = RelativeMutationID(line=line, index=r["index"], line_number=number)
                assert mid != ALL
                mutated, _ = mutate(Context(source=original, mutation_id=mid, filename=r["file"], config=cfg))
                if _hunks(_diff(r["file"], original, mutated)) != _hunks(r["diff"]):
                    raise SystemExit(f"{r['file']}:{r['line_number']}: mutant #{r['index']} is not the one recorded")
                r["recheck_line_number"] = number
                (ROOT / r["file"]).write_text(mutated)
                try:
                    rc = run_tests(sock, args, timeout=timeout, cwd=str(ROOT))
                finally:
                    (ROOT / r["file"]).write_text(original)
                r["recheck"] = "timeout" if rc is None else ("survived" if rc == 0 else "killed")
            tested = sum(v for k, v in t["counts"].items() if k != "untested")
            still = sum(r.get("recheck") == "survived" for r in t["records"] if r["status"] == "survived")
            t["kill_rate_after_recheck"] = (tested - still) / tested if tested else None
            from ivl_fast.provenance import provenance

            t["recheck_provenance"] = provenance("python bench/mutation_testing/run.py --recheck")
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{name:20s} survivors {t['counts'].get('survived', 0)} -> {still} after recheck", flush=True)
    finally:
        server.kill()
        server.wait()


def merge(paths: list[str], out: Path) -> None:
    """Several runs' results (e.g. two scratch checkouts run side by side) -> one file; every survivor gets the
    judgement bench/mutation_testing/judgements.json holds for its line now."""
    judgements = json.loads((ROOT / "bench/mutation_testing/judgements.json").read_text())
    merged: dict = {"line_numbers": "mutmut's, counted from 0 (add 1 for an editor's)", "targets": {}}
    for path in paths:
        merged["targets"].update(json.loads(Path(path).read_text())["targets"])
    for t in merged["targets"].values():
        if len(t["records"]) < t["mutants"]:  # a run that ended early (interrupted): the rest were not reached
            t["counts"]["untested"] = t["mutants"] - sum(r["status"] != "untested" for r in t["records"])
            t["ended_early"] = f"interrupted after {len(t['records'])} of {t['mutants']} mutants"
        if "provenance" not in t:  # an interrupted run never wrote its own: its recheck's is the record we have
            t["provenance"] = t["recheck_provenance"]
        for r in t["records"]:
            if r["status"] == "survived":
                r["judgement"] = judgements.get(f"{r['file']}:{r['line']}")
        t["survivors"] = [r for r in t["records"] if r["status"] == "survived"]
        t["unjudged_survivors"] = sum(r["judgement"] is None for r in t["survivors"])
    out.write_text(json.dumps(merged, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=list(TARGETS), help=f"any of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--out", default="bench/results/mutation.json", help="results JSON (merged with an earlier one)")
    ap.add_argument("--time-limit", type=float, default=None, help="minutes per target; then stop and report so far")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="instead of running: merge these results files into --out, attaching the current judgements",
    )
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="instead of running: run the survivors in --out against today's tests (of the targets named, or all)",
    )
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, ROOT / args.out)
        return
    if args.recheck:  # the targets named (none: every target in --out)
        recheck(ROOT / args.out, [t for t in args.targets if t in sys.argv[1:]])
        return
    bad = [t for t in args.targets if t not in TARGETS]
    if bad:
        ap.error(f"unknown target(s) {bad}; choose from {list(TARGETS)}")
    jpath = ROOT / "bench/mutation_testing/judgements.json"
    judgements = json.loads(jpath.read_text()) if jpath.exists() else {}
    out = ROOT / args.out
    results = json.loads(out.read_text()) if out.exists() else {}
    from ivl_fast.provenance import provenance

    for name in args.targets:
        res = run_target(name, judgements, args.time_limit * 60 if args.time_limit else None, out, results)
        limit = f" --time-limit {args.time_limit:g}" if args.time_limit else ""
        res["provenance"] = provenance(f"python bench/mutation_testing/run.py {name}{limit}")
        results.setdefault("targets", {})[name] = res
        out.write_text(json.dumps(results, indent=2) + "\n")
        c = res["counts"]
        print(
            f"{name:20s} mutants {res['mutants']:4d}  killed {c.get('killed', 0):4d}  survived "
            f"{c.get('survived', 0):3d}  timeout {c.get('timeout', 0):3d}  untested {c.get('untested', 0):3d}  "
            f"kill rate {(res['kill_rate'] or 0):.1%}  ({res['seconds'] / 60:.1f} min)",
            flush=True,
        )


if __name__ == "__main__":
    main()
