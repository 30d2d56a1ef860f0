"""GenerationOptions: the typed, frozen settings of one generation, resolved as transformers resolves them.

Precedence, highest first: explicit arguments > a passed ``GenerationConfig`` > the checkpoint's own
``generation_config.json`` (the value network's, else the base's, as transformers uses a model's own) > the
defaults below. Of a ``GenerationConfig`` only the fields it sets count (``to_diff_dict()``), so an unset field
falls through to the next source. Fields that change the output but are not implemented here (``num_beams > 1``,
``no_repeat_ngram_size``, ``bad_words_ids``, constraints, ...) raise a ValueError naming the field: never
silently ignored. ``max_length`` (prompt + new tokens, transformers' older budget) counts when it is passed (an
argument or a passed config) and no ``max_new_tokens`` is set anywhere, as in transformers, where
``max_new_tokens`` wins when both are set; the decoder turns it into ``max_new_tokens`` once it knows the prompt's
width. A checkpoint file's ``max_length`` is not used (the default budget is ``max_new_tokens=20``).

The command line shares these defaults: its flags default to "unset" and fall through the same chain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..checks import check_int, is_int
from ..sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default length budget (max_length=20 there)

# GenerationConfig fields implemented here (same names and meanings)
CONFIG_FIELDS = (
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "num_return_sequences",
    "eos_token_id",
    "pad_token_id",
    "stop_strings",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
)
# fields that do not change which tokens come out (bookkeeping, caching, outputs, beam-only or assistant-only
# settings, which have no effect without beams / an assistant model)
HARMLESS_FIELDS = frozenset(
    {
        "transformers_version",
        "_from_model_config",
        "bos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "return_legacy_cache",
        "output_attentions",
        "output_hidden_states",
        "length_penalty",
        "early_stopping",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "is_assistant",
        "compile_config",
        "disable_compile",
        "max_cache_len",
        "prefill_chunk_size",
        "continuous_batching_config",
        "assistant_ensemble_weight",
    }
)
# fields not implemented, with the value that means "off" (any other value is refused)
NOOP_VALUES = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "sequence_bias": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "min_length": 0,
    "max_time": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "forced_decoder_ids": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "token_healing": False,
    "dola_layers": None,
    "prompt_lookup_num_tokens": None,
    "max_matching_ngram_size": None,
    "assistant_early_exit": None,
    "low_memory": None,
}


@dataclass(frozen=True)
class GenerationOptions:
    """One generation's settings (validated on construction; see the module docstring for where they come from).

    max_new_tokens: new tokens per row at most (EOS included). do_sample, temperature, top_k, top_p, min_p: the
    warpers of :mod:`ivl_fast.sampling` (transformers' semantics; do_sample=False is greedy).
    repetition_penalty: transformers' (over prompt + generated ids). presence_penalty, frequency_penalty: OpenAI's
    (over generated ids; in [-2, 2]). num_return_sequences: samples per prompt, laid out as transformers does
    (each prompt's samples adjacent; needs do_sample). seed: the sampler's seed (None: fresh entropy).
    eos_token_id: the ids that end a row (empty: none). pad_token_id: what fills rows after they end.
    stop_strings: texts that end a row (None: none). return_logprobs: also return each token's log-probability.
    max_length: prompt width + new tokens (None: max_new_tokens counts; the decoder resolves it per call).
    min_new_tokens: EOS ids cannot be drawn before this many new tokens (transformers' MinNewTokensLength
    processor). return_dict_in_generate, output_scores, output_logits: transformers' output switches (scores and
    logits per step are kept only with return_dict_in_generate). return_components: keep each step's top-k of the
    base, of the value network's delta and of the combination (:class:`~ivl_fast.decode.components.Components`).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_return_sequences: int = 1
    seed: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0
    stop_strings: tuple[str, ...] | None = None
    return_logprobs: bool = False
    max_length: int | None = None
    min_new_tokens: int = 0
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    return_components: int = 0

    def __post_init__(self):
        mnt = self.max_new_tokens
        check_int(mnt, "max_new_tokens", 1)
        if self.max_length is not None:
            check_int(self.max_length, "max_length", 2)
        check_int(self.min_new_tokens, "min_new_tokens", 0)
        check_int(self.return_components, "return_components", 0, 64)
        for name in ("return_dict_in_generate", "output_scores", "output_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        n = self.num_return_sequences
        check_int(n, "num_return_sequences", 1)
        if n > 1 and not self.do_sample:  # transformers' rule: greedy rows would be n copies of one answer
            raise ValueError(
                f"num_return_sequences={n} needs do_sample=True (greedy decoding gives one answer per prompt)"
            )
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        if not isinstance(self.return_logprobs, bool):
            raise ValueError(f"return_logprobs must be a bool, got {self.return_logprobs!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        object.__setattr__(self, "_sampling", self._make_sampling())  # validates the warpers and penalties

    def _make_sampling(self) -> SamplingParams:
        return SamplingParams(
            self.do_sample,
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    @property
    def sampling(self) -> SamplingParams:
        return self._sampling

    def replace(self, **changes) -> GenerationOptions:
        return dataclasses.replace(self, **changes)

    @property
    def record(self) -> tuple[bool, bool]:
        """(scores, logits): what each step keeps for a transformers-style output."""
        keep = self.return_dict_in_generate
        return keep and self.output_scores, keep and self.output_logits

    def for_prompt(self, width: int) -> GenerationOptions:
        """These options for prompts ``width`` tokens wide: ``max_length`` becomes ``max_new_tokens`` (transformers'
        rule: a ValueError when the prompt already fills it)."""
        if self.max_length is None:
            return self
        if width >= self.max_length:
            raise ValueError(
                f"the prompt is {width} tokens wide but max_length is {self.max_length} (prompt + new tokens); "
                "raise max_length or set max_new_tokens"
            )
        return self.replace(max_new_tokens=self.max_length - width, max_length=None)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GenerationOptions))


def _set_fields(generation_config) -> dict:
    """The fields a GenerationConfig (or a plain dict of its fields) sets."""
    if generation_config is None:
        return {}
    if hasattr(generation_config, "to_diff_dict"):
        return generation_config.to_diff_dict()
    return dict(generation_config)


def config_values(generation_config, source: str) -> dict:
    """The fields a GenerationConfig sets, checked: unimplemented ones raise a ValueError naming the field."""
    out = {}
    for name, value in _set_fields(generation_config).items():
        if name in CONFIG_FIELDS:
            if value is not None:
                out[name] = value
        elif name in HARMLESS_FIELDS:
            continue
        elif name in NOOP_VALUES:
            if not _is_noop(value, NOOP_VALUES[name]):
                raise ValueError(
                    f"{source}.{name}={value!r} is not supported by ivl-fast (it implements sampling and greedy "
                    f"decoding with {', '.join(CONFIG_FIELDS)}); remove it or set it to {NOOP_VALUES[name]!r}"
                )
        elif value:  # an unknown field set to something other than off (None, 0, False, empty)
            raise ValueError(f"{source}.{name}={value!r} is not a generation setting ivl-fast implements")
    return out


def _is_noop(value, noop) -> bool:
    if noop is None or noop is False or noop == 0:  # "off" is falsy: None, 0, False, [] all mean off
        return not value
    return value is None or value == noop


# transformers' generate() switches for outputs not returned here: refused when asked for
NOT_RETURNED = frozenset({"output_attentions", "output_hidden_states", "return_legacy_cache"})


def _check_transformers_arguments(extra: dict) -> None:
    """Arguments of transformers' generate() that are not options here: accepted where they change nothing (a
    no-op value of an unimplemented setting, ``use_cache``, ...), else refused naming each one."""
    unknown = []
    for name, value in sorted(extra.items()):
        if name in NOOP_VALUES:
            if not _is_noop(value, NOOP_VALUES[name]):
                raise ValueError(
                    f"{name}={value!r} is not supported by ivl-fast (it implements sampling and greedy decoding "
                    f"with {', '.join(OPTION_NAMES)}); remove it or set it to {NOOP_VALUES[name]!r}"
                )
        elif name in NOT_RETURNED:
            if value:
                raise ValueError(f"{name}={value!r}: ivl-fast returns no attentions, hidden states or caches")
        elif name not in HARMLESS_FIELDS:
            unknown.append(name)
    if unknown:
        raise TypeError(
            f"generation arguments ivl-fast does not know: {', '.join(unknown)} (check the spelling); it takes "
            f"{', '.join(OPTION_NAMES)}, and transformers' streamer= in generate()"
        )


def resolve_options(
    explicit: dict,
    generation_config=None,
    checkpoint_config=None,
    *,
    tokenizer=None,
    model_config=None,
    vocab_size: int,
) -> GenerationOptions:
    """explicit (values None = unset) > generation_config > checkpoint_config > defaults; then the special ids:
    eos from those, else the tokenizer's, else the model config's; pad likewise, else eos[0], else 0."""
    extra = set(explicit) - set(OPTION_NAMES)
    if extra:
        explicit = dict(explicit)
        _check_transformers_arguments({k: explicit.pop(k) for k in extra})
    passed = config_values(generation_config, "generation_config")
    checkpoint = config_values(checkpoint_config, "the checkpoint's generation_config.json")
    checkpoint.pop("max_length", None)  # see the module docstring
    values = {**checkpoint, **passed}
    values.update({k: v for k, v in explicit.items() if v is not None})
    if "max_new_tokens" in values:  # set anywhere: it wins over max_length (transformers warns and does the same)
        values.pop("max_length", None)

    def fallback(name):  # the tokenizer's id, else the model config's; ids the model cannot produce do not count
        for src in (tokenizer, model_config):
            v = getattr(src, name, None) if src is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size:
                return v
            if isinstance(v, list | tuple) and v and all(isinstance(x, int) and 0 <= x < vocab_size for x in v):
                return list(v)
        return None

    eos = values.pop("eos_token_id", None)
    if eos is None:
        eos = fallback("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for e in eos:
        if not is_int(e) or not 0 <= e < vocab_size:
            raise ValueError(f"eos_token_id entries must be token ids in [0, {vocab_size}), got {e!r}")
    pad = values.pop("pad_token_id", None)
    if pad is None:
        pad = fallback("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
    if not is_int(pad) or not 0 <= pad < vocab_size:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab_size}), got {pad!r}")
    stops = values.pop("stop_strings", None)
    if stops is not None:
        raw = stops
        stops = [stops] if isinstance(stops, str) else list(stops) if isinstance(stops, list | tuple) else None
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop_strings must be a non-empty string or list of them, got {raw!r}")
        if tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer: pass tokenizer=... or load checkpoints that include one")
        stops = tuple(stops)
    return GenerationOptions(**values, eos_token_id=tuple(eos), pad_token_id=pad, stop_strings=stops)


def read_generation_config(path):
    """The GenerationConfig of ``path``'s generation_config.json (None for no path or no such file)."""
    from pathlib import Path

    from transformers import GenerationConfig

    if path is not None and (Path(path) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(path))
    return None


def checkpoint_generation_config(paths):
    """The GenerationConfig of the first of ``paths`` holding a generation_config.json (None when none has one):
    the value network's before the base's, as transformers uses a model's own."""
    for p in paths:
        cfg = read_generation_config(p)
        if cfg is not None:
            return cfg
    return None


@dataclass(frozen=True)
class StopIds:
    """The stop ids of a base/value pair of one vocabulary and where they came from.

    ids: the union, in first-seen order. sources: (where, ids) for each source that has some ("the base's
    generation_config.json", (128001, 128008, 128009)), in the order they were read."""

    ids: tuple[int, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def agree(self) -> bool:
        """Every source names the same ids (nothing to point out)."""
        return len({frozenset(ids) for _, ids in self.sources}) <= 1

    def describe(self) -> str:
        """The one line a decoder prints at load time."""
        parts = "; ".join(f"{where} {list(ids) if len(ids) > 1 else ids[0]}" for where, ids in self.sources)
        return f"ivl-fast: stop ids {list(self.ids)}, the union of {parts} (eos_token_id=... overrides)"


def _as_ids(v) -> tuple:
    """An eos_token_id value (int, list, None) -> a tuple of its entries (unchecked: resolve_options checks)."""
    if v is None:
        return ()
    return (v,) if isinstance(v, int) else tuple(v) if isinstance(v, list | tuple) else (v,)


def _owner(name: str) -> str:
    return f"the {name}'s " if name else "the "


def union_stop_ids(configs, tokenizers, vocab_size: int) -> StopIds | None:
    """The stop ids of a pair: the union of the EOS lists of both checkpoints' generation configs (``configs``:
    (name, GenerationConfig or None), the value's first) and of the tokenizers' EOS (``tokenizers``: (name,
    tokenizer or None); name "" for the pair's one tokenizer); None when none has one. An Instruct base stops at its
    chat-turn ends as well as at the value network's EOS (Llama 3 Instruct: [128001, 128008, 128009]; Gemma:
    [1, 107]). A tokenizer's EOS outside
    ``[0, vocab_size)`` counts as none (no model can produce it); a generation config's entries are kept as they
    are, so :func:`resolve_options` refuses a bad one naming it."""
    sources = []
    for name, cfg in configs:
        ids = _as_ids(getattr(cfg, "eos_token_id", None)) if cfg is not None else ()
        if ids:
            sources.append((f"{_owner(name)}generation_config.json", ids))
    for name, tok in tokenizers:
        e = getattr(tok, "eos_token_id", None) if tok is not None else None
        if isinstance(e, int) and not isinstance(e, bool) and 0 <= e < vocab_size:
            sources.append((f"{_owner(name)}tokenizer's EOS", (e,)))
    if not sources:
        return None
    ids = tuple(dict.fromkeys(i for _, src in sources for i in src))
    return StopIds(ids, tuple(sources))


def pair_generation_config(configs, tokenizers, vocab_size: int):
    """(the GenerationConfig a same-vocabulary pair decodes with, its :class:`StopIds` or None).

    The config is the first of ``configs`` present (the value network's, else the base's), as before, with
    ``eos_token_id`` replaced by :func:`union_stop_ids` when a generation config names EOS ids or the tokenizers
    disagree (else the fallback to the tokenizer's EOS gives the same ids, and nothing changes). A config passed
    to generate() or an explicit ``eos_token_id`` still wins over it."""
    import copy

    first = next((cfg for _, cfg in configs if cfg is not None), None)
    stop = union_stop_ids(configs, tokenizers, vocab_size)
    from_files = any(cfg is not None and _as_ids(getattr(cfg, "eos_token_id", None)) for _, cfg in configs)
    if stop is None or (not from_files and stop.agree):
        return first, None
    if first is None:
        from transformers import GenerationConfig

        out = GenerationConfig()
    else:
        out = copy.deepcopy(first)
    out.eos_token_id = list(stop.ids)
    return out, stop


def own_generation_config(*models):
    """The generation config of the first transformers model (of ``models``) that has one of its own. One derived
    from config.json (no generation_config.json; ``_from_model_config``) does not count: the special ids then come
    from the tokenizer, else the config, as with ``from_pretrained`` of the same directory."""
    for m in models:
        g = getattr(m, "generation_config", None)
        if g is not None and not getattr(g, "_from_model_config", False):
            return g
    return None
