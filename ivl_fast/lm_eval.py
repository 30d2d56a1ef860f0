"""lm-evaluation-harness model type ``"ivl"``: a base model steered by a value network, evaluated as lm-eval
evaluates a Hugging Face model.

``import ivl_fast.lm_eval`` registers it (``lm_eval.api.registry.register_model("ivl")``)::

    import ivl_fast.lm_eval  # noqa: F401
    lm_eval.simple_evaluate(model="ivl", model_args="base=BASE_DIR,value=VALUE_DIR,alpha=1.0", tasks=[...])

or lm-eval's own command line after that import, ``python -m ivl_fast.lm_eval_cli --model ivl --model_args ...``
(:mod:`ivl_fast.lm_eval_cli`; lm-eval reads no plugin entry point for model types), or ``ivl-fast eval``
(:mod:`ivl_fast.cli.eval`). Semantics are those of lm-eval's own ``hf`` model
(``lm_eval.models.huggingface.HFLM``) on the same tokenizer, so results differ only by the model:

- text -> ids: ``tok_encode`` as HFLM's (the tokenizer's own special tokens unless ``add_bos_token`` says
  otherwise; none when the text already starts with the prefix token's text); (context, continuation) pairs are
  split by lm-eval's ``TemplateLM._encode_pair`` (trailing spaces move to the continuation); an empty context reads
  the prefix token (BOS, else EOS).
- ``loglikelihood``: :meth:`ivl_fast.FastIVLDecoder.loglikelihood` on those ids (window
  ``(context + continuation)[-(max_length + 1):][:-1]``, summed log-probabilities under
  ``log_softmax(z_base + alpha * z_value)``, ``is_greedy``). Refused across vocabularies (ValueError).
- ``loglikelihood_rolling``: lm-eval's own rolling windows (``get_rolling_token_windows`` with ``context_len=1``,
  made disjoint) scored as above and summed.
- ``generate_until``: requests grouped by their gen_kwargs and batched longest first as HFLM batches them; the
  context left-truncated to ``max_length - max_gen_toks`` tokens; decoding stops at EOS (the checkpoint's
  generation config, else the tokenizer's) and at the ``until`` strings, which are then cut off with lm-eval's
  ``postprocess_generated_text`` (the EOS text is one of them, as in HFLM). gen_kwargs: ``until``,
  ``max_gen_toks`` (or lm-eval's aliases ``max_new_tokens``, ``max_tokens``, ``max_completion_tokens``),
  ``do_sample``, ``temperature``; any other key is refused (ValueError naming it), never ignored.
- chat templates (``--apply_chat_template``): the tokenizer's own template, else
  :data:`ivl_fast.chat.DEFAULT_CHAT_TEMPLATE` (what ``ivl-fast train`` renders demonstrations with).

model_args: ``base``, ``value`` (checkpoint directories), ``alpha``, ``scheme``, ``vocab_map``, ``dtype``,
``device``, ``batch_size`` (an integer, or "auto": the largest batch from ``max_batch_size`` down, default 64,
that does not run out of memory, as HFLM finds it), ``max_length`` (default: the models' context),
``add_bos_token`` (as HFLM's), ``draft`` (a small base's checkpoint: generate_until decodes speculatively, with
the same outputs) and ``num_draft_tokens`` (default 4); also what lm-eval passes itself (``max_batch_size``;
``trust_remote_code=False``). Unknown keys are refused with a ValueError naming them.
Nothing is downloaded and no remote code runs: checkpoints are local safetensors directories.
"""

from __future__ import annotations

import contextlib
import logging
import math

import jinja2
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from .chat import DEFAULT_CHAT_TEMPLATE
from .checks import check_int, is_int, is_number
from .decode.cross_vocab import prompt_text

logger = logging.getLogger(__name__)

MODEL_ARGS = (
    "base",
    "value",
    "alpha",
    "scheme",
    "vocab_map",
    "dtype",
    "device",
    "batch_size",
    "max_length",
    "add_bos_token",
    "draft",
    "num_draft_tokens",
    "terms",
    "tensor_parallel",
)
# also accepted: what lm_eval.simple_evaluate / lm-eval's CLI pass themselves (max_batch_size, trust_remote_code)
# the gen_kwargs generate_until reads (lm-eval's normalize_gen_kwargs resolves the max-token aliases)
GEN_KWARGS = (
    "until",
    "max_gen_toks",
    "max_new_tokens",
    "max_tokens",
    "max_completion_tokens",
    "do_sample",
    "temperature",
)
# requests scored per call of the decoder (sorted longest first overall, so each call's batches pad little); the
# progress bar moves once per call
_SCORE_CALL = 256


def _batch_size(value) -> int | str:
    """An integer >= 1, or "auto" (lm-eval's "auto:N" too: one detection, so N, HFLM's re-detection schedule, is
    not used)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str) and (value == "auto" or value.startswith("auto:")):
        return "auto"
    if not is_int(value) or value < 1:
        raise ValueError(f"model_args batch_size must be an integer >= 1 or 'auto', got {value!r}")
    return value


def _draft_tokens(value) -> int:
    if value is None:
        return 4
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return check_int(value, "model_args num_draft_tokens", 1)


def _terms(value) -> list[tuple[str, float]]:
    """model_args ``terms``: "DIR@WEIGHT|DIR@WEIGHT" (lm-eval's model_args string splits on ',' and '=')."""
    if value is None:
        return []
    out = []
    for part in str(value).split("|"):
        d, at, w = part.rpartition("@")
        try:
            weight = float(w)
        except ValueError:
            weight = None
        if not at or not d or weight is None or not math.isfinite(weight):
            raise ValueError(f"model_args terms must be 'DIR@WEIGHT|DIR@WEIGHT...', got {value!r}")
        out.append((d, weight))
    return out


def _quiet_git_commit_hash():
    """lm-eval's ``get_git_commit_hash`` (the working directory's commit, else lm-eval's fallback) without git's
    "fatal: not a git repository" on stderr outside a checkout (lm-eval lets git write to our stderr)."""
    import os
    import subprocess

    try:
        out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)  # noqa: S607
        return out.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        from lm_eval.loggers.utils import get_commit_from_path

        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def quiet_git():
    """Within it, ``lm_eval.simple_evaluate`` records the commit as it does, quietly (ivl-fast eval and the demo,
    which call it once per run or row)."""
    import lm_eval.evaluator

    saved = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _quiet_git_commit_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = saved


@register_model("ivl")
class IVLLM(TemplateLM):
    """lm-eval model over :class:`ivl_fast.FastIVLDecoder` (see the module docstring for the semantics)."""

    def __init__(
        self,
        base=None,
        value=None,
        alpha: float = 1.0,
        scheme: str | None = None,
        vocab_map=None,
        dtype=None,
        device=None,
        batch_size=1,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        draft=None,
        num_draft_tokens=None,
        terms=None,
        tensor_parallel=None,
        max_batch_size=None,  # where batch_size="auto" starts (lm-eval passes it; default 64, as HFLM's)
        trust_remote_code: bool = False,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args {sorted(unknown)} for model 'ivl'; accepted: {', '.join(MODEL_ARGS)}")
        if trust_remote_code:
            raise ValueError(
                "model_args trust_remote_code=True is not supported: 'ivl' loads local safetensors checkpoints "
                "with its own engines and runs no remote code"
            )
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise ValueError(f"model_args add_bos_token must be true or false, got {add_bos_token!r}")
        if not is_number(alpha):
            raise ValueError(f"model_args alpha must be a number, got {alpha!r}")
        _batch_size(batch_size)  # checked before anything loads
        spec = {}
        if draft is not None:
            spec = {"draft": draft, "num_draft_tokens": _draft_tokens(num_draft_tokens)}
        elif num_draft_tokens is not None:
            raise ValueError("model_args num_draft_tokens needs draft (the small base that drafts the tokens)")
        from . import FastIVLDecoder

        dec = FastIVLDecoder.from_pretrained(
            base,
            value,
            vocab_map,
            device=device,
            dtype=dtype,
            alpha=float(alpha),
            scheme=scheme,
            terms=_terms(terms),
            tensor_parallel=None if tensor_parallel is None else int(tensor_parallel),
            **spec,
        )
        where = " and ".join(repr(str(x)) for x in (base, value) if x is not None)
        self._attach(dec, batch_size, max_length, add_bos_token, where, max_batch_size)
        self.model_args = dict(base=base, value=value, alpha=alpha, scheme=self.dec.scheme, vocab_map=vocab_map)

    @classmethod
    def from_decoder(cls, dec, *, batch_size=1, max_length: int | None = None, add_bos_token: bool | None = None):
        """The model over an already loaded :class:`ivl_fast.FastIVLDecoder` (the demo evaluates the decoders it
        built); same checks and semantics as the model_args path."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise ValueError(f"add_bos_token must be true or false, got {add_bos_token!r}")
        self._attach(dec, batch_size, max_length, add_bos_token, "the decoder")
        self.model_args = dict(alpha=dec.alpha, scheme=dec.scheme)
        return self

    def _attach(self, dec, batch_size, max_length, add_bos_token, where: str, max_batch_size=None) -> None:
        self.batch_size_per_gpu = _batch_size(batch_size)
        if isinstance(max_batch_size, str) and max_batch_size.strip().isdigit():  # from a model_args string
            max_batch_size = int(max_batch_size)
        if max_batch_size is not None:
            check_int(max_batch_size, "model_args max_batch_size", 1)
        self.dec = dec
        if self.dec.tokenizer is None:
            raise ValueError(f"no tokenizer files in {where}; lm-eval requests are text (save it with the checkpoint)")
        self.tokenizer = self.dec.tokenizer
        self._device = self.dec.device
        if max_length is not None and (
            isinstance(max_length, bool)
            or not isinstance(max_length, int)
            or not 1 <= max_length <= self.dec.max_context
        ):
            raise ValueError(
                f"model_args max_length must be an integer in [1, {self.dec.max_context}], got {max_length!r}"
            )
        self._max_length = max_length
        self.add_bos_token = add_bos_token
        if self.batch_size_per_gpu == "auto":
            self.batch_size_per_gpu = self._detect_batch_size(max_batch_size or 64)

    def _detect_batch_size(self, start: int) -> int:
        """batch_size="auto" as lm-eval's HFLM finds it: the largest batch from ``start`` down (accelerate's
        ``find_executable_batch_size`` tries smaller ones on running out of memory) that scores requests filling
        the whole window."""
        from accelerate.utils import find_executable_batch_size

        ids = [self.prefix_token_id] * (self.max_length + 1)  # scored window: max_length tokens

        @find_executable_batch_size(starting_batch_size=start)
        def fits(batch_size: int) -> int:
            self.dec.loglikelihood([(ids[:-1], ids[-1:])] * batch_size, batch_size=batch_size)
            return batch_size

        try:
            found = fits()
        except RuntimeError as e:
            if "No executable batch size found" not in str(e):
                raise
            found = 1
        logger.info("batch_size auto: %d", found)
        return found

    # ------------------------------------------------------------------ what HFLM exposes
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.dec.max_context

    @property
    def max_gen_toks(self) -> int:
        return 256  # HFLM's default when a task gives none

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        d = self.dec
        return {"ivl_scheme": d.scheme, "ivl_alpha": d.alpha, "ivl_cross_vocab": d.cross_vocab}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """HFLM's: the given ``add_special_tokens``, else ``add_bos_token``, else the tokenizer's default, except
        that a text already starting with the prefix token's text gets none added."""
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _batch_encode(self, strings, left_truncate_len: int) -> tuple[list[list[int]], list[bool]]:
        """HFLM's ``tok_batch_encode`` without the padding: special tokens decided by the batch's first text (no
        special tokens when it starts with the BOS text), then left truncation. -> (ids, which were cut)."""
        kw = {}
        if has_bos_prefix(strings[0], getattr(self.tokenizer, "bos_token", None)):
            kw["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        enc = self.tokenizer(list(strings), **kw)["input_ids"]
        return [list(ids)[-left_truncate_len:] for ids in enc], [len(ids) > left_truncate_len for ids in enc]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _score(self, pairs, desc: str, disable_tqdm: bool, texts=None) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (log p, is_greedy) in their order, longest first in calls.
        ``texts``: each context's text as a base with its own tokenizer reads it (None: the ids' decoding)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm or self.rank != 0)
        step = max(_SCORE_CALL, self.batch_size)
        for s in range(0, len(order), step):
            idx = order[s : s + step]
            res = self.dec.loglikelihood(
                [pairs[i] for i in idx],
                batch_size=self.batch_size,
                max_length=self.max_length,
                texts=None if texts is None else [texts[i] for i in idx],
            )
            for i, r in zip(idx, res, strict=True):
                out[i] = r
            bar.update(len(idx))
        bar.close()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # across vocabularies the base reads the context's text (lm-eval's _encode_pair moved its trailing
        # whitespace to the continuation)
        texts = [(s[0].rstrip() or None) if s is not None else None for s, _, _ in requests]
        res = self._score(
            [(ctx, cont) for _, ctx, cont in requests], "Running loglikelihood requests", disable_tqdm, texts
        )
        for (request_str, _, _), answer in zip(requests, res, strict=True):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            w = [lm_utils.make_disjoint_window(x) for x in rolling]
            windows += w
            counts.append(len(w))
        scores = iter(self._score(windows, "Running loglikelihood_rolling requests", disable_tqdm))
        out = []
        for req, n in zip(requests, counts, strict=True):
            total = sum(next(scores)[0] for _ in range(n))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _check_gen_kwargs(requests) -> None:
        for req in requests:
            gen_kwargs = req.args[1]
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
            bad = sorted(set(gen_kwargs) - set(GEN_KWARGS))
            if bad:
                task = f" (task {req.task_name!r})" if getattr(req, "task_name", None) else ""
                raise ValueError(
                    f"generate_until: unsupported gen_kwargs {bad}{task}; the 'ivl' model reads only "
                    "until, max_gen_toks (max_new_tokens, max_tokens, max_completion_tokens), do_sample, temperature"
                )

    def _options(self, gen_kwargs: dict, eos: str):
        """-> (until, max_gen_toks, decoder options) of one gen_kwargs group, resolved as HFLM resolves them."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = kwargs.pop("temperature", None)
        if kwargs:  # nothing else survives _check_gen_kwargs; never drop a setting without a word
            raise ValueError(f"generate_until: unsupported gen_kwargs {sorted(kwargs)}")
        check_int(max_gen_toks, "generate_until: max_gen_toks", 1)
        if max_gen_toks >= self.max_length:
            raise ValueError(
                f"generate_until: max_gen_toks={max_gen_toks} leaves no room for the context within "
                f"max_length={self.max_length}"
            )
        options = dict(max_new_tokens=max_gen_toks, do_sample=do_sample)
        if do_sample:
            temperature = 0.0 if temperature is None else float(temperature)
            if temperature <= 0.0:  # transformers' generate refuses it too
                raise ValueError(f"generate_until: do_sample=True needs temperature > 0, got {temperature}")
            options["temperature"] = temperature
        stops = [s for s in until if s]
        options["stop_strings"] = stops or None
        return until, max_gen_toks, options

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._check_gen_kwargs(requests)
        re_ords = Collator(
            [req.args for req in requests],
            sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
            group_by="gen_kwargs",
            group_fn=lambda req: req[1],
        )
        bar = tqdm(total=len(requests), desc="Running generate_until requests", disable=disable_tqdm or self.rank != 0)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        res = []
        for chunk in re_ords.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs = zip(*chunk, strict=True)
            gen_kwargs = all_gen_kwargs[0]  # the Collator groups equal gen_kwargs
            until, max_gen_toks, options = self._options(gen_kwargs, eos)
            ids, cut = self._batch_encode(contexts, self.max_length - max_gen_toks)
            texts = None
            if self.dec.cross_vocab:
                # the base reads the context as lm-eval rendered it, as loglikelihood does ("<s><|user|>..." with no
                # word-start mark after the BOS); a context cut to fit reads the kept ids' prompt_text
                texts = [prompt_text(self.tokenizer, x) if c else s for x, c, s in zip(ids, cut, contexts, strict=True)]
            out = self.dec.generate(ids, texts=texts, **options)
            t = out.prompt_length
            for row, n, context in zip(out.sequences.tolist(), out.num_new_tokens.tolist(), contexts, strict=True):
                s = postprocess_generated_text(self.tok_decode(row[t : t + n]), until, None)
                res.append(s)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
                bar.update(1)
        bar.close()
        return re_ords.get_original(res)

    # ------------------------------------------------------------------ chat templates
    def _own_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template ``--apply_chat_template`` renders with: the tokenizer's (chosen as lm-eval chooses among
        several), else :data:`ivl_fast.chat.DEFAULT_CHAT_TEMPLATE`; None when not asked for."""
        if self._own_template():
            return super().chat_template(chat_template)
        if chat_template is False or chat_template is None:
            return None
        return DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's rendering (``continue_final_message`` when no generation prompt is added; a template that refuses
        a system message gets the history without it), with the default template for tokenizers without one."""
        kw = {} if self._own_template() else {"chat_template": DEFAULT_CHAT_TEMPLATE}

        def render(history):
            return self.tokenizer.apply_chat_template(
                history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
                **kw,
            )

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            logger.warning("Failed to apply chat template. removing the system role in chat history.")
            return render([m for m in chat_history if m["role"] != "system"])


__all__ = ["GEN_KWARGS", "MODEL_ARGS", "IVLLM"]
