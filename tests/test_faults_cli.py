"""Careless and hostile input to the command line: every refusal is one line naming the file or the flag, with exit
code 2 (``IVL_FAST_DEBUG=1`` shows the traceback), and nothing is written where it should not be."""

from __future__ import annotations

import os
import re

import pytest
import torch
from cli_fixtures import one_line

from ivl_fast.cli import main

PROMPT = "def main"


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_make_tiny_never_writes_into_the_root_or_a_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, "make-tiny", "--out", "/")
    one_line(rc, err, "--out '/'")
    assert not os.path.exists("/base") and not os.path.exists("/value")
    f = tmp_path / "a_file"
    f.write_text("mine")
    rc, err = run(capsys, "make-tiny", "--out", f)
    one_line(rc, err, str(f), "is a file")
    assert f.read_text() == "mine"


def test_train_data_that_is_not_text_names_the_file(capsys, pair, tmp_path):
    _, _, base_dir, value_dir = pair
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"messages": []}\n\x89PNG\r\n\x1a\n\xff\xfe')
    rc, err = run(capsys, "train", "--base", base_dir, "--value-init", value_dir, "--data", data,
                  "--out", tmp_path / "out", "--max-steps", 1, "--no-progress")  # fmt: skip
    one_line(rc, err, "--data", str(data), "not UTF-8")
    assert not (tmp_path / "out").exists()


def test_a_broken_tokenizer_json_is_named(capsys, pair, tmp_path):
    import shutil

    _, _, base_dir, value_dir = pair
    broken = tmp_path / "value"
    shutil.copytree(value_dir, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "truncation": nul')
    rc, err = run(capsys, "generate", "--base", base_dir, "--value", broken, "--prompt", PROMPT)
    one_line(rc, err, str(broken / "tokenizer.json"), "not valid JSON")


def test_options_this_machine_cannot_run_are_one_line(capsys, pair):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    _, _, base_dir, value_dir = pair
    pair_flags = ("--base", base_dir, "--value", value_dir, "--prompt", PROMPT, "--max-new-tokens", 2)
    env = os.environ.pop("TRITON_INTERPRET", None)  # the suite's interpreter would make triton usable on a CPU
    try:
        from ivl_fast.ops import _backend

        rc, err = run(capsys, "generate", *pair_flags, "--sample-backend", "triton")
        one_line(rc, err, "backend='triton' needs")
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env
        _backend.triton_version.cache_clear()
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        rc, err = run(capsys, "generate", *pair_flags, "--attn-backend", "flash")
        one_line(rc, err, "flash-attn")


def test_a_too_long_generation_is_an_error_on_a_line_of_its_own(capsys, pair):
    _, _, base_dir, value_dir = pair
    rc, err = run(capsys, "generate", "--base", base_dir, "--value", value_dir, "--prompt", PROMPT,
                  "--max-new-tokens", 100_000)  # fmt: skip
    assert rc == 2 and re.search(r"(^|\n)ivl-fast generate: error: ", err), repr(err[-500:])


def test_a_pickle_that_would_run_code_is_refused_on_one_line(capsys, pair, tmp_path, tokenizer):
    """--allow-pickle still loads tensors only: a pytorch_model.bin that would run code when unpickled is
    refused, as one line naming the file, and its code never runs."""
    import pickle

    _, value, base_dir, _ = pair
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    value.config.save_pretrained(evil_dir)
    tokenizer.save_pretrained(evil_dir)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))
    rc, err = run(capsys, "generate", "--base", base_dir, "--value", evil_dir, "--prompt", PROMPT, "--allow-pickle")
    one_line(rc, err, str(evil_dir / "pytorch_model.bin"))
    assert not marker.exists()
