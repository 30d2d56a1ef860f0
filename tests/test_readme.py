"""The README's test command is what CI runs: .ci/run must hold it verbatim; its benchmark and mutation tables are
what bench/report.py renders from the committed results JSON."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from doc_pages import documentation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bash_blocks(text: str) -> list[str]:
    blocks, cur, inside = [], [], False
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, cur = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(cur).strip())
        elif inside:
            cur.append(line)
    return blocks


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
    # a failure anywhere in the command's && list (not only pytest) must end the job: set -e alone does not
    after = ci[ci.index(test_cmd) + 1 :]
    guard = next(line for line in after if not line.startswith("#"))
    assert guard.startswith('rc=$?; [ "$rc" = 0 ] ||') and "exit" in guard


def test_ci_stops_when_an_early_step_of_the_test_command_fails(tmp_path):
    """Run .ci/run's own lines with the README command's first step failing: the job ends non-zero before the
    lowest-versions stage."""
    import subprocess

    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_cmd = next(b for b in _bash_blocks((ROOT / "README.md").read_text()) if "pytest" in b)
    i = ci.index(test_cmd)
    script = "\n".join(["set -euo pipefail", "false && echo skipped", *ci[i + 1 : i + 4], "echo lowest-stage-ran"])
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "lowest-stage-ran" not in r.stdout and "skipped" not in r.stdout, r


def test_readme_main_command_installs_and_runs_the_demo():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_cmd = next(b for b in blocks if "pytest" not in b and "venv" in b)
    assert main_cmd.endswith("ivl-fast demo") and "torch==2.13.0" in main_cmd
    # the demo's smallest extra: lm-eval for its lm-eval columns, not the test tools
    assert '-e ".[eval]"' in main_cmd


def test_ci_runs_the_lowest_versions_stage_and_readme_names_its_pins():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ".ci/lowest-versions" in ci and any(".ci/versions.py" in line for line in ci)
    pins = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "lowest_pins.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    triton_pin = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "lowest_pins.py"), "triton"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- lowest-pins: \.ci/lowest_pins\.py -->`([^`]*)`<!-- /lowest-pins -->", readme)
    assert block and block[1] == pins, (block and block[1], pins)
    assert triton_pin.startswith("triton==") and f"`{triton_pin}`" in readme


def test_readme_benchmark_and_mutation_tables_are_rendered_from_the_committed_json():
    report, readme = _report(), documentation()
    assert report.benchmarks_block() in readme, "README's benchmark table differs: run python docs/update_readme.py"
    assert report.mutation_block() in readme, "README's mutation table differs: run python docs/update_readme.py"
    assert report.speculative_floor_block() in readme, "README's speculative floor differs: run docs/update_readme.py"


def test_every_committed_result_records_its_provenance():
    """Each result JSON names the exact command (no placeholders), date, machine, versions and commit; timings are
    medians over several runs with their range (a ``spread`` record: median, min, max, runs, samples)."""
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        provs = [data["provenance"]] if "provenance" in data else [t["provenance"] for t in data["targets"].values()]
        for p in provs:
            assert p["command"] and "<" not in p["command"] and "..." not in p["command"], path.name
            assert p["date"] and p["commit"] and p["machine"]["cpu"] and p["versions"]["torch"], path.name

        def spreads(x):
            if isinstance(x, dict):
                if set(x) >= {"median", "min", "max", "runs", "samples"}:
                    yield x
                else:
                    for v in x.values():
                        yield from spreads(v)

        for s in spreads(data):
            assert s["min"] <= s["median"] <= s["max"] and s["runs"] == len(s["samples"]) >= 2, path.name


def test_readme_speculative_prose_holds_for_the_committed_results():
    """The claims README's speculative-decoding section makes in words, against bench/results/speculative_cpu.json."""
    res = json.loads((ROOT / "bench" / "results" / "speculative_cpu.json").read_text())
    assert not res["provenance"]["dirty"]
    one = res["results"]["1"]
    c = one["cost_model_s"]
    assert 0.25 < c["draft_step"] / c["plain_step"] < 0.4  # "about a third of a plain pair step"
    assert 0.7 < c["value_step"] / c["draft_step"] < 1.4  # "the value network's step as much again"
    spec = one["speculative"]
    assert all(s["break_even_acceptance_vs_base_alone"] is None for s in spec.values())  # "costs more than the base"
    assert all(s["break_even_acceptance_vs_pair"] >= 0.75 for s in spec.values())  # "above about 0.8"
    speed = {k: s["speedup_vs_pair"]["median"] for k, s in spec.items()}
    assert max(speed, key=speed.get) == "2" and 0.85 <= speed["2"] < 1  # "best k is 2, about 0.9x": goal not met


def test_readme_serve_load_prose_holds_for_the_committed_results():
    """README's words about the load benchmark, against bench/results/serve_cpu.json."""
    res = json.loads((ROOT / "bench" / "results" / "serve_cpu.json").read_text())
    assert not res["provenance"]["dirty"] and res["every_answer_checked"] and res["config"]["clients"] == 64
    by = {st["max_num_batched_tokens"]: st for st in res["settings"]}
    assert set(by) == {None, 80}
    assert all(st["throughput_ratio"]["min"] >= 4 for st in by.values())  # "with either (goal >= 4x: met)"
    # "with --max-num-batched-tokens 80 p99 is within 3x its p50 in every run"; "without the bound ... above 3x
    # p50 in some runs"
    assert by[80]["per_token_p99_over_p50"]["max"] <= 3 < by[None]["per_token_p99_over_p50"]["max"]
    # "the worst run's per-token p99 is 181 ms"
    assert round(by[None]["summary"]["concurrent"]["per_token_ms_p99"]["max"]) == 181
    # "the gaps between chunks with visible text are longer"
    for st in by.values():
        c = st["summary"]["concurrent"]
        assert c["per_text_chunk_ms_p99"]["median"] > c["per_token_ms_p99"]["median"]
    # "a later first token under a burst and somewhat less throughput"
    con = {b: st["summary"]["concurrent"] for b, st in by.items()}
    assert con[80]["ttft_ms_p99"]["median"] > con[None]["ttft_ms_p99"]["median"]
    assert con[80]["tokens_per_s"]["median"] < con[None]["tokens_per_s"]["median"]


def test_readme_vocab_map_prose_holds_for_the_committed_results():
    """README's words about the vocabulary-map benchmark (#19), against bench/results/vocab_map_cpu.json."""
    res = json.loads((ROOT / "bench" / "results" / "vocab_map_cpu.json").read_text())
    assert not res["provenance"]["dirty"]
    q = res["against_the_authors"]
    assert q["train_documents"] == 250 and q["held_out_documents"] == 100
    pairs = q["pairs"]
    assert set(pairs) == {
        "tekken_240911 -> tokenizer_v1",
        "tokenizer_v1 -> tekken_240911",
        "demo tokenizer_b -> tokenizer_a",
    }
    readme = documentation()
    for name, e in pairs.items():  # "at least as well ... on all three pairs, in running text and on held-out lines"
        assert e["top1_at_least_the_authors"] and e["top1_at_least_the_authors_on_lines"], name
        au = e["authors_naive_mined_argmax_whole_documents"]["overlap_ratio"]
        assert abs(e["argmax_of_the_maps_counts"]["overlap_ratio"] - au) < 0.002, name  # "within 0.002"
    for name in ("tekken_240911 -> tokenizer_v1", "tokenizer_v1 -> tekken_240911"):  # "better by 0.03 on both"
        e = pairs[name]
        gain = e["map_top_k4"]["overlap_ratio"] - e["authors_naive_mined_argmax_whole_documents"]["overlap_ratio"]
        assert round(gain, 2) == 0.03, (name, gain)
    demo = pairs["demo tokenizer_b -> tokenizer_a"]  # "the two differ by about 1e-5"
    gap = demo["map_top_k4"]["overlap_ratio"] - demo["authors_naive_mined_argmax_whole_documents"]["overlap_ratio"]
    assert 0 <= gap < 5e-5
    tek = pairs["tekken_240911 -> tokenizer_v1"]  # the earlier line-piece rule, in running text
    line_map, au = tek["line_piece_map_top1"], tek["authors_naive_mined_argmax_whole_documents"]["overlap_ratio"]
    assert line_map < au and f"scores {line_map:.3f} against the authors' {au:.3f}" in " ".join(readme.split())
    assert pairs["tekken_240911 -> tokenizer_v1"]["speedup_per_document"] >= 100  # "over 100x faster"
    parts = pairs["tekken_240911 -> tokenizer_v1"]["build_seconds_by_part"]
    assert set(parts) == {"surfaces", "tokenize", "align", "rank", "hash"}


def test_the_default_map_k_is_among_the_sweeps_best():
    """#19: "make the default the best one": the default K gives the sweep's best mean accuracy on the demo's
    cross-vocabulary row (bench/results/vocab_k_sweep_cpu.json, bench/vocab_k_sweep.py; K ties there since the base
    reads token boundaries)."""
    from ivl_fast.vocab import DEFAULT_TOP_K

    ks = json.loads((ROOT / "bench" / "results" / "vocab_k_sweep_cpu.json").read_text())
    best = max(r["accuracy_mean"] for r in ks["rows"])
    default = next(r for r in ks["rows"] if r["top_k"] == DEFAULT_TOP_K)
    assert not ks["provenance"]["dirty"] and default["accuracy_mean"] == best
    assert DEFAULT_TOP_K in ks["best_accuracy_top_ks"]


def test_readme_tensor_parallel_figures_are_the_committed_ones():
    """#20: the floor table is bench/tp_floor.py's output, the memory figures bench/results/tp_memory_cpu.json's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tp_floor", ROOT / "bench" / "tp_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    readme = documentation()
    assert floor.table() in readme
    res = json.loads((ROOT / "bench" / "results" / "tp_memory_cpu.json").read_text())
    one, ranks = res["one_process"], res["ranks"]
    assert not res["provenance"]["dirty"] and f"commit {res['provenance']['commit'][:7]}" in readme
    flat = " ".join(readme.split())
    assert (
        f"holds {ranks[0]['base_param_bytes'] / 2**20:.0f} MiB of parameters per rank of 2 against "
        f"{one['base_param_bytes'] / 2**20:.0f} MiB alone ({res['param_bytes_per_rank_over_one_process'][0]:.2f}x"
    ) in flat
    assert (
        f"added {ranks[0]['load_rss_added_mb']:.0f} and {ranks[1]['load_rss_added_mb']:.0f} MiB of resident memory per "
        f"rank against {one['load_rss_added_mb']:.0f} MiB alone"
    ) in flat
