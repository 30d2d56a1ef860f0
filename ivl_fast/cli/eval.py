"""`ivl-fast eval`: lm-evaluation-harness tasks on a base + value pair (model type "ivl", :mod:`ivl_fast.lm_eval`).

A thin front over ``lm_eval.simple_evaluate`` that takes lm-eval's own flag names (``--num_fewshot``,
``--model_args``, ``--gen_kwargs``, ``--batch_size auto``, ``--output_path``, ``--log_samples``,
``--include_path``, ``--apply_chat_template``; the hyphenated spellings work too): the models are loaded once,
each run prints lm-eval's own table (``lm_eval.utils.make_table``) and, with ``--output_path``, lm-eval's own
tracker (``lm_eval.loggers.EvaluationTracker``) writes its layout: ``DIR/<model>/results_<time>.json`` (and
``samples_<task>_<time>.jsonl`` with ``--log_samples``), new files named by the time (nothing is overwritten or
deleted). ``--suite paper`` runs the paper's few-shot tasks with its shot counts (arXiv 2410.21027, Table 1), one
``simple_evaluate`` call per shot count (:func:`suite_runs`). Datasets come from the Hugging Face cache, local
task files (``--include_path``), or the Hub (lm-eval downloads them) unless ``--offline`` (HF_DATASETS_OFFLINE=1).
lm-eval's own CLI with this model type: :mod:`ivl_fast.lm_eval_cli`.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
    req.add_argument(
        "--max-length", "--max_length", type=int, default=None, help="context window in tokens (default: the models')"
    )
    req.add_argument(
        "--model_args", "--model-args", default=None, metavar="K=V,K=V",
        help="more model_args of the model type 'ivl' (e.g. add_bos_token=True), lm-eval's syntax; not those of the "
        "flags above",
    )  # fmt: skip
    t = e.add_argument_group("tasks (one of --tasks, --suite)")
    t.add_argument("--tasks", default=None, metavar="T1,T2", help="comma-separated lm-eval task (or group) names")
    t.add_argument("--suite", default=None, choices=list(SUITES), help="the paper's tasks with its shot counts")
    t.add_argument(
        "--num_fewshot", "--num-fewshot", type=int, default=None, metavar="N",
        help="few-shot examples (default: each task's own)",
    )  # fmt: skip
    t.add_argument(
        "--limit", type=float, default=None, metavar="N", help="documents per task (< 1: a fraction); for testing"
    )
    t.add_argument(
        "--include_path", "--include-path", type=Path, default=None, metavar="DIR",
        help="directory of extra task YAML files",
    )  # fmt: skip
    t.add_argument(
        "--apply_chat_template", "--apply-chat-template", action="store_true",
        help="render prompts with the chat template",
    )  # fmt: skip
    t.add_argument(
        "--gen_kwargs", "--gen-kwargs", default=None, metavar="K=V,K=V",
        help="generation settings for generate_until tasks, lm-eval's syntax (e.g. temperature=0,max_gen_toks=64)",
    )  # fmt: skip
    e.add_argument(
        "--batch_size", "--batch-size", type=_batch_size_flag, default=8, metavar="N|auto",
        help="requests per forward / decode batch; auto: the largest that fits, from --max_batch_size down",
    )  # fmt: skip
    e.add_argument(
        "--max_batch_size", "--max-batch-size", type=int, default=64, metavar="N", help="where --batch_size auto starts"
    )
    e.add_argument(
        "--output_path", "--output-path", type=Path, default=None, metavar="DIR",
        help="where lm-eval's tracker writes the results (DIR/<model>/results_<time>.json)",
    )  # fmt: skip
    e.add_argument(
        "--log_samples", "--log-samples", action="store_true",
        help="also write each document's prompt, answers and scores (samples_<task>_<time>.jsonl; needs --output_path)",
    )  # fmt: skip
    e.add_argument(
        "--offline", action="store_true",
        help="never download datasets (HF_DATASETS_OFFLINE=1): the Hugging Face cache and local task files only",
    )
    e.add_argument(
        "--seed", type=int, default=None, help="lm-eval's python/numpy/torch/few-shot seeds (default: lm-eval's)"
    )
    e.set_defaults(func=run)


def _batch_size_flag(value: str):
    """--batch_size: an integer, or lm-eval's "auto" / "auto:N"."""
    if value == "auto" or value.startswith("auto:"):
        return value
    return int(value)


def _check(args) -> list[tuple[int | None, list[str]]]:
    """Refuse flag combinations before anything loads; -> the simple_evaluate runs."""
    if (args.tasks is None) == (args.suite is None):
        raise UsageError("give exactly one of --tasks or --suite")
    if args.suite is not None and args.num_fewshot is not None:
        raise UsageError("--num_fewshot does not go with --suite (the suite fixes each task's shot count)")
    check_pair_args(args, alone="evaluates")
    if isinstance(args.batch_size, int) and args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1 or auto, got {args.batch_size}")
    if args.max_batch_size < 1:
        raise UsageError(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if args.log_samples and args.output_path is None:
        raise UsageError("--log_samples needs --output_path (where the samples files go)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not args.limit > 0:
        raise UsageError(f"--limit must be > 0, got {args.limit:g}")
    if args.limit is not None and args.limit >= 1 and not args.limit.is_integer():
        raise UsageError(f"--limit must be a whole number of documents or a fraction < 1, got {args.limit:g}")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {args.max_length}")
    if args.include_path is not None and not args.include_path.is_dir():
        raise UsageError(f"--include_path {str(args.include_path)!r} is not a directory")
    out = args.output_path
    if out is not None and out.suffix != ".json" and out.exists() and not out.is_dir():
        raise UsageError(f"--output_path {str(out)!r} is a file; give a directory (or a name ending in .json)")
    _extra_model_args(args)  # refused before anything loads
    if args.suite is not None:
        return list(suite_runs(args.suite))
    tasks = [x.strip() for x in args.tasks.split(",")]
    if not all(tasks):
        raise UsageError(f"--tasks {args.tasks!r} holds an empty task name")
    return [(args.num_fewshot, tasks)]


def _limit(value: float | None):
    return None if value is None else int(value) if value >= 1 else value


@contextlib.contextmanager
def _dataset_errors(offline: bool):
    """A task's dataset that cannot be read: one line saying why and what to do (not the datasets traceback)."""
    try:
        yield
    except ConnectionError as e:  # datasets' "Couldn't reach '<repo>' on the Hub (OfflineModeIsEnabled)", or no network
        if offline:
            raise UsageError(
                f"{e}: the dataset is not in the Hugging Face cache and --offline forbids downloading it; run without "
                "--offline to let lm-eval download it, or give local task files with --include_path"
            ) from None
        raise UsageError(f"{e}: lm-eval could not download the dataset (is the Hub reachable from here?)") from None


# what the flags set: --model_args may not set them again
FLAG_MODEL_ARGS = ("base", "value", "alpha", "scheme", "vocab_map", "dtype", "device", "batch_size", "max_length")
FLAG_MODEL_ARGS += ("draft", "num_draft_tokens", "terms", "tensor_parallel", "max_batch_size")


def _extra_model_args(args) -> dict:
    """--model_args (lm-eval's "k=v,k=v", parsed by lm-eval's own parser): what the flags do not set."""
    if not args.model_args:
        return {}
    from lm_eval.utils import simple_parse_args_string

    try:
        extra = simple_parse_args_string(args.model_args)
    except Exception as e:  # noqa: BLE001  (lm-eval's parser raises whatever a malformed string makes it raise)
        raise UsageError(f"--model_args {args.model_args!r} is not lm-eval's K=V,K=V: {e}") from None
    taken = sorted(set(extra) & set(FLAG_MODEL_ARGS))
    if taken:
        raise UsageError(f"--model_args sets {', '.join(taken)}, which the flags set: use the flags")
    return extra


def run(args) -> int:
    from .distributed import init_tensor_parallel, quiet_unless

    runs = _check(args)
    rank = init_tensor_parallel(args.tp)
    # --tp: every rank runs the same lm-eval requests in the same order (the model's collectives stay in step);
    # rank 0 prints and writes the results
    with quiet_unless(rank == 0):
        return _run(args, runs, write=rank == 0)


def _run(args, runs, *, write: bool) -> int:
    if args.offline:
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # before lm_eval imports datasets

    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table, sanitize_model_name

    from ..lm_eval import IVLLM, quiet_git

    model_args = dict(
        base=None if args.base is None else str(args.base),
        value=None if args.value is None else str(args.value),
        alpha=args.alpha,
        scheme=args.scheme,
        vocab_map=None if args.vocab_map is None else str(args.vocab_map),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        max_batch_size=args.max_batch_size if isinstance(args.batch_size, str) else None,
        max_length=args.max_length,
        draft=None if args.draft is None else str(args.draft),
        num_draft_tokens=args.num_draft_tokens,
        terms="|".join(f"{d}@{w}" for d, w in parse_terms(args)) or None,
        tensor_parallel=args.tp,
    )
    model_args = {k: v for k, v in model_args.items() if v is not None} | _extra_model_args(args)
    include = None if args.include_path is None else str(args.include_path)
    manager = TaskManager(include_path=include, metadata=dict(model_args))
    wanted = [t for _, tasks in runs for t in tasks]
    unknown = [t for t in wanted if not manager.match_tasks([t])]
    if unknown:
        hint = "" if include else " (local tasks: --include-path DIR)"
        raise UsageError(f"unknown task(s) {', '.join(unknown)}{hint}")
    lm = IVLLM(**model_args)  # loaded once for every run
    model_args["scheme"] = lm.dec.scheme
    model_args["batch_size"] = lm.batch_size  # "auto": what it found
    model_args.pop("max_batch_size", None)
    name = "ivl__" + Path(str(model_args.get("value", model_args.get("base", "model")))).name
    seeds = (
        {}
        if args.seed is None
        else {k: args.seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    )
    for shots, tasks in runs:
        tracker = EvaluationTracker(output_path=None if args.output_path is None else str(args.output_path))
        with quiet_git(), _dataset_errors(args.offline):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=shots,
                limit=_limit(args.limit),
                batch_size=lm.batch_size,
                device=str(lm.dec.device),
                task_manager=manager,
                apply_chat_template=args.apply_chat_template,
                gen_kwargs=args.gen_kwargs,
                log_samples=args.log_samples,
                evaluation_tracker=tracker,
                **seeds,
            )
        if results is None:
            continue
        results["config"]["model"] = "ivl"
        results["config"]["model_args"] = model_args
        samples = results.pop("samples", None)
        print(
            f"ivl ({', '.join(f'{k}={v}' for k, v in model_args.items())}), gen_kwargs: ({args.gen_kwargs}), "
            f"limit: {_limit(args.limit)}, num_fewshot: {shots}, batch_size: {lm.batch_size}"
        )
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
        if args.output_path is not None and write:
            general = tracker.general_config_tracker  # the folder lm-eval names after the model
            general.model_name, general.model_name_sanitized = name, sanitize_model_name(name)
            tracker.save_results_aggregated(results=results, samples=samples if args.log_samples else None)
            if args.log_samples:
                for task in results["configs"]:
                    tracker.save_results_samples(task_name=task, samples=samples[task])
            where = Path(args.output_path)
            where = where.parent if where.suffix == ".json" else where / general.model_name_sanitized
            print(f"results: {where} (results_{tracker.date_id}.json)", file=sys.stderr)
    return 0
