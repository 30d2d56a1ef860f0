"""How the vocabulary map's K (value tokens kept per base token) changes the demo's cross-vocabulary row
(``other_vocab+value``: the demo's other base, with its own tokenizer, steered by the value network through a
map), issue #19.

    python bench/vocab_k_sweep.py DEMO_DIR [OUT.json]

DEMO_DIR: a finished ``ivl-fast demo --work-dir DEMO_DIR`` (its models are reused; nothing in it is changed).
For each K in 1, 2, 4, 8 a map is built from the demo's own pretraining text (as the demo builds its map), the
row is evaluated on the demo's held-out questions (accuracy: the share of answers in the format with the right
word), and the map's held-out overlap is reported beside it. The demo's default seed only. Writes OUT.json
(default bench/results/vocab_k_sweep_cpu.json) with the provenance.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main(work: Path, out: Path) -> None:
    from ivl_fast import FastIVLDecoder
    from ivl_fast.chat import load_tokenizer
    from ivl_fast.demo import DemoConfig, evaluate, make_world, pretraining_text
    from ivl_fast.provenance import provenance
    from ivl_fast.vocab import VocabMap
    from ivl_fast.vocab.build import split_corpus

    cfg = DemoConfig()
    res = json.loads((work / "results.json").read_text())
    seed = res["world"]["seed"]
    world = make_world(cfg.n_people, seed)
    lines = pretraining_text(world, world["people"], 6, seed)
    held = split_corpus(pretraining_text(world, world["people"], 1, seed + 100))
    people = world["eval_people"][: cfg.eval_people]
    tok_b, tok_a = load_tokenizer(work / "tokenizer_b"), load_tokenizer(work / "tokenizer_a")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 2, 4, 8):
            vmap = VocabMap.build(tok_b, tok_a, lines, top_k=k)
            path = Path(tmp) / f"map_k{k}.safetensors"
            vmap.save(path)
            dec = FastIVLDecoder.from_pretrained(work / "other", work / "value", vocab_map=path)
            row = {"top_k": k, **evaluate(dec, world, people), "map": vmap.evaluate(tok_b, tok_a, held)}
            rows.append(row)
            print(
                f"K={k}: accuracy {row['accuracy']:.3f}, format {row['format_rate']:.3f}, map overlap "
                f"{row['map']['overlap_ratio']:.3f} (weighted {row['map']['overlap_ratio_weighted']:.3f})"
            )
    best = max(rows, key=lambda r: (r["accuracy"], r["format_rate"], -r["top_k"]))
    cmd = "python bench/vocab_k_sweep.py " + " ".join(sys.argv[1:])
    out.write_text(
        json.dumps(
            {
                "provenance": provenance(cmd),
                "benchmark": "the demo's cross-vocabulary row (other_vocab+value) against the map's K",
                "config": {
                    "demo_dir_seed": seed,
                    "questions": 2 * len(people),
                    "map_corpus": "the demo's pretraining text",
                },
                "rows": rows,
                "best_top_k": best["top_k"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: vocab_k_sweep.py DEMO_DIR [OUT.json]")
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) == 3 else "bench/results/vocab_k_sweep_cpu.json"))
