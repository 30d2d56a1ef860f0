"""Shared by the training tests: a real frozen base, a value init and a demonstrations file, and the settings
that make a run take seconds on a CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import build_model

from ivl_fast.train import TrainConfig


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


def cli_args(setup, *, max_steps: int, save_every: int) -> list[str]:
    """`ivl-fast train` arguments for the fixture's base, value init and data (fast settings)."""
    return [
        "train",
        *("--base", str(setup["base"]), "--value-init", str(setup["small"]), "--data", str(setup["data"])),
        *("--max-steps", str(max_steps), "--save-every", str(save_every), "--batch-tokens", "256"),
        *("--lr", "1e-3", "--no-progress", "--loss-backend", "torch"),
    ]
