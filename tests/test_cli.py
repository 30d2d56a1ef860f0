"""The ``ivl-fast`` command line, run in-process through ``ivl_fast.cli.main`` (fast), plus one real subprocess.

Checkpoints come from the conftest ``pair`` fixture (real HF directories with a tokenizer). ``main`` returns 0 on
success and 2 on bad input, printing ``ivl-fast <cmd>: error: ...`` to stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model

import ivl_fast
from ivl_fast import FastIVLDecoder
from ivl_fast.cli import main

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def dirs(pair):
    """(base_dir, value_dir) as strings, as a shell would pass them."""
    return str(pair[2]), str(pair[3])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def generate(capsys, dirs, *extra) -> tuple[int, str, str]:
    base, value = dirs
    return run_cli(capsys, "generate", "--base", base, "--value", value, *extra)


# ----------------------------------------------------------------------------- generate


def test_generate_json(capsys, dirs):
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 8, "--json")
    assert rc == 0, err
    report = json.loads(out)  # stdout is exactly one JSON object
    assert report["outputs"][0]["prompt"] == PROMPT
    assert isinstance(report["outputs"][0]["text"], str)
    assert report["speed"]["tokens"] > 0
    assert report["base_alone"] is None
    assert "tokens/s" in err


def test_generate_compare_base(capsys, dirs):
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 4, "--json", "--compare-base")
    assert rc == 0, err
    assert "base alone:" in err and "pair/base time per token" in err
    base_alone = json.loads(out)["base_alone"]
    assert base_alone["tokens"] > 0
    assert base_alone["pair_over_base_time_per_token"] > 0


def test_generate_matches_python_api(capsys, dirs):
    # greedy decoding: the CLI and generate_text must agree token for token
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 8, "--json")
    assert rc == 0, err
    expected = FastIVLDecoder.from_pretrained(*dirs).generate_text(PROMPT, max_new_tokens=8)
    assert json.loads(out)["outputs"][0]["text"] == expected


@pytest.mark.parametrize("mode", ["fused", "two_stream"])
def test_generate_with_emulated_graphs_matches_eager(capsys, dirs, mode):
    args = ("--prompt", PROMPT, "--max-new-tokens", 8, "--json", "--compare-base")
    rc, out, err = generate(capsys, dirs, *args, "--graphs", "emulate", "--graph-mode", mode)
    assert rc == 0, err
    rc2, eager, err2 = generate(capsys, dirs, *args, "--graphs", "off")
    assert rc2 == 0, err2
    assert json.loads(out)["outputs"] == json.loads(eager)["outputs"]
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--graphs", "cuda")
    assert rc == 2 and "graphs='cuda' needs the models on a CUDA device" in err


def test_generate_plain_text_output(capsys, dirs):
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 4)
    assert rc == 0, err
    expected = FastIVLDecoder.from_pretrained(*dirs).generate_text(PROMPT, max_new_tokens=4)
    assert out == expected + "\n"


def test_prompts_file_txt_batched(capsys, dirs, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("def f(x):\n\nclass A:\nimport os\n")  # the blank line is skipped
    rc, out, err = generate(capsys, dirs, "--prompts-file", f, "--batch-size", 2, "--max-new-tokens", 4, "--json")
    assert rc == 0, err
    outputs = json.loads(out)["outputs"]
    assert [o["prompt"] for o in outputs] == ["def f(x):", "class A:", "import os"]  # 2 batches, order kept
    assert all(isinstance(o["text"], str) for o in outputs)


def test_prompts_file_jsonl_chat(capsys, dirs, tmp_path):
    f = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "Write a loop."}]
    f.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"messages": messages}) + "\n")
    rc, out, err = generate(
        capsys, dirs, "--prompts-file", f, "--chat", "--system", "Be brief.", "--max-new-tokens", 3, "--json"
    )
    assert rc == 0, err
    outputs = json.loads(out)["outputs"]
    assert [o["prompt"] for o in outputs] == ["Hello", messages]
    assert all(isinstance(o["text"], str) for o in outputs)


def test_prompts_file_malformed_jsonl(capsys, dirs, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n')
    rc, _, err = generate(capsys, dirs, "--prompts-file", f)
    assert rc == 2
    assert f"ivl-fast generate: error: {f}:2: malformed JSON" in err


def test_prompts_file_jsonl_wrong_shape(capsys, dirs, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "no prompt key"}\n')
    rc, _, err = generate(capsys, dirs, "--prompts-file", f)
    assert rc == 2
    assert f"{f}:1: expected a string or an object with 'prompt' or 'messages'" in err


def test_prompts_file_messages_without_chat(capsys, dirs, tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    rc, _, err = generate(capsys, dirs, "--prompts-file", f, "--max-new-tokens", 2)
    assert rc == 2
    assert "--chat" in err  # generate_text says "use chat=True for messages"; the CLI should say --chat


def test_prompts_file_missing_or_empty(capsys, dirs, tmp_path):
    rc, _, err = generate(capsys, dirs, "--prompts-file", tmp_path / "nope.txt")
    assert rc == 2 and "nope.txt" in err and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc, _, err = generate(capsys, dirs, "--prompts-file", empty)
    assert rc == 2 and "holds no prompts" in err


def test_scheme_base_without_value(capsys, dirs):
    rc, out, err = run_cli(
        capsys, "generate", "--base", dirs[0], "--scheme", "base", "--prompt", PROMPT, "--max-new-tokens", 4, "--json"
    )
    assert rc == 0, err
    assert json.loads(out)["speed"]["scheme"] == "base"
    assert "base alone:" in err


# ----------------------------------------------------------------------------- bad input


def test_missing_base_directory(capsys, dirs, tmp_path):
    missing = tmp_path / "no_base_here"
    rc, _, err = run_cli(capsys, "generate", "--base", missing, "--value", dirs[1], "--prompt", PROMPT)
    assert rc == 2
    assert err.startswith("ivl-fast generate: error:")
    assert str(missing) in err and "does not exist" in err


def test_negative_temperature(capsys, dirs):
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--temperature", -1)
    assert rc == 2
    assert "temperature must be a finite number >= 0" in err


def _one_line_error(rc: int, err: str, match: str) -> None:
    """README's promise: bad input exits with code 2 and one line on stderr, no traceback."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ivl-fast generate: error: "), err
    assert match in lines[0], err


def test_prompt_and_prompts_file_together(capsys, dirs, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("x\n")
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--prompts-file", f)
    _one_line_error(rc, err, "exactly one of --prompt or --prompts-file")


def test_neither_prompt_nor_file(capsys, dirs):
    rc, _, err = generate(capsys, dirs)
    _one_line_error(rc, err, "exactly one of --prompt or --prompts-file")


@pytest.mark.parametrize(
    "extra, match",
    [(["--prompt", ""], "--prompt is empty"), (["--prompt", "x", "--batch-size", "0"], "--batch-size must be >= 1")],
)
def test_bad_prompt_options(capsys, dirs, extra, match):
    rc, _, err = generate(capsys, dirs, *extra)
    _one_line_error(rc, err, match)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", "x"], "--base is required"),  # not the Python name base_path
        (["--prompt", "x", "--scheme", "residual"], "--base is required"),
    ],
)
def test_missing_base_names_the_flag(capsys, dirs, argv, match):
    rc, _, err = run_cli(capsys, "generate", "--value", dirs[1], *argv)
    _one_line_error(rc, err, match)
    assert "base_path" not in err


def test_missing_value_names_the_flag(capsys, dirs):
    rc, _, err = run_cli(capsys, "generate", "--base", dirs[0], "--prompt", "x")
    _one_line_error(rc, err, "--value is required")


def test_unsupported_dtype(capsys, dirs):
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--dtype", "int8")
    assert rc == 2 and "dtype 'int8' is not supported" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys, dirs):
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--device", "cuda")
    assert rc == 2 and "device='cuda'" in err


def test_bin_checkpoint_needs_allow_pickle(capsys, dirs, pair, tmp_path, tokenizer):
    # a pickle-only value checkpoint (written by hand: transformers 5 always saves safetensors)
    value_bin = tmp_path / "value_bin"
    value_bin.mkdir()
    pair[1].config.save_pretrained(value_bin)
    torch.save(pair[1].state_dict(), value_bin / "pytorch_model.bin")
    tokenizer.save_pretrained(value_bin)
    bin_dirs = (dirs[0], str(value_bin))
    rc, _, err = generate(capsys, bin_dirs, "--prompt", PROMPT, "--max-new-tokens", 2)
    assert rc == 2 and "--allow-pickle" in err
    rc, _, err = generate(capsys, bin_dirs, "--prompt", PROMPT, "--max-new-tokens", 2, "--allow-pickle")
    assert rc == 0, err


def test_checkpoints_without_tokenizer(capsys, pair, save_checkpoint):
    base = save_checkpoint(pair[0], "cli_base_notok", with_tokenizer=False)
    value = save_checkpoint(pair[1], "cli_value_notok", with_tokenizer=False)
    capsys.readouterr()  # (the saves' own progress bars)
    rc, _, err = run_cli(capsys, "generate", "--base", base, "--value", value, "--prompt", PROMPT)
    _one_line_error(rc, err, "no tokenizer files in")
    assert str(base) in err


def test_non_finite_logits_exit_code(capsys, dirs, save_checkpoint):
    # a value checkpoint whose lm_head makes one logit inf at every step: exit 2, not a traceback
    value = build_model("llama", seed=1)
    with torch.no_grad():
        value.lm_head.weight[7] = float("inf")
    bad_value = save_checkpoint(value, "cli_value_inf")
    rc, out, err = generate(capsys, (dirs[0], str(bad_value)), "--prompt", PROMPT, "--max-new-tokens", 2)
    assert rc == 2
    assert "non-finite (NaN/inf) logits" in err
    assert out == ""  # no garbage text


# ----------------------------------------------------------------------------- make-tiny and the entry point


def test_make_tiny(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "make-tiny", "--out", tmp_path / "tiny", "--vocab-size", 300)
    assert rc == 0, err
    assert f"base: {tmp_path / 'tiny' / 'base'}" in out and f"value: {tmp_path / 'tiny' / 'value'}" in out
    for name in ("base", "value"):
        assert (tmp_path / "tiny" / name / "config.json").is_file()
        assert (tmp_path / "tiny" / name / "model.safetensors").is_file()
    dec = FastIVLDecoder.from_pretrained(tmp_path / "tiny" / "base", tmp_path / "tiny" / "value")
    assert dec.vocab_size == len(dec.tokenizer) <= 300
    assert isinstance(dec.generate_text(PROMPT, max_new_tokens=2), str)


def test_console_script_version():
    # the installed `ivl-fast` entry point next to this interpreter (falls back to `python -m ivl_fast.cli`)
    script = Path(sys.executable).with_name("ivl-fast")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "ivl_fast.cli"]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ivl-fast {ivl_fast.__version__}"
