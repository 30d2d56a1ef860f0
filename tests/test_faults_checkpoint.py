"""Faults injected into training runs: bit flips and truncations of every checkpoint file, a missing state, kills
at random points of checkpoint writes, a full disk (a small tmpfs, as root) during a save and during the export,
and what a killed run leaves behind. A damaged checkpoint is detected (SHA-256 per file), the previous one is used
when it is good (saying so), otherwise the run is refused on one line with nothing changed; no trained network is
lost to a failed export."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from file_snapshots import snapshot
from safetensors.torch import load_file
from train_fixtures import cli_args, make_train_setup

from ivl_fast.cli import main as cli_main

CKPT_FILES = ("model.safetensors", "opt.pt", "trainer_state.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_checkpoint):
    return make_train_setup(tmp_path_factory, save_checkpoint)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6; the last two kept): its --out."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert cli_main(cli_args(setup, max_steps=6, save_every=2) + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(finished) -> dict:
    """The uninterrupted run's exported weights."""
    return load_file(str(finished / "model.safetensors"))


def _train(capsys, setup, out, *extra, max_steps=6, save_every=2) -> tuple[int, str]:
    rc = cli_main(cli_args(setup, max_steps=max_steps, save_every=save_every) + ["--out", str(out), *extra])
    return rc, capsys.readouterr().err


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_without_its_export(finished: Path, out: Path) -> None:
    """A copy of the uninterrupted run as if killed before its export: checkpoint/ at step 6, .checkpoint.old/ at
    step 4 (the previous one, kept)."""
    shutil.copytree(finished, out)
    for name in ("config.json", "model.safetensors", "ivl.json", "loss_curve.png"):
        (out / name).unlink()
    assert _step(out / "checkpoint") == 6 and _step(out / ".checkpoint.old") == 4


def _step(ckpt: Path) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


def _flip_bytes(path: Path, n: int, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for i in rng.sample(range(len(data)), min(n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, seed: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: random.Random(seed).randrange(len(data))])


def _flip_bit(path: Path, seed: int) -> None:
    """One bit of one byte: in trainer_state.json a digit can become another digit and still parse."""
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    digits = [i for i, b in enumerate(data) if 0x30 <= b <= 0x38] if path.suffix == ".json" else range(len(data))
    i = rng.choice(list(digits))
    data[i] ^= 1 if path.suffix == ".json" else 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


DAMAGE = {
    "flip 1 bit": _flip_bit,
    "flip 1000 bytes": lambda p, s: _flip_bytes(p, 1000, s),
    "truncate": _truncate,
    "delete": lambda p, s: p.unlink(),
}
CASES = [(d, n) for d in ("flip 1 bit", "truncate") for n in CKPT_FILES]  # every file, bit-flipped and truncated
CASES += [("flip 1000 bytes", "model.safetensors"), ("delete", "opt.pt"), ("delete", "trainer_state.json")]


@pytest.mark.parametrize("damage, name", CASES)
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(
    setup, finished, reference, tmp_path, capsys, name, damage
):
    """The latest checkpoint damaged: the resume says so, loads the previous one (step 4) and ends with the
    uninterrupted run's weights, bit for bit; its log keeps one line per step."""
    out = tmp_path / "run"
    _run_without_its_export(finished, out)
    DAMAGE[damage](out / "checkpoint" / name, hash(name) % 1000)
    rc, err = _train(capsys, setup, out, "--resume")
    assert rc == 0, err
    assert "resuming from the previous checkpoint, .checkpoint.old" in err and name in err, err
    assert "(resumed at step 4, now at step 6)" in err, err
    assert _same(load_file(str(out / "model.safetensors")), reference)
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _step(out / "checkpoint") == 6 and _step(out / ".checkpoint.old") == 4  # the damaged one is gone
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [".checkpoint.old", "checkpoint"]


@pytest.mark.parametrize("name", CKPT_FILES)
def test_both_checkpoints_damaged_refuses_on_one_line_and_changes_nothing(setup, finished, tmp_path, capsys, name):
    out = tmp_path / "run"
    _run_without_its_export(finished, out)
    for ckpt in ("checkpoint", ".checkpoint.old"):
        _flip_bytes(out / ckpt / name, 1000, 7)
    before = snapshot(out)
    rc, err = _train(capsys, setup, out, "--resume")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "no usable checkpoint" in err and "nothing was changed" in err and name in err, err
    assert snapshot(out) == before  # train_log.jsonl included


def test_a_missing_state_with_no_previous_checkpoint_refuses_and_keeps_the_log(setup, tmp_path, capsys):
    """The failure this issue reported: checkpoint/trainer_state.json missing made --resume restart at step 0 and
    rewrite train_log.jsonl (12 lines -> 5)."""
    out = tmp_path / "run"
    rc, err = _train(capsys, setup, out, max_steps=4, save_every=4)
    assert rc == 0, err
    (out / "checkpoint" / "trainer_state.json").unlink()
    before = snapshot(out)
    rc, err = _train(capsys, setup, out, "--resume", max_steps=6, save_every=4)
    assert rc == 2 and "trainer_state.json is missing" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before


def test_a_run_without_any_checkpoint_is_not_resumed_from_step_0(setup, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _train(capsys, setup, out, max_steps=3, save_every=0)
    assert rc == 0 and not (out / "checkpoint").exists(), err  # --save-every 0: none kept after the export
    before = snapshot(out)
    rc, err = _train(capsys, setup, out, "--resume", max_steps=5, save_every=0)
    assert rc == 2 and "holds no checkpoint" in err and "--overwrite" in err, err
    assert snapshot(out) == before


def test_code_in_opt_pt_is_refused_on_one_line(setup, finished, tmp_path, capsys):
    """An opt.pt that would run code when unpickled, with every checksum updated to match (a deliberate edit,
    not corruption): weights_only loading refuses it, as one line naming the file, and its code never runs."""
    import hashlib
    import pickle

    out = tmp_path / "run"
    _run_without_its_export(finished, out)
    shutil.rmtree(out / ".checkpoint.old")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    opt = out / "checkpoint" / "opt.pt"
    opt.write_bytes(pickle.dumps({"optimizer": Evil()}))
    state_path = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state.pop("state_sha256")
    state["files"]["opt.pt"] = hashlib.sha256(opt.read_bytes()).hexdigest()
    # the state's own digest, recomputed too (canonical JSON): every checksum agrees with the crafted file
    state["state_sha256"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    state_path.write_text(json.dumps(state))
    rc, err = _train(capsys, setup, out, "--resume")
    assert rc == 2 and "opt.pt" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pwned").exists()


def test_kills_at_random_points_of_checkpoint_writes_resume_to_the_same_weights(setup, reference, tmp_path):
    """SIGKILL at seeded random moments of a run that checkpoints every step (so kills land in and near its
    writes), each followed by --resume (--overwrite when the kill came before the first checkpoint): the final
    weights equal the uninterrupted run's, and no temp dir is left."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ivl_fast.cli", *cli_args(setup, max_steps=6, save_every=1), "--out", str(out)]
    log = out / "train_log.jsonl"
    rng = random.Random(0)
    kills, how = 0, []
    for _ in range(8):
        lines = len(log.read_text().splitlines()) if log.is_file() else -1
        proc = subprocess.Popen(args + how, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # until this process trains (a new log line)
            if log.is_file() and len(log.read_text().splitlines()) not in (lines, 0):
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None and kills < 2:  # up to two kills, then the run may finish
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode in (-signal.SIGKILL, 2), err[-2000:]
        how = ["--overwrite"] if "holds no checkpoint" in err or not (out / "checkpoint").exists() else ["--resume"]
    assert proc.returncode == 0 and kills >= 1, (kills, proc.returncode)
    assert _same(load_file(str(out / "model.safetensors")), reference)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_killed_runs_temp_files_are_removed_and_overwrite_knows_them(setup, finished, tmp_path, capsys):
    out = tmp_path / "run"
    _run_without_its_export(finished, out)
    dead = 2**22 + 12345  # no such process
    (out / f".checkpoint.tmp-{dead}").mkdir()
    (out / f".checkpoint.tmp-{dead}" / "model.safetensors").write_bytes(b"partial")
    (out / f".model.safetensors.tmp-{dead}").write_bytes(b"partial export")
    rc, err = _train(capsys, setup, out, "--overwrite", max_steps=2)  # --overwrite knows them as the run's own
    assert rc == 0, err
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    _run_without_its_export(finished, tmp_path / "again")
    (tmp_path / "again" / f".checkpoint.tmp-{dead}").mkdir()
    rc, err = _train(capsys, setup, tmp_path / "again", "--resume")
    assert rc == 0 and f"removed .checkpoint.tmp-{dead}" in err, err
    assert not (tmp_path / "again" / f".checkpoint.tmp-{dead}").exists()


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 16 MiB (root only), which the tests fill up."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs needs root")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with a file (removed to free the space again)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(setup, small_disk, capsys):
    out = small_disk / "run"
    rc, err = _train(capsys, setup, out, max_steps=2, save_every=2)
    assert rc == 0, err
    for name in ("model.safetensors", "loss_curve.png"):
        (out / name).unlink()
    shutil.rmtree(out / ".checkpoint.old", ignore_errors=True)
    filler = _fill(small_disk, 4096)
    rc, err = _train(capsys, setup, out, "--resume", max_steps=4, save_every=1)
    assert rc == 2 and "writing a checkpoint" in err and "the earlier ones are kept" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _step(out / "checkpoint") == 2 and not [p for p in out.iterdir() if ".tmp-" in p.name]
    filler.unlink()
    rc, err = _train(capsys, setup, out, "--resume", max_steps=4, save_every=1)
    assert rc == 0, err


def test_a_full_disk_during_the_export_loses_nothing(setup, small_disk, capsys, reference, monkeypatch):
    """--save-every 0: a checkpoint of the final weights is written before the export and kept when the export
    fails; --resume then finishes the export, with the uninterrupted run's weights, and removes it."""
    from ivl_fast.train import run_dir

    out = small_disk / "run"
    real_export = run_dir.export

    def export_on_a_full_disk(*a, **k):
        _fill(small_disk, 1024)  # the disk fills up between the last checkpoint and the export
        return real_export(*a, **k)

    monkeypatch.setattr("ivl_fast.train.checkpoint.export", export_on_a_full_disk)
    rc, err = _train(capsys, setup, out, max_steps=6, save_every=0)
    assert rc == 2 and "exporting the value network" in err and "--resume" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _step(out / "checkpoint") == 6
    assert not (out / "model.safetensors").exists()  # never half a model.safetensors
    monkeypatch.setattr("ivl_fast.train.checkpoint.export", real_export)
    (small_disk / "filler").unlink()
    rc, err = _train(capsys, setup, out, "--resume", max_steps=6, save_every=0)
    assert rc == 0, err
    assert _same(load_file(str(out / "model.safetensors")), reference)
    assert not (out / "checkpoint").exists()  # --save-every 0 asked for none to be kept
