"""`ivl-fast serve`: the OpenAI-compatible server (:mod:`ivl_fast.serve`) on one continuous batch."""

from __future__ import annotations

import sys

from .errors import DefaultsHelp, UsageError
from .model_args import add_pair_args, check_pair_args, draft_kwargs, term_kwargs


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server (completions, chat, streaming) with continuous batching",
        usage="ivl-fast serve --base DIR --value DIR [--host 127.0.0.1] [--port 8000] [options]",
        formatter_class=DefaultsHelp,
    )
    add_pair_args(s, vocab_map_help="map file from `ivl-fast vocab-map` (a value network on another tokenizer)")
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    g.add_argument("--port", type=int, default=8000, help="port to bind")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    g.add_argument("--served-model-name", default=None, help="the model id of the API (default: the value dir's name)")
    g.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="sequences decoded together (slots)")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="N",
        help="tokens per sequence, prompt + new (default: the models' context, at most 2048)",
    )
    g.add_argument("--max-queue", type=int, default=256, metavar="N", help="sequences waiting for a slot (then 503)")
    g.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=256,
        metavar="N",
        help="prompt tokens admitted between two decode steps at most (bounds the stall a burst of arrivals causes)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens one step processes at most: one per running sequence + the prompt tokens admitted before it "
        "(at least one request while a slot is free), so every step costs about the same and streams stay even "
        "(default: no such bound, --max-prefill-tokens only)",
    )
    s.set_defaults(func=run)


def load(args):
    """-> (scheduler, app) for the flags (the models loaded, the batch opened, the worker not yet started)."""
    from .. import FastIVLDecoder
    from ..serve.app import build_app
    from ..serve.metrics import Metrics
    from ..serve.scheduler import Scheduler

    check_pair_args(args, alone="serves")
    for flag, v, lo in (
        ("--max-batch-size", args.max_batch_size, 1),
        ("--max-queue", args.max_queue, 1),
        ("--port", args.port, 0),
        ("--max-prefill-tokens", args.max_prefill_tokens, 1),
        ("--max-num-batched-tokens", args.max_num_batched_tokens or 1, 1),
    ):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    dec = FastIVLDecoder.from_pretrained(
        args.base,
        args.value,
        vocab_map=args.vocab_map,
        alpha=args.alpha,
        scheme=args.scheme,
        device=args.device,
        dtype=args.dtype,
        **draft_kwargs(args),
        **term_kwargs(args),
        tensor_parallel=args.tp,
    )
    if dec.tokenizer is None:
        raise UsageError("the checkpoints hold no tokenizer files; the server needs one to read text")
    top = dec.max_context
    max_len = args.max_model_len or min(top, 2048)
    if not 2 <= max_len <= top:
        raise UsageError(f"--max-model-len must be in [2, {top}] (the models' context), got {max_len}")
    name = args.served_model_name or (args.value or args.base).resolve().name
    sched = Scheduler(
        dec,
        max_batch_size=args.max_batch_size,
        max_model_len=max_len,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        metrics=Metrics(),
    )
    return sched, build_app(sched, served_model_name=name, api_key=args.api_key)


def _server(config):
    """uvicorn's server, except that SIGINT / SIGTERM end it with exit status 0 (uvicorn re-raises the signal after
    its graceful shutdown): it stops accepting, lets running requests finish, then returns."""
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server(config)


def run(args) -> int:
    import uvicorn

    from .distributed import init_tensor_parallel, quiet_unless

    rank = init_tensor_parallel(args.tp)
    group = None
    if args.tp not in (None, 1):  # rank 0 serves; the others follow its batch (ivl_fast.serve.follow)
        from ..serve.follow import MirroredBatch, control_group, follow, shared_seed

        group = control_group()
        shared_seed(group)
        if rank != 0:
            with quiet_unless(False):
                sched, _ = load(args)
                follow(sched.batch, group)
            return 0
    sched, app = load(args)
    if group is not None:
        sched.batch = MirroredBatch(sched.batch, group)
    sched.start()
    print(f"ivl-fast serve: http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM stops)", file=sys.stderr)
    try:
        _server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()
    finally:
        sched.shutdown()
        if group is not None:
            sched.batch.close()
    print("ivl-fast serve: stopped (running requests finished)", file=sys.stderr)
    return 0
