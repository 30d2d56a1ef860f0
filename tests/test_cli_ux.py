"""What a user sees: every flag explained with its default, required flags marked, progress bars where work
takes long, and one-line errors (exit code 2) for broken inputs such as a damaged vocabulary map."""

from __future__ import annotations

import json

import pytest
from cli_fixtures import check_flags_explained, check_required_listed

from ivl_fast.cli import main as cli_main
from ivl_fast.vocab import VocabMap

PROMPT = "def f(x):"


@pytest.mark.parametrize("command", ["generate", "train", "vocab-map", "demo", "make-tiny", "export-vllm"])
def test_every_flag_has_help_and_shows_its_default(command):
    check_flags_explained(command)


@pytest.mark.parametrize(
    "command, required",
    [
        ("train", ["--base", "--value-init", "--data", "--out"]),
        ("vocab-map", ["--base-tokenizer", "--value-tokenizer", "--corpus"]),
        ("generate", ["--base", "--value"]),
    ],
)
def test_required_flags_are_listed_as_required(command, required):
    check_required_listed(command, required)


# ----------------------------------------------------------------------------- progress
@pytest.fixture(scope="module")
def dirs(pair):
    return str(pair[2]), str(pair[3])


def test_generate_shows_progress_for_a_single_prompt(capsys, dirs):
    argv = ["generate", "--base", dirs[0], "--value", dirs[1], "--prompt", PROMPT, "--max-new-tokens", "6"]
    assert cli_main(argv + ["--no-eos"]) == 0
    err = capsys.readouterr().err
    assert "6/6" in err and "step" in err, err
    assert cli_main(argv + ["--no-eos", "--no-progress"]) == 0
    assert "6/6" not in capsys.readouterr().err


def test_generate_progress_callback_counts_decode_steps(pair):
    from ivl_fast import FastIVLDecoder

    dec = FastIVLDecoder(pair[0], pair[1])
    seen = []
    dec.generate([[1, 5, 6]], max_new_tokens=5, eos_token_id=[], progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 5 and len(seen) >= 2


def test_vocab_map_shows_progress(vocab_map_cli, tmp_path):
    rc, _, err = vocab_map_cli("--out", tmp_path / "m.safetensors")
    assert rc == 0, err
    assert "tokenize" in err and "align" in err and "100%" in err
    rc, _, err = vocab_map_cli("--out", tmp_path / "m2.safetensors", "--no-progress")
    assert rc == 0 and "align" not in err


# ----------------------------------------------------------------------------- damaged maps
@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_map"])
def test_damaged_map_is_a_clear_error(vocab_map_cli, tmp_path, damage):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    VocabMap.from_dense(torch.eye(6)).save(good)
    bad = tmp_path / "bad.safetensors"
    if damage == "garbage":
        bad.write_bytes(b"\x00garbage" * 10)
    elif damage == "truncated":
        bad.write_bytes(good.read_bytes()[:-20])
    else:
        save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors"):
        VocabMap.load(bad)
    rc, _, err = vocab_map_cli("--map", bad)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ivl-fast vocab-map: error: ") and "bad" in err


def test_vocab_map_evaluates_an_existing_map(vocab_map_cli, tmp_path):
    out = tmp_path / "m.safetensors"
    assert vocab_map_cli("--out", out, "--no-progress")[0] == 0
    rc, stdout, err = vocab_map_cli("--map", out)
    assert rc == 0, err
    ev = json.loads(stdout)["evaluation"]
    # one tokenizer on both sides: every token maps to itself, in the map and in the argmax baseline
    assert ev["map"]["overlap_ratio"] == pytest.approx(1.0) == ev["argmax_baseline"]["overlap_ratio"]
    rc, _, err = vocab_map_cli("--map", out, "--top-k", "2")
    assert rc == 2 and "--top-k" in err and "not to --map" in err
    rc, _, err = vocab_map_cli()
    assert rc == 2 and "exactly one of --out" in err
