"""The demo's results as people read them: the Markdown table (results.md, README), README's generated block
(seed 0 with where it came from, and every row's range over other seeds), and the bar chart."""

from __future__ import annotations

from pathlib import Path

ROWS = {  # name -> what it is (paper)
    "small": "small base alone",
    "large": "larger base alone",
    "small+value": "value network on the base it was trained on",
    "large+value": "transfer to the larger base (Table 1)",
    "large+value_l1": "transfer of the L1-regularised value network",
    "large_finetuned": "the larger base fine-tuned on the demonstrations (ceiling)",
    "other_vocab+value": "transfer across tokenizers through a vocabulary map (Section 4.2.2)",
}
ROW_NAMES = list(ROWS)


def _score(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _lm_eval(row: dict, key: str):
    """A row's lm-eval figure, None where the row has none (a cross-vocabulary row's multiple choice)."""
    return (row.get("lm_eval") or {}).get(key)


def to_markdown(result: dict) -> str:
    """The results table as README shows it (README's table is this function's output for a committed JSON):
    the demo's greedy accuracy and format rate, and lm-eval's multiple-choice accuracy (log-likelihood) and
    generation exact match on the same questions."""
    lines = [
        "| row | what it is (paper) | accuracy | format | lm-eval MC acc | lm-eval gen EM |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {ROWS[r['name']]} | {r['accuracy']:.2f} | {r['format_rate']:.2f} "
            f"| {_score(_lm_eval(r, 'mc_acc'))} | {_score(_lm_eval(r, 'gen_exact_match'))} |"
        )
    notes = sorted({r["lm_eval"]["mc_note"] for r in result["rows"] if _lm_eval(r, "mc_note")})
    if notes:
        lines += ["", "n/a: " + "; ".join(notes) + " (README, Limitations)."]
    sp = result["tokens_per_s"]
    lines.append("")
    runs = result.get("tokens_per_s_runs", {})
    n = len(runs.get("large_alone", [])) or 1
    lines.append(
        f"Decoding, batch 8 x 32 new tokens, median of {n} timed calls: large alone {sp['large_alone']:.0f} "
        f"tokens/s, large+value {sp['large+value']:.0f} tokens/s"
    )
    return "\n".join(lines) + "\n"


README_START = "<!-- demo-results: made by `python docs/update_readme.py` from docs/demo_results*.json -->"
README_END = "<!-- /demo-results -->"


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def readme_block(main: dict, others: list[dict]) -> str:
    """README's demo results: the table of ``main`` (docs/demo_results.json, seed 0) with its provenance, then
    every row's range over ``main`` and ``others`` (other seeds, same machine). Generated, never typed
    (tests/test_demo.py checks)."""
    prov = main["provenance"]
    m = prov["machine"]
    runs = [main, *others]
    seeds = ", ".join(str(r["world"]["seed"]) for r in runs)
    head = (
        f"`{prov['command']}` (seed {main['world']['seed']}), {_minutes(prov['seconds'])} from scratch on "
        f"{m['cores']} cores of an {m['cpu']} (torch {prov['versions']['torch']}, "
        f"commit {(prov['commit'] or 'unknown')[:7]}):"
    )
    lines = [head, "", to_markdown(main).rstrip("\n"), ""]
    lines.append(f"The same rows over seeds {seeds} (`ivl-fast demo --seed S --work-dir DIR`, same machine), min-max:")
    lines += [
        "",
        "| row | accuracy | format | lm-eval MC acc | lm-eval gen EM |",
        "| --- | --- | --- | --- | --- |",
    ]

    def span(values) -> str:
        return "n/a" if None in values else f"{min(values):.2f}-{max(values):.2f}"

    for i, name in enumerate(ROW_NAMES):
        cols = [
            [r["rows"][i]["accuracy"] for r in runs],
            [r["rows"][i]["format_rate"] for r in runs],
            [_lm_eval(r["rows"][i], "mc_acc") for r in runs],
            [_lm_eval(r["rows"][i], "gen_exact_match") for r in runs],
        ]
        lines.append(f"| {name} | " + " | ".join(span(c) for c in cols) + " |")
    alone = [r["tokens_per_s"]["large_alone"] for r in runs]
    pair = [r["tokens_per_s"]["large+value"] for r in runs]
    lines += [
        "",
        f"Decoding over those runs (medians per run): large alone {min(alone):.0f}-{max(alone):.0f} tokens/s, "
        f"large+value {min(pair):.0f}-{max(pair):.0f} tokens/s.",
    ]
    return "\n".join([README_START, *lines, README_END])


def plot(result: dict, png: Path) -> None:
    """The bar chart: accuracy and format rate of each row of ``result``, written to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in result["rows"]]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    ax.bar([i - 0.2 for i in x], [r["accuracy"] for r in result["rows"]], width=0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], [r["format_rate"] for r in result["rows"]], width=0.4, label="format")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("IVL in miniature: held-out questions")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
