"""ModelSet.build, the one place every pairing check lives, through its own interface: the real vocabulary of
models padded to different row counts (a draft's rows count too), the refusals naming what does not fit, logit
terms, and what the set then reports (engines, vocabularies, trimmed logits)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from ivl_fast.decode.model_set import ModelSet
from ivl_fast.models import from_hf_model


def _engine(rows: int, seed: int):
    return from_hf_model(build_model("llama", seed=seed, vocab_size=rows))


@pytest.fixture(scope="module")
def engines():
    return {rows: _engine(rows, i) for i, rows in enumerate((512, 560, 576, 500))}


def test_padded_rows_share_the_tokenizers_real_vocabulary(engines, tokenizer):
    """One tokenizer (512 ids) under a 576-row base and a 560-row value: the real vocabulary is 512; every model's
    logits are trimmed to it (a view, no copy); a draft with fewer rows lowers it to its own."""
    m = ModelSet.build("residual", engines[576], engines[560], alpha=0.5, tokenizer=tokenizer)
    assert (m.real_vocab, m.vocab_size, m.sampled_vocab, m.alpha) == (512, 512, 512, 0.5)
    z = torch.randn(2, 576)
    assert m.trim(z).shape == (2, 512) and m.trim(z).data_ptr() == z.data_ptr()
    assert m.engines == [engines[576], engines[560]] and not m.cross_vocab
    with_draft = ModelSet.build("residual", engines[576], engines[560], tokenizer=tokenizer, draft=engines[500])
    assert with_draft.real_vocab == 500
    same = ModelSet.build("residual", engines[512], engines[512])
    assert same.real_vocab is None and same.vocab_size == 512 and same.trim(z) is z


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=float("nan")), "alpha"),
        (dict(alpha=True), "alpha"),
        (dict(value=560), "no tokenizer tells their padding rows apart"),
        (dict(scheme="cascade", vocab_map="x.safetensors"), "cross-vocabulary decoding supports scheme='residual'"),
        (dict(vocab_map="x.safetensors"), "needs both tokenizers"),
        (dict(terms=[(512, 1.0)], scheme="value_only", base=None), "logit terms need scheme 'residual' or 'base'"),
        (dict(terms=[(512, float("inf"))]), r"terms\[0\]: the weight must be a finite number"),
        (dict(terms=[(576, -1.0)]), r"terms\[0\]: its vocabulary \(576 tokens\) differs"),
        (dict(terms=[(512,)]), r"terms\[0\] must be a \(model, weight\) pair"),
    ],
)
def test_a_pairing_that_does_not_fit_is_refused_by_name(engines, kwargs, message):
    args = dict(scheme="residual", base=512, value=512)
    args.update(kwargs)
    pick = lambda x: engines[x] if isinstance(x, int) else x  # noqa: E731
    terms = [tuple(pick(e) if i == 0 else e for i, e in enumerate(t)) for t in args.pop("terms", ())]
    scheme, base, value = args.pop("scheme"), pick(args.pop("base")), pick(args.pop("value"))
    with pytest.raises(ValueError, match=message):
        ModelSet.build(scheme, base, value, terms=terms, **args)


def test_logit_terms_join_the_engines_with_their_weights(engines):
    m = ModelSet.build("residual", engines[512], engines[512], terms=[(engines[512], -1)])
    assert m.terms == ((engines[512], -1.0),) and len(m.engines) == 3
    assert m.term_weights.tolist() == [-1.0]
