"""`ivl-fast eval`: lm-evaluation-harness tasks on a base + value pair (model type "ivl", :mod:`ivl_fast.lm_eval`).

A thin front over ``lm_eval.simple_evaluate``: the models are loaded once, each run prints lm-eval's own table
(``lm_eval.utils.make_table``) and, with ``--output-path DIR``, writes lm-eval's results JSON to a new file in DIR
(``results_<time>[_<N>shot].json``; an existing file is never overwritten, nothing is deleted). ``--suite paper``
runs the paper's few-shot tasks with its shot counts (arXiv 2410.21027, Table 1), one ``simple_evaluate`` call
per shot count (:func:`suite_runs`). Datasets come from the Hugging Face cache or local task files
(``--include-path``); HF_DATASETS_OFFLINE=1 is set unless the environment sets it (HF_DATASETS_OFFLINE=0 lets
lm-eval download hub datasets).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

from .errors import DefaultsHelp, UsageError
from .model_args import add_pair_args, check_pair_args, parse_terms

# arXiv 2410.21027, Table 1: (task, few-shot examples)
PAPER_SUITE = (
    ("arc_challenge", 25),
    ("hellaswag", 10),
    ("mmlu", 5),
    ("truthfulqa_mc2", 0),
    ("winogrande", 5),
    ("gsm8k", 5),
)
SUITES = {"paper": PAPER_SUITE}


def suite_runs(name: str) -> list[tuple[int, list[str]]]:
    """The ``simple_evaluate`` calls of a suite: (num_fewshot, tasks) per shot count, in order of first appearance
    (``paper``: 25 arc_challenge, 10 hellaswag, 5 mmlu winogrande gsm8k, 0 truthfulqa_mc2)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    runs: dict[int, list[str]] = {}
    for task, shots in SUITES[name]:
        runs.setdefault(shots, []).append(task)
    return list(runs.items())


def add_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="lm-evaluation-harness tasks on a base model steered by a value network",
        usage="ivl-fast eval --base DIR --value DIR (--tasks T1,T2 | --suite paper) [options]",
        formatter_class=DefaultsHelp,
    )
    req = add_pair_args(e, vocab_map_help="map file from `ivl-fast vocab-map` (generation only)")
    req.add_argument("--max-length", type=int, default=None, help="context window in tokens (default: the models')")
    t = e.add_argument_group("tasks (one of --tasks, --suite)")
    t.add_argument("--tasks", default=None, metavar="T1,T2", help="comma-separated lm-eval task (or group) names")
    t.add_argument("--suite", default=None, choices=list(SUITES), help="the paper's tasks with its shot counts")
    t.add_argument(
        "--num-fewshot", type=int, default=None, metavar="N", help="few-shot examples (default: each task's own)"
    )
    t.add_argument(
        "--limit", type=float, default=None, metavar="N", help="documents per task (< 1: a fraction); for testing"
    )
    t.add_argument("--include-path", type=Path, default=None, metavar="DIR", help="directory of extra task YAML files")
    t.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="requests per forward / decode batch")
    e.add_argument(
        "--output-path", type=Path, default=None, metavar="DIR", help="directory to write the results JSON into"
    )
    e.add_argument(
        "--seed", type=int, default=None, help="lm-eval's python/numpy/torch/few-shot seeds (default: lm-eval's)"
    )
    e.set_defaults(func=run)


def _check(args) -> list[tuple[int | None, list[str]]]:
    """Refuse flag combinations before anything loads; -> the simple_evaluate runs."""
    if (args.tasks is None) == (args.suite is None):
        raise UsageError("give exactly one of --tasks or --suite")
    if args.suite is not None and args.num_fewshot is not None:
        raise UsageError("--num-fewshot does not go with --suite (the suite fixes each task's shot count)")
    check_pair_args(args, alone="evaluates")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not args.limit > 0:
        raise UsageError(f"--limit must be > 0, got {args.limit:g}")
    if args.limit is not None and args.limit >= 1 and not args.limit.is_integer():
        raise UsageError(f"--limit must be a whole number of documents or a fraction < 1, got {args.limit:g}")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {args.max_length}")
    if args.include_path is not None and not args.include_path.is_dir():
        raise UsageError(f"--include-path {str(args.include_path)!r} is not a directory")
    if args.output_path is not None and args.output_path.exists() and not args.output_path.is_dir():
        raise UsageError(f"--output-path {str(args.output_path)!r} is a file; give a directory for the results")
    if args.suite is not None:
        return list(suite_runs(args.suite))
    tasks = [x.strip() for x in args.tasks.split(",")]
    if not all(tasks):
        raise UsageError(f"--tasks {args.tasks!r} holds an empty task name")
    return [(args.num_fewshot, tasks)]


def _limit(value: float | None):
    return None if value is None else int(value) if value >= 1 else value


def _write_new(directory: Path, stem: str, text: str) -> Path:
    """Write ``text`` to a file of ``directory`` that did not exist (``stem.json``, else ``stem-1.json`` ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = directory / (f"{stem}.json" if n == 0 else f"{stem}-{n}.json")
        try:
            with open(path, "x", encoding="utf-8") as f:  # exclusive: never replaces a file
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"--output-path {str(directory)!r}: no free name for {stem}.json")


def run(args) -> int:
    from .distributed import init_tensor_parallel, quiet_unless

    runs = _check(args)
    rank = init_tensor_parallel(args.tp)
    # --tp: every rank runs the same lm-eval requests in the same order (the model's collectives stay in step);
    # rank 0 prints and writes the results
    with quiet_unless(rank == 0):
        return _run(args, runs, write=rank == 0)


def _run(args, runs, *, write: bool) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm_eval imports datasets

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from ..lm_eval import IVLLM

    model_args = dict(
        base=None if args.base is None else str(args.base),
        value=None if args.value is None else str(args.value),
        alpha=args.alpha,
        scheme=args.scheme,
        vocab_map=None if args.vocab_map is None else str(args.vocab_map),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        draft=None if args.draft is None else str(args.draft),
        num_draft_tokens=args.num_draft_tokens,
        terms="|".join(f"{d}@{w}" for d, w in parse_terms(args)) or None,
        tensor_parallel=args.tp,
    )
    model_args = {k: v for k, v in model_args.items() if v is not None}
    include = None if args.include_path is None else str(args.include_path)
    manager = TaskManager(include_path=include, metadata=dict(model_args))
    wanted = [t for _, tasks in runs for t in tasks]
    unknown = [t for t in wanted if not manager.match_tasks([t])]
    if unknown:
        hint = "" if include else " (local tasks: --include-path DIR)"
        raise UsageError(f"unknown task(s) {', '.join(unknown)}{hint}")
    lm = IVLLM(**model_args)  # loaded once for every run
    model_args["scheme"] = lm.dec.scheme
    seeds = (
        {}
        if args.seed is None
        else {k: args.seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    )
    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    for shots, tasks in runs:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=shots,
            limit=_limit(args.limit),
            batch_size=args.batch_size,
            device=str(lm.dec.device),
            task_manager=manager,
            apply_chat_template=args.apply_chat_template,
            log_samples=False,
            **seeds,
        )
        if results is None:
            continue
        results["config"]["model"] = "ivl"
        results["config"]["model_args"] = model_args
        print(
            f"ivl ({', '.join(f'{k}={v}' for k, v in model_args.items())}), limit: {_limit(args.limit)}, "
            f"num_fewshot: {shots}, batch_size: {args.batch_size}"
        )
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
        if args.output_path is not None and write:
            stem = f"results_{stamp}" + (f"_{shots}shot" if len(runs) > 1 else "")
            text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
            path = _write_new(args.output_path, stem, text)
            print(f"results: {path}", file=sys.stderr)
    return 0
