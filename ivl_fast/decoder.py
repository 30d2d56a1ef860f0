"""FastIVLDecoder: decode with a frozen base model steered by a value network (Inverse Value Learning).

Per step: ``z = z_base + alpha * z_value`` (residual scheme; both models see the same tokens and could run
concurrently), then the sampling reference of :mod:`ivl_fast.sampling`. The decode loop keeps everything on
device; the host synchronises only at the batched stop check (every ``sync_every`` steps), where EOS, stop
strings and non-finite logits are looked at.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import as_messages, has_tokenizer, load_tokenizer, render_chat
from .graphs import (
    GRAPH_MODES,
    KV_BUCKET_MIN,
    StepGraphs,
    batch_bucket,
    fork_join,
    kv_bucket,
    kv_segments,
    new_graph,
    resolve_graphs,
    resolve_runner,
    run_cpp,
    run_python,
)
from .models import from_hf_model, load_model
from .ops import combine_and_sample
from .ops._backend import pick_backend
from .sampling import SamplingParams

SCHEMES = ("residual", "cascade", "cascade+", "base", "value_only")
PAIR_SCHEMES = ("residual", "cascade", "cascade+")
_UNSET = object()


class NonFiniteLogitsError(FloatingPointError):
    """A model produced NaN or inf logits; no token was emitted from them."""


@dataclass
class IVLGenerateOutput:
    """Result of :meth:`FastIVLDecoder.generate`.

    sequences: [B, T + n] prompt (left-padded) followed by the new tokens; after EOS / a stop string,
        ``pad_token_id``. ``n`` is the number of steps run (<= max_new_tokens; fewer when every row stopped).
    logprobs: [B, n] log-probability of each new token under the combined distribution before warping
        (0.0 at padded positions), when ``return_logprobs=True``.
    num_new_tokens: [B] new tokens per row, EOS included.
    """

    sequences: torch.Tensor
    logprobs: torch.Tensor | None = None
    num_new_tokens: torch.Tensor | None = None
    prompt_length: int = 0
    timings: dict = field(default_factory=dict)


class FastIVLDecoder:
    """Decode with a base model plus a value network.

    Args:
        base_model, value_model: engines from :func:`ivl_fast.models.load_model`, or already loaded
            ``transformers`` causal LMs (the lean engine then shares their weight tensors; nothing is copied).
            ``value_model`` may be None with ``scheme="base"``, ``base_model`` None with ``scheme="value_only"``.
        vocab_map: a :class:`ivl_fast.vocab.VocabMap` (or its file) for a base with another tokenizer; then
            ``tokenizer`` is the value model's and ``base_tokenizer`` the base's, sampling happens in the value
            vocabulary and the base re-reads the text after every step (see ``_CrossVocabRun``).
        base_tokenizer: the base's tokenizer, needed with ``vocab_map``.
        alpha: weight of the value logits.
        scheme: "residual" (IVL: both models read the tokens), "cascade" / "cascade+" (the value network reads
            softmax(z_base) @ E_value (+ the token embedding); the base runs first), "base" (base alone) or
            "value_only" (value network alone; residual value networks only). ``from_pretrained`` takes the
            scheme from the value checkpoint's ``ivl.json`` when none is given.
        tokenizer: used by ``generate_text``, stop strings and default EOS/pad ids.
        sync_every: steps between host checks of EOS / stop strings / NaN (stream() checks every step).
        sample_backend: backend of :func:`ivl_fast.ops.combine_and_sample` ("auto": the fused Triton kernel on
            GPU, the torch reference on CPU).
        graphs: decode steps as captured graphs (:mod:`ivl_fast.graphs`): "auto" (CUDA graphs on a GPU when the
            run allows them: lean engines, one vocabulary, the fused sampler; else eager), "cuda", "emulate"
            (CUDA-graph semantics replayed from recorded ops on any device: checks graph safety without a GPU,
            at eager speed) or "off". NOT YET VALIDATED ON GPU.
        graph_mode: "fused" (one graph: base and value on two streams, joined before the sampler), "two_stream"
            (a graph per model, replayed on two streams with events, then the sampler's) or "one_stream" (one
            graph, all sequential). The cascade and single-model schemes always run one_stream.
        graph_runner: who replays the graphs: "cpp" (``torch.ops.ivl_fast.replay_graphs``, CUDA builds of the
            extension), "python", or "auto" (cpp when built).
        kv_block: granularity of the KV-length buckets: a decode step attends to the first kv_block * 2^i cache
            columns that cover every position (one graph per bucket), so attention reads follow the sequence.
    """

    def __init__(
        self,
        base_model=None,
        value_model=None,
        vocab_map=None,
        *,
        alpha: float = 1.0,
        scheme: str = "residual",
        tokenizer=None,
        engine: str = "auto",
        attn_backend: str = "sdpa",
        sync_every: int = 8,
        sample_backend: str = "auto",
        base_tokenizer=None,
        graphs="auto",
        graph_mode: str = "fused",
        graph_runner: str = "auto",
        kv_block: int = KV_BUCKET_MIN,
    ):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if scheme != "value_only" and base_model is None:
            raise ValueError(f"scheme={scheme!r} needs a base_model")
        if scheme != "base" and value_model is None:
            raise ValueError(f"scheme={scheme!r} needs a value_model")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        self.scheme, self.alpha, self.sync_every = scheme, float(alpha), sync_every
        self.sample_backend = sample_backend  # combine_and_sample backend: auto = Triton on GPU, torch on CPU
        self.base = (
            from_hf_model(base_model, engine=engine, attn_backend=attn_backend) if base_model is not None else None
        )
        self.value = (
            from_hf_model(value_model, engine=engine, attn_backend=attn_backend) if value_model is not None else None
        )
        self.tokenizer = tokenizer
        if scheme.startswith("cascade") and not (getattr(self.base, "is_lean", False) and self.value.is_lean):
            raise ValueError(f"scheme={scheme!r} needs the lean engine for both models (Llama/Mistral/Qwen2)")
        if self.base is not None and self.value is not None:
            if self.base.device != self.value.device:
                raise ValueError(f"base model is on {self.base.device} but value model is on {self.value.device}")
            if self.base.vocab_size != self.value.vocab_size and vocab_map is None:
                raise ValueError(
                    f"base vocabulary ({self.base.vocab_size} tokens) and value vocabulary ({self.value.vocab_size} "
                    "tokens) differ and no vocab_map was given; build one with `ivl-fast vocab-map "
                    "--base-tokenizer BASE --value-tokenizer VALUE --corpus FILE --out map.safetensors`"
                )
        self.vocab_map = None
        self.base_tokenizer = base_tokenizer
        if vocab_map is not None:
            self._setup_cross_vocab(vocab_map)
        if isinstance(kv_block, bool) or not isinstance(kv_block, int) or kv_block < 1:
            raise ValueError(f"kv_block must be an integer >= 1, got {kv_block!r}")
        self.kv_block = kv_block
        if graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {graph_mode!r}")
        self.graphs_option, self.graph_mode = graphs, graph_mode
        self._graphs_kind = resolve_graphs(graphs, self.device)
        self._runner = resolve_runner(graph_runner, self._graphs_kind or "off") if self._graphs_kind else "python"
        if self._graphs_kind is not None and graphs != "auto":
            why = self._graph_obstacle(pick_backend(sample_backend, self.device))
            if why:
                raise ValueError(f"graphs={graphs!r}: {why}")
        self.graph_captures = 0  # graphs captured so far (a bucket's graphs are reused by later calls)
        self._statics: dict = {}
        self._side = None

    def _setup_cross_vocab(self, vocab_map) -> None:
        from .vocab import VocabMap

        if self.scheme != "residual":
            raise ValueError(f"cross-vocabulary decoding supports scheme='residual' only, got {self.scheme!r}")
        if not getattr(self.base, "is_lean", False):
            raise ValueError("cross-vocabulary decoding needs the lean engine for the base (it rewinds its cache)")
        if self.tokenizer is None or self.base_tokenizer is None:
            raise ValueError("cross-vocabulary decoding needs both tokenizers (tokenizer=value's, base_tokenizer=)")
        if isinstance(vocab_map, str | Path):
            vocab_map = VocabMap.load(vocab_map, base_tokenizer=self.base_tokenizer, value_tokenizer=self.tokenizer)
        if not isinstance(vocab_map, VocabMap):
            raise TypeError(f"vocab_map must be a VocabMap or a path, got {type(vocab_map).__name__}")
        from .vocab.build import tokenizer_hash

        hashes = {"base": tokenizer_hash(self.base_tokenizer), "value": tokenizer_hash(self.tokenizer)}
        for side, h in hashes.items():
            want = (vocab_map.meta or {}).get(f"{side}_tokenizer_hash")
            if want and want != h:
                raise ValueError(
                    f"vocab_map was built for another {side} tokenizer (hash {want[:12]}..., given {h[:12]}...)"
                )
        for side, tok, n in (
            ("base", self.base_tokenizer, vocab_map.v_base),
            ("value", self.tokenizer, vocab_map.v_value),
        ):
            if len(tok) > n:
                raise ValueError(f"the {side} tokenizer has {len(tok)} tokens but vocab_map covers {n}")
        self._same_tokenizers = hashes["base"] == hashes["value"]
        if vocab_map.v_base > self.base.vocab_size or vocab_map.v_value > self.value.vocab_size:
            raise ValueError(
                f"vocab_map is [{vocab_map.v_base}, {vocab_map.v_value}] but the base model has "
                f"{self.base.vocab_size} and the value model {self.value.vocab_size} logits"
            )
        self.vocab_map = vocab_map

    @property
    def cross_vocab(self) -> bool:
        return self.vocab_map is not None

    # ------------------------------------------------------------------ graphs
    def _graph_obstacle(self, backend: str) -> str | None:
        """Why decode steps cannot be captured here (None: they can)."""
        if self.cross_vocab:
            return "cross-vocabulary decoding re-tokenizes on the host every step (it runs eagerly)"
        if not all(getattr(m, "is_lean", False) for m in self.engines):
            return "graphs need the lean engine for every model (the transformers adapter's cache is dynamic)"
        if self._graphs_kind == "cuda" and backend != "triton":
            return "CUDA graphs need the fused Triton sampler (sample_backend='auto' or 'triton')"
        return None

    def _graph_kind(self, run) -> str | None:
        if self._graphs_kind is None or self._graph_obstacle(run.backend):
            return None
        return self._graphs_kind

    def _mode_for_scheme(self) -> str:
        return self.graph_mode if self.scheme == "residual" else "one_stream"

    def _cache_capacity(self, need: int) -> int:
        """KV cache columns for a run needing ``need``: rounded up like the KV buckets (so later, longer calls
        reuse the cache and its graphs), within the context."""
        return kv_bucket(need, self.max_context, self.kv_block)

    def _static(self, rows: int, cols: int, backend: str):
        st = self._statics.get(rows)
        if st is None or st.cols < cols or (st.work is None) != (backend != "triton"):
            st = self._statics[rows] = _Static(rows, cols, self.vocab_size, self.device, backend)
        return st

    def _streams(self):
        """(capture stream, side stream): graphs are warmed up and captured on the stream they will use, so each
        cuBLAS workspace baked into a graph belongs to one stream (two graphs replayed concurrently must not
        share one) and is created before capture, outside the graphs' memory pools."""
        if self._side is None:
            self._side = (torch.cuda.Stream(device=self.device), torch.cuda.Stream(device=self.device))
        return self._side

    def capture_graphs(self, batch_sizes=(1,), max_seq_len: int | None = None, **generate_kwargs) -> int:
        """Capture decode graphs ahead of the first requests (as servers do at start-up), so no call pays for a
        capture: for the bucket of each of ``batch_sizes``, every KV bucket up to ``max_seq_len`` tokens (default:
        the context), and the generation settings ``generate_kwargs`` (graphs differ by greedy vs which warpers are
        on, ``return_logprobs`` and the number of EOS ids; values such as temperature do not matter). Returns the
        number of graphs captured (0 for what was captured before)."""
        if self._graphs_kind is None:
            raise ValueError(f"capture_graphs needs graphs enabled (graphs={self.graphs_option!r} on {self.device})")
        unknown = set(generate_kwargs) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"capture_graphs() got unexpected keyword arguments {sorted(unknown)}")
        max_seq_len = self.max_context if max_seq_len is None else max_seq_len
        if not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= self.max_context:
            raise ValueError(f"max_seq_len must be an integer in [2, {self.max_context}], got {max_seq_len!r}")
        opts = self._options(None, **{**generate_kwargs, "max_new_tokens": max_seq_len - 1})
        captured = 0
        # largest bucket first: its KV store serves the smaller buckets as row views (no reallocation after)
        for b in sorted({batch_bucket(int(x)) for x in batch_sizes}, reverse=True):
            prompt = torch.full((b, 1), opts["pad_token_id"], dtype=torch.int64, device=self.device)
            run = _Run(self, prompt, torch.ones_like(prompt, dtype=torch.bool), opts, self.sync_every)
            if run.graph_kind is None:
                raise ValueError(f"capture_graphs: these runs decode eagerly ({self._graph_obstacle(run.backend)})")
            run._start()
            with torch.inference_mode(), run._on_device():
                for kv, _ in kv_segments(1, max_seq_len - 2, 1, run.capacity, self.kv_block):
                    run._graphs(kv)
            captured += run.captures
        return captured

    def release_graphs(self) -> None:
        """Drop every captured graph and its static buffers (they hold device memory)."""
        self._statics.clear()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base_path: str | Path | None,
        value_path: str | Path | None = None,
        vocab_map=None,
        *,
        device=None,
        dtype=None,
        alpha: float = 1.0,
        scheme: str | None = None,
        engine: str = "auto",
        attn_backend: str = "sdpa",
        allow_pickle: bool = False,
        tokenizer=None,
        sync_every: int = 8,
        sample_backend: str = "auto",
        graphs="auto",
        graph_mode: str = "fused",
        graph_runner: str = "auto",
    ) -> FastIVLDecoder:
        """Load base and value checkpoints (Hugging Face directories) and their tokenizer."""
        kw = dict(device=device, dtype=dtype, engine=engine, attn_backend=attn_backend, allow_pickle=allow_pickle)
        if scheme is None:
            scheme = _scheme_of(value_path)
        need_base = scheme != "value_only"
        need_value = scheme != "base"
        if need_base and base_path is None:
            raise ValueError(f"scheme={scheme!r} needs base_path")
        if need_value and value_path is None:
            raise ValueError(f"scheme={scheme!r} needs value_path")
        base = load_model(base_path, **kw) if need_base else None
        value = load_model(value_path, **kw) if need_value else None
        base_tokenizer = None
        if vocab_map is not None:  # two vocabularies: each model keeps its own tokenizer
            base_tokenizer = load_tokenizer(base_path)
            if tokenizer is None or isinstance(tokenizer, str | Path):
                tokenizer = load_tokenizer(tokenizer or value_path)
        elif tokenizer is None or isinstance(tokenizer, str | Path):
            tokenizer = _pick_tokenizer(tokenizer, base_path if need_base else None, value_path if need_value else None)
        return cls(
            base,
            value,
            vocab_map,
            alpha=alpha,
            scheme=scheme,
            tokenizer=tokenizer,
            sync_every=sync_every,
            sample_backend=sample_backend,
            base_tokenizer=base_tokenizer,
            graphs=graphs,
            graph_mode=graph_mode,
            graph_runner=graph_runner,
        )

    @property
    def device(self) -> torch.device:
        return (self.base or self.value).device

    @property
    def vocab_size(self) -> int:
        return (self.value or self.base).vocab_size

    @property
    def engines(self) -> list:
        return [
            m
            for m in (self.base if self.scheme != "value_only" else None, self.value if self.scheme != "base" else None)
            if m is not None
        ]

    @property
    def max_context(self) -> int:
        return min(m.max_context for m in self.engines)

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens=_UNSET,
        do_sample=_UNSET,
        temperature=_UNSET,
        top_k=_UNSET,
        top_p=_UNSET,
        min_p=_UNSET,
        seed=_UNSET,
        eos_token_id=_UNSET,
        pad_token_id=_UNSET,
        stop_strings=_UNSET,
        return_logprobs=_UNSET,
        generation_config=None,
        texts: list[str] | None = None,
        progress=None,
    ) -> IVLGenerateOutput:
        """Generate like ``transformers``' ``generate`` (same argument names and meanings).

        ``input_ids``: [B, T] tensor (with ``attention_mask`` for padded batches; left or right padding), a
        [T] tensor, or a list of token-id lists of different lengths. Defaults: max_new_tokens=20,
        do_sample=False, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0; eos/pad from the tokenizer or the
        base config. A ``GenerationConfig`` supplies values not given explicitly. ``eos_token_id=[]`` disables
        EOS stopping. With a vocab map, token ids are in the value model's vocabulary (input and output) and
        the base reads the prompt text (``texts``, or the value tokenizer's decoding of ``input_ids``).
        ``progress``: a callable given the number of decode steps done, at each host check (no extra syncs).
        """
        opts = self._options(
            generation_config,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            stop_strings=stop_strings,
            return_logprobs=return_logprobs,
        )
        prompt, mask = self._prepare_inputs(input_ids, attention_mask, opts["pad_token_id"])
        t0 = time.perf_counter()
        run = self._make_run(prompt, mask, opts, self.sync_every, texts)
        for _ in run:
            if progress is not None:
                progress(run.steps)
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        n = run.steps
        b = run.b
        seqs = torch.cat([prompt, run.out[:b, :n]], dim=1)
        lp = run.logprobs[:b, :n].clone() if opts["return_logprobs"] else None
        timings = {
            "total_s": elapsed,
            "prefill_s": run.prefill_s,
            "steps": n,
            "batch": b,
            "graphs": run.graph_kind or "off",
            "graph_captures": run.captures,
        }
        return IVLGenerateOutput(seqs, lp, run.num_new_tokens(), prompt.shape[1], timings)

    def _make_run(self, prompt, mask, opts, sync_every, texts):
        if not self.cross_vocab:
            return _Run(self, prompt, mask, opts, sync_every)
        if texts is None:
            tok = self.tokenizer
            texts = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(prompt, mask, strict=True)]
        if len(texts) != prompt.shape[0]:
            raise ValueError(f"texts has {len(texts)} entries for {prompt.shape[0]} prompts")
        return _CrossVocabRun(self, prompt, mask, opts, sync_every, list(texts))

    def stream(self, input_ids, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
        """Yield the new token ids [B] of each step (pad for rows already stopped); same arguments as generate."""
        gen_cfg = kwargs.pop("generation_config", None)
        unknown = set(kwargs) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"stream() got unexpected keyword arguments {sorted(unknown)}")
        opts = self._options(gen_cfg, **kwargs)
        prompt, mask = self._prepare_inputs(input_ids, attention_mask, opts["pad_token_id"])
        yield from self._make_run(prompt, mask, opts, 1, None)

    def generate_text(
        self,
        prompts,
        *,
        chat: bool = False,
        system: str | None = None,
        skip_special_tokens: bool = True,
        **kwargs,
    ) -> list[str] | str:
        """Text in, text out through the checkpoint's tokenizer.

        ``prompts``: a string or a list of strings (or, with ``chat=True``, message lists
        ``[{"role": "user", "content": ...}]``; plain strings become one user message, rendered with the
        tokenizer's chat template or :data:`ivl_fast.chat.DEFAULT_CHAT_TEMPLATE`). Returns the generated
        continuation(s) only; a single string for a single prompt.
        """
        tok = self._require_tokenizer("generate_text")
        single = isinstance(prompts, str) or (chat and _is_message_list(prompts))
        items = [prompts] if single else list(prompts)
        if not items:
            raise ValueError("prompts is empty")
        if chat:
            texts = [render_chat(tok, as_messages(p, system)) for p in items]
            ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            for i, p in enumerate(items):
                if not isinstance(p, str):
                    raise TypeError(f"prompt {i} must be a string, got {type(p).__name__} (use chat=True for messages)")
            ids = [tok(t)["input_ids"] for t in items]
        base_texts = texts if chat else items  # what the base reads when it has its own tokenizer
        out = self.generate(ids, texts=base_texts if self.cross_vocab else None, **kwargs)
        t = out.prompt_length
        texts = []
        for row, n in zip(out.sequences.tolist(), out.num_new_tokens.tolist(), strict=True):
            new = row[t : t + n]
            texts.append(tok.decode(new, skip_special_tokens=skip_special_tokens))
        return texts[0] if single else texts

    # ------------------------------------------------------------------ internals
    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass tokenizer=... or load checkpoints that include one")
        return self.tokenizer

    def _options(self, generation_config, **given) -> dict:
        opts = dict(_DEFAULTS)
        if generation_config is not None:
            for k in _DEFAULTS:
                v = getattr(generation_config, k, None)
                if v is not None:
                    opts[k] = v
            if getattr(generation_config, "max_new_tokens", None) is None and getattr(
                generation_config, "max_length", None
            ):
                raise ValueError("generation_config.max_length is not supported; set max_new_tokens")
        for k, v in given.items():
            if v is not _UNSET:
                opts[k] = v
        mnt = opts["max_new_tokens"]
        if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {mnt!r}")
        opts["sampling"] = SamplingParams(
            bool(opts["do_sample"]), opts["temperature"], opts["top_k"], opts["top_p"], opts["min_p"]
        )
        tok = self.tokenizer
        cfg_src = (self.base or self.value).config
        if opts["eos_token_id"] is None:
            eos = getattr(tok, "eos_token_id", None) if tok is not None else None
            opts["eos_token_id"] = eos if eos is not None else getattr(cfg_src, "eos_token_id", None)
        eos = opts["eos_token_id"]
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        for e in eos:
            if not isinstance(e, int) or not 0 <= e < self.vocab_size:
                raise ValueError(f"eos_token_id entries must be token ids in [0, {self.vocab_size}), got {e!r}")
        opts["eos_token_id"] = eos
        if opts["pad_token_id"] is None:
            pad = getattr(tok, "pad_token_id", None) if tok is not None else None
            if pad is None:
                pad = getattr(cfg_src, "pad_token_id", None)
            opts["pad_token_id"] = pad if pad is not None else (eos[0] if eos else 0)
        pad = opts["pad_token_id"]
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size:
            raise ValueError(f"pad_token_id must be a token id in [0, {self.vocab_size}), got {pad!r}")
        stops = opts["stop_strings"]
        if stops is not None:
            stops = [stops] if isinstance(stops, str) else list(stops)
            if not stops or not all(isinstance(s, str) and s for s in stops):
                raise ValueError(
                    f"stop_strings must be a non-empty string or list of them, got {opts['stop_strings']!r}"
                )
            self._require_tokenizer("stop_strings")
        opts["stop_strings"] = stops
        return opts

    def _prepare_inputs(self, input_ids, attention_mask, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> left-padded prompt [B, T] int64 and mask [B, T] bool on the model device."""
        dev = self.device
        if isinstance(input_ids, list | tuple):
            rows = (
                [list(r) for r in input_ids]
                if input_ids and isinstance(input_ids[0], list | tuple)
                else [list(input_ids)]
            )
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with a tensor input_ids (lists carry their lengths)")
            for i, r in enumerate(rows):
                if not r:
                    raise ValueError(f"prompt {i} is empty: every row needs at least one token")
                bad = next((x for x in r if isinstance(x, bool) or not isinstance(x, int)), None)
                if bad is not None:
                    raise ValueError(f"input_ids must hold integer token ids; prompt {i} holds {bad!r}")
            t = max(len(r) for r in rows)
            ids = torch.full((len(rows), t), pad_id, dtype=torch.int64)
            mask = torch.zeros((len(rows), t), dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, t - len(r) :] = torch.tensor(r, dtype=torch.int64)
                mask[i, t - len(r) :] = True
        elif isinstance(input_ids, torch.Tensor):
            ids = input_ids
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
            if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
            if ids.shape[1] == 0 or ids.shape[0] == 0:
                raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)})")
            ids = ids.long().cpu()
            if attention_mask is None:
                mask = torch.ones_like(ids, dtype=torch.bool)
            else:
                mask = torch.as_tensor(attention_mask)
                mask = mask.reshape(ids.shape if mask.dim() == 2 else (1, -1))
                if mask.shape != ids.shape:
                    raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
                mask = mask.cpu().bool()
            empty = (~mask.any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"prompt {empty[0]} is empty: its attention_mask has no 1s")
            left_padded = bool((mask.long().diff(dim=1) >= 0).all())
            if not left_padded:  # re-pack right/other padding to the left, keeping token order
                rows = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
                return self._prepare_inputs(rows, None, pad_id)
        else:
            raise TypeError(f"input_ids must be a tensor or a list of token-id lists, got {type(input_ids).__name__}")
        real = ids[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.vocab_size):
            raise ValueError(
                f"input_ids holds token ids outside [0, {self.vocab_size}) "
                f"(min {int(real.min())}, max {int(real.max())})"
            )
        return ids.to(dev), mask.to(dev)


_DEFAULTS = {
    "max_new_tokens": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "seed": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "stop_strings": None,
    "return_logprobs": False,
}


class _Static:
    """The device buffers of a generation, updated in place only (so a captured graph keeps seeing them).

    Eager runs get fresh ones; graph runs borrow the persistent ones of their batch bucket, which the graphs
    of that bucket captured. Rows past the real batch are padding rows (finished from the start).
    """

    def __init__(self, rows: int, cols: int, vocab: int, dev: torch.device, backend: str):
        i64 = dict(dtype=torch.int64, device=dev)
        self.rows, self.cols = rows, cols
        self.ids = torch.zeros(rows, **i64)  # the token each row feeds to the next decode step
        self.out = torch.zeros((rows, cols), **i64)
        self.logprobs = torch.zeros((rows, cols), dtype=torch.float32, device=dev)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.stop_step = torch.zeros(rows, **i64)  # index of each row's last token
        self.bad = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.done = torch.zeros(1, dtype=torch.int32, device=dev)  # every row stopped, or a row non-finite
        self.step_t = torch.zeros(1, **i64)  # the step being emitted (the output column)
        # counter-based RNG state of the fused kernel: the offset advances on device after every step
        self.seed_t = torch.zeros(1, **i64)
        self.offset_t = torch.zeros(1, **i64)
        self.pad = torch.zeros((), **i64)
        self.eos: dict[int, torch.Tensor] = {}
        self.temperature = torch.ones(rows, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(rows, **i64)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=dev)
        self.min_p = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.gen = torch.Generator(device=dev)  # the torch sampler's RNG (persistent: graphs replay with it)
        # the fused kernel's fp32 workspace, allocated once (static for graph capture)
        self.work = torch.empty(rows, vocab, dtype=torch.float32, device=dev) if backend == "triton" else None
        self._host = None
        self.graphs: dict = {}  # graph key -> StepGraphs
        self.pools: dict = {}  # CUDA graph memory pools of these graphs (dropped with them, never reused after)
        self.cache_token: tuple = ()  # the KV cache tensors the graphs captured

    @property
    def host(self) -> torch.Tensor:
        """The runner's two flag slots in host memory (pinned on CUDA: the target of asynchronous copies)."""
        if self._host is None:
            self._host = torch.zeros(2, dtype=torch.int32, pin_memory=self.ids.device.type == "cuda")
        return self._host

    def eos_buffer(self, eos: list[int]) -> torch.Tensor:
        buf = self.eos.get(len(eos))
        if buf is None:
            buf = self.eos[len(eos)] = torch.zeros(len(eos), dtype=torch.int64, device=self.ids.device)
        if eos:
            buf.copy_(torch.tensor(eos, dtype=torch.int64), non_blocking=True)
        return buf


def _set_rows(buf: torch.Tensor, value, b: int, fill) -> None:
    """buf[:b] = value (scalar or [b] tensor), buf[b:] = fill."""
    if isinstance(value, torch.Tensor):
        buf[:b].copy_(value.reshape(-1).to(buf))
    else:
        buf[:b].fill_(value)
    buf[b:].fill_(fill)


class _Run:
    """One generation: prefill, then one device-side step per iteration; yields each step's ids [B].

    Every step's bookkeeping (output column, EOS, NaN flags, RNG offset, step counter) happens on device in
    place, so the same step runs eagerly or as a captured graph (``dec.graphs``), replayed by the C++ or the
    Python runner in chunks between host checks.
    """

    def __init__(self, dec: FastIVLDecoder, prompt: torch.Tensor, mask: torch.Tensor, opts: dict, sync_every: int):
        self.dec, self.opts, self.k = dec, opts, sync_every
        b, t = prompt.shape
        n = opts["max_new_tokens"]
        if t + n > dec.max_context:
            raise ValueError(
                f"prompt length {t} + max_new_tokens {n} = {t + n} exceeds the model context of "
                f"{dec.max_context} tokens"
            )
        dev = dec.device
        self.b = b
        self.backend = pick_backend(dec.sample_backend, dev)
        self.graph_kind = dec._graph_kind(self)
        self.capacity = dec._cache_capacity(t + n)
        rows = b
        if self.graph_kind is None:
            self.st = _Static(b, n, dec.vocab_size, dev, self.backend)
        else:  # padded to the batch bucket; buffers persist with the bucket's graphs
            rows = batch_bucket(b)
            self.st = dec._static(rows, self.capacity, self.backend)
            pad_rows = rows - b
            if pad_rows:  # one real token each, finished from the start
                prompt = torch.cat([prompt, prompt.new_full((pad_rows, t), opts["pad_token_id"])])
                extra = mask.new_zeros((pad_rows, t))
                extra[:, -1] = True
                mask = torch.cat([mask, extra])
        self.prompt, self.mask = prompt, mask
        st = self.st
        sp = opts["sampling"]
        self.graph_values = self.graph_kind is not None
        with torch.inference_mode():
            st.out[:, :n].fill_(opts["pad_token_id"])
            st.logprobs.zero_()
            st.finished.zero_()
            st.finished[b:] = True
            st.stop_step.fill_(n)
            st.stop_step[b:] = 0
            st.bad.zero_()
            st.done.zero_()
            st.step_t.zero_()
            st.offset_t.zero_()
            st.pad.fill_(opts["pad_token_id"])
            self.eos = st.eos_buffer(opts["eos_token_id"])
            if self.graph_values and not sp.greedy:  # values live in device buffers: a new temperature, no recapture
                _set_rows(st.temperature, sp.temperature, b, 1.0)
                _set_rows(st.top_k, sp.top_k, b, 0)
                _set_rows(st.top_p, sp.top_p, b, 1.0)
                _set_rows(st.min_p, sp.min_p, b, 0.0)
        self.gen = None
        seed = opts["seed"]
        if not sp.greedy:
            self.gen = st.gen
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))  # fresh entropy from the global RNG
            self.gen.manual_seed(int(seed))
        with torch.inference_mode():  # the buffers may be inference tensors (made under a caller's inference mode)
            st.seed_t.fill_(int(seed or 0))
        self.steps = 0
        self.prefill_s = 0.0
        self.captures = 0
        self._checked = 0  # steps whose stop strings were examined

    # the buffers under their historical names (the cross-vocabulary run and the stop-string check use them)
    out = property(lambda self: self.st.out)
    logprobs = property(lambda self: self.st.logprobs)
    finished = property(lambda self: self.st.finished)
    stop_step = property(lambda self: self.st.stop_step)
    bad = property(lambda self: self.st.bad)
    pad = property(lambda self: self.st.pad)

    def _allocate(self, b: int, t: int, n: int) -> None:
        for m in self.dec.engines:
            m.allocate(b, self.capacity)

    def num_new_tokens(self) -> torch.Tensor:
        return torch.clamp(self.st.stop_step[: self.b] + 1, max=self.steps)

    def _kv_len(self, step: int) -> int | None:
        """Cache columns the eager decode step feeding step ``step``'s token attends to (lean engines): exactly
        the columns that can hold a position (graphs round this up to their KV bucket; the extra columns are
        masked, so the logits agree)."""
        if not all(getattr(m, "is_lean", False) for m in self.dec.engines):
            return None
        return self.prompt.shape[1] + step

    def _logits(self, ids: torch.Tensor | None, kv_len: int | None = None, side=None):
        """(z_base, z_value) of the next position ([B, V] each; None for a model the scheme does not use).
        ``ids`` None: prefill. ``side``: a CUDA stream for the value model (residual scheme)."""
        dec = self.dec
        kw = {} if kv_len is None else {"kv_len": kv_len}
        if dec.scheme.startswith("cascade"):  # sequential: the value network reads the base's distribution
            plus = dec.scheme == "cascade+"
            if ids is None:
                zb_all = dec.base.prefill(self.prompt, self.mask, all_logits=True)  # [B, T, V]
                emb = dec.value.soft_embed(zb_all, self.prompt if plus else None)
                return zb_all[:, -1], dec.value.prefill(None, self.mask, inputs_embeds=emb)
            zb = dec.base.decode(ids, **kw)
            return zb, dec.value.decode(None, inputs_embeds=dec.value.soft_embed(zb, ids if plus else None), **kw)
        if ids is None:
            zb = dec.base.prefill(self.prompt, self.mask) if dec.scheme != "value_only" else None
            zv = dec.value.prefill(self.prompt, self.mask) if dec.scheme != "base" else None
            return zb, zv
        if dec.scheme == "base":
            return dec.base.decode(ids, **kw), None
        if dec.scheme == "value_only":
            return None, dec.value.decode(ids, **kw)
        return fork_join(lambda: dec.base.decode(ids, **kw), lambda: dec.value.decode(ids, **kw), side)

    def _sample(self, zb, zv):
        sp, st = self.opts["sampling"], self.st
        do_sample = sp.do_sample
        if self.graph_values and sp.greedy:  # values unused; Python scalars keep user tensors out of the capture
            temperature, top_k, top_p, min_p, do_sample = 1.0, 0, 1.0, 0.0, False
        elif self.graph_values:
            temperature = st.temperature
            top_k = st.top_k if sp.top_k_on else 0
            top_p = st.top_p if sp.top_p_on else 1.0
            min_p = st.min_p if sp.min_p_on else 0.0
        else:
            temperature, top_k, top_p, min_p = sp.temperature, sp.top_k, sp.top_p, sp.min_p
        ids, lp, bad = combine_and_sample(
            zb,
            zv,
            vocab_map=self.dec.vocab_map,
            alpha=self.dec.alpha,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            do_sample=do_sample,
            seed=st.seed_t,
            offset=st.offset_t,
            generator=self.gen,
            return_logprobs=self.opts["return_logprobs"],
            backend=self.backend,
            workspace=st.work,
            validate=False,  # checked once in generate(); per-step validation would sync on tensor params
        )
        st.offset_t += 1
        return ids, lp, bad

    def _emit(self, zb, zv) -> None:
        """Sample the next tokens and do the step's bookkeeping, all on device and in place."""
        st = self.st
        ids, lp, bad = self._sample(zb, zv)  # one fused op: add, warp, sample (+ NaN flag)
        st.bad |= bad & ~st.finished
        ids = torch.where(st.finished, st.pad, ids)
        st.out.index_copy_(1, st.step_t, ids[:, None])
        if lp is not None:
            st.logprobs.index_copy_(1, st.step_t, torch.where(st.finished, 0.0, lp)[:, None])
        if self.eos.numel():
            hit = (ids[:, None] == self.eos[None, :]).any(1) & ~st.finished
            st.stop_step.copy_(torch.where(hit, st.step_t, st.stop_step))
            st.finished |= hit
        st.ids.copy_(ids)
        st.step_t += 1
        if self.graph_kind is not None:  # the runners' early-exit flag (eager runs check on the host)
            st.done.copy_((st.finished.all() | st.bad.any()).to(torch.int32).reshape(1))

    def _start(self) -> None:
        """Allocate, prefill, and emit step 0 from the prefill logits (always eager)."""
        b, t = self.prompt.shape
        self._allocate(b, t, self.opts["max_new_tokens"])
        t0 = time.perf_counter()
        zb, zv = self._logits(None)
        self.prefill_s = time.perf_counter() - t0
        with torch.inference_mode():
            self._emit(zb, zv)
        self.steps = 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.opts["max_new_tokens"]
        self._start()
        with torch.inference_mode():  # entered per chunk: never held across a yield (the caller's code)
            done = (self.steps == n or self.steps % self.k == 0) and self._check()
            ready = [self.st.out[: self.b, 0].clone()]
        yield from ready
        while not done and self.steps < n:
            first = self.steps
            with torch.inference_mode(), self._on_device():
                if self.graph_kind is None:
                    zb, zv = self._logits(self.st.ids, self._kv_len(self.steps))
                    self._emit(zb, zv)
                    self.steps += 1
                    check = self.steps == n or self.steps % self.k == 0
                else:
                    self._replay_chunk()
                    check = True
                if check:
                    done = self._check()  # host sync: the batched stop check
                    if done:  # every row stopped: drop the steps run after the last one did
                        self.steps = int(self.st.stop_step[: self.b].max()) + 1  # host sync
                ready = [self.st.out[: self.b, s].clone() for s in range(first, self.steps)]
            yield from ready

    def _on_device(self):
        """CUDA calls that use the current device (streams, capture, synchronize) go to the models' device."""
        dev = self.dec.device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

    # ------------------------------------------------------------------ graphs
    def _replay_chunk(self) -> None:
        """Replay decode steps as graphs up to the next host check: every remaining step when only EOS / NaN can
        stop the run (the runner watches the device's done flag every ``k`` steps), else ``k`` steps."""
        n, t = self.opts["max_new_tokens"], self.prompt.shape[1]
        remaining = n - self.steps
        chunk = min(self.k, remaining) if (self.opts["stop_strings"] or self.k == 1) else remaining
        runner = run_cpp if self.dec._runner == "cpp" else run_python
        for kv, count in kv_segments(self.steps, self.steps + chunk - 1, t, self.capacity, self.dec.kv_block):
            graphs = self._graphs(kv)
            ran = runner(graphs, count, self.st.done, self.st.host, self.k)
            self.steps += ran
            if ran < count:  # the done flag was seen
                return

    def _graph_key(self, kv_len: int) -> tuple:
        sp, dec = self.opts["sampling"], self.dec
        sampling = ("greedy",) if sp.greedy else ("sample", sp.top_k_on, sp.top_p_on, sp.min_p_on)
        return (
            dec._mode_for_scheme(),
            kv_len,
            sampling,
            bool(self.opts["return_logprobs"]),
            int(self.eos.numel()),
            dec.alpha,
            self.backend,
        )

    def _graphs(self, kv_len: int) -> StepGraphs:
        st, dec = self.st, self.dec
        token = tuple(t for m in dec.engines for t in (m.k_cache[0], m.v_cache[0], m.seq_lens))
        if len(token) != len(st.cache_token) or any(a is not b for a, b in zip(token, st.cache_token, strict=True)):
            st.graphs.clear()  # the KV caches were reallocated: every graph of this bucket read the old ones
            st.pools.clear()
            st.cache_token = token
        key = self._graph_key(kv_len)
        graphs = st.graphs.get(key)
        if graphs is None:
            snap = self._snapshot()
            try:
                graphs = self._capture(key, kv_len)
            finally:
                self._restore(snap)  # warm-up (and emulated capture) ran the step: undo it
            st.graphs[key] = graphs
            self.captures += 1
            dec.graph_captures += 1
        return graphs

    def _snapshot(self):
        st = self.st
        tensors = [st.ids, st.out, st.logprobs, st.finished, st.stop_step, st.bad, st.done, st.step_t, st.offset_t]
        tensors += [m.seq_lens for m in self.dec.engines]
        return [(x, x.clone()) for x in tensors], st.gen.get_state()

    def _restore(self, snap) -> None:
        pairs, gen_state = snap
        for x, saved in pairs:
            x.copy_(saved)
        self.st.gen.set_state(gen_state)

    def _capture(self, key: tuple, kv_len: int) -> StepGraphs:
        """Warm up and capture the step's graph(s). CUDA: each graph is warmed up on the very stream it is captured
        on (lazy inits such as cuBLAS workspaces and Triton compilation happen outside the capture, per stream);
        the value model of two_stream is captured on the side stream, with its own memory pool, since it replays
        concurrently with the base's graph."""
        dec, st = self.dec, self.st
        kind, mode = self.graph_kind, key[0]
        cuda = kind == "cuda"
        cap, side = dec._streams() if cuda else (None, None)
        ids = st.ids

        def pool(i: int):
            if not cuda:
                return None
            if i not in st.pools:
                st.pools[i] = torch.cuda.graph_pool_handle()
            return st.pools[i]

        def warm(fn, stream):
            if not cuda:
                return None
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = fn()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            return out

        if mode != "two_stream":
            fork = side if mode == "fused" else None

            def step():
                zb, zv = self._logits(ids, kv_len, side=fork)
                self._emit(zb, zv)

            warm(step, cap)
            g = new_graph(kind, pool(0))
            g.capture(step, stream=cap)
            return StepGraphs(mode, {"step": g}, fork, key)
        kw = {"kv_len": kv_len}

        def base_fn():
            return dec.base.decode(ids, **kw)

        def value_fn():
            return dec.value.decode(ids, **kw)

        zb_w, zv_w = warm(base_fn, cap), warm(value_fn, side)
        if cuda:  # the sampler's warm-up on real logits (the captured outputs hold nothing until replayed)
            warm(lambda: self._emit(zb_w, zv_w), cap)
            del zb_w, zv_w
        gb = new_graph(kind, pool(0))
        zb = gb.capture(base_fn, stream=cap)
        gv = new_graph(kind, pool(1))
        zv = gv.capture(value_fn, stream=side)
        gs = new_graph(kind, pool(0))
        gs.capture(lambda: self._emit(zb, zv), stream=cap)
        return StepGraphs(mode, {"base": gb, "value": gv, "sample": gs}, side, key)

    # ------------------------------------------------------------------ host checks
    def _check(self) -> bool:
        """Host-side stop check: NaN/inf, stop strings; True when every row has finished."""
        st, b = self.st, self.b
        if bool(st.bad.any()):  # host sync
            rows = st.bad[:b].nonzero().flatten().tolist()
            raise NonFiniteLogitsError(
                f"non-finite (NaN/inf) logits for batch row(s) {rows} within steps "
                f"[{self._checked}, {self.steps}); no tokens were returned from them"
            )
        if self.opts["stop_strings"]:
            self._check_stop_strings()
        self._checked = self.steps
        return bool(st.finished.all())  # host sync

    def _check_stop_strings(self) -> None:
        st, b = self.st, self.b
        tok, stops = self.dec.tokenizer, self.opts["stop_strings"]
        window = max(len(s) for s in stops) + 8  # tokens enough to span any stop string
        out = st.out[:b, : self.steps].tolist()
        stop_step = st.stop_step.tolist()
        for r, row in enumerate(out):
            if stop_step[r] < self._checked:  # stopped before this window: nothing new to look at
                continue
            # up to the row's EOS if it hit one inside this window (a stop string before it ends the row first)
            for s in range(self._checked, min(self.steps, stop_step[r] + 1)):
                lo = max(0, s - window)
                prev, cur = tok.decode(row[lo:s]), tok.decode(row[lo : s + 1])
                if any(x in cur and x not in prev for x in stops):
                    stop_step[r] = s
                    break
        new = torch.tensor(stop_step, dtype=torch.int64, device=st.out.device)
        n = self.opts["max_new_tokens"]
        newly = (new < st.stop_step) | ((new < n) & ~st.finished)
        if bool(newly.any()):
            cols = torch.arange(st.out.shape[1], device=st.out.device)[None]
            after = newly[:, None] & (cols > new[:, None])
            st.out.masked_fill_(after, int(self.opts["pad_token_id"]))
            st.logprobs.masked_fill_(after, 0.0)
            st.stop_step.copy_(torch.minimum(st.stop_step, new))
            st.finished |= newly
            st.done.copy_(st.finished.all().to(torch.int32).reshape(1))


class _CrossVocabRun(_Run):
    """Decoding across vocabularies: sample in the value vocabulary (z = z_base @ W + alpha z_value), then
    re-tokenize the text for the base after every step.

    Rule for unstable token boundaries: after each step the base's context is re-derived as the base
    tokenization of (prompt text + generated text); the longest common prefix with what the base has already
    read is kept, the rest of its KV cache is rewound, and the new suffix is fed (0..k tokens, rows in lock
    step, rows with fewer tokens idle). So the base's context always decodes to exactly the text so far, even
    when new text merges with the previous base token (" Hel" + "lo" -> " Hello"). This needs the token ids on
    the host every step (one sync per step).
    """

    def __init__(self, dec, prompt, mask, opts, sync_every, texts: list[str]):
        super().__init__(dec, prompt, mask, opts, sync_every)
        self.texts = texts
        # identical tokenizers (an identity-like map): the base reads the value's own token ids, exactly
        self.same_tokens = dec._same_tokenizers
        self.prompt_ids = [r[m].tolist() for r, m in zip(prompt.cpu(), mask.cpu(), strict=True)]
        self.prompt_text_dec = [dec.tokenizer.decode(p, skip_special_tokens=True) for p in self.prompt_ids]
        if self.same_tokens:
            self.base_ctx = [list(p) for p in self.prompt_ids]
        else:
            self.base_ctx = [self._base_ids(x) for x in texts]
        for i, ctx in enumerate(self.base_ctx):
            if not ctx:
                raise ValueError(f"prompt {i} is empty for the base tokenizer")
            if len(ctx) + 1 >= dec.base.max_context:
                raise ValueError(
                    f"prompt {i} is {len(ctx)} base tokens long; the base's context is {dec.base.max_context}"
                )
        self.generated: list[list[int]] = [[] for _ in texts]  # value ids per row (self.gen is the RNG)
        self.vb, self.vv = dec.vocab_map.v_base, dec.vocab_map.v_value

    def _allocate(self, b, t, n):
        dec = self.dec
        dec.value.allocate(b, t + n)
        # base tokens per value token vary; give the base room for a few per step, within its context
        longest = max(len(c) for c in self.base_ctx)
        dec.base.allocate(b, min(dec.base.max_context, longest + 4 * n + 16))

    def _base_ids(self, text: str) -> list[int]:
        """The base tokenization of ``text``, with the base's special tokens, but one BOS only: a chat prompt
        rendered with a template already starts with the BOS string ("<s>..."), which the tokenizer would
        otherwise precede with a second one."""
        btok = self.dec.base_tokenizer
        bos = btok.bos_token
        add = not (bos and text.startswith(bos))
        return list(btok(text, add_special_tokens=add)["input_ids"])

    def base_context_text(self, row: int) -> str:
        return self.dec.base_tokenizer.decode(self.base_ctx[row], skip_special_tokens=True)

    def generated_text(self, row: int) -> str:
        """The text of the generated value tokens as it reads after the prompt: decoded together with the prompt
        tokens and cut after them, so decoders that strip a leading space ("▁" of SentencePiece) at the start
        of a string do not lose the space between prompt and reply."""
        tok = self.dec.tokenizer
        full = tok.decode(self.prompt_ids[row] + self.generated[row], skip_special_tokens=True)
        return full[len(self.prompt_text_dec[row]) :]

    def _logits(self, ids, kv_len=None, side=None):  # the base's positions differ: whole caches, one stream
        dec = self.dec
        base, value = dec.base, dec.value
        if ids is None:
            b = len(self.base_ctx)
            t = max(len(c) for c in self.base_ctx)
            pad = dec.base_tokenizer.pad_token_id or 0
            bids = torch.full((b, t), pad, dtype=torch.int64)
            bmask = torch.zeros((b, t), dtype=torch.bool)
            for i, c in enumerate(self.base_ctx):
                bids[i, t - len(c) :] = torch.tensor(c)
                bmask[i, t - len(c) :] = True
            self.zb = base.prefill(bids.to(dec.device), bmask.to(dec.device))[:, : self.vb]
            return self.zb, value.prefill(self.prompt, self.mask)[:, : self.vv]
        zv = value.decode(ids)[:, : self.vv]
        new_ids = ids.tolist()  # host sync: re-tokenizing the text for the base is host work
        finished = self.finished.tolist()
        keep, feed = [], []
        for r, tok_id in enumerate(new_ids):
            if finished[r]:
                keep.append(len(self.base_ctx[r]))
                feed.append([])
                continue
            self.generated[r].append(tok_id)
            if self.same_tokens:
                target = self.base_ctx[r] + [tok_id]
            else:
                target = self._base_ids(self.texts[r] + self.generated_text(r))
            old = self.base_ctx[r]
            n = 0
            while n < min(len(old), len(target)) and old[n] == target[n]:
                n += 1
            if target != old and n == len(target):
                # the new tokenization is a prefix of the old one (a partial UTF-8 character completed into a
                # shorter byte string): re-feed its last token so the base's logits follow the new context
                n -= 1
            if len(target) >= base.max_context:  # one free column stays for idle rows' writes
                raise ValueError(
                    f"row {r}: the base context reached {len(target)} tokens, the end of the base model's context "
                    f"({base.max_context}); lower max_new_tokens"
                )
            keep.append(n)
            feed.append(target[n:])
            self.base_ctx[r] = target
        need = max(len(c) for c in self.base_ctx) + 1  # + a free column for idle rows' writes
        if need > base.max_seq_len:  # more base tokens per value token than planned: grow, up to the context
            base.grow(min(base.max_context, max(need, 2 * base.max_seq_len)))
        base.rewind(torch.tensor(keep))
        zb = self.zb
        for j in range(max((len(f) for f in feed), default=0)):
            col = torch.tensor([f[j] if j < len(f) else 0 for f in feed], device=dec.device)
            act = torch.tensor([j < len(f) for f in feed], device=dec.device)
            out = base.decode(col, active=act)[:, : self.vb]
            zb = torch.where(act[:, None], out, zb)
        self.zb = zb
        return zb, zv


def _scheme_of(value_path) -> str:
    """The scheme recorded by ``ivl-fast train`` in the value checkpoint's ivl.json (default residual)."""
    import json

    if value_path is None:
        return "residual"
    meta = Path(value_path) / "ivl.json"
    if meta.is_file():
        scheme = json.loads(meta.read_text()).get("scheme", "residual")
        return scheme if scheme in PAIR_SCHEMES else "residual"
    return "residual"


def _is_message_list(x) -> bool:
    return isinstance(x, list | tuple) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _pick_tokenizer(explicit, base_path, value_path):
    if explicit is not None:
        return load_tokenizer(explicit)
    paths = [p for p in (base_path, value_path) if p is not None and has_tokenizer(p)]
    if not paths:
        return None
    tok = load_tokenizer(paths[0])
    if len(paths) == 2:
        other = load_tokenizer(paths[1])
        if tok.get_vocab() != other.get_vocab():
            raise ValueError(
                f"the tokenizers of {str(base_path)!r} and {str(value_path)!r} differ; same-vocabulary IVL needs one "
                "tokenizer (for different tokenizers build a map with `ivl-fast vocab-map`)"
            )
    return tok


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
