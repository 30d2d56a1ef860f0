"""The README's test command is what CI runs: .ci/run must hold it verbatim; its benchmark and mutation tables are
what bench/report.py renders from the committed results JSON."""

import importlib.util
import json
from pathlib import Path

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
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_readme_main_command_installs_and_runs_the_demo():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_cmd = next(b for b in blocks if "pytest" not in b and "venv" in b)
    assert main_cmd.endswith("ivl-fast demo") and "torch==2.13.0" in main_cmd


def test_readme_benchmark_and_mutation_tables_are_rendered_from_the_committed_json():
    report, readme = _report(), (ROOT / "README.md").read_text()
    assert report.benchmarks_block() in readme, "README's benchmark table differs: run python docs/update_readme.py"
    assert report.mutation_block() in readme, "README's mutation table differs: run python docs/update_readme.py"


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
