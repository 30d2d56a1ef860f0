"""`ivl-fast vocab-map`: build a base->value vocabulary map, or evaluate one, from text files."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..vocab import DEFAULT_TOP_K
from .errors import DefaultsHelp, UsageError


def add_parser(sub) -> None:
    vm = sub.add_parser(
        "vocab-map",
        help="build a sparse base->value vocabulary map (MinED/DTW alignment)",
        usage="ivl-fast vocab-map --base-tokenizer DIR --value-tokenizer DIR --corpus FILE [FILE ...] "
        "(--out MAP | --map MAP) [options]",
        formatter_class=DefaultsHelp,
    )
    req = vm.add_argument_group("required")
    req.add_argument("--base-tokenizer", type=Path, required=True, help="directory of the base model's tokenizer")
    req.add_argument("--value-tokenizer", type=Path, required=True, help="directory of the value network's tokenizer")
    req.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="text files both tokenizers read")
    what = vm.add_argument_group("output (one of --out, --map)")
    what.add_argument("--out", type=Path, default=None, help="the map file to build (.safetensors)")
    what.add_argument("--map", type=Path, default=None, help="evaluate this existing map on the corpus instead")
    vm.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help="value tokens kept per base token, by alignment count (1: the paper's argmax map, plus the identical "
        "surface for base tokens the corpus never aligned)",
    )
    vm.add_argument("--threads", type=int, default=None, help="alignment threads (default: all cores)")
    vm.add_argument(
        "--evaluate",
        action="store_true",
        help="hold out 10%% of the corpus and report held-out overlap and coverage of the map and of the argmax "
        "baseline (the paper's map from the same counts) side by side",
    )
    vm.add_argument("--overwrite", action="store_true", help="replace an existing map file at --out (nothing else)")
    vm.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    vm.set_defaults(func=run)


def _given(args, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args.argv)


def _read_corpus(files: list[str]) -> list[str]:
    texts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file {str(p)!r} does not exist")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
    if not any(t.strip() for t in texts):
        raise ValueError("the corpus files hold no text")
    return texts


def _side_by_side(ev: dict) -> dict:
    """The evaluation as the report prints it: the map's figures beside the argmax baseline's (None for a map file
    written before maps carried the baseline)."""
    base = ev["argmax_baseline"]
    return {
        "held_out_texts": ev["texts"],
        "held_out_pieces": ev["pieces"],
        "map": {k: ev[k] for k in ("overlap_ratio", "overlap_ratio_weighted", "coverage")},
        "argmax_baseline": base,
    }


def _table(ev: dict) -> str:
    rows = [("", "overlap (top-1)", "overlap (weighted)", "coverage")]
    m, b = ev["map"], ev["argmax_baseline"]
    rows.append(("map", f"{m['overlap_ratio']:.3f}", f"{m['overlap_ratio_weighted']:.3f}", f"{m['coverage']:.3f}"))
    if b is not None:
        rows.append(("argmax baseline", f"{b['overlap_ratio']:.3f}", "-", f"{b['coverage']:.3f}"))
    return "\n".join(f"{r[0]:<16} {r[1]:>15} {r[2]:>18} {r[3]:>9}" for r in rows)


def run(args) -> int:
    from ..safe_output import check_output_location
    from ..vocab import VocabMap
    from ..vocab.build import check_map_output

    if (args.out is None) == (args.map is None):
        raise UsageError("give exactly one of --out (build a map) or --map (evaluate an existing one)")
    if args.map is not None:
        building = [f for f in ("--top-k", "--threads", "--evaluate", "--overwrite") if _given(args, f)]
        if building:
            raise UsageError(f"{', '.join(building)} apply to building a map (--out), not to --map")
    texts = _read_corpus(args.corpus)
    if args.map is not None:  # evaluate a map that exists on the whole corpus: nothing is written
        vmap = VocabMap.load(args.map, base_tokenizer=args.base_tokenizer, value_tokenizer=args.value_tokenizer)
        report = {"map": str(args.map), "shape": list(vmap.shape)}
        report["evaluation"] = _side_by_side(vmap.evaluate(args.base_tokenizer, args.value_tokenizer, texts))
        print(_table(report["evaluation"]), file=sys.stderr)
        print(json.dumps(report, indent=1))
        return 0
    inputs = {
        "--base-tokenizer": args.base_tokenizer,
        "--value-tokenizer": args.value_tokenizer,
        "--corpus": args.corpus,
    }
    check_output_location(args.out, inputs)
    check_map_output(args.out, overwrite=args.overwrite, flag="--out")  # before minutes of building
    held_out = []
    if args.evaluate:  # hold out the last 10% of the corpus for the quality report
        joined = "\n".join(texts)
        cut = int(len(joined) * 0.9)
        texts, held_out = [joined[:cut]], [joined[cut:]]
    t0 = time.perf_counter()
    vmap = VocabMap.build(
        args.base_tokenizer,
        args.value_tokenizer,
        texts,
        top_k=args.top_k,
        threads=args.threads,
        progress=not args.no_progress,
    )
    secs = time.perf_counter() - t0
    vmap.save(args.out, overwrite=args.overwrite)
    report = {"out": str(args.out), "shape": list(vmap.shape), "seconds": secs, **vmap.stats}
    if args.evaluate:
        report["evaluation"] = _side_by_side(vmap.evaluate(args.base_tokenizer, args.value_tokenizer, held_out))
        print(_table(report["evaluation"]), file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0
