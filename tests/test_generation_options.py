"""GenerationOptions: precedence (explicit > GenerationConfig > the checkpoint's generation_config.json > defaults),
refused fields, shared CLI defaults, and the new options against transformers' own processors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig, RepetitionPenaltyLogitsProcessor

from ivl_fast import FastIVLDecoder
from ivl_fast.cli import build_parser
from ivl_fast.decode.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]  # equal lengths: no padding (see repetition below)


def _write_gc(d, **fields):
    """A checkpoint's generation_config.json as published ones often are (transformers' save would refuse
    top_k without do_sample; its load accepts it)."""
    (d / "generation_config.json").write_text(json.dumps(fields))


@pytest.fixture(scope="module")
def dirs(pair, tmp_path_factory):
    """Copies of the pair's checkpoints whose generation_config.json we control."""
    import shutil

    _, _, base_dir, value_dir = pair
    root = tmp_path_factory.mktemp("gc")
    b, v = root / "base", root / "value"
    shutil.copytree(base_dir, b)
    shutil.copytree(value_dir, v)
    for d in (b, v):
        (d / "generation_config.json").unlink(missing_ok=True)
    return b, v


def test_precedence_explicit_over_config_over_checkpoint_over_defaults(dirs):
    b, v = dirs
    _write_gc(b, max_new_tokens=7, top_k=5, temperature=0.3)  # the base's: used only without the value's
    dec = FastIVLDecoder.from_pretrained(b, v)
    assert dec.options().max_new_tokens == 7 and dec.options().top_k == 5
    _write_gc(v, max_new_tokens=9, top_p=0.8)  # the value network's own wins over the base's, wholesale
    dec = FastIVLDecoder.from_pretrained(b, v)
    o = dec.options()
    assert (o.max_new_tokens, o.top_p, o.top_k, o.temperature) == (9, 0.8, 0, 1.0)
    passed = GenerationConfig(max_new_tokens=4, top_k=3)
    o = dec.options(passed)
    assert (o.max_new_tokens, o.top_k, o.top_p) == (4, 3, 0.8)  # fields the passed config leaves unset fall through
    o = dec.options(passed, max_new_tokens=2, top_p=None)  # explicit beats both; None means unset
    assert (o.max_new_tokens, o.top_k, o.top_p) == (2, 3, 0.8)
    # and generate() honours them: 9 new tokens from the value checkpoint's file, 2 when given
    assert dec.generate(PROMPTS, eos_token_id=[]).sequences.shape[1] == 6 + 9
    assert dec.generate(PROMPTS, eos_token_id=[], max_new_tokens=2).sequences.shape[1] == 6 + 2
    (v / "generation_config.json").unlink()
    (b / "generation_config.json").unlink()
    o = FastIVLDecoder.from_pretrained(b, v).options()
    assert o == GenerationOptions(eos_token_id=o.eos_token_id, pad_token_id=o.pad_token_id)
    assert o.max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_checkpoint_eos_list_is_used(dirs):
    b, v = dirs
    _write_gc(v, eos_token_id=[2, 9], pad_token_id=1)
    try:
        o = FastIVLDecoder.from_pretrained(b, v).options()
        assert o.eos_token_id == (2, 9) and o.pad_token_id == 1
    finally:
        (v / "generation_config.json").unlink()


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_beams", 2),
        ("no_repeat_ngram_size", 3),
        ("bad_words_ids", [[5]]),
        ("typical_p", 0.5),
        ("min_length", 5),
        ("suppress_tokens", [4]),
        ("penalty_alpha", 0.6),
    ],
)
def test_unimplemented_fields_are_refused_by_name(pair, dirs, field, value):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    cfg = GenerationConfig(**{field: value, **({"top_k": 4, "do_sample": True} if field == "penalty_alpha" else {})})
    with pytest.raises(ValueError, match=f"generation_config.{field}="):
        dec.generate(PROMPTS, generation_config=cfg, max_new_tokens=2)
    # the same field in the checkpoint's own file is refused too (not silently ignored)
    b, v = dirs
    (v / "generation_config.json").write_text(json.dumps({field: value}))
    try:
        with pytest.raises(ValueError, match=f"generation_config.json.{field}="):
            FastIVLDecoder.from_pretrained(b, v).generate(PROMPTS, max_new_tokens=2)
    finally:
        (v / "generation_config.json").unlink()


def test_noop_values_and_harmless_fields_are_accepted(pair):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    cfg = GenerationConfig(num_beams=1, no_repeat_ngram_size=0, output_scores=True, use_cache=True, max_new_tokens=3)
    assert dec.generate(PROMPTS, generation_config=cfg, eos_token_id=[]).sequences.shape[1] == 6 + 3


def test_max_length_of_a_passed_config_counts_as_in_transformers(pair):
    """A passed config's max_length (prompt width + new tokens) is the budget when no max_new_tokens is set."""
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    out = dec.generate(PROMPTS, generation_config=GenerationConfig(max_length=30), eos_token_id=[])
    assert out.sequences.shape[1] == 30 and out.finish_reasons == ["length"] * len(PROMPTS)
    cfg = GenerationConfig(max_length=30, max_new_tokens=3)
    assert dec.generate(PROMPTS, generation_config=cfg, eos_token_id=[]).sequences.shape[1] == out.prompt_length + 3


def test_unknown_arguments_and_bad_values_are_refused(pair):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    with pytest.raises(ValueError, match="^num_beams=2 is not supported"):
        dec.generate(PROMPTS, num_beams=2)
    with pytest.raises(TypeError, match="^generation arguments ivl-fast does not know: beams "):
        dec.generate(PROMPTS, beams=2)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample"):
        dec.generate(PROMPTS, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        dec.generate(PROMPTS, num_return_sequences=0, do_sample=True)
    with pytest.raises(ValueError, match="repetition_penalty"):
        dec.generate(PROMPTS, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="presence_penalty"):
        dec.generate(PROMPTS, presence_penalty=2.5)


def test_cli_and_api_share_their_defaults():
    """The CLI's sampling flags default to unset and fall through the same chain as the API's arguments."""
    args = build_parser().parse_args(["generate", "--base", "b", "--value", "v", "--prompt", "x"])
    for name in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        assert getattr(args, name) is None, name
    helptext = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert f"({DEFAULT_MAX_NEW_TOKENS})" in helptext


# ---------------------------------------------------------------------------------------------- new options
def _greedy_reference(base, value, rows, new, *, processor=None, presence=0.0, frequency=0.0, alpha=1.0):
    """z = z_base + alpha z_value in fp32 (as transformers' generate keeps scores), then transformers' processor
    on (prompt + generated ids), then the OpenAI penalties over the generated ids, then argmax."""
    out = []
    for r in rows:
        seq = list(r)
        for _ in range(new):
            x = torch.tensor([seq])
            with torch.no_grad():
                z = base(x).logits[:, -1].float() + alpha * value(x).logits[:, -1].float()  # [1, V]
            if processor is not None:
                z = processor(x, z)
            counts = torch.bincount(torch.tensor(seq[len(r) :], dtype=torch.int64), minlength=z.shape[1]).float()
            z = z - frequency * counts - presence * (counts > 0).float()
            seq.append(int(z.argmax()))
        out.append(seq[len(r) :])
    return out


@pytest.mark.parametrize(
    "path", [dict(sample_backend="torch"), dict(sample_backend="triton"), dict(graphs="emulate", kv_block=8)]
)
@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_greedy_equals_transformers_processor(pair, path, penalty):
    base, value, base_dir, value_dir = pair
    new = 10
    want = _greedy_reference(base, value, PROMPTS, new, processor=RepetitionPenaltyLogitsProcessor(penalty))
    plain = _greedy_reference(base, value, PROMPTS, new)
    assert want != plain, "the penalty must change the greedy text for this test to mean anything"
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, **path)
    out = dec.generate(PROMPTS, max_new_tokens=new, eos_token_id=[], repetition_penalty=penalty)
    assert out.sequences[:, 6:].tolist() == want


@pytest.mark.parametrize(
    "path", [dict(sample_backend="torch"), dict(sample_backend="triton"), dict(graphs="emulate", kv_block=8)]
)
def test_presence_and_frequency_penalties_greedy_equal_their_definition(pair, path):
    base, value, base_dir, value_dir = pair
    new = 10
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, **path)
    for presence, frequency in ((1.5, 0.0), (0.0, 1.0), (0.5, 0.7)):
        want = _greedy_reference(base, value, PROMPTS, new, presence=presence, frequency=frequency)
        out = dec.generate(
            PROMPTS, max_new_tokens=new, eos_token_id=[], presence_penalty=presence, frequency_penalty=frequency
        )
        assert out.sequences[:, 6:].tolist() == want, (presence, frequency)
    assert want != _greedy_reference(base, value, PROMPTS, new)


def test_num_return_sequences_lays_rows_out_like_transformers(pair):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, sample_backend="torch")
    rows = [[5, 6, 7], [11, 12, 13, 14, 15]]
    kw = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=5.0, seed=1)
    out = dec.generate(rows, num_return_sequences=3, **kw)
    assert out.sequences.shape[0] == 6 and out.num_new_tokens.tolist() == [6] * 6
    t = out.prompt_length
    one = dec.generate(rows, max_new_tokens=1)
    # each prompt's samples adjacent: [a, a, a, b, b, b], as transformers' expand of input_ids
    assert torch.equal(out.sequences[:, :t], one.sequences[:, :t].repeat_interleave(3, dim=0))
    samples = {tuple(out.sequences[i, t:].tolist()) for i in range(3)}
    assert len(samples) > 1, "the samples of one prompt must be drawn independently"
    texts = dec.generate_text(["hello there", "a b"], num_return_sequences=2, **kw) if dec.tokenizer else None
    assert texts is None or len(texts) == 4


def test_an_unknown_field_that_is_set_is_refused(pair):
    """A field this version does not know (a newer transformers' setting) is refused when set, accepted when off."""
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    with pytest.raises(ValueError, match="generation_config.use_mtp=True is not a generation setting"):
        dec.options({"use_mtp": True})
    assert dec.options({"use_mtp": False, "max_new_tokens": 3}).max_new_tokens == 3


def test_special_ids_agree_between_loaded_and_passed_in_models(pair, tmp_path, tokenizer):
    """A checkpoint without generation_config.json: passing its transformers models in and from_pretrained of its
    directory resolve the same eos / pad (the tokenizer's first, then config.json's), even when they differ."""
    from conftest import build_model

    base = build_model("llama", seed=0, eos_token_id=7, pad_token_id=8)
    value = build_model("llama", seed=1, eos_token_id=7, pad_token_id=8)
    for m, name in ((base, "b"), (value, "v")):
        m.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        (tmp_path / name / "generation_config.json").unlink(missing_ok=True)
    loaded = FastIVLDecoder.from_pretrained(tmp_path / "b", tmp_path / "v").options()
    passed = FastIVLDecoder(base, value, tokenizer=tokenizer).options()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (passed.eos_token_id, passed.pad_token_id)
    assert loaded.eos_token_id == (tokenizer.eos_token_id,)


def test_cli_can_turn_a_checkpoints_sampling_off():
    parse = build_parser().parse_args
    base = ["generate", "--base", "b", "--value", "v", "--prompt", "x"]
    assert parse([*base, "--no-do-sample"]).do_sample is False
    assert parse([*base, "--do-sample"]).do_sample is True
