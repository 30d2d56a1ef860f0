"""The transformers fallback engine (``ivl_fast.models.hf_adapter.HFCausalLM``) against transformers itself: Phi-3's
LongRoPE switch (the cache re-run once the sequence passes ``original_max_position_embeddings``, as Phi-3's
``prepare_inputs_for_generation`` does in ``generate``), and the cache passed by its current name (no
``past_key_values`` deprecation warning with transformers >= 5.25)."""

from __future__ import annotations

import logging
import types
import warnings

import pytest
import torch
import transformers
from conftest import build_model
from transformers import Phi3Config, Phi3ForCausalLM

from ivl_fast.models import HFCausalLM, load_model
from ivl_fast.models.hf_adapter import cache_kwarg, longrope_switch

SWITCH = 16  # original_max_position_embeddings of the tiny Phi-3
HEAD_DIM = 16


def _phi3_longrope(seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    half = HEAD_DIM // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "long_factor": [2.0 + 0.5 * i for i in range(half)],  # far from the short ones: the switch shows
        "original_max_position_embeddings": SWITCH,
    }
    cfg = Phi3Config(
        vocab_size=256, hidden_size=4 * HEAD_DIM, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=SWITCH,
        rope_parameters=rope, bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.1,
    )  # fmt: skip
    return Phi3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """(transformers model, HFCausalLM loaded from its saved checkpoint through load_model(engine="hf"))."""
    model = _phi3_longrope()
    d = tmp_path_factory.mktemp("phi3_longrope")
    model.save_pretrained(d)
    eng = load_model(d, engine="hf", device="cpu", dtype=torch.float32)
    assert isinstance(eng, HFCausalLM) and longrope_switch(eng.config) == SWITCH
    return model, eng


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 3)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = torch.randint(4, 256, (n,), generator=g)
        mask[r, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize(
    "lengths, steps",
    [([10], 20), ([10, 6], 20), ([20], 5)],
    ids=["one-row-across-the-switch", "left-padded-across-the-switch", "prompt-past-the-switch"],
)
def test_phi3_longrope_decoding_equals_transformers_generate(phi3, lengths, steps):
    """Prefill then ``steps`` decode steps, fed transformers' own greedy tokens: every step's logits equal those of
    ``generate(output_logits=True, do_sample=False)`` (1e-4 relative), before, at and after the switch."""
    model, eng = phi3
    ids, mask = _left_padded(lengths)
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=mask, max_new_tokens=steps + 1, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=3,
        )  # fmt: skip
    assert len(ref.logits) == steps + 1
    new = ref.sequences[:, ids.shape[1] :]  # [B, steps + 1]
    eng.allocate(len(lengths), ids.shape[1] + steps + 1)
    errs = [_rel(eng.prefill(ids, mask), ref.logits[0])]
    for i in range(steps):
        errs.append(_rel(eng.decode(new[:, i]), ref.logits[i + 1]))
    eng.free()
    assert max(errs) <= 1e-4, [f"{e:.1e}" for e in errs]


def test_the_switch_matters_for_this_model(phi3):
    """Guard for the test above: decoding on with the short-factor cache past the switch (what the adapter did)
    gives other logits, so equality there means the cache really was re-run."""
    model, _ = phi3
    ids, mask = _left_padded([10])
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=3,
        )  # fmt: skip
        name = cache_kwarg(model)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        seq = ref.sequences[0]
        stale = []
        for i in range(1, 10):
            pos = torch.tensor([[10 + i - 1]])
            out = model(input_ids=seq[None, 10 + i - 1 : 10 + i], position_ids=pos, use_cache=True, **{name: out[name]})
            stale.append(_rel(out.logits[:, -1], ref.logits[i]))
    before, after = stale[: SWITCH - 10], stale[SWITCH - 10 :]  # steps whose new position is < SWITCH, then >=
    assert max(before) <= 1e-4 and min(after) > 1e-2, (before, after)


def test_longrope_switch_reads_the_configs():
    ns = types.SimpleNamespace
    assert (
        longrope_switch(ns(rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 4096})) == 4096
    )
    # the Phi-3 config field when the rope dict lacks it; "su", LongRoPE's old name, in a transformers 4 rope_scaling
    assert longrope_switch(ns(rope_scaling={"type": "su"}, original_max_position_embeddings=2048)) == 2048
    per_layer = {"full_attention": {"rope_type": "longrope", "original_max_position_embeddings": 8192},
                 "sliding_attention": {"rope_type": "default"}}  # fmt: skip
    assert longrope_switch(ns(rope_parameters=per_layer)) == 8192
    for other in ({"rope_type": "default"}, {"rope_type": "yarn", "original_max_position_embeddings": 4096}, None):
        assert longrope_switch(ns(rope_parameters=other, original_max_position_embeddings=4096)) is None


def _decode_a_little(eng, steps: int = 3) -> None:
    ids, mask = _left_padded([5, 3])
    eng.allocate(2, 16)
    z = eng.prefill(ids, mask)
    for _ in range(steps):
        z = eng.decode(z.argmax(-1))
    eng.free()


@pytest.mark.parametrize("family", ["llama", "phi3-longrope"])
def test_no_past_key_values_deprecation_warning_in_a_decode(family, phi3, save_checkpoint, caplog):
    """The adapter passes the cache by the name forward takes (``cache`` from transformers 5.25): prefill and decode
    (and, for Phi-3, the LongRoPE re-run) warn about nothing named past_key_values, neither by warnings nor by the
    transformers logger."""
    if family == "llama":
        d = save_checkpoint(build_model("llama", seed=5), "hf_adapter_llama", with_tokenizer=False)
        eng = load_model(d, engine="hf", device="cpu", dtype=torch.float32)
    else:
        eng = phi3[1]
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 25):
        assert cache_kwarg(eng.model) == "cache"
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _decode_a_little(eng, steps=SWITCH if family != "llama" else 3)  # Phi-3: past its switch
    about = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    about += [r.getMessage() for r in caplog.records if "past_key_values" in r.getMessage()]
    assert not about, about
    assert not [w for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)], [
        f"{w.category.__name__}: {w.message}" for w in caught
    ]
    if family == "llama":
        assert eng._ids is None  # no LongRoPE: no token ids kept
