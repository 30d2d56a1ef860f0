"""The ``ivl-fast`` command line.

Subcommands: ``generate`` (IVL decoding from checkpoints), ``make-tiny`` (random base/value checkpoints built
offline). Each subcommand lives in its own ``_cmd_*`` function registered in :func:`build_parser`, so later
ones (train, vocab-map, bench, demo) slot in beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (transformers semantics)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 disables")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 disables")
    g.add_argument("--min-p", type=float, default=0.0, help="0 disables")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string (repeatable)")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the EOS token")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", type=Path, help="base model checkpoint directory (Hugging Face layout)")
    g.add_argument("--value", type=Path, help="value network checkpoint directory")
    g.add_argument("--vocab-map", type=Path, default=None, help="map file from `ivl-fast vocab-map` (other tokenizers)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the value logits")
    g.add_argument(
        "--scheme",
        default=None,
        choices=["residual", "cascade", "cascade+", "base", "value_only"],
        help="default: the value checkpoint's ivl.json, else residual",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp32 on CPU, checkpoint's on GPU)"
    )
    g.add_argument("--engine", default="auto", choices=["auto", "lean", "hf"])
    g.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flash"])
    g.add_argument(
        "--sample-backend", default="auto", choices=["auto", "triton", "torch"], help="fused sampling op backend"
    )
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .bin checkpoints (unsafe)")


def _read_prompts(args) -> list:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {str(path)!r} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from e
            if isinstance(obj, str):
                prompts.append(obj)
            elif isinstance(obj, dict) and ("messages" in obj or "prompt" in obj):
                prompts.append(obj.get("messages", obj.get("prompt")))
            else:
                raise ValueError(f"{path}:{n}: expected a string or an object with 'prompt' or 'messages'")
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r} holds no prompts")
    if not args.chat and any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"--prompts-file {str(path)!r} holds chat messages; add --chat to render them")
    return prompts


def _run_batches(dec, prompts, args, gen_kwargs, desc: str):
    from tqdm.auto import tqdm

    texts, tokens, t0 = [], 0, time.perf_counter()
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    bar = tqdm(batches, desc=desc, unit="batch", disable=len(batches) < 2, file=sys.stderr)
    tok = dec.tokenizer
    for batch in bar:
        if args.chat:
            from .chat import as_messages, render_chat

            raw = [render_chat(tok, as_messages(p, args.system)) for p in batch]
            ids = [tok(r, add_special_tokens=False)["input_ids"] for r in raw]
        else:
            raw = list(batch)
            ids = [tok(p)["input_ids"] for p in batch]
        # across vocabularies the base reads the prompt text with its own tokenizer
        out = dec.generate(ids, texts=raw if getattr(dec, "cross_vocab", False) else None, **gen_kwargs)
        t = out.prompt_length
        for row, n in zip(out.sequences.tolist(), out.num_new_tokens.tolist(), strict=True):
            texts.append(tok.decode(row[t : t + n], skip_special_tokens=True))
            tokens += n
    return texts, tokens, time.perf_counter() - t0


def _cmd_generate(args) -> int:
    from . import FastIVLDecoder

    if (args.prompt is None) == (args.prompts_file is None):
        raise SystemExit("ivl-fast generate: give exactly one of --prompt or --prompts-file")
    if args.prompt is not None and not args.prompt:
        raise SystemExit("ivl-fast generate: --prompt is empty")
    if args.batch_size < 1:
        raise SystemExit(f"ivl-fast generate: --batch-size must be >= 1, got {args.batch_size}")
    prompts = _read_prompts(args)
    common = dict(device=args.device, dtype=args.dtype, engine=args.engine, attn_backend=args.attn_backend)
    dec = FastIVLDecoder.from_pretrained(
        args.base,
        args.value,
        args.vocab_map,
        alpha=args.alpha,
        scheme=args.scheme,
        allow_pickle=args.allow_pickle,
        sample_backend=args.sample_backend,
        graphs=args.graphs,
        graph_mode=args.graph_mode,
        **common,
    )
    if dec.tokenizer is None:
        raise SystemExit("ivl-fast generate: the checkpoints hold no tokenizer files; text prompts need one")
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop_strings=args.stop,
    )
    if args.no_eos:
        gen_kwargs["eos_token_id"] = []
    label = {"base": "base alone", "value_only": "value alone"}.get(dec.scheme, f"base+value ({dec.scheme})")
    if args.compare_base:  # time both sides warm (first calls pay one-off allocation and compilation)
        _run_batches(dec, prompts[: args.batch_size], args, {**gen_kwargs, "max_new_tokens": 2}, "warm-up")
    texts, ntok, secs = _run_batches(dec, prompts, args, gen_kwargs, label)
    report = {"scheme": dec.scheme, "tokens": ntok, "seconds": secs, "tokens_per_s": ntok / secs if secs else 0.0}
    print(f"{label}: {ntok} tokens in {secs:.2f} s = {report['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    compare = None
    if args.compare_base and dec.scheme not in ("base", "value_only"):
        base_tok = dec.base_tokenizer if dec.cross_vocab else dec.tokenizer  # the base reads its own tokens
        base_only = FastIVLDecoder(
            dec.base,
            None,
            scheme="base",
            tokenizer=base_tok,
            sample_backend=args.sample_backend,
            graphs=args.graphs if not dec.cross_vocab else "auto",
        )
        _run_batches(base_only, prompts[: args.batch_size], args, {**gen_kwargs, "max_new_tokens": 2}, "warm-up")
        _, btok, bsecs = _run_batches(base_only, prompts, args, gen_kwargs, "base alone")
        compare = {"tokens": btok, "seconds": bsecs, "tokens_per_s": btok / bsecs if bsecs else 0.0}
        ratio = (secs / max(ntok, 1)) / (bsecs / max(btok, 1))
        compare["pair_over_base_time_per_token"] = ratio
        print(
            f"base alone: {btok} tokens in {bsecs:.2f} s = {compare['tokens_per_s']:.1f} tokens/s; "
            f"pair/base time per token = {ratio:.2f}x",
            file=sys.stderr,
        )
    if args.json:
        outputs = [{"prompt": p, "text": t} for p, t in zip(prompts, texts, strict=True)]
        print(json.dumps({"outputs": outputs, "speed": report, "base_alone": compare}, ensure_ascii=False))
    else:
        for i, t in enumerate(texts):
            if len(texts) > 1:
                print(f"### {i}")
            print(t)
    return 0


def _cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_pair

    paths = make_tiny_pair(args.out, vocab_size=args.vocab_size, seed=args.seed)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _cmd_train(args) -> int:
    from .train import TrainConfig, train_value_model

    cfg = TrainConfig(
        bases=[str(b) for b in args.base],
        value_init=str(args.value_init),
        data=str(args.data),
        out=str(args.out),
        l1=args.l1,
        scheme=args.scheme,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_tokens=args.batch_tokens,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_length=args.max_length,
        drop_long=args.drop_long,
        grad_checkpointing=args.grad_checkpointing,
        save_every=args.save_every,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        dtype=args.dtype,
        loss_backend=args.loss_backend,
        fsdp=args.fsdp,
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        debug_kill_at_step=args.debug_kill_at_step,
    )
    summary = train_value_model(cfg)
    d = summary["data"]
    print(
        f"trained {summary['steps']} steps in {summary['seconds']:.1f} s on {d['used']} conversations "
        f"({d['skipped_no_assistant']} without an assistant turn skipped, {d['truncated']} truncated, "
        f"{d['dropped_too_long']} dropped); padding {100 * summary['padding_fraction']:.1f}%; "
        f"value network: {args.out}",
        file=sys.stderr,
    )
    return 0


def _cmd_vocab_map(args) -> int:
    from .vocab import VocabMap

    texts = []
    for f in args.corpus:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file {str(p)!r} does not exist")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
    if not any(t.strip() for t in texts):
        raise ValueError("the corpus files hold no text")
    held_out = []
    if args.evaluate:  # hold out the last 10% of the corpus for the quality report
        joined = "\n".join(texts)
        cut = int(len(joined) * 0.9)
        texts, held_out = [joined[:cut]], [joined[cut:]]
    t0 = time.perf_counter()
    vmap = VocabMap.build(args.base_tokenizer, args.value_tokenizer, texts, top_k=args.top_k, threads=args.threads)
    secs = time.perf_counter() - t0
    vmap.save(args.out)
    report = {"out": str(args.out), "shape": list(vmap.shape), "seconds": secs, **vmap.stats}
    if args.evaluate:
        from .vocab.build import split_corpus

        report["evaluation"] = vmap.evaluate(args.base_tokenizer, args.value_tokenizer, split_corpus(held_out))
    print(json.dumps(report, indent=1))
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(work_dir=str(args.work_dir), quick=args.quick, seed=args.seed))
    if args.json:
        print(json.dumps(result))
    else:
        from .demo import to_markdown

        print(to_markdown(result))
        print(f"results: {args.work_dir}/results.json, results.md, results.png", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivl-fast", description="Fast Inverse Value Learning")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate with a base model steered by a value network")
    _add_model_args(g)
    src = g.add_argument_group("prompts")
    src.add_argument("--prompt", default=None)
    src.add_argument("--prompts-file", default=None, help="one prompt per line (.txt) or JSONL (prompt/messages)")
    src.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    src.add_argument("--system", default=None, help="system message for --chat")
    src.add_argument("--batch-size", type=int, default=8)
    _add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of plain text")
    g.add_argument("--compare-base", action="store_true", help="also time the base alone and print the ratio")
    g.add_argument(
        "--graphs",
        default="auto",
        choices=["auto", "cuda", "emulate", "off"],
        help="decode steps as captured graphs (auto: CUDA graphs on GPU; emulate: graph semantics on CPU)",
    )
    g.add_argument("--graph-mode", default="fused", choices=["fused", "two_stream", "one_stream"])
    g.set_defaults(func=_cmd_generate)

    tr = sub.add_parser("train", help="train a value network on a frozen base from chat demonstrations")
    tr.add_argument("--base", type=Path, action="append", required=True, help="frozen base; repeat for a curriculum")
    tr.add_argument("--value-init", type=Path, required=True, help="initial value network (normally the small base)")
    tr.add_argument("--data", type=Path, required=True, help="JSON/JSONL demonstrations (ShareGPT or OpenAI form)")
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--l1", type=float, default=1.0, help="L1 weight on the value logits (0 = plain IVL)")
    tr.add_argument("--scheme", default="residual", choices=["residual", "cascade", "cascade+"])
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--warmup-ratio", type=float, default=0.04)
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--max-steps", type=int, default=None, help="optimizer steps per base (overrides --epochs)")
    tr.add_argument("--batch-tokens", type=int, default=16384, help="tokens per micro-batch, padding included")
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--max-grad-norm", type=float, default=1.0)
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--max-length", type=int, default=4096)
    tr.add_argument("--drop-long", action="store_true", help="drop over-long conversations instead of truncating")
    tr.add_argument("--grad-checkpointing", action="store_true")
    tr.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (0: never)")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--overwrite", action="store_true")
    tr.add_argument("--device", default=None)
    tr.add_argument("--dtype", default=None, help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    tr.add_argument("--loss-backend", default="auto", choices=["auto", "triton", "torch"])
    tr.add_argument("--fsdp", action="store_true", help="shard the value network with FSDP (under torchrun)")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--allow-pickle", action="store_true")
    tr.add_argument("--debug-kill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    tr.set_defaults(func=_cmd_train)

    vm = sub.add_parser("vocab-map", help="build a sparse base->value vocabulary map (MinED/DTW alignment)")
    vm.add_argument("--base-tokenizer", type=Path, required=True)
    vm.add_argument("--value-tokenizer", type=Path, required=True)
    vm.add_argument("--corpus", nargs="+", required=True, metavar="FILE")
    vm.add_argument("--out", type=Path, required=True)
    vm.add_argument("--top-k", type=int, default=3, help="value tokens kept per base token")
    vm.add_argument("--threads", type=int, default=None)
    vm.add_argument("--evaluate", action="store_true", help="hold out 10%% of the corpus and report the overlap")
    vm.set_defaults(func=_cmd_vocab_map)

    dm = sub.add_parser("demo", help="the paper's transfer table in miniature, built from nothing (CPU, offline)")
    dm.add_argument("--quick", action="store_true", help="a much smaller version (the test suite runs it)")
    dm.add_argument("--work-dir", type=Path, default=Path("ivl-demo"))
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--json", action="store_true")
    dm.set_defaults(func=_cmd_demo)

    t = sub.add_parser("make-tiny", help="build a random tiny base/value pair with a BPE tokenizer (offline)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_make_tiny)
    return parser


def _version() -> str:
    from . import __version__

    return f"ivl-fast {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        NotImplementedError,
        FloatingPointError,
    ) as e:
        print(f"ivl-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
