"""Rewrite README's generated blocks from the committed JSON (run from the repository root): the demo results,
the benchmark table (bench/results/*.json), the mutation-testing table (bench/results/mutation.json) and the
speculative decoding floor (bench/results/speculative_cpu.json).

ivl-fast demo --work-dir /tmp/d0 && cp /tmp/d0/results.json docs/demo_results.json
cp /tmp/d0/results.png docs/demo_results.png
ivl-fast demo --seed 1 --work-dir /tmp/d1 && cp /tmp/d1/results.json docs/demo_results_seed1.json   (and seed 2)
python docs/update_readme.py   (also writes docs/demo_summary.json and docs/demo_seeds.png: mean +- sd over seeds)
"""

import json
import sys
from pathlib import Path

from ivl_fast.demo.report import README_END, README_START, plot_seeds, readme_block, seed_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402  (bench/report.py: bench/ is not a package)


def main() -> None:
    main_run = json.loads((ROOT / "docs" / "demo_results.json").read_text())
    others = [json.loads(p.read_text()) for p in sorted((ROOT / "docs").glob("demo_results_seed*.json"))]
    readme = (ROOT / "README.md").read_text()
    a, b = readme.index(README_START), readme.index(README_END) + len(README_END)
    readme = readme[:a] + readme_block(main_run, others) + readme[b:]
    summary = seed_summary([main_run, *others])
    (ROOT / "docs" / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_seeds(summary, ROOT / "docs" / "demo_seeds.png")
    readme = report.replace_block(readme, report.BENCH_START, report.BENCH_END, report.benchmarks_block())
    readme = report.replace_block(readme, report.MUTATION_START, report.MUTATION_END, report.mutation_block())
    readme = report.replace_block(readme, report.SPEC_START, report.SPEC_END, report.speculative_floor_block())
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
