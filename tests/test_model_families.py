"""The families beyond Llama on the lean engine (ivl_fast/models/families.py), each against transformers' own model:
Qwen3 (q/k norm, sliding layers), Gemma 2 (soft-capping, sandwich norms, alternating windows, scaled embeddings,
GeGLU), Gemma 3 text (q/k norm, a local rotary table) and the multimodal gemma3 layout, Phi-3 (fused weights,
longrope past its switch), Phi-4-mini (partial rotary), OLMo 2 (post-norms, q/k norm over the projection),
Granite (multipliers), SmolLM3 (NoPE layers).

Random tiny checkpoints built by transformers and saved with ``save_pretrained``. Windows of 6 positions and a
longrope switch at 16 are crossed by the 9-token prompt plus 24 steps. A family the installed transformers does not
have (the lowest-versions stage) is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY
from parity import FAMILY_PROMPTS as PROMPTS
from parity import batch, compare_with_hf, rel_err

from ivl_fast import FastIVLDecoder
from ivl_fast.models import LeanCausalLM, load_model

HERE = Path(__file__).parent
BASE = {**TINY, "num_hidden_layers": 3}
SWITCH = 16  # longrope's original_max_position_embeddings in these tests


def _longrope(n: int) -> dict:
    return dict(
        rope_type="longrope",
        short_factor=[1.0 + 0.1 * i for i in range(n)],
        long_factor=[2.0 + 0.5 * i for i in range(n)],
        original_max_position_embeddings=SWITCH,
    )


# name -> (model_type, overrides): every family switch on, every window and the longrope switch within reach
FAMILIES = {
    "qwen3": ("qwen3", dict(head_dim=32, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "gemma2": (
        "gemma2",
        dict(
            head_dim=16,
            sliding_window=6,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        dict(
            head_dim=16,
            sliding_window=6,
            sliding_window_pattern=2,
            query_pre_attn_scalar=24,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    ),
    "phi3-longrope": (
        "phi3",
        dict(rope_scaling=_longrope(8), original_max_position_embeddings=SWITCH, max_position_embeddings=64),
    ),
    "phi4-mini-partial": (
        "phi3",
        dict(
            rope_scaling=_longrope(6),
            partial_rotary_factor=0.75,
            original_max_position_embeddings=SWITCH,
            max_position_embeddings=64,
        ),
    ),
    "olmo2": ("olmo2", dict()),
    "granite": (
        "granite",
        dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5),
    ),
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2)),
}
LONGROPE = {"phi3-longrope", "phi4-mini-partial"}


def family_config(name: str, **extra):
    from transformers import AutoConfig

    model_type, overrides = FAMILIES[name]
    try:
        return AutoConfig.for_model(model_type, **{**BASE, **overrides, **extra})
    except (KeyError, ValueError) as e:  # a transformers without this family
        pytest.skip(f"transformers lacks {model_type}: {e}")


def family_model(name: str, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(name, **extra)).float().eval()


@pytest.fixture(scope="module")
def family_pairs(save_checkpoint):
    """name -> (base_hf, value_hf, base_dir, value_dir): a family base and a narrower value network of the same
    family (2 layers, 2 heads of the base's head size), the tokenizer fixture's 512-token tokenizer in both dirs."""
    cache = {}

    def get(name):
        if name not in cache:
            base = family_model(name, seed=0)
            value = family_model(
                name, seed=1, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1
            )
            cache[name] = (base, value, save_checkpoint(base, f"fb-{name}"), save_checkpoint(value, f"fv-{name}"))
        return cache[name]

    return get


def compare_rereading(hf, lean, *, tol: float, steps: int = 24):
    """Longrope: each row against transformers reading the row's whole sequence at every step (what its
    generate does once the sequence crosses the switch; a batched transformers run picks the set by the longest
    row, so rows are compared one by one)."""
    ids, mask = batch(hf.config.vocab_size)
    seqs = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
    worst = 0.0
    full = lean(ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([s])).logits[0]
        worst = max(worst, rel_err(full[i][mask[i].bool()], ref))
    lean.allocate(ids.shape[0], ids.shape[1] + steps)
    z = lean.prefill(ids, mask)
    for _ in range(steps):
        for i, s in enumerate(seqs):
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor([s])).logits[0, -1]
            worst = max(worst, rel_err(z[i], ref))
        nxt = z.argmax(-1)
        for i, s in enumerate(seqs):
            s.append(int(nxt[i]))
        z = lean.decode(nxt)
    assert max(len(s) for s in seqs) > SWITCH + 1 and min(len(s) for s in seqs) > SWITCH  # every row crossed
    assert worst <= tol, f"lean vs transformers: max relative logit error {worst:.3g} > {tol}"
    return worst


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_logits_equal_transformers_fp32(name, save_checkpoint):
    hf = family_model(name)
    lean = load_model(save_checkpoint(hf, f"parity-{name}", with_tokenizer=False), device="cpu")
    assert isinstance(lean, LeanCausalLM), f"{name} fell back to the transformers adapter"
    if name in LONGROPE:
        compare_rereading(hf, lean, tol=1e-4)
    else:
        compare_with_hf(hf, lean, tol=1e-4)
    # the family's switches reached the engine (not silently Llama): windows, rotary kinds, norms
    layers = lean.config.layers
    if "window" in json.dumps(FAMILIES[name][1]):
        assert any(spec.window == 6 for spec in layers)
    if name == "smollm3":
        assert [spec.rope for spec in layers] == ["global", None, "global"]
    if name == "gemma3":
        assert [spec.rope for spec in layers] == ["local", "global", "local"]


def test_the_switches_matter(save_checkpoint):
    """Each switch changes the logits (so parity above is not reached by accident): the engine with one switch
    turned off differs from transformers by far more than the tolerance."""
    import dataclasses

    hf = family_model("gemma2")
    path = save_checkpoint(hf, "switches-gemma2", with_tokenizer=False)
    ids, mask = batch(512)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    for off in (dict(attn_softcap=None), dict(final_softcap=None), dict(norm_offset=False), dict(embed_scale=1.0)):
        lean = load_model(path, device="cpu")
        lean.config = dataclasses.replace(lean.config, arch=dataclasses.replace(lean.config.arch, **off))
        for layer in lean.model.layers:  # the attention and norms read their copy of the switch at build time
            layer.self_attn.softcap = lean.config.arch.attn_softcap
            for mod in layer.modules():
                if hasattr(mod, "offset"):
                    mod.offset = lean.config.arch.norm_offset
        assert rel_err(lean(ids, attention_mask=mask)[mask.bool()], ref) > 1e-3, off


def test_gemma3_multimodal_checkpoint_runs_its_text_model(save_checkpoint):
    """A gemma3 (image-text) checkpoint: the lean engine runs its language model from the checkpoint's own
    weight names, with the logits of transformers' Gemma3ForConditionalGeneration on text."""
    from transformers import AutoModelForImageTextToText

    try:
        from transformers import Gemma3Config
    except ImportError:
        pytest.skip("transformers lacks gemma3")
    text = family_config("gemma3").to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(cfg).float().eval()
    path = save_checkpoint(hf, "gemma3-mm", with_tokenizer=False)
    lean = load_model(path, device="cpu")
    assert isinstance(lean, LeanCausalLM) and lean.config.multimodal == "gemma3"
    ids = torch.randint(4, 500, (2, 11))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert rel_err(lean(ids), ref) <= 1e-4


def two_model_loop(base, value, rows, new):
    """Greedy IVL with the two transformers models reading each whole sequence (z_base + z_value, argmax)."""
    out = []
    for r in rows:
        seq = list(r)
        for _ in range(new):
            with torch.no_grad():
                x = torch.tensor([seq])
                z = base(x).logits[0, -1].double() + value(x).logits[0, -1].double()
            seq.append(int(z.argmax()))
        out.append(seq[len(r) :])
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_pair_decodes_as_the_two_model_loop(name, family_pairs):
    """Greedy pair decoding (eager and with emulated graphs, and continuous batching) equals the plain loop;
    scheme='base' equals transformers' generate; scoring equals the two models' log-probabilities."""
    base, value, bdir, vdir = family_pairs(name)
    new = 14  # the 9-token prompt crosses the windows and, with longrope, the switch at 16
    want = two_model_loop(base, value, PROMPTS, new)
    for kw in (dict(), dict(graphs="emulate", kv_block=8)):
        dec = FastIVLDecoder.from_pretrained(bdir, vdir, device="cpu", **kw)
        assert isinstance(dec.models.base, LeanCausalLM) and isinstance(dec.models.value, LeanCausalLM)
        out = dec.generate(PROMPTS, max_new_tokens=new, eos_token_id=[])
        assert out.sequences[:, out.prompt_length :].tolist() == want, kw
    # continuous batching: a request admitted into a running batch (its own prefill, the other row untouched)
    slots = dec.open_batch(slots=2, max_seq_len=40, eos_token_id=[])
    first = slots.admit(PROMPTS[0], max_new_tokens=new)
    for _ in range(3):
        slots.step()
    second = slots.admit(PROMPTS[1], max_new_tokens=new)
    while not slots.step():
        pass
    assert [slots.tokens(first), slots.tokens(second)] == want[:2]
    # scheme="base": transformers' generate, greedy
    alone = FastIVLDecoder.from_pretrained(bdir, None, scheme="base", device="cpu")
    ours = alone.generate([PROMPTS[0]], max_new_tokens=new, eos_token_id=[]).sequences
    theirs = base.generate(
        torch.tensor([PROMPTS[0]]),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        top_k=None,
        eos_token_id=None,
    )
    assert ours.tolist() == theirs.tolist()
    # scoring: log p(continuation | context) under the pair, from the two models' full passes
    ctx, cont = PROMPTS[2], want[2][:6]
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        z = (base(x).logits[0].double() + value(x).logits[0].double()).log_softmax(-1)
    ref = sum(float(z[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    from ivl_fast.decode.scoring import score

    ((lp, greedy),) = score(dec.models, [(ctx, cont)], max_length=64)
    assert lp == pytest.approx(ref, abs=1e-4) and greedy


@pytest.mark.parametrize("name", ["gemma2", "phi3-longrope"])
def test_family_speculative_decoding_is_exact(name, family_pairs):
    """A draft of the family (the value network's checkpoint as the draft base): greedy speculative IVL decoding
    gives the plain pair's tokens (with longrope, the rounds cross the switch and rewind across it)."""
    base, value, bdir, vdir = family_pairs(name)
    want = two_model_loop(base, value, PROMPTS, 14)
    dec = FastIVLDecoder.from_pretrained(bdir, vdir, draft=vdir, num_draft_tokens=3, device="cpu")
    out = dec.generate(PROMPTS, max_new_tokens=14, eos_token_id=[])
    assert out.sequences[:, out.prompt_length :].tolist() == want


def test_families_under_tensor_parallel_decode_as_one_process(family_pairs, save_checkpoint, tmp_path):
    """--tp 2 (gloo, 2 ranks) equals one process for every family: fused qkv/gate_up (Phi-3, with longrope), q/k
    norm over the projection (OLMo 2, all-reduced; also a base with one KV head, replicated on both ranks),
    soft-capping after the gathered head (Gemma 2), per-head q/k norm (Qwen3, Gemma 3), multipliers, NoPE."""
    from torchrun_helpers import ENV, run_group, torchrun

    dirs = {n: family_pairs(n)[2:] for n in FAMILIES}
    kv1 = save_checkpoint(family_model("olmo2", seed=5, num_key_value_heads=1), "olmo2-kv1")  # k_norm replicated
    dirs["olmo2-kv1"] = (kv1, dirs["olmo2"][1])
    pairs = [f"{n}={b},{v}" for n, (b, v) in dirs.items()]
    r = run_group(torchrun(str(HERE / "tp_families_worker.py"), str(tmp_path), *pairs), ENV, 300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for n, (bdir, vdir) in dirs.items():
        one = FastIVLDecoder.from_pretrained(bdir, vdir, dtype="float32", device="cpu")
        want = one.generate(PROMPTS, max_new_tokens=14, do_sample=False, eos_token_id=[]).sequences.tolist()
        assert ranks[0][n] == want and ranks[1][n] == want, n


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_value_network_trains_and_decodes(name, family_pairs, tmp_path):
    """`ivl-fast train` on a family pair: the loss falls; the exported value network loads in transformers with
    the lean model's logits; the trained pair decodes as the two transformers models do. Gemma 2's logit
    soft-capping and Granite's logit scale go through the fused loss; Phi-3's fused weights export as they came."""
    from train_fixtures import train_cli
    from transformers import AutoModelForCausalLM

    from ivl_fast.models.llama import LeanCausalLM as Lean

    base, _, bdir, vdir = family_pairs(name)
    rc, out, log = train_cli(bdir, vdir, tmp_path, steps=32)
    assert rc == 0
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    hf = AutoModelForCausalLM.from_pretrained(out).float().eval()
    lean = load_model(out, device="cpu")
    assert isinstance(lean, Lean)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert rel_err(lean(ids), hf(ids).logits) <= 1e-4
    want = two_model_loop(base, hf, PROMPTS[:2], 10)
    dec = FastIVLDecoder.from_pretrained(bdir, out, device="cpu")
    got = dec.generate(PROMPTS[:2], max_new_tokens=10, eos_token_id=[])
    assert got.sequences[:, got.prompt_length :].tolist() == want


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_family_pair_is_served(name, family_pairs):
    """`ivl-fast serve` of a family pair (the families the transformers adapter used to serve into a hang): the
    official client's completions, concurrent ones included, equal the decoder's own greedy text."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_fixtures import Server

    _, _, bdir, vdir = family_pairs(name)
    dec = FastIVLDecoder.from_pretrained(bdir, vdir, device="cpu")
    prompts = ["The for statement", "A while loop", "def f(x):"]
    want = [dec.generate_text(p, max_new_tokens=10) for p in prompts]
    srv = Server("--base", bdir, "--value", vdir, "--served-model-name", "ivl", "--max-batch-size", 2)
    try:

        def ask(p):
            return srv.client().completions.create(model="ivl", prompt=p, max_tokens=10, temperature=0).choices[0].text

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(ask, prompts)) == want
    finally:
        srv.stop()
