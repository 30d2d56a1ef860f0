"""`ivl-fast generate`: IVL decoding from checkpoints, prompts from the command line or a file."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..decode.options import GenerationOptions
from .errors import DefaultsHelp, UsageError
from .model_args import add_pair_args, check_pair_args, draft_kwargs, term_kwargs


def add_parser(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="generate with a base model steered by a value network",
        usage="ivl-fast generate --base DIR --value DIR (--prompt TEXT | --prompts-file FILE) [options]",
        formatter_class=DefaultsHelp,
    )
    _add_model_args(g)
    src = g.add_argument_group("prompts (one of --prompt, --prompts-file)")
    src.add_argument("--prompt", default=None, help="one prompt")
    src.add_argument("--prompts-file", default=None, help="one prompt per line (.txt) or JSONL (prompt/messages)")
    src.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    src.add_argument("--system", default=None, help="system message for --chat")
    src.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help="extra chat template variables for --chat, a JSON object (e.g. '{\"enable_thinking\": false}' for Qwen3)",
    )
    src.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    _add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of plain text")
    g.add_argument(
        "--explain",
        type=int,
        nargs="?",
        const=5,
        default=0,
        metavar="K",
        help="after each answer, what the value network changed: per token the top-K of the base alone, of the value "
        "network's delta and of the combination, '*' where it changed the choice (K: 5 when given without a "
        "number; 0: off)",
    )
    g.add_argument("--compare-base", action="store_true", help="also time the base alone and print the ratio")
    g.add_argument(
        "--graphs",
        default="auto",
        choices=["auto", "cuda", "emulate", "off"],
        help="decode steps as captured graphs (auto: CUDA graphs on GPU; emulate: graph semantics on CPU)",
    )
    g.add_argument(
        "--graph-mode", default="fused", choices=["fused", "two_stream", "one_stream"], help="layout of a graph step"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.set_defaults(func=run)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # every default is "unset" (None): the value comes from the checkpoint's generation_config.json, else the
    # defaults the Python API uses (ivl_fast.decode.options.GenerationOptions), shown in the help
    d = GenerationOptions()
    g = p.add_argument_group("sampling (transformers semantics; unset: the checkpoint's generation_config.json)")
    g.add_argument(
        "--max-new-tokens", type=int, default=None, help=f"new tokens per prompt at most ({d.max_new_tokens})"
    )
    g.add_argument(
        "--do-sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample instead of greedy decoding (--no-do-sample: greedy even if the checkpoint samples)",
    )
    g.add_argument("--temperature", type=float, default=None, help=f"softmax temperature, 0: greedy ({d.temperature})")
    g.add_argument("--top-k", type=int, default=None, help=f"keep the k most likely tokens, 0 disables ({d.top_k})")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass, 1.0 disables ({d.top_p})")
    g.add_argument(
        "--min-p", type=float, default=None, help=f"drop tokens below min_p x the top probability ({d.min_p})"
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help=f"transformers' penalty on prompt + generated tokens, 1.0 disables ({d.repetition_penalty})",
    )
    g.add_argument("--presence-penalty", type=float, default=None, help=f"OpenAI's, in [-2, 2] ({d.presence_penalty})")
    g.add_argument(
        "--frequency-penalty", type=float, default=None, help=f"OpenAI's, in [-2, 2] ({d.frequency_penalty})"
    )
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible on one device)")
    g.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string (repeatable)")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the EOS token")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = add_pair_args(p, vocab_map_help="map file from `ivl-fast vocab-map` (other tokenizers)")
    g.add_argument(
        "--engine", default="auto", choices=["auto", "lean", "hf"], help="lean Llama-family engine or transformers"
    )
    g.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flash"], help="attention kernels (lean engine)")
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


def _chat_template_kwargs(args) -> dict | None:
    """--chat-template-kwargs as a dict (None when not given); bad JSON, a non-object or a reserved key is a
    UsageError naming the flag."""
    raw = args.chat_template_kwargs
    if raw is None:
        return None
    if not args.chat:  # else the variables would be dropped without a word
        raise UsageError("--chat-template-kwargs needs --chat (the variables are read by the chat template)")
    try:
        kw = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"--chat-template-kwargs is not valid JSON ({e.msg} at character {e.pos}): {raw!r}") from None
    from ..chat import check_chat_template_kwargs

    try:
        return check_chat_template_kwargs(kw, name="--chat-template-kwargs")
    except TypeError:
        raise UsageError(f"--chat-template-kwargs must be a JSON object, got {type(kw).__name__}: {raw!r}") from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run_batches(dec, prompts, args, gen_kwargs, desc: str):
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    n_new = dec.options(**gen_kwargs).max_new_tokens  # unset flags resolved as generate() resolves them
    # one bar over every batch's decode steps (a batch that stops early jumps to its end)
    bar = tqdm(total=len(batches) * n_new, desc=desc, unit="step", disable=args.no_progress, file=sys.stderr)
    try:
        return _decode_batches(dec, batches, args, gen_kwargs, bar, n_new, t0)
    finally:
        bar.close()  # ends the bar's line, so that an error below it starts on a line of its own


def _decode_batches(dec, batches, args, gen_kwargs, bar, n_new: int, t0: float):
    texts, tokens = [], 0
    explained = []  # with --explain: per prompt (steps, emitted token texts, changed fraction)
    spec = {"rounds": 0, "drafted": 0, "accepted": 0}  # speculative decoding's counts over every batch
    tok = dec.tokenizer
    for k, batch in enumerate(batches):
        if args.chat:
            from ..chat import as_messages, render_chat

            kw = args.chat_template_kwargs
            raw = [render_chat(tok, as_messages(p, args.system), chat_template_kwargs=kw) for p in batch]
            ids = [tok(r, add_special_tokens=False)["input_ids"] for r in raw]
        else:
            raw = list(batch)
            ids = [tok(p)["input_ids"] for p in batch]

        def progress(steps: int, start: int = k * n_new) -> None:
            bar.update(start + steps - bar.n)

        # across vocabularies the base reads the prompt text with its own tokenizer
        texts_for_base = raw if getattr(dec, "cross_vocab", False) else None
        out = dec.generate(ids, texts=texts_for_base, progress=progress, **gen_kwargs)
        progress(n_new)
        for key in spec if "drafted" in out.timings else ():
            spec[key] += out.timings[key]
        t = out.prompt_length
        for i, (row, n) in enumerate(zip(out.sequences.tolist(), out.num_new_tokens.tolist(), strict=True)):
            texts.append(tok.decode(row[t : t + n], skip_special_tokens=True))
            tokens += n
            if out.components is not None:
                frac = float(out.components.changed_fraction()[i])
                explained.append((out.components.steps(i, tok), [tok.decode([x]) for x in row[t : t + n]], frac))
    if spec["drafted"]:
        spec["acceptance_rate"] = spec["accepted"] / spec["drafted"]
    return texts, tokens, time.perf_counter() - t0, spec if spec["drafted"] else None, explained


def run(args) -> int:
    from .distributed import init_tensor_parallel, quiet_unless

    rank = init_tensor_parallel(args.tp)
    with quiet_unless(rank == 0):  # every rank decodes the same prompts in lock step; rank 0 prints
        return _run(args)


def _run(args) -> int:
    from .. import FastIVLDecoder
    from ..decode.components import format_steps

    if (args.prompt is None) == (args.prompts_file is None):
        raise UsageError("give exactly one of --prompt or --prompts-file")
    if args.prompt is not None and not args.prompt:
        raise UsageError("--prompt is empty")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.system is not None and not args.chat:  # else the system message would be dropped without a word
        raise UsageError("--system needs --chat (the system message is rendered by the chat template)")
    args.chat_template_kwargs = _chat_template_kwargs(args)
    check_pair_args(args, alone="decodes")
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
        **draft_kwargs(args),
        **term_kwargs(args),
        **common,
        tensor_parallel=args.tp,
    )
    if dec.tokenizer is None:
        where = " and ".join(repr(str(x)) for x in (args.base, args.value) if x is not None)
        raise UsageError(f"no tokenizer files in {where}; text prompts need one (save it with the checkpoint)")
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop_strings=args.stop,
    )
    if args.no_eos:
        gen_kwargs["eos_token_id"] = []
    if args.explain < 0:
        raise UsageError(f"--explain must be >= 0, got {args.explain}")
    if args.explain:
        gen_kwargs["return_components"] = args.explain
    label = {"base": "base alone", "value_only": "value alone"}.get(dec.scheme, f"base+value ({dec.scheme})")
    if args.compare_base:  # time both sides warm (first calls pay one-off allocation and compilation)
        _run_batches(dec, prompts[: args.batch_size], args, {**gen_kwargs, "max_new_tokens": 2}, "warm-up")
    texts, ntok, secs, spec, explained = _run_batches(dec, prompts, args, gen_kwargs, label)
    report = {"scheme": dec.scheme, "tokens": ntok, "seconds": secs, "tokens_per_s": ntok / secs if secs else 0.0}
    print(f"{label}: {ntok} tokens in {secs:.2f} s = {report['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    if spec is not None:
        report["speculative"] = {"num_draft_tokens": dec.num_draft_tokens, **spec}
        print(
            f"speculative: {spec['rounds']} rounds, {spec['accepted']}/{spec['drafted']} drafted tokens accepted "
            f"({spec['acceptance_rate']:.2f})",
            file=sys.stderr,
        )
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
            generation_config=dec.generation_config,  # the same defaults as the pair's run
        )
        base_kwargs = {k: v for k, v in gen_kwargs.items() if k != "return_components"}
        _run_batches(base_only, prompts[: args.batch_size], args, {**base_kwargs, "max_new_tokens": 2}, "warm-up")
        _, btok, bsecs, _, _ = _run_batches(base_only, prompts, args, base_kwargs, "base alone")
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
        for o, (steps, emitted, frac) in zip(outputs, explained, strict=False):
            o["explain"] = [{"token": e, **st} for st, e in zip(steps, emitted, strict=True)]
            o["changed_fraction"] = frac
        print(json.dumps({"outputs": outputs, "speed": report, "base_alone": compare}, ensure_ascii=False))
    else:
        for i, t in enumerate(texts):
            if len(texts) > 1:
                print(f"### {i}")
            print(t)
            if explained:
                print(format_steps(*explained[i][:2]))
    return 0
