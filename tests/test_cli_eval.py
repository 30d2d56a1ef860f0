"""`ivl-fast eval`: end to end on local tasks with lm-eval's flag names (lm-eval's table on stdout, lm-eval's
output layout written by its own tracker, samples, gen_kwargs, model_args, batch_size auto), the hyphenated
spellings, the paper suite's expansion, flags refused with one line; and lm-eval's own command line with the
model type registered (`python -m ivl_fast.lm_eval_cli`, a real process)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported

from cli_fixtures import check_flags_explained, check_required_listed  # noqa: E402
from lm_eval_tasks import write_tasks  # noqa: E402

from ivl_fast.cli import main  # noqa: E402
from ivl_fast.cli.eval import PAPER_SUITE, suite_runs  # noqa: E402


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_eval_tasks")
    write_tasks(d)
    return d


def _cli(capsys, *argv):
    rc = main(["eval", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def _written(out_dir, keep=("notes.txt",)) -> list:
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p.name not in keep)


def test_eval_takes_lm_evals_flags_and_writes_its_layout(pair, tasks_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    argv = ["--base", pair[2], "--value", pair[3], "--tasks", "ivl_mc,ivl_gen", "--include_path", tasks_dir]
    argv += ["--limit", 2, "--num_fewshot", 1, "--batch_size", 2, "--alpha", 0.5, "--device", "cpu"]
    argv += ["--dtype", "float32", "--output_path", out_dir, "--seed", 3, "--log_samples"]
    argv += ["--gen_kwargs", "max_gen_toks=7", "--model_args", "add_bos_token=True"]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, err
    assert "HF_DATASETS_OFFLINE" not in os.environ  # downloads allowed unless --offline
    assert "|ivl_mc " in out and "|ivl_gen" in out and "|acc " in out and "|exact_match|" in out  # make_table's
    assert "num_fewshot: 1" in out and "alpha=0.5" in out and "gen_kwargs: (max_gen_toks=7)" in out
    model_dir = "ivl__" + pair[3].name
    written = _written(out_dir)
    results = [w for w in written if w.startswith(f"{model_dir}/results_") and w.endswith(".json")]
    samples = sorted(w.split("/")[1].split("_2")[0] for w in written if "/samples_" in w)
    assert len(results) == 1 and samples == ["samples_ivl_gen", "samples_ivl_mc"] and len(written) == 3, written
    assert f"results: {out_dir / model_dir}" in err
    assert (out_dir / "notes.txt").read_text() == "mine"
    res = json.loads((out_dir / results[0]).read_text())
    assert res["config"]["model"] == "ivl" and res["config"]["model_args"]["scheme"] == "residual"
    assert res["config"]["model_args"]["add_bos_token"] is True and res["config"]["gen_kwargs"]["max_gen_toks"] == 7
    assert res["config"]["limit"] == 2 and res["config"]["random_seed"] == 3
    assert set(res["results"]) == {"ivl_mc", "ivl_gen"} and "acc,none" in res["results"]["ivl_mc"]
    assert res["n-shot"] == {"ivl_mc": 1, "ivl_gen": 1} and "samples" not in res
    lines = [json.loads(x) for x in next(out_dir.rglob("samples_ivl_gen_*.jsonl")).read_text().splitlines()]
    assert len(lines) == 2 and all("resps" in x and "doc" in x for x in lines)
    # the hyphenated spellings and --offline; a second run writes new files beside the first
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # restored after the test (--offline sets it to 1)
    argv = ["--base", pair[2], "--value", pair[3], "--tasks", "ivl_mc", "--include-path", tasks_dir, "--limit", 2]
    argv += ["--num-fewshot", 0, "--batch-size", 2, "--device", "cpu", "--output-path", out_dir, "--offline"]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, err
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    again = _written(out_dir)
    assert set(written) < set(again) and len(again) == 4


def test_batch_size_auto_finds_the_largest_that_fits(pair, monkeypatch):
    """lm-eval's batch_size="auto": the largest batch from max_batch_size down that scores a full window; an
    out-of-memory error (injected for batches above 2) makes accelerate's search (what HFLM uses) try smaller."""
    import torch

    from ivl_fast.lm_eval import IVLLM

    assert IVLLM(base=str(pair[2]), value=str(pair[3]), batch_size="auto", max_batch_size=4).batch_size == 4
    from ivl_fast import FastIVLDecoder

    real = FastIVLDecoder.loglikelihood
    tried = []

    def scoring(self, requests, **kw):
        tried.append(kw["batch_size"])
        if kw["batch_size"] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, requests, **kw)

    monkeypatch.setattr(FastIVLDecoder, "loglikelihood", scoring)
    lm = IVLLM(base=str(pair[2]), value=str(pair[3]), batch_size="auto:4", max_batch_size="16")
    assert lm.batch_size == 2 and tried[0] == 16 and tried[-1] == 2 and tried == sorted(tried, reverse=True)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1 or 'auto', got 'big'"):
        IVLLM(base=str(pair[2]), value=str(pair[3]), batch_size="big")


def test_lm_evals_own_command_line_runs_the_ivl_model(pair, tasks_dir, tmp_path):
    """`python -m ivl_fast.lm_eval_cli` is lm-eval's CLI with "ivl" registered: its flags, its output layout."""
    import subprocess
    import sys

    out_dir = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "ivl_fast.lm_eval_cli", "--model", "ivl", "--model_args"]
    cmd += [f"base={pair[2]},value={pair[3]},alpha=0.5", "--device", "cpu", "--tasks", "ivl_mc", "--include_path"]
    cmd += [str(tasks_dir), "--limit", "2", "--batch_size", "2", "--output_path", str(out_dir), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|ivl_mc" in proc.stdout and "|acc " in proc.stdout
    (res,) = out_dir.glob("*/results_*.json")
    assert json.loads(res.read_text())["results"]["ivl_mc"]["sample_len"] == 2
    assert len(list(out_dir.glob("*/samples_ivl_mc_*.jsonl"))) == 1


def test_help_follows_the_cli_conventions():
    check_flags_explained("eval")  # every flag explained, with its default
    check_required_listed("eval", ["--base", "--value"])


def test_paper_suite_expands_to_one_run_per_shot_count():
    assert dict(PAPER_SUITE) == {
        "arc_challenge": 25,
        "hellaswag": 10,
        "mmlu": 5,
        "truthfulqa_mc2": 0,
        "winogrande": 5,
        "gsm8k": 5,
    }
    assert suite_runs("paper") == [
        (25, ["arc_challenge"]),
        (10, ["hellaswag"]),
        (5, ["mmlu", "winogrande", "gsm8k"]),
        (0, ["truthfulqa_mc2"]),
    ]
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suite_runs("nope")


def test_suite_paper_calls_simple_evaluate_once_per_shot_count(pair, capsys, monkeypatch):
    """The hub datasets cannot be fetched here: the plumbing is checked with simple_evaluate replaced."""
    import lm_eval
    import lm_eval.tasks

    calls = []

    class Manager:
        def __init__(self, include_path=None, metadata=None):
            pass

        def match_tasks(self, names):
            return names

    def fake_evaluate(model, tasks, num_fewshot, **kw):
        calls.append((num_fewshot, tasks, model, kw["task_manager"]))

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    rc, _, err = _cli(capsys, "--base", pair[2], "--scheme", "base", "--suite", "paper", "--device", "cpu")
    assert rc == 0, err
    assert [(n, t) for n, t, _, _ in calls] == suite_runs("paper")
    # one model, loaded once, and one task index for every run
    assert type(calls[0][2]).__name__ == "IVLLM" and isinstance(calls[0][3], Manager)
    assert all(m is calls[0][2] and k is calls[0][3] for _, _, m, k in calls)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give exactly one of --tasks or --suite"),
        (["--tasks", "a", "--suite", "paper"], "give exactly one of --tasks or --suite"),
        (["--suite", "paper", "--num_fewshot", "3"], "--num_fewshot does not go with --suite"),
        (["--tasks", "a", "--batch_size", "0"], "--batch_size must be >= 1 or auto, got 0"),
        (["--tasks", "a", "--max_batch_size", "0"], "--max_batch_size must be >= 1, got 0"),
        (["--tasks", "a", "--limit", "0"], "--limit must be > 0, got 0"),
        (["--tasks", "a", "--limit", "2.5"], "--limit must be a whole number"),
        (["--tasks", "a", "--num-fewshot", "-1"], "--num_fewshot must be >= 0"),
        (["--tasks", "a,,b"], "holds an empty task name"),
        (["--tasks", "a", "--include_path", "/nonexistent/tasks"], "is not a directory"),
        (["--tasks", "a", "--output_path", "FILE"], "is a file; give a directory"),
        (["--tasks", "a", "--log_samples"], "--log_samples needs --output_path"),
        (["--tasks", "a", "--model_args", "alpha=2,base=x"], "--model_args sets alpha, base, which the flags set"),
        (["--tasks", "a", "--no-base"], "--base is required"),
        (["--tasks", "a", "--scheme", "base", "--no-base"], "--base is required"),
        (["--tasks", "a", "--no-value"], "--value is required"),
    ],
)
def test_bad_flags_give_one_line_errors(pair, tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    models = ["--base", str(pair[2]), "--value", str(pair[3])]
    if "--no-base" in argv:
        argv.remove("--no-base")
        models = models[2:]
    if "--no-value" in argv:
        argv.remove("--no-value")
        models = models[:2]
    rc, out, err = _cli(capsys, *models, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ivl-fast eval: error: ") and message in err, err


def test_unknown_task_is_one_line_error(pair, tasks_dir, capsys):
    argv = ["--base", pair[2], "--value", pair[3], "--tasks", "ivl_mc,no_such_task_x", "--include-path", tasks_dir]
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and err == "ivl-fast eval: error: unknown task(s) no_such_task_x\n"


def test_eval_outside_a_git_checkout_prints_no_git_errors(pair, tasks_dir, tmp_path, capfd, monkeypatch):
    """lm-eval runs `git describe` with our stderr: outside a checkout git says "fatal: not a git repository" once
    per simple_evaluate; ivl-fast eval (and the demo) let lm-eval record the commit quietly."""
    monkeypatch.chdir(tmp_path)  # not inside any git checkout
    argv = ["eval", "--base", pair[2], "--value", pair[3], "--tasks", "ivl_mc", "--include_path", tasks_dir]
    rc = main([str(a) for a in [*argv, "--limit", 1, "--device", "cpu"]])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "fatal" not in err and "|ivl_mc" in out


def test_offline_says_how_to_allow_the_download(pair, capsys, monkeypatch):
    """--offline with a hub task whose dataset is not cached: one line naming the dataset and what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach the network from a test, whatever the flag does
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # restored after the test (--offline sets it to 1)
    rc, _, err = _cli(capsys, "--base", pair[2], "--value", pair[3], "--tasks", "arc_easy", "--offline", "--limit", 1)
    assert rc == 2 and err.count("\n") == 1, err
    assert "allenai/ai2_arc" in err and "run without --offline to let lm-eval download it" in err
