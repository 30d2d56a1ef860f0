"""TrainConfig against `ivl-fast train`'s parser: every flag reaches a field and every field has a flag (the renames
in config.CLI_DESTS are the only exceptions), the schemes come from ivl_fast.schemes, and the docstrings of the
run's objects name exactly their fields. Parser-only: no model is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

import pytest

from ivl_fast import schemes
from ivl_fast.cli import build_parser
from ivl_fast.train import SCHEMES, TrainConfig
from ivl_fast.train import config as config_mod
from ivl_fast.train.setup import RunState, TrainRun

REQUIRED = ["--base", "b1", "--value-init", "v", "--data", "d.jsonl", "--out", "o"]


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _dests() -> set[str]:
    return {a.dest for a in _train_parser()._actions if not isinstance(a, argparse._HelpAction)}


def _parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(["train", *argv])
    args.argv = ["train", *argv]  # what cli.main adds
    return args


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_flag_sets_a_field_and_every_field_has_a_flag():
    dests, fields = _dests(), _field_names(TrainConfig)
    mapped = {config_mod.CLI_DESTS.get(d, (d,))[0] for d in dests}
    assert not (mapped - fields), f"flags whose dest is no TrainConfig field (map them in CLI_DESTS): {mapped - fields}"
    unset = fields - mapped - set(config_mod.NO_FLAG)
    assert not unset, f"TrainConfig fields no flag sets (add a flag, or list them in NO_FLAG): {unset}"
    assert set(config_mod.CLI_DESTS) <= dests, "CLI_DESTS names a dest the parser no longer has"
    assert set(config_mod.NO_FLAG) <= fields and not set(config_mod.NO_FLAG) & mapped
    assert not set(config_mod.NOT_SETTINGS) & dests, "a flag's dest is skipped as argparse plumbing"


def test_from_args_copies_every_flag():
    """Every flag set away from its default: the config is what the CLI built by hand before from_args."""
    argv = [
        *("--base", "b1", "--base", "b2", "--value-init", "v", "--data", "d.jsonl", "--out", "o"),
        *("--l1", "0.5", "--scheme", "cascade+", "--lr", "2e-4", "--warmup-ratio", "0.1", "--epochs", "2"),
        *("--max-steps", "7", "--batch-tokens", "512", "--grad-accum", "3", "--max-grad-norm", "0.5"),
        *("--weight-decay", "0.01", "--seed", "5", "--max-length", "128", "--drop-long", "--grad-checkpointing"),
        *("--save-every", "4", "--resume", "--device", "cpu", "--dtype", "float32", "--loss-backend", "torch"),
        *("--fsdp", "--no-progress", "--allow-pickle", "--debug-kill-at-step", "3", "--probe-intermediate-size", "16"),
    ]
    want = TrainConfig(
        bases=["b1", "b2"],
        value_init="v",
        data="d.jsonl",
        out="o",
        l1=0.5,
        scheme="cascade+",
        lr=2e-4,
        warmup_ratio=0.1,
        epochs=2,
        max_steps=7,
        batch_tokens=512,
        grad_accum=3,
        max_grad_norm=0.5,
        weight_decay=0.01,
        seed=5,
        max_length=128,
        drop_long=True,
        grad_checkpointing=True,
        save_every=4,
        resume=True,
        overwrite=False,
        device="cpu",
        dtype="float32",
        loss_backend="torch",
        fsdp=True,
        probe_intermediate_size=16,
        progress=False,
        allow_pickle=True,
        debug_kill_at_step=3,
    )
    got = TrainConfig.from_args(_parse(argv))
    assert dataclasses.asdict(got) == dataclasses.asdict(want)
    assert all(type(getattr(got, k)) is str for k in ("value_init", "data", "out")) and got.bases == ["b1", "b2"]
    # every non-default above differs from the default, so a flag that reached no field would show
    default = TrainConfig.from_args(_parse(REQUIRED))
    same = {f for f in _field_names(TrainConfig) if getattr(default, f) == getattr(want, f)}
    assert same == {"value_init", "data", "out", "overwrite"}  # overwrite excludes --resume: its own check below
    assert TrainConfig.from_args(_parse([*REQUIRED, "--overwrite"])).overwrite is True
    assert default == TrainConfig(bases=["b1"], value_init="v", data="d.jsonl", out="o")  # the parser's defaults


def test_from_args_refuses_a_dest_that_maps_to_no_field():
    args = _parse(REQUIRED)
    args.new_flag = 1
    with pytest.raises(TypeError, match="'new_flag' is no TrainConfig field"):
        TrainConfig.from_args(args)


def test_schemes_come_from_ivl_fast_schemes():
    scheme = next(a for a in _train_parser()._actions if a.dest == "scheme")
    assert tuple(scheme.choices) == schemes.TRAIN_SCHEMES
    assert SCHEMES is schemes.TRAIN_SCHEMES  # the old name, kept for callers
    with pytest.raises(
        ValueError, match=r"scheme must be one of \('residual', 'cascade', 'cascade\+', 'probe'\), got 'base'"
    ):
        TrainConfig(bases=["b"], value_init="v", data="d", out="o", scheme="base").validate()


@pytest.mark.parametrize("cls", [TrainConfig, TrainRun, RunState])
def test_docstring_names_exactly_the_fields(cls):
    """The Attributes section: one ``name: ...`` line per field, no field missing and none that does not exist."""
    doc = inspect.cleandoc(cls.__doc__).split("Attributes:", 1)[1]
    documented = re.findall(r"^ {4}(\w+): ", doc, flags=re.M)
    assert documented == [f.name for f in dataclasses.fields(cls)]
