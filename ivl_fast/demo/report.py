"""The demo's results as people read them: the Markdown table (results.md, README), README's generated block
(seed 0 with where it came from, and every row's range over other seeds), and the bar chart."""

from __future__ import annotations

from pathlib import Path

ROWS = {  # name -> what it is (paper)
    "small": "small base alone",
    "mid": "mid-size base alone (reads about 2/3 of the evaluated people)",
    "large": "larger base alone (reads about everyone)",
    "continued": "small base continued on the text about everyone, alone",
    "other": "larger base with another tokenizer, alone",
    "small_finetuned": "small base fine-tuned on the demonstrations (Full)",
    "large_finetuned": "larger base fine-tuned on the demonstrations (Full, the ceiling)",
    "small+value": "value network on the base it was trained on",
    "mid+value": "transfer to the mid base (Table 1)",
    "large+value": "transfer to the larger base (Table 1)",
    "continued+value": "transfer to the continued base (the CodeLlama rows)",
    "large+value_l1=0.01": "transfer, value network trained with L1 0.01 (Table 1 norm)",
    "large+value_l1=0.1": "transfer, value network trained with L1 0.1",
    "large+value_l1=1": "transfer, value network trained with L1 1",
    "small+value_cascade": "cascade value network (reads softmax(z_base) @ E) on its training base (Figure 3b)",
    "large+value_cascade": "cascade value network transferred to the larger base",
    "small+value_cascade+": "cascade+ value network (also the token embedding) on its training base",
    "large+value_cascade+": "cascade+ value network transferred to the larger base",
    "large+value_curriculum": "value network trained on small, then mid; evaluated on large (Table 2)",
    "small+probe": "linear-probe value model on its training base (Section 3.2, Figure 2)",
    "large+proxy": "proxy tuning: large + (small fine-tuned - small) (Table 4)",
    "other_vocab+value": "transfer across tokenizers through a vocabulary map (Figure 4)",
    "other+value_b": "the other base with its own family's value network (trained on a small base of its tokenizer)",
    "other_vocab+value_l1=1": "Figure 4 with value networks trained at L1 1 (the training default): across tokenizers",
    "other+value_b_l1=1": "... and the other tokenizer's own value network at L1 1",
}
ROW_NAMES = list(ROWS)
# rows of earlier demo versions, for their committed results
EARLIER_ROWS = {"large+value_l1": "transfer of the L1-regularised value network (L1 1)"}


def _score(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _lm_eval(row: dict, key: str):
    """A row's lm-eval figure, None where the row has none (a cross-vocabulary row's multiple choice)."""
    return (row.get("lm_eval") or {}).get(key)


def to_markdown(result: dict) -> str:
    """The results table as README shows it (README's table is this function's output for a committed JSON):
    the demo's greedy accuracy and format rate, and lm-eval's multiple-choice accuracy (log-likelihood) and
    generation exact match on the same questions, and for the rows with a value network the share of the answers'
    tokens at which it changed the base's choice (a results file written before that figure existed shows "-")."""
    lines = [
        "| row | what it is (paper) | accuracy | format | lm-eval MC acc | lm-eval gen EM | tokens changed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        ch = r.get("changed_fraction")
        changed = "-" if "changed_fraction" not in r else "base alone" if ch is None else f"{ch:.0%}"
        lines.append(
            f"| {r['name']} | {ROWS.get(r['name']) or EARLIER_ROWS[r['name']]} | {r['accuracy']:.2f} "
            f"| {r['format_rate']:.2f} "
            f"| {_score(_lm_eval(r, 'mc_acc'))} | {_score(_lm_eval(r, 'gen_exact_match'))} | {changed} |"
        )
    notes = sorted({r["lm_eval"]["mc_note"] for r in result["rows"] if _lm_eval(r, "mc_note")})
    if notes:
        lines += ["", "n/a: " + "; ".join(notes) + " (README, Limitations)."]
    pr = result.get("premise")
    if pr:
        lines += [
            "",
            "The premise on the same questions (against the small base, the value network's training base):",
            "",
        ]
        lines += [
            "| base | KL format | KL content | top-1 agree format | top-1 agree content |",
            "| --- | --- | --- | --- | --- |",
        ]
        for b, kl in pr["kl"].items():
            ag = pr["top1_agree"][b]
            lines.append(
                f"| {b} | {kl['format']:.2f} | {kl['content']:.2f} | {ag['format']:.2f} | {ag['content']:.2f} |"
            )
        va = pr["value_abs"]
        lines += [
            "",
            f"Mean |z_value| (over the vocabulary): format position {va['format']:.2f}, content position "
            f"{va['content']:.2f}.",
        ]
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
        f"`{prov['command']}` (seed {main['world']['seed']}), {_minutes(prov['seconds'])} "
        f"{'from its cache (evaluation only)' if prov.get('from_cache') else 'from scratch'} on "
        f"{m['cores']} cores of an {m['cpu']} (torch {prov['versions']['torch']}, "
        f"commit {(prov['commit'] or 'unknown')[:7]}):"
    )
    lines = [head, "", to_markdown(main).rstrip("\n"), ""]
    summ = seed_summary(runs)
    lines.append(
        f"The same rows over seeds {seeds} (`ivl-fast demo --seed S --work-dir DIR`, same machine), mean +- sd "
        "(docs/demo_summary.json, docs/demo_seeds.png):"
    )
    lines += [
        "",
        "| row | accuracy | format | lm-eval MC acc | lm-eval gen EM |",
        "| --- | --- | --- | --- | --- |",
    ]

    def ms(x) -> str:
        return "n/a" if x is None else f"{x['mean']:.2f} +- {x['sd']:.2f}"

    for name, row in summ["rows"].items():
        lines.append(f"| {name} | " + " | ".join(ms(row[k]) for k in METRICS) + " |")
    pr = summ.get("premise")
    if pr:
        lines += ["", "The premise over those seeds (against the small base), mean +- sd:", ""]
        lines += ["| base | KL format | KL content | top-1 agree format | top-1 agree content |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        for b, v in pr["bases"].items():
            cells = [v["kl_format"], v["kl_content"], v["agree_format"], v["agree_content"]]
            lines.append(f"| {b} | " + " | ".join(ms(c) for c in cells) + " |")
        lines += [
            "",
            f"Mean |z_value|: format position {ms(pr['value_abs_format'])}, content position "
            f"{ms(pr['value_abs_content'])}.",
        ]
    alone = [r["tokens_per_s"]["large_alone"] for r in runs]
    pair = [r["tokens_per_s"]["large+value"] for r in runs]
    lines += [
        "",
        f"Decoding over those runs (medians per run): large alone {min(alone):.0f}-{max(alone):.0f} tokens/s, "
        f"large+value {min(pair):.0f}-{max(pair):.0f} tokens/s.",
    ]
    return "\n".join([README_START, *lines, README_END])


METRICS = ("accuracy", "format_rate", "mc_acc", "gen_exact_match")


def _mean_sd(values: list) -> dict | None:
    import statistics

    if any(v is None for v in values):
        return None
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def seed_summary(runs: list[dict]) -> dict:
    """Every row's metrics (and the premise figures) over ``runs`` (one demo run per seed): mean, sd, values."""
    names = [r["name"] for r in runs[0]["rows"]]
    rows = {}
    for i, name in enumerate(names):
        assert all(r["rows"][i]["name"] == name for r in runs), "the runs have other rows"
        rows[name] = {
            "accuracy": _mean_sd([r["rows"][i]["accuracy"] for r in runs]),
            "format_rate": _mean_sd([r["rows"][i]["format_rate"] for r in runs]),
            "mc_acc": _mean_sd([_lm_eval(r["rows"][i], "mc_acc") for r in runs]),
            "gen_exact_match": _mean_sd([_lm_eval(r["rows"][i], "gen_exact_match") for r in runs]),
        }
    out = {"seeds": [r["world"]["seed"] for r in runs], "rows": rows}
    if all(r.get("premise") for r in runs):
        bases = runs[0]["premise"]["kl"]
        out["premise"] = {
            "against": runs[0]["premise"]["against"],
            "bases": {
                b: {
                    "kl_format": _mean_sd([r["premise"]["kl"][b]["format"] for r in runs]),
                    "kl_content": _mean_sd([r["premise"]["kl"][b]["content"] for r in runs]),
                    "agree_format": _mean_sd([r["premise"]["top1_agree"][b]["format"] for r in runs]),
                    "agree_content": _mean_sd([r["premise"]["top1_agree"][b]["content"] for r in runs]),
                }
                for b in bases
            },
            "value_abs_format": _mean_sd([r["premise"]["value_abs"]["format"] for r in runs]),
            "value_abs_content": _mean_sd([r["premise"]["value_abs"]["content"] for r in runs]),
        }
    return out


def plot_seeds(summary: dict, png: Path) -> None:
    """Accuracy and format rate of every row, mean over the seeds with sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["rows"])
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(11, 4), dpi=100)
    for off, key, label in ((-0.2, "accuracy", "accuracy"), (0.2, "format_rate", "format")):
        vals = [summary["rows"][n][key] for n in names]
        ax.bar(
            [i + off for i in x],
            [v["mean"] for v in vals],
            width=0.4,
            yerr=[v["sd"] for v in vals],
            capsize=2,
            label=label,
        )
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"IVL in miniature over seeds {', '.join(map(str, summary['seeds']))}: mean +- sd")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot(result: dict, png: Path) -> None:
    """The bar chart: accuracy and format rate of each row of ``result``, written to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in result["rows"]]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(11, 4), dpi=100)
    ax.bar([i - 0.2 for i in x], [r["accuracy"] for r in result["rows"]], width=0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], [r["format_rate"] for r in result["rows"]], width=0.4, label="format")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("IVL in miniature: held-out questions")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
