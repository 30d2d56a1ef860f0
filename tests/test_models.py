"""The lean engine against transformers' own models, for every supported family (fp32, CPU).

Each case builds a random tiny checkpoint of the family, saves it with ``save_pretrained`` and loads it back
through ``ivl_fast.models.load_model``. Prompts of different lengths are batched with left padding; we compare
the full-sequence logits, the prefill logits and 24 decode steps against transformers with its own KV cache.
Tolerance: max |diff| <= 1e-4 x the largest |logit| (the issue's bound).
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_model

from ivl_fast.models import HFCausalLM, LeanCausalLM, from_hf_model, load_model

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# family name -> (model_type, config overrides, expected rope type)
FAMILIES = {
    "llama2": ("llama", dict(num_key_value_heads=4), "default"),
    "tinyllama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128), "default"),
    "codellama": ("llama", dict(rope_theta=1_000_000.0), "default"),
    "llama3": ("llama", dict(rope_theta=500_000.0), "default"),
    "llama3.1": ("llama", dict(rope_theta=500_000.0, rope_scaling=LLAMA3_SCALING), "llama3"),
    "llama3.2-tied": (
        "llama",
        dict(rope_theta=500_000.0, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True),
        "llama3",
    ),
    "llama-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), "linear"),
    # trained context 16; the test runs to 9 + 24 = 33 positions, so the dynamic NTK base changes every step
    "llama-dynamic": (
        "llama",
        dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=16),
        "dynamic",
    ),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True), "default"),
    "mistral": ("mistral", dict(head_dim=32, sliding_window=4096), "default"),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1_000_000.0), "default"),
}

LENGTHS = (9, 5, 2)
STEPS = 24


def _batch(vocab: int, lengths=LENGTHS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), 3, dtype=torch.int64)
    mask = torch.zeros((len(lengths), t), dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, t - n :] = 1
    return ids, mask


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _compare_with_hf(hf, lean, *, tol: float, steps: int = STEPS):
    """Prefill + teacher-forced decode of lean vs transformers (its own cache). Returns the worst rel. error."""
    vocab = hf.config.vocab_size
    ids, mask = _batch(vocab)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    worst = 0.0
    # full-sequence logits at the real (unpadded) positions
    full = lean(ids, attention_mask=mask)
    real = mask.bool()
    worst = max(worst, _rel_err(full[real], ref.logits[real]))
    lean.allocate(ids.shape[0], ids.shape[1] + steps)
    z = lean.prefill(ids, mask)
    worst = max(worst, _rel_err(z, ref.logits[:, -1]))
    past, am, lens = ref.past_key_values, mask, mask.sum(-1)
    nxt = ref.logits[:, -1].argmax(-1)
    for _ in range(steps):
        am = torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
        with torch.no_grad():
            out = hf(
                input_ids=nxt[:, None],
                attention_mask=am,
                position_ids=lens[:, None],
                past_key_values=past,
                use_cache=True,
            )
        z = lean.decode(nxt)
        worst = max(worst, _rel_err(z, out.logits[:, -1]))
        past, lens, nxt = out.past_key_values, lens + 1, out.logits[:, -1].argmax(-1)
    assert worst <= tol, f"lean vs transformers: max relative logit error {worst:.3g} > {tol}"
    return worst


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lean_matches_transformers_fp32(family, save_checkpoint):
    model_type, overrides, rope_type = FAMILIES[family]
    hf = build_model(model_type, seed=hash(family) % 1000, **overrides)
    path = save_checkpoint(hf, f"ckpt-{family}", with_tokenizer=False)
    lean = load_model(path, device="cpu")
    assert isinstance(lean, LeanCausalLM)
    # the checkpoint's rope settings really reached the engine (not silently defaulted on either side)
    assert lean.config.rope.rope_type == rope_type
    assert lean.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    _compare_with_hf(hf, lean, tol=1e-4)


def test_rope_variants_change_logits(save_checkpoint):
    """Guard against a rope setting being ignored on both sides: scaled and unscaled models must differ."""
    plain = build_model("llama", seed=7)
    scaled = build_model("llama", seed=7, rope_scaling={"rope_type": "linear", "factor": 4.0})
    ids, mask = _batch(512)
    assert not torch.allclose(plain(ids, attention_mask=mask).logits, scaled(ids, attention_mask=mask).logits)


def test_sharded_checkpoint_loads_identically(save_checkpoint):
    hf = build_model("llama", seed=3)
    single = load_model(save_checkpoint(hf, "single", with_tokenizer=False))
    sharded_dir = save_checkpoint(hf, "sharded", with_tokenizer=False, max_shard_size="100KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded = load_model(sharded_dir)
    for (k, a), (k2, b) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_matches_transformers_half(dtype, save_checkpoint):
    """Half precision on CPU: same weights, same dtype on both sides; looser tolerance (2e-2 of logit scale)."""
    hf = build_model("llama", seed=5, dtype=dtype, num_attention_heads=4, num_key_value_heads=2)
    lean = load_model(save_checkpoint(hf, f"half-{dtype}", with_tokenizer=False), dtype=dtype)
    assert lean.dtype == dtype
    _compare_with_hf(hf, lean, tol=2e-2, steps=8)


def test_from_hf_model_shares_weights():
    hf = build_model("qwen2", seed=2, tie_word_embeddings=True)
    lean = from_hf_model(hf)
    assert isinstance(lean, LeanCausalLM)
    hf_sd = hf.state_dict()
    for k, v in lean.state_dict().items():
        assert v.data_ptr() == hf_sd[k].data_ptr(), f"{k} was copied"
    _compare_with_hf(hf, lean, tol=1e-4, steps=4)


def test_unsupported_architecture_uses_hf_adapter(save_checkpoint, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    ).eval()
    path = save_checkpoint(gpt2, "gpt2", with_tokenizer=False)
    with caplog.at_level(logging.WARNING, logger="ivl_fast"):
        eng = load_model(path)
    assert isinstance(eng, HFCausalLM)
    assert any("fallback" in r.getMessage() for r in caplog.records)
    assert eng.max_context == 128
    with pytest.raises(ValueError, match="not implemented by the lean engine"):
        load_model(path, engine="lean")
    _compare_with_hf(gpt2, eng, tol=1e-5, steps=6)


def test_hf_engine_on_supported_checkpoint(save_checkpoint):
    hf = build_model("mistral", seed=9)
    eng = load_model(save_checkpoint(hf, "mistral-hf", with_tokenizer=False), engine="hf")
    assert isinstance(eng, HFCausalLM)
    _compare_with_hf(hf, eng, tol=1e-5, steps=6)


def test_context_limits(save_checkpoint):
    lean = load_model(
        save_checkpoint(build_model("mistral", seed=1, sliding_window=64), "mistral-sw", with_tokenizer=False)
    )
    assert lean.max_context == 64  # beyond the window Mistral would need sliding-window attention
    with pytest.raises(ValueError, match="context of 64"):
        lean.allocate(1, 65)
    dyn = load_model(
        save_checkpoint(
            build_model(
                "llama", seed=1, max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 4.0}
            ),
            "dyn",
            with_tokenizer=False,
        )
    )
    assert dyn.max_context == 64


def test_decode_step_has_static_shapes_and_no_host_sync(pair):
    """The decode step must be capturable: same output buffers' shapes every step, no sync (CUDA only check)."""
    _, _, base_dir, _ = pair
    lean = load_model(base_dir)
    ids, mask = _batch(lean.vocab_size, lengths=(4, 2))
    lean.allocate(2, 16)
    lean.prefill(ids, mask)
    ptr = lean.k_cache[0].data_ptr()
    x = torch.tensor([5, 6])
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            z = lean.decode(x)
            assert z.shape == (2, lean.vocab_size)
    finally:
        if torch.cuda.is_available():  # pragma: no cover
            torch.cuda.set_sync_debug_mode(0)
    assert lean.k_cache[0].data_ptr() == ptr  # the cache is written in place, never reallocated
    assert lean.seq_lens.tolist() == [7, 5]
