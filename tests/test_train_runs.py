"""What `ivl-fast train` does with --out and with runs that stop: never deletes what it did not write, leaves
nothing behind when it fails, saves and explains on Ctrl-C, resumes and extends runs, reports what it ran."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from file_snapshots import snapshot, user_dir
from train_fixtures import (
    ReferenceGradients,
    cli_args,
    clip_by_hand,
    cpu_config,
    interrupt_after,
    launch_two_processes,
    make_train_setup,
    max_err,
    record_run,
    train_config,
)

from ivl_fast.cli import main as cli_main
from ivl_fast.safe_output import UnsafeOutputError
from ivl_fast.train import save_checkpoint, train_value_model
from ivl_fast.train import trainer as trainer_mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_checkpoint):
    return make_train_setup(tmp_path_factory, save_checkpoint)


def train_cli(capsys, setup, out, *extra, max_steps=3, save_every=0) -> tuple[int, str]:
    rc = cli_main(cli_args(setup, max_steps=max_steps, save_every=save_every) + ["--out", str(out), *extra])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- --out and --overwrite
def test_overwrite_refuses_a_directory_of_the_users(setup, tmp_path, capsys):
    out = user_dir(tmp_path / "mine")
    before = snapshot(out)
    rc, err = train_cli(capsys, setup, out, "--overwrite")
    assert rc == 2 and "not a directory ivl-fast training wrote" in err and "nothing" in err
    assert snapshot(out) == before  # not one file lost
    rc, err = train_cli(capsys, setup, out)  # without --overwrite: refused as well
    assert rc == 2 and "already holds files" in err
    assert snapshot(out) == before


def test_overwrite_of_the_working_directory_is_refused(setup, tmp_path, capsys, monkeypatch):
    cwd = user_dir(tmp_path / "project")
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    for out in (".", str(cwd), ".."):
        rc, err = train_cli(capsys, setup, out, "--overwrite")
        assert rc == 2 and "current directory" in err, err
        assert "Traceback" not in err
    assert snapshot(cwd) == before


@pytest.mark.parametrize("which", ["--base", "--value-init", "--data", "parent of --data"])
def test_out_is_never_an_input(setup, tmp_path, capsys, which):
    target = {
        "--base": setup["base"],
        "--value-init": setup["small"],
        "--data": setup["data"],
        "parent of --data": setup["data"].parent,
    }[which]
    root = target if target.is_dir() else target.parent
    before = snapshot(root)
    rc, err = train_cli(capsys, setup, target, "--overwrite")
    assert rc == 2, err
    flag = which.replace("parent of ", "")
    assert flag in err and ("is the" in err or "contains the" in err), err
    assert "tokenizer" not in err  # the misleading follow-up error of old
    assert snapshot(root) == before


def test_overwrite_replaces_an_earlier_run_and_only_it(setup, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = train_cli(capsys, setup, out, max_steps=2, save_every=1)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["written_by"] == "ivl-fast train" and "tokenizer.json" in run["outputs"]
    before = snapshot(out)
    rc, err = train_cli(capsys, setup, out, "--overwrite", "--batch-tokens", "4")  # a bad new run
    assert rc == 2 and "--batch-tokens" in err
    assert snapshot(out) == before  # every input is checked before the earlier run is deleted
    rc, err = train_cli(capsys, setup, out, "--overwrite", max_steps=3)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["config"]["max_steps"] == 3
    assert not (out / "checkpoint").exists()  # the first run's checkpoint went with it (save_every 0 now)
    # a file of the user's inside a run directory: --overwrite refuses the whole run, deletes nothing
    (out / "my_eval.txt").write_text("scores")
    before = snapshot(out)
    rc, err = train_cli(capsys, setup, out, "--overwrite", max_steps=2)
    assert rc == 2 and "my_eval.txt" in err and "nothing was deleted" in err
    assert snapshot(out) == before


def test_out_that_is_a_file(setup, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("keep")
    rc, err = train_cli(capsys, setup, f, "--overwrite")
    assert rc == 2 and "is a file" in err and f.read_text() == "keep"


def test_checkpoint_rotation_never_replaces_a_foreign_checkpoint_dir(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "weights.bin").write_text("someone else's")
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(UnsafeOutputError, match="not a checkpoint ivl-fast wrote"):
        save_checkpoint(out, lin.state_dict(), opt.state_dict(), sched, {"step": 1, "stage": 0, "epoch": 0})
    assert (out / "checkpoint" / "weights.bin").read_text() == "someone else's"
    assert not list(out.glob(".checkpoint*"))


# ----------------------------------------------------------------------------- failed runs leave nothing
def test_failed_run_leaves_nothing_and_the_corrected_rerun_works(setup, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = train_cli(capsys, setup, out, "--batch-tokens", "4")
    assert rc == 2 and "--batch-tokens" in err, err
    assert not out.exists()
    rc, err = train_cli(capsys, setup, out, max_steps=2)
    assert rc == 0, err


def test_run_failing_in_its_first_step_removes_what_it_wrote(setup, tmp_path, monkeypatch):
    out = tmp_path / "empty_before"
    out.mkdir()  # the user made it: it stays, empty

    def boom(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(trainer_mod, "micro_batch_loss", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        train_value_model(train_config(setup, out, max_steps=3))
    assert out.is_dir() and not any(out.iterdir())
    monkeypatch.undo()
    train_value_model(train_config(setup, out, max_steps=2))  # no flag needed
    assert (out / "model.safetensors").is_file()


def test_failure_after_a_checkpoint_keeps_the_run(setup, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    real = trainer_mod.micro_batch_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash at step 3")
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "micro_batch_loss", flaky)
    with pytest.raises(RuntimeError):
        train_value_model(train_config(setup, out, max_steps=4, save_every=1))
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert (out / "run.json").is_file()  # resumable


# ----------------------------------------------------------------------------- resume: summary and extension
def test_resume_summary_counts_the_steps_that_ran(setup, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = train_cli(capsys, setup, out, max_steps=10, save_every=5)
    assert rc == 0 and "trained 10 steps" in err, err
    rc, err = train_cli(capsys, setup, out, "--resume", max_steps=30, save_every=5)  # extend 10 -> 30
    assert rc == 0, err
    assert "trained 20 steps (resumed at step 10, now at step 30)" in err, err
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert json.loads((out / "run.json").read_text())["config"]["max_steps"] == 30


def test_extended_run_follows_the_new_schedule(setup, tmp_path):
    """Steps after the resume use the learning rates of a run planned with the new length from the start."""
    ext, ref = tmp_path / "ext", tmp_path / "ref"
    train_value_model(train_config(setup, ext, max_steps=8, save_every=8, warmup_ratio=0.25))
    train_value_model(train_config(setup, ext, max_steps=16, save_every=8, warmup_ratio=0.25, resume=True))
    train_value_model(train_config(setup, ref, max_steps=16, save_every=0, warmup_ratio=0.25))

    def lrs(d):
        return [json.loads(x)["lr"] for x in (d / "train_log.jsonl").read_text().splitlines()]

    assert lrs(ext)[8:] == pytest.approx(lrs(ref)[8:], rel=1e-12)
    assert lrs(ext)[:8] != pytest.approx(lrs(ref)[:8])  # the first 8 steps had the 8-step schedule


def test_resume_shorter_than_the_checkpoint_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    train_value_model(train_config(setup, out, max_steps=6, save_every=6))
    with pytest.raises(ValueError, match="checkpoint is at step 6, past the new length of 4"):
        train_value_model(train_config(setup, out, max_steps=4, resume=True))


def test_curriculum_length_changes_only_in_its_first_stage(setup, tmp_path, save_checkpoint):
    out = tmp_path / "curr"
    bases = [str(setup["base"]), str(setup["small"])]
    train_value_model(train_config(setup, out, bases=bases, max_steps=3, save_every=3))  # both stages done
    with pytest.raises(ValueError, match="only during the first stage"):
        train_value_model(train_config(setup, out, bases=bases, max_steps=5, resume=True))
    # --epochs changed under a fixed --max-steps: the same length, so the resume is allowed
    summary = train_value_model(train_config(setup, out, bases=bases, max_steps=3, epochs=5, resume=True))
    assert summary["steps"] == 6 and summary["steps_run"] == 0


def test_resume_with_other_settings_is_still_refused(setup, tmp_path):
    out = tmp_path / "run"
    train_value_model(train_config(setup, out, max_steps=2, save_every=1))
    with pytest.raises(ValueError, match="settings differ.*'lr'"):
        train_value_model(train_config(setup, out, max_steps=2, lr=5e-4, resume=True))


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(setup, tmp_path):
    """A real SIGINT to a real `ivl-fast train` process: it finishes the step, checkpoints, prints a --resume
    command; running that command ends with the weights of an uninterrupted run (CPU, bit for bit)."""
    from safetensors.torch import load_file

    common = cli_args(setup, max_steps=80, save_every=0)
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "ivl_fast.cli", *common, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 80, "the run should stop soon after the signal"
    assert f"at step {step}" in err and not (out / "model.safetensors").exists()
    lines = err.splitlines()
    resume_line = lines[next(i for i, ln in enumerate(lines) if ln.endswith("Continue with:")) + 1].strip()
    argv = shlex.split(resume_line)[1:]
    assert argv[-1] == "--resume" and argv[argv.index("--out") + 1] == str(out)
    capture = subprocess.run([sys.executable, "-m", "ivl_fast.cli", *argv], capture_output=True, text=True, timeout=300)
    assert capture.returncode == 0, capture.stderr[-3000:]
    assert f"trained {80 - step} steps (resumed at step {step}, now at step 80)" in capture.stderr
    full = tmp_path / "full"
    assert cli_main(common + ["--out", str(full)]) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(1, 81))


def test_second_ctrl_c_stops_at_once(tmp_path):
    """The handler itself: the first SIGINT only asks, the second raises KeyboardInterrupt."""
    from ivl_fast.train.stop_request import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- resuming a curriculum's later stage
@pytest.fixture(scope="module")
def curriculum_run(setup, tmp_path_factory):
    """An uninterrupted 2-stage curriculum (4 steps per base, 2 of them warmup), the reference for the resumes."""
    out = tmp_path_factory.mktemp("curr_full") / "run"
    train_value_model(curriculum_config(setup, out))
    return out


def curriculum_config(setup, out, **kw):
    bases = [str(setup["base"]), str(setup["small"])]
    return cpu_config(setup, out, bases=bases, max_steps=4, warmup_ratio=0.5, save_every=0, **kw)


@pytest.mark.parametrize("cut_at", [6, 4], ids=["inside-stage-2", "at-the-stage-boundary"])
def test_curriculum_interrupted_in_stage_2_resumes_to_the_uninterrupted_weights(
    setup, curriculum_run, tmp_path, monkeypatch, cut_at
):
    """Ctrl-C (a real SIGINT) after step cut_at; --resume restarts stage 2 on the right base, optimizer and schedule
    position: the final weights equal the uninterrupted run's bit for bit (CPU)."""
    from safetensors.torch import load_file

    out = tmp_path / "cut"
    with monkeypatch.context() as mp:
        interrupt_after(mp, cut_at)
        with pytest.raises(trainer_mod.TrainingInterrupted) as info:
            train_value_model(curriculum_config(setup, out))
    assert info.value.step == cut_at
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["stage"]) == (cut_at, 1)  # a checkpoint at step 4 already belongs to stage 2
    summary = train_value_model(curriculum_config(setup, out, resume=True))
    assert summary["resumed_from"] == cut_at and summary["steps"] == 8
    a, b = load_file(str(curriculum_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: float((a[k] - b[k]).abs().max()) for k in a}
    log_full = [json.loads(x) for x in (curriculum_run / "train_log.jsonl").read_text().splitlines()]
    log_cut = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"], r["lr"], r["loss"]) for r in log_cut] == [
        (r["step"], r["stage"], r["lr"], r["loss"]) for r in log_full
    ]


# ----------------------------------------------------------------------------- DDP and FSDP in 2 real processes
@pytest.fixture(scope="module")
def two_process_runs(setup, tmp_path_factory):
    """One launch of 2 gloo processes runs: DDP with grad_accum 2 (recorded), an FSDP run, and the same FSDP run
    interrupted by a Ctrl-C on rank 0 after step 2 and resumed."""
    d = tmp_path_factory.mktemp("dist")

    def cfg(name, **kw):
        return dataclasses.asdict(cpu_config(setup, d / name, save_every=0, **kw))

    fsdp = dict(max_steps=4, fsdp=True, warmup_ratio=0.5)
    jobs = [
        {"name": "ddp", "cfg": cfg("ddp", max_steps=3, grad_accum=2), "record": True},
        {"name": "fsdp_full", "cfg": cfg("fsdp_full", **fsdp)},
        {"name": "fsdp_cut", "cfg": cfg("fsdp_cut", **fsdp), "interrupt_after": 2},
        {"name": "fsdp_resumed", "cfg": cfg("fsdp_cut", **fsdp, resume=True)},
    ]
    launch_two_processes(jobs, d, timeout=150)  # ~10 s normally; a rank left waiting in a collective hangs
    return SimpleNamespace(dir=d, load=lambda name, r: torch.load(d / f"{name}.rank{r}.pt", weights_only=False))


def test_ddp_grad_accum_all_reduces_once_per_step_and_applies_the_global_batch_gradient(
    setup, two_process_runs, tmp_path, monkeypatch
):
    """2 processes x grad_accum 2: the first micro-batch's backward runs under no_sync (each DDP bucket is
    all-reduced once per optimizer step), and every step's gradient is that of the global batch, i.e. the 4
    micro-batches a single process with grad_accum 4 uses, computed from the definition in float64."""
    r0, r1 = two_process_runs.load("ddp", 0), two_process_runs.load("ddp", 1)
    assert r0["summary"]["world_size"] == 2 and len(r0["steps"]) == 3
    for r in (r0, r1):
        for s in r["steps"]:
            # each bucket exactly once (none: the ranks never agree; twice: no no_sync)
            assert s["reduced"] and sorted(s["reduced"]) == list(range(len(s["reduced"]))), s["reduced"]
    single = record_run(monkeypatch, cpu_config(setup, tmp_path / "single", max_steps=3, grad_accum=4, save_every=0))
    ref64 = ReferenceGradients(setup["base"], setup["small"], torch.float64)
    ref32 = ReferenceGradients(setup["base"], setup["small"], torch.float32)
    for k, (s0, s1, s_single) in enumerate(zip(r0["steps"], r1["steps"], single.steps, strict=True)):
        # the replicas stay identical: same parameters, same all-reduced gradients
        assert all(
            torch.equal(s0["before"][n], s1["before"][n]) and torch.equal(s0["grad"][n], s1["grad"][n])
            for n in s0["grad"]
        )
        batches = s_single["batches"]  # the global batch of step k
        assert len(batches) == 4
        loss64, g64 = ref64(s0["before"], batches, 1.0)
        loss32, g32 = ref32(s0["before"], batches, 1.0)
        g64, norm64 = clip_by_hand(g64, 1.0)  # the default --max-grad-norm
        g32, norm32 = clip_by_hand(g32, 1.0)
        torch_err = max_err(g32, g64)
        assert max_err(s0["grad"], g64) <= max(2 * torch_err, 1e-9), (k, max_err(s0["grad"], g64), torch_err)
        # the logged loss (token-weighted mean over the global batch) and gradient norm (before clipping, which
        # hides a wrongly scaled gradient from the check above); float32 numbers: a floor of 4 ulps
        for got, want, want32 in ((r0["log"][k]["loss"], loss64, loss32), (r0["log"][k]["grad_norm"], norm64, norm32)):
            assert got == pytest.approx(want, rel=max(2 * abs(want32 - want) / want, 2**-21)), (k, got, want)


def test_fsdp_run_stopped_by_ctrl_c_on_one_rank_resumes_to_the_uninterrupted_weights(two_process_runs):
    from safetensors.torch import load_file

    d, load = two_process_runs.dir, two_process_runs.load
    # rank 0's SIGINT stops both ranks after the same step (the stop flag is all-reduced)
    assert load("fsdp_cut", 0)["interrupted_at"] == load("fsdp_cut", 1)["interrupted_at"] == 2
    resumed = load("fsdp_resumed", 0)["summary"]
    assert not (d / "fsdp_cut" / "checkpoint").exists()  # --save-every 0: none kept once the export is complete
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4 and resumed["world_size"] == 2
    a, b = load_file(str(d / "fsdp_full" / "model.safetensors")), load_file(str(d / "fsdp_cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: float((a[k] - b[k]).abs().max()) for k in a}
    steps = [json.loads(x)["step"] for x in (d / "fsdp_cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
