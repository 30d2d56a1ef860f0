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
from host_reads import HostRead, no_host_reads
from parity import batch as _batch
from parity import compare_with_hf as _compare_with_hf

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
    # the window masks keys, it does not bound the context (tests/test_model_families.py decodes past it)
    assert lean.max_context == 256
    with pytest.raises(ValueError, match="context of 256"):
        lean.allocate(1, 257)
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




def test_the_host_read_trap_catches_every_kind_of_read():
    """The trap is only evidence if it fires: each way of reading a value must raise inside it, none outside."""
    x = torch.tensor([1.0, 0.0])
    reads = {
        "item": lambda: x[0].item(),
        "tolist": lambda: x.tolist(),
        "bool": lambda: bool(x[0]),
        "if": lambda: 1 if x[0] else 0,
        "int": lambda: int(x[0]),
        "float": lambda: float(x[0]),
        "range": lambda: range(torch.tensor(3)),
        "numpy": lambda: x.numpy(),
        "cpu": lambda: x.cpu(),
        "nonzero": lambda: x.nonzero(),
        "mask index": lambda: x[x > 0],
        "equal": lambda: torch.equal(x, x),
    }
    for what, read in reads.items():
        with no_host_reads(), pytest.raises(HostRead, match="reads a tensor value|data-dependent"):
            read()
            pytest.fail(f"the trap let {what} through")
        read()  # and the methods are restored after the block
    with no_host_reads():
        y = (x * 2).where(x > 0, x)  # device-side work is allowed
    assert y.tolist() == [2.0, 0.0]


@pytest.mark.parametrize("kv_len", [None, 8])
def test_decode_step_has_static_shapes_and_no_host_sync(pair, kv_len):
    """The decode step must be capturable: same output buffers' shapes every step, no host read of any tensor
    value (checked on CPU with the trap above; on CUDA also with torch's sync debug mode)."""
    _, _, base_dir, _ = pair
    lean = load_model(base_dir)
    ids, mask = _batch(lean.vocab_size, lengths=(4, 2))
    lean.allocate(2, 16)
    lean.prefill(ids, mask)
    ptr = lean.k_cache[0].data_ptr()
    x = torch.tensor([5, 6])
    active = torch.tensor([True, False])
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode(), no_host_reads():
            zs = [lean.decode(x, kv_len=kv_len) for _ in range(3)]
            zs.append(lean.decode(x, active=active, kv_len=kv_len))
    finally:
        if torch.cuda.is_available():  # pragma: no cover
            torch.cuda.set_sync_debug_mode(0)
    assert all(z.shape == (2, lean.vocab_size) and torch.isfinite(z).all() for z in zs)
    assert lean.k_cache[0].data_ptr() == ptr  # the cache is written in place, never reallocated
    assert lean.seq_lens.tolist() == [8, 5]  # 4 + 4 and 2 + 3: the inactive step left row 1 where it was


def _decode_trace(lean, ids, mask, steps: int, grow_at: int | None = None, grow_to: int = 0):
    """Prefill + ``steps`` greedy decode steps; returns the logits of every step. ``grow_at``: grow the cache to
    ``grow_to`` columns before that step, and check that the contents of the used columns survived."""
    zs = [lean.prefill(ids, mask)]
    nxt = zs[0].argmax(-1)
    for s in range(steps):
        if s == grow_at:
            used = lean.seq_lens.clone()
            old_k = [k.clone() for k in lean.k_cache]
            old_v = [v.clone() for v in lean.v_cache]
            lean.grow(grow_to)
            assert lean.max_seq_len == grow_to and lean.k_cache[0].shape[1] == grow_to
            assert torch.equal(lean.seq_lens, used)
            for new, old in zip(lean.k_cache + lean.v_cache, old_k + old_v, strict=True):
                # every old column (used or not) is carried over bit for bit
                assert torch.equal(new[:, : old.shape[1]], old)
        # attend to exactly the columns that can hold a position (as the decoder does): both engines then reduce
        # over the same columns, so their logits can be compared bit for bit
        kv_len = int(lean.seq_lens.max()) + 1
        with torch.no_grad():
            z = lean.decode(nxt, kv_len=kv_len)
        zs.append(z)
        nxt = z.argmax(-1)
    return zs


def test_grow_keeps_the_cache_and_decoding_continues_as_with_a_big_cache(pair):
    """grow() mid-decode: old cache columns and lengths are kept exactly, and every later step's logits are
    identical (bit for bit) to those of an engine whose cache had the final size from the start. The cache store
    has more rows than the batch using it (a view), as when a smaller batch follows a larger one."""
    base, _, _, _ = pair
    ids, mask = _batch(base.config.vocab_size, lengths=(6, 3))
    grown, big = from_hf_model(base), from_hf_model(base)  # two engines sharing the same weights
    grown.allocate(3, 12)
    grown.allocate(2, 12)  # rows 0-1 of the 3-row store
    big.allocate(3, 40)
    big.allocate(2, 40)
    a = _decode_trace(grown, ids, mask, steps=20, grow_at=5, grow_to=40)  # 6 + 5 = 11 of 12 columns used
    b = _decode_trace(big, ids, mask, steps=20)
    assert (grown.kv.rows, grown.kv.cols) == (3, 40)  # the whole store grew, not only the view
    for s, (za, zb) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(za, zb), f"step {s}: the grown cache decodes differently"
    assert grown.seq_lens.tolist() == big.seq_lens.tolist() == [26, 23]
    with pytest.raises(ValueError, match="context"):
        grown.grow(grown.max_context + 1)
