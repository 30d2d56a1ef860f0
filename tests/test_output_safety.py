"""Every command that writes (vocab-map, make-tiny, demo; train has tests/test_train_runs.py) refuses to
overwrite or delete what ivl-fast did not create, and the rules themselves (ivl_fast.safe_output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from file_snapshots import snapshot, user_dir

from ivl_fast.cli import main as cli_main
from ivl_fast.demo import MARKER, DemoConfig, prepare_work_dir
from ivl_fast.safe_output import UnsafeOutputError, check_output_location, clear_owned_dir, replace_file_atomically
from ivl_fast.vocab import VocabMap
from ivl_fast.vocab.build import is_map_file


# ----------------------------------------------------------------------------- the rules
def test_output_location_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.jsonl").write_text("{}")
    for out in (".", str(tmp_path), str(tmp_path.parent), "/"):
        with pytest.raises(UnsafeOutputError, match="current directory"):
            check_output_location(out, {})
    with pytest.raises(UnsafeOutputError, match="is the --data input"):
        check_output_location("in/data.jsonl", {"--data": "in/data.jsonl"})
    with pytest.raises(UnsafeOutputError, match="contains the --data input"):
        check_output_location("in", {"--data": ["x", "in/data.jsonl"]})
    assert check_output_location("new", {"--data": "in/data.jsonl"}) == tmp_path / "new"
    assert check_output_location("in/out", {"--base": "in"}) == tmp_path / "in" / "out"  # inside an input: fine


def test_clear_owned_dir_deletes_only_when_everything_is_owned(tmp_path):
    d = tmp_path / "d"
    (d / "ckpt").mkdir(parents=True)
    (d / "ckpt" / "w").write_text("w")
    (d / "log").write_text("l")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("p")
    (d / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeOutputError, match="link"):
        clear_owned_dir(d, lambda n: n in {"ckpt", "log"}, flag="--out", owner="test")
    assert sorted(p.name for p in d.iterdir()) == ["ckpt", "link", "log"]
    assert clear_owned_dir(d, lambda n: True, flag="--out", owner="test") == ["ckpt", "link", "log"]
    assert d.is_dir() and not any(d.iterdir())
    assert (outside / "precious").read_text() == "p"  # a link is removed as a link, never followed


def test_atomic_replace_keeps_the_old_file_when_writing_fails(tmp_path):
    f = tmp_path / "f"
    f.write_text("old")

    def half(tmp: Path):
        tmp.write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_file_atomically(f, half)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]
    replace_file_atomically(f, lambda tmp: tmp.write_text("new"))
    assert f.read_text() == "new"


# ----------------------------------------------------------------------------- vocab-map --out
def test_vocab_map_out_never_replaces_a_file_it_did_not_write(vocab_map_cli, vocab_map_files, tmp_path):
    mine = tmp_path / "weights.safetensors"
    mine.write_bytes(b"not a map, somebody's file")
    for extra in ((), ("--overwrite",)):
        rc, _, err = vocab_map_cli("--out", mine, *extra)
        assert rc == 2 and mine.read_bytes() == b"not a map, somebody's file", err
    assert "not an ivl-fast vocabulary map" in err
    rc, _, err = vocab_map_cli("--out", vocab_map_files[1], "--overwrite")  # the corpus itself
    assert rc == 2 and "is the --corpus input" in err
    rc, _, err = vocab_map_cli("--out", tmp_path)
    assert rc == 2 and "is a directory" in err


def test_vocab_map_out_replaces_a_map_only_with_overwrite(vocab_map_cli, tmp_path):
    out = tmp_path / "map.safetensors"
    rc, stdout, err = vocab_map_cli("--out", out, "--top-k", 1)
    assert rc == 0, err
    assert is_map_file(out)
    assert json.loads(stdout)["out"] == str(out)
    first = out.read_bytes()
    rc, _, err = vocab_map_cli("--out", out, "--top-k", 2)
    assert rc == 2 and "already exists" in err and out.read_bytes() == first
    rc, _, err = vocab_map_cli("--out", out, "--top-k", 2, "--overwrite")
    assert rc == 0, err
    assert VocabMap.load(out).meta["top_k"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.safetensors"]  # no temp file left


def test_vocab_map_save_api_follows_the_same_rules(tmp_path):
    import torch

    vmap = VocabMap.from_dense(torch.eye(4))
    f = tmp_path / "m.safetensors"
    vmap.save(f)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        vmap.save(f)
    vmap.save(f, overwrite=True)
    other = tmp_path / "other.bin"
    other.write_text("x")
    with pytest.raises(UnsafeOutputError, match="not an ivl-fast vocabulary map"):
        vmap.save(other, overwrite=True)
    assert other.read_text() == "x"


# ----------------------------------------------------------------------------- make-tiny --out
def test_make_tiny_does_not_overwrite_a_checkpoint(capsys, tmp_path):
    out = tmp_path / "models"
    user_dir(out / "base")  # e.g. the user's own model directory called base/
    before = snapshot(out)
    assert cli_main(["make-tiny", "--out", str(out), "--vocab-size", "300"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- demo --work-dir
def test_demo_refuses_a_work_dir_it_did_not_make(tmp_path, monkeypatch):
    work = user_dir(tmp_path / "work")
    before = snapshot(work)
    with pytest.raises(UnsafeOutputError, match=f"no {MARKER}"):
        prepare_work_dir(DemoConfig(work_dir=str(work)))
    assert snapshot(work) == before
    monkeypatch.chdir(work)
    with pytest.raises(UnsafeOutputError, match="current directory"):
        prepare_work_dir(DemoConfig(work_dir="."))
    assert snapshot(work) == before


def test_demo_cache_of_other_settings_is_refused(tmp_path):
    """A --quick work dir reused by the full demo would report the quick models' rows as the full demo's."""
    work = tmp_path / "ivl-demo"
    prepare_work_dir(DemoConfig(work_dir=str(work), quick=True))
    (work / "small").mkdir()
    assert prepare_work_dir(DemoConfig(work_dir=str(work), quick=True)) == work  # same settings: reused
    with pytest.raises(ValueError, match="other settings.*quick"):
        prepare_work_dir(DemoConfig(work_dir=str(work), quick=False))
    with pytest.raises(ValueError, match="other settings.*seed"):
        prepare_work_dir(DemoConfig(work_dir=str(work), quick=True, seed=1))
