"""`ivl-fast export-vllm` / :func:`ivl_fast.vllm.export_pair`: the directory vLLM serves a pair from.

Runs in the main suite (no vLLM needed to write the directory); the directory served by vLLM itself is tested in
tests/on_vllm/ (its own venv: .ci/vllm)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import build_model, swap_token_ids
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from ivl_fast import FastIVLDecoder
from ivl_fast.chat import DEFAULT_CHAT_TEMPLATE
from ivl_fast.cli import main
from ivl_fast.safe_output import UnsafeOutputError
from ivl_fast.vllm import ARCHITECTURE, PairSpec, export_pair
from ivl_fast.vllm.pair_dir import MARKER


def _dir_state(d):
    return sorted((p.relative_to(d).as_posix(), p.stat().st_size) for p in d.rglob("*"))


def test_export_writes_what_vllm_reads(pair, tmp_path):
    _, _, base_dir, value_dir = pair
    out = export_pair(base_dir, value_dir, tmp_path / "served", alpha=0.75)
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((base_dir / "config.json").read_text())
    # the base's own config (vLLM reads the family, width and context from it), the pair in flat ivl_* keys
    assert cfg["architectures"] == [ARCHITECTURE]
    assert {k: v for k, v in cfg.items() if k != "architectures" and not k.startswith("ivl_")} == {
        k: v for k, v in base_cfg.items() if k != "architectures"
    }
    spec = PairSpec.from_config(cfg)
    assert spec == PairSpec(str(base_dir.resolve()), str(value_dir.resolve()), 0.75, ("LlamaForCausalLM",), None)
    # transformers reads it as the base's config class with the pair's keys as attributes (vLLM's hf_config)
    hf = AutoConfig.from_pretrained(out)
    assert type(hf).__name__ == "LlamaConfig" and PairSpec.from_config(hf) == spec
    # no weights copied: one marker tensor
    assert [p.name for p in out.glob("*.safetensors")] == [MARKER]
    assert (out / MARKER).stat().st_size < 1024
    # the pair's tokenizer, with the chat template `ivl-fast serve` renders with (the tiny one has none)
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(base_dir)
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def test_export_generation_config_matches_from_pretrained(tmp_path, save_checkpoint):
    """The value network's generation_config.json, else the base's, stopping at both sides' EOS ids: what
    FastIVLDecoder.from_pretrained decodes with."""
    base = build_model("llama", seed=0, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    value = build_model("llama", seed=1)
    base_dir, value_dir = save_checkpoint(base, "gen_base"), save_checkpoint(value, "gen_value")
    GenerationConfig(eos_token_id=[2, 7], temperature=0.3, do_sample=True).save_pretrained(base_dir)
    GenerationConfig(eos_token_id=5, top_p=0.8, do_sample=True).save_pretrained(value_dir)
    out = export_pair(base_dir, value_dir, tmp_path / "served")
    written = GenerationConfig.from_pretrained(out)
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    assert written.to_diff_dict() | {"transformers_version": None} == dec.generation_config.to_diff_dict() | {
        "transformers_version": None
    }
    assert sorted(written.eos_token_id) == [2, 5, 7] and written.top_p == 0.8


def test_export_keeps_a_chat_template(tokenizer, tmp_path, save_checkpoint):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    base_dir, value_dir = tmp_path / "b", tmp_path / "v"
    for d, seed in ((base_dir, 0), (value_dir, 1)):
        build_model("llama", seed=seed).save_pretrained(d)
        tok.save_pretrained(d)
    out = export_pair(base_dir, value_dir, tmp_path / "served")
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template


def test_export_padded_rows_and_shorter_value_context(tokenizer, save_checkpoint, tmp_path):
    """One tokenizer under embeddings padded to other row counts: the real vocabulary is recorded (vLLM masks the
    rest); a value network with a shorter context bounds the pair's (vLLM takes the smallest length key)."""
    base = build_model("llama", seed=0, vocab_size=len(tokenizer) + 64)
    value = build_model("llama", seed=1, vocab_size=len(tokenizer) + 8, max_position_embeddings=128)
    base_dir, value_dir = save_checkpoint(base, "pad_base"), save_checkpoint(value, "pad_value")
    out = export_pair(base_dir, value_dir, tmp_path / "served")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ivl_real_vocab"] == len(tokenizer)
    assert cfg["max_sequence_length"] == 128 and cfg["max_position_embeddings"] == 256


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ivl_alpha": "x"}, "ivl_alpha must be a finite number"),
        ({"ivl_alpha": math.inf}, "ivl_alpha must be a finite number"),
        ({"ivl_alpha": True}, "ivl_alpha must be a finite number"),
        ({"ivl_format": 9}, "ivl_format 9"),
        ({"ivl_value": "/nonexistent/value"}, "ivl_value must name a checkpoint directory"),
        ({"ivl_base_architectures": []}, "ivl_base_architectures must be a non-empty list"),
        ({"ivl_real_vocab": 0}, "ivl_real_vocab must be a positive integer"),
        ({"ivl_base": None}, "has no ivl_base"),
    ],
)
def test_pair_spec_checks_each_key(pair, tmp_path, bad, message):
    """What --hf-overrides or a hand edit can put in the keys is checked by name when vLLM builds the model."""
    _, _, base_dir, value_dir = pair
    cfg = PairSpec(str(base_dir), str(value_dir), 1.0, ("LlamaForCausalLM",), None).to_config()
    cfg.update(bad)
    with pytest.raises(ValueError, match=message):
        PairSpec.from_config(cfg)


def test_export_refuses_two_tokenizers(pair, tmp_path):
    _, value, base_dir, _ = pair
    other = tmp_path / "other_value"
    value.save_pretrained(other)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(other)
    swap_token_ids(other, 300, 301)
    with pytest.raises(ValueError, match="--vocab-map"):
        export_pair(base_dir, other, tmp_path / "served")
    assert not (tmp_path / "served").exists()


@pytest.mark.parametrize("scheme", ["cascade", "cascade+", "probe"])
def test_export_refuses_cascade_and_probe(pair, tmp_path, scheme):
    _, value, base_dir, value_dir = pair
    v = tmp_path / "v"
    value.save_pretrained(v)
    AutoTokenizer.from_pretrained(value_dir).save_pretrained(v)
    (v / "ivl.json").write_text(json.dumps({"scheme": scheme}))
    with pytest.raises(NotImplementedError, match=f"'{re.escape(scheme)}'.*ivl-fast serve"):
        export_pair(base_dir, v, tmp_path / "served")


def test_export_refuses_pickled_and_quantized_checkpoints(pair, tmp_path):
    base, _, base_dir, value_dir = pair
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(base.config.to_json_string())
    torch.save(base.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle|\\.bin"):
        export_pair(pickled, value_dir, tmp_path / "a")
    quant = tmp_path / "quant"
    base.save_pretrained(quant)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="quantized.*'awq'"):
        export_pair(quant, value_dir, tmp_path / "b")


def test_export_never_overwrites(pair, tmp_path):
    _, _, base_dir, value_dir = pair
    out = tmp_path / "served"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _dir_state(out)
    with pytest.raises(UnsafeOutputError, match="not an empty directory"):
        export_pair(base_dir, value_dir, out)
    assert _dir_state(out) == before
    with pytest.raises(UnsafeOutputError, match="is the --base input"):
        export_pair(base_dir, value_dir, base_dir)
    # an exported directory is not a base
    first = export_pair(base_dir, value_dir, tmp_path / "first")
    with pytest.raises(ValueError, match="itself an exported pair"):
        export_pair(first, value_dir, tmp_path / "second")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        export_pair(base_dir, value_dir, tmp_path / "third", alpha=float("nan"))
    # an empty directory given for the output is used, and stays the same directory
    (tmp_path / "empty").mkdir()
    inode = (tmp_path / "empty").stat().st_ino
    assert (export_pair(base_dir, value_dir, tmp_path / "empty") / "config.json").is_file()
    assert (tmp_path / "empty").stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_export_failure_leaves_nothing(pair, tmp_path, monkeypatch):
    import ivl_fast.vllm.pair_dir as pair_dir

    _, _, base_dir, value_dir = pair

    def broken(d, *args):
        (d / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pair_dir, "_write", broken)
    with pytest.raises(OSError, match="No space left"):
        export_pair(base_dir, value_dir, tmp_path / "served")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary directory beside it


def test_export_vllm_cli(pair, tmp_path, capsys):
    _, _, base_dir, value_dir = pair
    out = tmp_path / "served"
    rc = main(["export-vllm", "--base", str(base_dir), "--value", str(value_dir), "--alpha", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and f"vllm serve {out}" in printed and "ivl_alpha" in printed
    assert json.loads((out / "config.json").read_text())["ivl_alpha"] == 0.5
    rc = main(["export-vllm", "--base", str(base_dir), "--value", str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "ivl-fast export-vllm: error:" in err and "missing" in err


def test_the_package_registers_the_pair_with_vllm():
    """vLLM loads the `vllm.general_plugins` entry points in every process it starts: the installed ivl-fast names
    its register function there (the vLLM stage, tests/on_vllm/, shows vLLM building the pair through it)."""
    from importlib.metadata import entry_points

    import ivl_fast.vllm

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "ivl_fast"]
    assert ep.value == "ivl_fast.vllm:register" and ep.load() is ivl_fast.vllm.register
