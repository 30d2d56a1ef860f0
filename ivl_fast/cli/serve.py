"""`ivl-fast serve`: the OpenAI-compatible server (:mod:`ivl_fast.serve`) on one continuous batch."""

from __future__ import annotations

import sys

from ..serve import DEFAULT_MAX_BODY_BYTES
from .errors import DefaultsHelp, UsageError
from .model_args import add_pair_args, check_pair_args, draft_kwargs, parse_terms, term_kwargs


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
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help="largest request body accepted (then 413)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM / Ctrl-C: seconds the running and waiting requests may still take; then they end with a "
        "503 and the server exits 0 (a second signal ends them at once)",
    )
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
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|TEMPLATE",
        help="the chat template for /v1/chat/completions and /tokenize: a Jinja file, or the template itself "
        "(default: the tokenizer's own, else ivl-fast's)",
    )
    g.add_argument(
        "--max-components",
        type=int,
        default=5,
        metavar="N",
        help="the most entries of what the value network changed a request may ask for (return_components); "
        "0: none (steps replayed as CUDA graphs compute them for every row whenever N > 0)",
    )
    g.add_argument(
        "--generation-config",
        choices=("auto", "vllm"),
        default="auto",
        help="auto: the checkpoint's generation_config.json gives the defaults of temperature, top_p, top_k, min_p, "
        "repetition_penalty and max_tokens (max_new_tokens) for requests that leave them out, as vLLM does; "
        "vllm: OpenAI's defaults",
    )
    s.set_defaults(func=run)


def chat_template_arg(value: str | None) -> str | None:
    """--chat-template: a file's text (a path that exists), else the value itself if it reads as a Jinja template
    (vLLM's rule); a path that does not exist and holds no template syntax is refused."""
    from pathlib import Path

    if value is None:
        return None
    p = Path(value)
    try:
        if p.is_file():
            return p.read_text(encoding="utf-8")
    except OSError:
        pass
    if "{{" in value or "{%" in value:
        return value
    raise UsageError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def load(args):
    """-> (scheduler, app) for the flags (the models loaded, the batch opened, the worker not yet started)."""
    from .. import FastIVLDecoder
    from ..serve.app import build_app
    from ..serve.metrics import Metrics
    from ..serve.protocol import generation_defaults
    from ..serve.scheduler import Scheduler

    check_pair_args(args, alone="serves")
    for flag, v, lo in (
        ("--max-batch-size", args.max_batch_size, 1),
        ("--max-queue", args.max_queue, 1),
        ("--max-prefill-tokens", args.max_prefill_tokens, 1),
        ("--max-num-batched-tokens", args.max_num_batched_tokens or 1, 1),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-components", args.max_components, 0),
    ):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if not 0 <= args.drain_timeout < float("inf"):
        raise UsageError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    _refuse_adapter_models(args)
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
    top = dec.max_batch_len  # the context, less a draft's look-ahead
    max_len = args.max_model_len or min(top, 2048)
    if not 2 <= max_len <= top:
        ahead = dec.max_context - top
        why = "the models' context" + (f" less {ahead} for drafted tokens" if ahead > 0 else "")
        raise UsageError(f"--max-model-len must be in [2, {top}] ({why}), got {max_len}")
    name = args.served_model_name or (args.value or args.base).resolve().name
    template = chat_template_arg(args.chat_template)
    if template is not None:
        import jinja2

        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as e:
            raise UsageError(f"--chat-template does not parse: {e}") from None
    defaults = generation_defaults(dec.generation_config) if args.generation_config == "auto" else {}
    if defaults:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(defaults.items()))
        print(f"ivl-fast serve: request defaults from the checkpoint's generation config: {shown}", file=sys.stderr)
    sched = Scheduler(
        dec,
        max_batch_size=args.max_batch_size,
        max_model_len=max_len,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_components=args.max_components,
        metrics=Metrics(name),
    )
    app = build_app(
        sched,
        served_model_name=name,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        defaults=defaults,
        chat_template=template,
    )
    return sched, app


def _refuse_adapter_models(args) -> None:
    """A checkpoint the lean engine does not implement would load on the transformers adapter, which has no slots
    for continuous batching: refused on one line from its config.json, before any weights load (the scheduler
    refuses such an engine too, whatever loaded it). A directory that cannot be read is left to the loader's error."""
    from ..models.checkpoint import read_config
    from ..models.config import LeanConfig, UnsupportedArchitecture
    from ..models.probe import is_probe_config

    dirs = [("--base", args.base), ("--value", args.value), ("--draft", getattr(args, "draft", None))]
    dirs += [("--term", d) for d, _ in parse_terms(args)]
    for flag, d in dirs:
        if d is None:
            continue
        try:
            raw = read_config(d)
        except (OSError, ValueError):
            continue
        if is_probe_config(raw):
            continue
        try:
            LeanConfig.from_dict(raw)
        except UnsupportedArchitecture as e:
            arch = ", ".join(raw.get("architectures") or [str(raw.get("model_type"))])
            raise UsageError(
                f"{flag} {str(d)!r} ({arch}): serving needs every model on the lean engine (continuous batching admits "
                f"requests into its slots) and {e}; ivl-fast generate and eval run it on the transformers adapter"
            ) from None
        except (ValueError, TypeError, KeyError):
            continue  # another problem: the loader names it


def bind(host: str, port: int):
    """The listening socket, bound before anything says the server is up: a busy port or a bad host is one line
    naming the flags (uvicorn would log it after our banner and exit 3)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"--host {host!r}: cannot be resolved to an address to bind ({e.strerror or e})") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


# after a second signal: how long the answers of the sequences it ended may take to reach their clients
FORCED_EXIT_GRACE_S = 2.0


def _server(config, scheduler, drain_timeout: float):
    """uvicorn's server, except that SIGINT / SIGTERM drain and end with exit status 0 (uvicorn re-raises the signal
    after its graceful shutdown): it stops accepting; the requests already taken go on for ``drain_timeout`` seconds
    at most, then end with a 503 (:meth:`Scheduler.begin_drain`); a second signal ends them at once (their 503s get
    ``FORCED_EXIT_GRACE_S`` to reach the clients)."""
    import asyncio
    import contextlib
    import signal
    import time

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

        def handle_exit(self, sig, frame):
            again = self.should_exit
            scheduler.begin_drain(0.0 if again else drain_timeout)
            super().handle_exit(sig, frame)
            if again:
                self.force_exit = True

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)  # on a forced exit: returns without waiting for the connections
            # the scheduler ended every sequence at once: give their handlers a moment to send those answers (503s,
            # a stream's error chunk and [DONE]) before the loop closes the connections under them
            end = time.monotonic() + FORCED_EXIT_GRACE_S
            while self.force_exit and self.server_state.connections and time.monotonic() < end:
                await asyncio.sleep(0.02)

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
    sock = bind(args.host, args.port)  # before the models load: a busy port fails fast
    try:
        sched, app = load(args)
    except BaseException:
        sock.close()
        raise
    if group is not None:
        sched.batch = MirroredBatch(sched.batch, group)
    sched.start()
    sock.listen(2048)  # from here a client is queued until uvicorn accepts it, so the banner is true when printed
    port = sock.getsockname()[1]
    print(f"ivl-fast serve: http://{args.host}:{port}/v1 (Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)
    # uvicorn's own graceful wait is the backstop: the scheduler ends what is left at the drain deadline
    # lifespan off: the app has no startup / shutdown handlers, and a second signal (force exit) skips the lifespan's
    # shutdown, which then printed a CancelledError traceback as the process ended
    config = uvicorn.Config(
        app,
        host=args.host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=args.drain_timeout + 5,
        lifespan="off",
    )
    try:
        _server(config, sched, args.drain_timeout).run(sockets=[sock])
    finally:
        sched.shutdown(timeout=args.drain_timeout)
        if group is not None:
            sched.batch.close()
    print("ivl-fast serve: stopped", file=sys.stderr)
    return 0
