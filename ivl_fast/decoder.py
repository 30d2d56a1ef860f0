"""FastIVLDecoder: decode with a frozen base model steered by a value network (Inverse Value Learning).

Per step: ``z = z_base + alpha * z_value`` (residual scheme; both models see the same tokens and could run
concurrently), then the sampling of :mod:`ivl_fast.sampling`. This module is the public facade only: options
are resolved by :mod:`ivl_fast.decode.options`, and the loop, the step, the buffers and the graphs live in
:mod:`ivl_fast.decode`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .chat import as_messages, is_message_list, render_chat
from .decode.graph_cache import GraphCache, GraphSettings
from .decode.inputs import pack_prompts, repeat_prompts
from .decode.loop import DecodeLoop
from .decode.model_set import ModelSet
from .decode.options import (
    GenerationOptions,
    own_generation_config,
    pair_generation_config,
    resolve_options,
)
from .decode.output import IVLGenerateOutput, generate_output, loop_sequences
from .decode.scoring import loglikelihood, loglikelihood_rolling
from .decode.speculative_loop import check_draft
from .decode.speculative_slots import SpeculativeSlots, check_slots
from .decode.start import capture_buckets, kv_capacity, open_slots, start_generation, start_speculative
from .decode.stops import NonFiniteLogitsError
from .graphs import KV_BUCKET_MIN
from .models import from_hf_model
from .models.probe import ProbeValue
from .pair_loading import load_pair
from .schemes import check_scheme, uses_base, uses_value

logger = logging.getLogger("ivl_fast")

__all__ = ["FastIVLDecoder", "IVLGenerateOutput", "NonFiniteLogitsError"]


class FastIVLDecoder:
    """Decode with a base model plus a value network.

    Args:
        base_model, value_model: engines from :func:`ivl_fast.models.load_model`, or already loaded
            ``transformers`` causal LMs (the lean engine then shares their weight tensors; nothing is copied; their
            ``generation_config`` becomes :attr:`generation_config`). ``value_model`` may be None with
            ``scheme="base"``, ``base_model`` None with ``scheme="value_only"``.
        vocab_map: a :class:`ivl_fast.vocab.VocabMap` (or its file) for a base with another tokenizer; then
            ``tokenizer`` is the value model's and ``base_tokenizer`` the base's, sampling happens in the value
            vocabulary and the base re-reads the text after every step (:mod:`ivl_fast.decode.cross_vocab`).
        alpha: weight of the value logits.
        scheme: one of :data:`ivl_fast.schemes.DECODE_SCHEMES`: "residual" (IVL: both models read the tokens),
            "cascade" / "cascade+" (the value network reads softmax(z_base) @ E_value (+ the token embedding); the
            base runs first), "base" (base alone) or "value_only" (value network alone; residual value networks
            only). ``from_pretrained`` takes it from the value checkpoint's ``ivl.json`` when none is given.
        tokenizer: used by ``generate_text``, stop strings and default EOS/pad ids.
        engine, attn_backend: how transformers models passed in are wrapped (see ``load_model``).
        sync_every: steps between host checks of EOS / stop strings / NaN (stream() checks every step).
        sample_backend: backend of :func:`ivl_fast.ops.combine_and_sample` ("auto": the fused Triton kernel on
            GPU, the torch reference on CPU).
        base_tokenizer: the base's tokenizer, needed with ``vocab_map``.
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
        generation_config: the checkpoint's own ``GenerationConfig`` (defaults for :meth:`generate`, below a
            config passed to it; ``from_pretrained`` reads ``generation_config.json``).
        terms: ((model, weight), ...) more same-vocabulary models in the logit arithmetic, z = z_base +
            alpha * z_value + sum_i w_i * z_i, each read like a residual value network and summed in the fused
            sampler: proxy tuning is ``FastIVLDecoder(large, small_tuned, terms=[(small, -1.0)])``, DExperts
            ``FastIVLDecoder(base, expert, alpha=a, terms=[(anti_expert, -a)])``.
        draft_model: a small base sharing the base's vocabulary (the one the value network was trained on): with
            it, generate / stream decode speculatively (:mod:`ivl_fast.decode.speculative`): the draft + the value
            network propose ``num_draft_tokens`` tokens, the base verifies them in one forward. Same output law as
            without it (greedy: the same tokens). Schemes "residual" and "base", one vocabulary, lean engines.
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
        generation_config=None,
        draft_model=None,
        num_draft_tokens: int = 4,
        terms=(),
    ):
        check_scheme(scheme)
        if uses_base(scheme) and base_model is None:
            raise ValueError(f"scheme={scheme!r} needs a base_model")
        if uses_value(scheme) and value_model is None:
            raise ValueError(f"scheme={scheme!r} needs a value_model")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        self.generation_config = generation_config or own_generation_config(value_model, base_model)
        self.sync_every, self.tokenizer, self.base_tokenizer = sync_every, tokenizer, base_tokenizer

        def wrap(m):
            if m is None or isinstance(m, ProbeValue):  # a probe is no engine: it reads the base's hidden state
                return m
            return from_hf_model(m, engine=engine, attn_backend=attn_backend)

        base, value = wrap(base_model), wrap(value_model)
        self.draft = None if draft_model is None else wrap(draft_model)
        terms = [(wrap(m), w) for m, w in terms or ()]
        self.models = ModelSet.build(
            scheme,
            base,
            value,
            alpha=alpha,
            vocab_map=vocab_map,
            sample_backend=sample_backend,
            terms=terms,
            tokenizer=tokenizer,
            base_tokenizer=base_tokenizer,
            draft=self.draft,
        )
        self.stop_ids = None  # the pair's StopIds when both sides' EOS were merged (see _merge_stop_ids)
        if generation_config is None and vocab_map is None:  # transformers models passed in: both own configs
            own = [(n, own_generation_config(m)) for n, m in (("value", value_model), ("base", base_model))]
            if any(c is not None for _, c in own):
                self._merge_stop_ids(own, [("", tokenizer)])
        self.num_draft_tokens = num_draft_tokens
        if self.draft is not None:
            check_draft(self.models, self.draft, num_draft_tokens)
        self.graphs_option = graphs
        settings = GraphSettings.resolve(graphs, graph_mode, graph_runner, kv_block, self.models)
        self.graph_cache = GraphCache(settings, self.device)

    # ------------------------------------------------------------------ the models, read-only views
    scheme = property(lambda self: self.models.scheme)

    @property
    def max_batch_len(self) -> int:
        """The longest ``max_seq_len`` :meth:`open_batch` takes: the context, less a draft model's look-ahead."""
        if self.draft is None:
            return self.max_context
        return min(self.max_context, self.draft.max_context) - self.num_draft_tokens - 1

    alpha = property(lambda self: self.models.alpha)
    base = property(lambda self: self.models.base)
    value = property(lambda self: self.models.value)
    vocab_map = property(lambda self: self.models.vocab_map)
    sample_backend = property(lambda self: self.models.sample_backend)
    device = property(lambda self: self.models.device)
    vocab_size = property(lambda self: self.models.vocab_size)
    engines = property(lambda self: self.models.engines)
    max_context = property(lambda self: self.models.max_context)
    cross_vocab = property(lambda self: self.models.cross_vocab)
    graph_mode = property(lambda self: self.graph_cache.settings.mode)
    kv_block = property(lambda self: self.graph_cache.settings.kv_block)
    graph_captures = property(lambda self: self.graph_cache.captures)  # graphs captured so far, every call

    def cache_capacity(self, need: int) -> int:
        """KV cache columns of a run needing ``need`` (see :func:`ivl_fast.decode.start.kv_capacity`)."""
        return kv_capacity(self.models, need, self.kv_block)

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
        kv_block: int = KV_BUCKET_MIN,
        draft: str | Path | None = None,
        num_draft_tokens: int = 4,
        terms=(),
        tensor_parallel: int | None = None,
    ) -> FastIVLDecoder:
        """Load base and value checkpoints (Hugging Face directories), their tokenizer and generation config (the
        value checkpoint's ``generation_config.json``, else the base's; with one vocabulary it stops at the union of
        both files' and both tokenizers' EOS ids, logged once: :attr:`stop_ids`). One tokenizer under embeddings
        padded to different row counts is one vocabulary (``ModelSet.real_vocab``). ``draft``: a small base's
        checkpoint for speculative decoding (its tokenizer must be the base's); ``terms``: ((checkpoint dir,
        weight), ...), more models in the logit arithmetic (see the constructor); ``tensor_parallel=N``: shard the
        base over the N ranks of the initialised process group (call this on every rank; each reads only its
        slices; the value network, draft and terms are replicated, and every rank samples the same ids:
        ``ivl_fast.models.tensor_parallel``); every other option as in the constructor."""
        p = load_pair(
            base_path,
            value_path,
            vocab_map,
            scheme=scheme,
            device=device,
            dtype=dtype,
            engine=engine,
            attn_backend=attn_backend,
            allow_pickle=allow_pickle,
            tokenizer=tokenizer,
            draft=draft,
            terms=terms,
            tensor_parallel=tensor_parallel,
        )
        dec = cls(
            p.base,
            p.value,
            vocab_map,
            alpha=alpha,
            scheme=p.scheme,
            tokenizer=p.tokenizer,
            sync_every=sync_every,
            sample_backend=sample_backend,
            base_tokenizer=p.base_tokenizer,
            graphs=graphs,
            graph_mode=graph_mode,
            graph_runner=graph_runner,
            kv_block=kv_block,
            generation_config=next((c for _, c in p.configs if c is not None), None),
            draft_model=p.draft,
            num_draft_tokens=num_draft_tokens,
            terms=p.terms,
        )
        if vocab_map is None:  # one vocabulary: stop at both sides' EOS (across vocabularies ids differ)
            dec._merge_stop_ids(p.configs, list(p.sides.items()) or [("", p.tokenizer)])
        return dec

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        generation_config=None,
        texts: list[str] | None = None,
        progress=None,
        streamer=None,
        **options,
    ) -> IVLGenerateOutput | torch.Tensor:
        """Generate like ``transformers``' ``generate`` (same argument names and meanings).

        ``input_ids``: [B, T] tensor (with ``attention_mask`` for padded batches; left or right padding), a
        [T] tensor, or a list of token-id lists of different lengths. ``options``: the fields of
        :class:`~ivl_fast.decode.options.GenerationOptions` (max_new_tokens, do_sample, temperature, top_k,
        top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, num_return_sequences, seed,
        eos_token_id, pad_token_id, stop_strings, return_logprobs); what is not given comes from
        ``generation_config``, then the checkpoint's own generation config, then the defaults (max_new_tokens=20,
        greedy). ``eos_token_id=[]`` disables EOS stopping. With a vocab map, token ids are in the value
        model's vocabulary (input and output) and the base reads the prompt text (``texts``, else
        :func:`~ivl_fast.decode.cross_vocab.prompt_text`: a rendered chat with its special tokens, other ids as
        plain text; pass ``texts`` for a chat turn whose markers are plain text). ``progress``: a callable given
        the number of decode steps done, at each host check (no extra syncs).

        transformers' arguments with a meaning here: ``max_length`` (prompt width + new tokens; ``max_new_tokens``
        wins when both are set), ``min_new_tokens``, ``streamer`` (its ``put`` gets the prompt [B, T], then each
        step's ids [B], and ``end()``, as transformers calls it: ``TextStreamer``, ``TextIteratorStreamer``; the
        host is read every step), ``return_dict_in_generate`` with ``output_scores`` / ``output_logits`` (see
        :class:`IVLGenerateOutput`; ``return_dict_in_generate=False`` returns the sequences tensor alone, as
        transformers does). No-op values of unimplemented settings (``num_beams=1``, ``use_cache``) are
        accepted; other values, and unknown names, are refused naming them.
        """
        opts = self.options(generation_config, **options)
        t0 = time.perf_counter()
        loop = self._start(input_ids, attention_mask, opts, 1 if streamer is not None else self.sync_every, texts)
        prompt = loop.prompt
        if streamer is not None:
            streamer.put(prompt.cpu())
        for ids in loop:
            if streamer is not None:
                streamer.put(ids.cpu())
            if progress is not None:
                progress(loop.steps)
        if streamer is not None:
            streamer.end()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        if options.get("return_dict_in_generate") is False:  # asked for transformers' plain tensor
            return loop_sequences(loop)
        return generate_output(loop, elapsed)

    def stream(self, input_ids, attention_mask=None, *, generation_config=None, **options) -> Iterator[torch.Tensor]:
        """Yield the new token ids [B] of each step (pad for rows already stopped); same arguments as generate."""
        opts = self.options(generation_config, **options)
        yield from self._start(input_ids, attention_mask, opts, 1, None)

    def generate_text(
        self,
        prompts,
        *,
        chat: bool = False,
        system: str | None = None,
        skip_special_tokens: bool = True,
        chat_template_kwargs: dict | None = None,
        **kwargs,
    ) -> list[str] | str:
        """Text in, text out through the checkpoint's tokenizer.

        ``prompts``: a string or a list of strings (or, with ``chat=True``, message lists
        ``[{"role": "user", "content": ...}]``; plain strings become one user message, rendered with the
        tokenizer's chat template or :data:`ivl_fast.chat.DEFAULT_CHAT_TEMPLATE`). Returns the generated
        continuation(s) only; a single string for a single prompt without ``num_return_sequences``, else a list
        (each prompt's samples adjacent). ``chat_template_kwargs``: extra chat template variables (e.g.
        ``{"enable_thinking": False}`` for Qwen3), checked by :func:`ivl_fast.chat.check_chat_template_kwargs`;
        with ``chat=True`` only.
        """
        if chat_template_kwargs is not None and not chat:
            raise ValueError("chat_template_kwargs needs chat=True (plain prompts are not rendered by a template)")
        tok = self._require_tokenizer("generate_text")
        single = isinstance(prompts, str) or (chat and is_message_list(prompts))
        items = [prompts] if single else list(prompts)
        if not items:
            raise ValueError("prompts is empty")
        if chat:
            texts = [render_chat(tok, as_messages(p, system), chat_template_kwargs=chat_template_kwargs) for p in items]
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
            texts.append(tok.decode(row[t : t + n], skip_special_tokens=skip_special_tokens))
        return texts[0] if single and len(texts) == 1 else texts

    def loglikelihood(
        self, requests, *, batch_size: int = 8, max_length: int | None = None, texts: list[str] | None = None
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context) under the combined distribution, is_greedy) per (context, continuation)
        request, texts or token-id lists, as lm-eval's HF model scores them (:mod:`ivl_fast.decode.scoring`).
        Across vocabularies, under the distribution decoding samples from (the base re-reads the text at each
        position); ``texts``: each id request's context text as the base reads it (default: ``prompt_text``)."""
        return loglikelihood(
            self.models,
            self.tokenizer,
            requests,
            max_length or self.max_context,
            batch_size,
            base_tokenizer=self.base_tokenizer,
            texts=texts,
        )

    def loglikelihood_rolling(self, texts, *, batch_size: int = 8, max_length: int | None = None) -> list[float]:
        """Summed log-probability of each whole text (or token-id list), in disjoint windows of ``max_length``."""
        return loglikelihood_rolling(
            self.models,
            self.tokenizer,
            texts,
            max_length or self.max_context,
            batch_size,
            base_tokenizer=self.base_tokenizer,
        )

    def open_batch(
        self,
        slots: int,
        max_seq_len: int,
        *,
        generation_config=None,
        per_request: bool = False,
        top_logprobs: int = 0,
        components: int = 0,
        **options,
    ) -> DecodeLoop | SpeculativeSlots:
        """A persistent batch of ``slots`` rows for continuous batching: ``admit(ids)`` a request into a free slot
        between rounds, ``step()`` one round, ``tokens(slot)``, ``retire(slot)``. Each slot's KV holds
        ``max_seq_len`` tokens (prompt + new); ``options`` as for :meth:`generate` (per-request budgets at admit;
        with ``per_request=True`` also per-request sampling values and seeds: ``admit(ids, n,
        sampling=SamplingParams(...), seed=7)``, ``options`` being the defaults). ``top_logprobs``: requests may
        ask for up to that many top alternatives per token (``admit(..., top_logprobs=k)``; read them from
        ``bufs.top_ids`` / ``bufs.top_logprobs``). ``components``: requests may ask for up to that many entries of
        what the value network changed per token (``admit_many([SlotRequest(..., components=k)])``, read with
        ``read_new(..., components=k)``; :mod:`~ivl_fast.decode.components`). With a draft model: a
        :class:`~ivl_fast.decode.speculative_slots.SpeculativeSlots` batch (speculative rounds, each emitting 1 to
        k + 1 tokens per row; one alpha, one random stream, no top alternatives)."""
        opts, cache = self.options(generation_config, **options), self.graph_cache.for_models(self.models)
        if self.draft is not None:  # speculative rounds over the slots (eager); see SpeculativeSlots for limits
            if top_logprobs or components:
                raise ValueError("top_logprobs and components are not supported with a draft model")
            check_slots(slots, max_seq_len, self.max_batch_len)
            return SpeculativeSlots(
                self.models,
                self.draft,
                opts,
                k=self.num_draft_tokens,
                slots=slots,
                max_seq_len=max_seq_len,
                per_request=per_request,
            )
        return open_slots(
            self.models,
            opts,
            cache,
            slots,
            max_seq_len,
            self.kv_block,
            self.sync_every,
            per_request=per_request,
            top_logprobs=top_logprobs,
            components=components,
            tokenizer=self.tokenizer,
            base_tokenizer=self.base_tokenizer,
            same_tokenizers=self.models.same_tokenizers,
        )

    def capture_graphs(
        self, batch_sizes=(1,), max_seq_len: int | None = None, *, continuous: bool = False, **generate_kwargs
    ) -> int:
        """Capture decode graphs ahead of the first requests (as servers do at start-up), so no call pays for a
        capture: for the bucket of each of ``batch_sizes``, every KV bucket up to ``max_seq_len`` tokens (default:
        the context), and the generation settings ``generate_kwargs`` (graphs differ by greedy vs which warpers are
        on, penalties, ``return_logprobs`` and the number of EOS ids; values such as temperature do not matter).
        ``continuous=True``: the graphs of :meth:`open_batch` batches of those sizes instead of generate()'s.
        Returns the number of graphs captured (0 for what was captured before)."""
        if self.graph_cache.settings.kind is None:
            raise ValueError(f"capture_graphs needs graphs enabled (graphs={self.graphs_option!r} on {self.device})")
        max_seq_len = self.max_context if max_seq_len is None else max_seq_len
        if not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= self.max_context:
            raise ValueError(f"max_seq_len must be an integer in [2, {self.max_context}], got {max_seq_len!r}")
        opts = self.options(None, **{**generate_kwargs, "max_new_tokens": max_seq_len - 1})
        cache = self.graph_cache.for_models(self.models)
        if cache is None:
            why = self.graph_cache.obstacle(self.models)
            raise ValueError(f"capture_graphs: these runs decode eagerly ({why})")
        return capture_buckets(self.models, opts, cache, batch_sizes, max_seq_len, self.sync_every, continuous)

    def release_graphs(self) -> None:
        """Drop every captured graph and its static buffers (they hold device memory)."""
        self.graph_cache.clear()

    def options(self, generation_config=None, **explicit) -> GenerationOptions:
        """The resolved :class:`~ivl_fast.decode.options.GenerationOptions` of a call with these arguments."""
        return resolve_options(
            explicit,
            generation_config,
            self.generation_config,
            tokenizer=self.tokenizer,
            model_config=self.models.config,
            vocab_size=self.vocab_size,
        )

    # ------------------------------------------------------------------ internals
    def _merge_stop_ids(self, configs, tokenizers) -> None:
        """Decode with the union of both checkpoints' EOS ids (:func:`~ivl_fast.decode.options.pair_generation_config`)
        and say once, on the ``ivl_fast`` logger, which ids stop and where they came from: a warning (shown on
        stderr without a logging setup) when the sources name different ids, else at info level."""
        self.generation_config, self.stop_ids = pair_generation_config(configs, tokenizers, self.vocab_size)
        if self.stop_ids is not None:
            logger.log(logging.INFO if self.stop_ids.agree else logging.WARNING, "%s", self.stop_ids.describe())

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass tokenizer=... or load checkpoints that include one")
        return self.tokenizer

    def start_loop(
        self, input_ids, attention_mask=None, *, texts=None, sync_every=None, generation_config=None, **options
    ):
        """The prefilled :class:`~ivl_fast.decode.loop.DecodeLoop` of a generate() call (its first tokens emitted):
        iterate it for each step's ids, or drive it round by round."""
        opts = self.options(generation_config, **options)
        return self._start(input_ids, attention_mask, opts, sync_every or self.sync_every, texts)

    def _start(self, input_ids, attention_mask, opts: GenerationOptions, sync_every: int, texts) -> DecodeLoop:
        """Pack the prompts and start the loop (``loop.prompt``: the packed prompts [B, T] on device)."""
        prompt, mask = pack_prompts(input_ids, attention_mask, opts.pad_token_id, self.vocab_size)
        opts = opts.for_prompt(prompt.shape[1])  # max_length -> max_new_tokens
        if texts is not None and len(texts) != prompt.shape[0]:
            raise ValueError(f"texts has {len(texts)} entries for {prompt.shape[0]} prompts")
        prompt, mask, texts = repeat_prompts(prompt, mask, texts, opts.num_return_sequences)
        if self.draft is not None:
            s = self.graph_cache.settings
            lean = self.models.all_support("graphs") and self.draft.supports_graphs
            return start_speculative(
                self.models,
                self.draft,
                self.num_draft_tokens,
                opts,
                prompt,
                mask,
                graph_cache=self.graph_cache if s.kind and lean else None,
                kv_block=self.kv_block,
                tokenizer=self.tokenizer,
            )
        return start_generation(
            self.models,
            opts,
            prompt,
            mask,
            graph_cache=self.graph_cache.for_models(self.models),
            kv_block=self.kv_block,
            sync_every=sync_every,
            tokenizer=self.tokenizer,
            base_tokenizer=self.base_tokenizer,
            same_tokenizers=self.models.same_tokenizers,
            texts=texts,
        )
