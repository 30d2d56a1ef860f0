"""How the vocabulary map's K (value tokens kept per base token) changes the demo's cross-vocabulary row
(``other_vocab+value``: the demo's other base, with its own tokenizer, steered by the value network through a
map), issue #19.

    python bench/vocab_k_sweep.py OUT.json DEMO_DIR [DEMO_DIR ...]

Each DEMO_DIR: a finished ``ivl-fast demo --seed S --work-dir DEMO_DIR`` (its models are reused; nothing in it is
changed). For each K in 1, 2, 4, 8 and each demo, a map is built from that demo's pretraining text (as the demo
builds its own map), the row is evaluated on the demo's held-out questions (accuracy: the share of answers in the
format with the right word), and the map's held-out overlap is reported beside it. The best K: the highest mean
accuracy over the demos, ties to the higher mean top-K weighted overlap, then to the smaller K.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

KS = (1, 2, 4, 8)


def sweep(work: Path, tmp: Path) -> dict[int, dict]:
    from ivl_fast import FastIVLDecoder
    from ivl_fast.chat import load_tokenizer
    from ivl_fast.demo import DemoConfig, evaluate, make_world, pretraining_text
    from ivl_fast.vocab import VocabMap

    cfg = DemoConfig()
    seed = json.loads((work / "results.json").read_text())["world"]["seed"]
    world = make_world(cfg.n_people, seed)
    lines = pretraining_text(world, world["people"], 6, seed)
    held = pretraining_text(world, world["people"], 1, seed + 100)  # other shuffles and layouts
    people = world["eval_people"][: cfg.eval_people]
    tok_b, tok_a = load_tokenizer(work / "tokenizer_b"), load_tokenizer(work / "tokenizer_a")
    out = {}
    for k in KS:
        vmap = VocabMap.build(tok_b, tok_a, lines, top_k=k)
        path = tmp / f"map_seed{seed}_k{k}.safetensors"
        vmap.save(path)
        dec = FastIVLDecoder.from_pretrained(work / "other", work / "value", vocab_map=path)
        out[k] = {"seed": seed, **evaluate(dec, world, people), "map": vmap.evaluate(tok_b, tok_a, held)}
        r = out[k]
        print(
            f"seed {seed} K={k}: accuracy {r['accuracy']:.3f}, format {r['format_rate']:.3f}, map overlap "
            f"{r['map']['overlap_ratio']:.3f} (weighted {r['map']['overlap_ratio_weighted']:.3f})"
        )
    return out


def main(out: Path, works: list[Path]) -> None:
    from ivl_fast.provenance import provenance

    with tempfile.TemporaryDirectory() as tmp:
        per_demo = [sweep(w, Path(tmp)) for w in works]
    rows = []
    for k in KS:
        runs = [d[k] for d in per_demo]
        rows.append(
            {
                "top_k": k,
                "accuracy": [r["accuracy"] for r in runs],
                "accuracy_mean": statistics.mean(r["accuracy"] for r in runs),
                "format_rate": [r["format_rate"] for r in runs],
                "map_overlap": [r["map"]["overlap_ratio"] for r in runs],
                "map_overlap_weighted": [r["map"]["overlap_ratio_weighted"] for r in runs],
                "runs": runs,
            }
        )
    best = max(rows, key=lambda r: (r["accuracy_mean"], statistics.mean(r["map_overlap_weighted"]), -r["top_k"]))
    out.write_text(
        json.dumps(
            {
                "provenance": provenance("python bench/vocab_k_sweep.py " + " ".join(sys.argv[1:])),
                "benchmark": "the demo's cross-vocabulary row (other_vocab+value) against the map's K",
                "config": {
                    "seeds": [d[KS[0]]["seed"] for d in per_demo],
                    "questions_per_seed": per_demo[0][KS[0]]["questions"],
                    "map_corpus": "each demo's pretraining text; held out for the overlap: other shuffles of it",
                },
                "rows": rows,
                "best_accuracy_top_ks": [r["top_k"] for r in rows if r["accuracy_mean"] == best["accuracy_mean"]],
                "best_top_k": best["top_k"],
            },
            indent=1,
        )
    )
    print(f"best K: {best['top_k']}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: vocab_k_sweep.py OUT.json DEMO_DIR [DEMO_DIR ...]")
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
