"""Rewrite the generated blocks of the documentation (README.md and docs/*.md: each block lives in one page) from
the committed JSON (run from the repository root): the demo results (docs/demo.md), the benchmark table
(bench/results/*.json) and the mutation-testing table (bench/results/mutation.json) (docs/benchmarks.md) and the
speculative decoding floor (bench/results/speculative_cpu.json, docs/speculative.md).

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


def _page_with(marker: str) -> Path:
    """The one page (README.md or docs/*.md) that holds a generated block's start marker."""
    found = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if marker in p.read_text()]
    if len(found) != 1:
        raise SystemExit(f"the block {marker!r} is in {len(found)} pages, not one: {found}")
    return found[0]


def _rewrite(marker: str, rewrite) -> None:
    page = _page_with(marker)
    page.write_text(rewrite(page.read_text()))


def main() -> None:
    main_run = json.loads((ROOT / "docs" / "demo_results.json").read_text())
    others = [json.loads(p.read_text()) for p in sorted((ROOT / "docs").glob("demo_results_seed*.json"))]

    def demo(text: str) -> str:
        a, b = text.index(README_START), text.index(README_END) + len(README_END)
        return text[:a] + readme_block(main_run, others) + text[b:]

    _rewrite(README_START, demo)
    summary = seed_summary([main_run, *others])
    (ROOT / "docs" / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_seeds(summary, ROOT / "docs" / "demo_seeds.png")
    for start, end, block in (
        (report.BENCH_START, report.BENCH_END, report.benchmarks_block()),
        (report.MUTATION_START, report.MUTATION_END, report.mutation_block()),
        (report.SPEC_START, report.SPEC_END, report.speculative_floor_block()),
    ):
        _rewrite(start, lambda text, s=start, e=end, b=block: report.replace_block(text, s, e, b))


if __name__ == "__main__":
    main()
