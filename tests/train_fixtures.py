"""Shared by the training tests: a real frozen base, a value init and a demonstrations file, and the settings
that make a run take seconds on a CPU; recording what each optimizer step of a real run saw, a float64 reference
gradient written from the loss's definition, a real Ctrl-C after a given step, and 2-process (gloo) runs."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import build_model

from ivl_fast.train import TrainConfig, TrainingInterrupted, train_value_model
from ivl_fast.train import setup as setup_mod
from ivl_fast.train import trainer as trainer_mod


def conversations(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        out.append(
            [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"The answer is {a + b}."},
            ]
        )
    return out


def write_jsonl(path: Path, convs, form: str = "openai") -> Path:
    with path.open("w") as f:
        for c in convs:
            if form == "openai":
                f.write(json.dumps({"messages": c}) + "\n")
            else:
                who = {"user": "human", "assistant": "gpt", "system": "system"}
                f.write(json.dumps({"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in c]}))
                f.write("\n")
    return path


def make_train_setup(tmp_path_factory, save_checkpoint):
    """A frozen base (wider) and a value init (the small model), same tokenizer, plus a demonstrations file."""
    base = build_model("llama", seed=0, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    small = build_model("llama", seed=1)
    d = tmp_path_factory.mktemp("train")
    data = write_jsonl(d / "demos.jsonl", conversations(48))
    return {
        "base": save_checkpoint(base, "tbase"),
        "small": save_checkpoint(small, "tsmall"),
        "data": data,
        "dir": d,
    }


def train_config(setup, out, **kw) -> TrainConfig:
    args = dict(
        bases=[str(setup["base"])],
        value_init=str(setup["small"]),
        data=str(setup["data"]),
        out=str(out),
        max_steps=24,
        batch_tokens=256,
        lr=1e-3,
        save_every=8,
        progress=False,
        loss_backend="torch",
    )
    args.update(kw)
    return TrainConfig(**args)


def cpu_config(setup, out, **kw) -> TrainConfig:
    """train_config pinned to the CPU in float32: the numeric references and the gloo runs assume it (on a GPU the
    trainer would default to CUDA with bf16 autocast, and forked ranks cannot use CUDA)."""
    return train_config(setup, out, device="cpu", dtype="float32", **kw)


def cli_args(setup, *, max_steps: int, save_every: int) -> list[str]:
    """`ivl-fast train` arguments for the fixture's base, value init and data (fast settings)."""
    return [
        "train",
        *("--base", str(setup["base"]), "--value-init", str(setup["small"]), "--data", str(setup["data"])),
        *("--max-steps", str(max_steps), "--save-every", str(save_every), "--batch-tokens", "256"),
        *("--lr", "1e-3", "--no-progress", "--loss-backend", "torch"),
    ]


# ----------------------------------------------------------------------------- recording a real run
def record_run(monkeypatch, cfg, per_step=None):
    """Run ``train_value_model(cfg)`` and return what every optimizer step saw.

    rec.steps[i]: {"opt": which optimizer (a curriculum stage makes a new one), "groups": [(lr, weight_decay,
    betas, eps, param ids)], "before"/"grad"/"after": {param id: float32 copy}, "batches": the micro-batches whose
    gradients this step applies (this process's), "extra": per_step() if given}. rec.value: the trained value
    model (names of the parameter ids: rec.names); rec.models: every model loaded, in order (the value network,
    then each stage's base); rec.optimizers: every AdamW made; rec.summary: what train_value_model returned;
    rec.log: the train_log.jsonl records (None where this process wrote no log).
    """
    rec = SimpleNamespace(models=[], pending=[], steps=[], optimizers=[])
    real_load, real_loss = setup_mod.load_model, trainer_mod.micro_batch_loss

    def load_model(*a, **k):
        m = real_load(*a, **k)
        rec.models.append(m)
        return m

    def micro_batch_loss(cfg_, value_fwd, value, base, batch):
        rec.pending.append({k: v.detach().clone() for k, v in batch.items()})
        return real_loss(cfg_, value_fwd, value, base, batch)

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            rec.optimizers.append(self)

        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            s = {
                "opt": rec.optimizers.index(self),
                "groups": [
                    (g["lr"], g["weight_decay"], g["betas"], g["eps"], [id(p) for p in g["params"]])
                    for g in self.param_groups
                ],
                "before": {id(p): p.detach().clone() for p in params},
                "grad": {id(p): p.grad.detach().clone() for p in params},
                "batches": list(rec.pending),
                "extra": per_step() if per_step else None,
            }
            rec.pending.clear()
            out = super().step(closure)
            s["after"] = {id(p): p.detach().clone() for p in params}
            rec.steps.append(s)
            return out

    monkeypatch.setattr(setup_mod, "load_model", load_model)  # the value network and each base load there
    monkeypatch.setattr(trainer_mod, "micro_batch_loss", micro_batch_loss)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    rec.summary = train_value_model(cfg)
    rec.value = rec.models[0]  # the value network is loaded first, the base(s) per stage after it
    rec.names = {id(p): n for n, p in rec.value.named_parameters()}
    log = Path(cfg.out) / "train_log.jsonl"
    rec.log = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else None  # rank 0 logs
    return rec


def named(rec, by_id: dict) -> dict:
    """{param id: tensor} of a recorded step -> {parameter name: tensor}."""
    return {rec.names[i]: t for i, t in by_id.items()}


def interrupt_after(monkeypatch, step: int, *, rank: int = 0) -> None:
    """Send this process a real SIGINT (Ctrl-C) once its ``step``-th optimizer step is done (only on ``rank``
    under torch.distributed): the trainer then finishes the step, checkpoints and raises TrainingInterrupted."""
    real = trainer_mod._optimizer_step
    calls = {"n": 0}

    def optimizer_step(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == step and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # let the Python-level handler run now
        return out

    monkeypatch.setattr(trainer_mod, "_optimizer_step", optimizer_step)


class ReferenceGradients:
    """(loss, d loss / d value-params) of one global batch, computed with transformers' own models (not the trainer's
    lean engine or fused loss) from the definition, in any dtype:

        loss = sum over the global batch's supervised tokens of [CE(z_base + z_value, y) + l1 * sum_v |z_value| / V]
               / (number of supervised tokens in the global batch)
    """

    def __init__(self, base_dir, value_dir, dtype):
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(base_dir).to(dtype).eval()
        self.value = AutoModelForCausalLM.from_pretrained(value_dir).to(dtype).eval()
        self.dtype = dtype

    def __call__(self, params: dict[str, torch.Tensor], batches: list[dict], l1: float):
        self.value.load_state_dict({n: p.to(self.dtype) for n, p in params.items()}, strict=True)
        self.value.zero_grad(set_to_none=True)
        n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            ids, mask, lab = b["input_ids"], b["attention_mask"], b["labels"][:, 1:]
            keep = lab != -100  # [B, T-1]
            with torch.no_grad():
                zb = self.base(ids, attention_mask=mask).logits[:, :-1][keep]  # [N, V]
            zv = self.value(ids, attention_mask=mask).logits[:, :-1][keep]  # [N, V]
            ce = torch.nn.functional.cross_entropy(zb + zv, lab[keep], reduction="sum")
            l1_term = zv.abs().sum() / zv.shape[-1]
            part = (ce + l1 * l1_term) / n_total
            part.backward()
            total += float(part.detach())
        return total, {n: p.grad.detach().clone() for n, p in self.value.named_parameters()}


def clip_by_hand(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale all gradients together so that their global L2 norm is at most max_norm (torch's convention: the
    factor is max_norm / (norm + 1e-6), capped at 1), computed in the gradients' dtype. Returns (clipped, the norm
    before clipping)."""
    norm = float(torch.stack([(g**2).sum() for g in grads.values()]).sum().sqrt())  # in the grads' dtype
    f = min(1.0, max_norm / (norm + 1e-6))
    return {n: g * f for n, g in grads.items()}, norm


def max_err(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ----------------------------------------------------------------------------- two real processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(jobs: list[dict], workdir: Path, timeout: float = 300) -> None:
    """Run ``jobs`` (see run_jobs) in 2 CPU processes joined by gloo, set up as torchrun would (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT). The processes are forked from this one, which has torch, transformers and ivl_fast imported
    already: 2 fresh interpreters spent 5-12 s importing them on 2 busy cores, the jobs themselves ~6 s. One process
    group serves every job. If one process fails, the other is stopped (it would wait in a collective)."""
    import multiprocessing

    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(rank, port, jobs, workdir)) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    bad = {}
    for rank, p in enumerate(procs):
        if p.exitcode != 0:
            err = workdir / f"error.rank{rank}.txt"
            bad[rank] = (p.exitcode, err.read_text()[-3000:] if err.is_file() else "no traceback (killed?)")
    assert not bad, bad


def _rank_main(rank: int, port: int, jobs: list[dict], workdir: Path) -> None:
    import traceback

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # 2 ranks share 2 cores (and a forked child must not reuse the parent's thread pool)
    try:
        run_jobs(rank, jobs, workdir)
    except BaseException:
        (workdir / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        raise


def run_jobs(rank: int, jobs: list[dict], workdir: Path) -> None:
    """One rank of launch_two_processes. Each job: {"name", "cfg": TrainConfig fields, "interrupt_after": step or
    None (rank 0 gets a SIGINT after that step), "record": save what each optimizer step saw}. Writes
    ``<name>.rank<r>.pt`` into workdir: {"interrupted_at", "summary", and if recorded "log" (rank 0's
    train_log.jsonl) and "steps": [{"grad", "before": {name: tensor}, "reduced": [the DDP bucket indices all-reduced
    during the step]}]}."""
    import pytest
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    reduced: list[int] = []  # bucket indices, in the order DDP all-reduced them

    def counting_hook(state, bucket):
        reduced.append(bucket.index())
        return allreduce_hook(state, bucket)

    class CountingDDP(DistributedDataParallel):
        """Real DDP whose gradient all-reduces (the default hook's) are counted."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_comm_hook(None, counting_hook)

    def since_last_step():
        out = list(reduced)
        reduced.clear()
        return out

    for job in jobs:
        cfg = TrainConfig(**job["cfg"])
        res = {"interrupted_at": None, "summary": None}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.parallel, "DistributedDataParallel", CountingDDP)
            if job.get("interrupt_after"):
                interrupt_after(mp, job["interrupt_after"])
            try:
                if job.get("record"):
                    rec = record_run(mp, cfg, per_step=since_last_step)
                    res["summary"] = rec.summary
                    res["steps"] = [
                        {"before": named(rec, s["before"]), "grad": named(rec, s["grad"]), "reduced": s["extra"]}
                        for s in rec.steps
                    ]
                    res["log"] = rec.log
                else:
                    res["summary"] = train_value_model(cfg)
            except TrainingInterrupted as e:
                res["interrupted_at"] = e.step
        torch.save(res, workdir / f"{job['name']}.rank{rank}.pt")
    dist.destroy_process_group()


def train_cli(base_dir, value_dir, tmp_path: Path, *, steps: int, extra=()) -> tuple[int, Path, list[dict]]:
    """`ivl-fast train` of ``value_dir`` on ``base_dir`` over 32 demonstrations (torch loss, no checkpoints):
    (exit code, the run dir, its train_log.jsonl records)."""
    from ivl_fast.cli import main as cli_main

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "demos.jsonl", conversations(32))
    out = tmp_path / "run"
    argv = ["train", "--base", str(base_dir), "--value-init", str(value_dir), "--data", str(data), "--out", str(out)]
    argv += ["--max-steps", str(steps), "--save-every", "0", "--batch-tokens", "256", "--lr", "2e-3"]
    rc = cli_main([*argv, "--no-progress", "--loss-backend", "torch", *map(str, extra)])
    log = out / "train_log.jsonl"
    return rc, out, [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
