"""`ivl-fast eval`: end to end on local tasks (lm-eval's table on stdout, its results JSON in a new file), the
paper suite's expansion, and flags refused with one line."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported

from cli_fixtures import check_flags_explained, check_required_listed  # noqa: E402
from lm_eval_tasks import write_tasks  # noqa: E402

from ivl_fast.cli import main  # noqa: E402
from ivl_fast.cli.eval import PAPER_SUITE, _write_new, suite_runs  # noqa: E402


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_eval_tasks")
    write_tasks(d)
    return d


def _cli(capsys, *argv):
    rc = main(["eval", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_prints_lm_evals_table_and_writes_a_new_results_file(pair, tasks_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    argv = ["--base", pair[2], "--value", pair[3], "--tasks", "ivl_mc,ivl_gen", "--include-path", tasks_dir]
    argv += ["--limit", 2, "--num-fewshot", 1, "--batch-size", 2, "--alpha", 0.5, "--device", "cpu"]
    argv += ["--dtype", "float32", "--output-path", out_dir, "--seed", 3]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, err
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "|ivl_mc " in out and "|ivl_gen" in out and "|acc " in out and "|exact_match|" in out  # make_table's
    assert "num_fewshot: 1" in out and "alpha=0.5" in out
    written = sorted(p.name for p in out_dir.iterdir() if p.name != "notes.txt")
    assert len(written) == 1 and written[0].startswith("results_") and written[0].endswith(".json")
    assert f"results: {out_dir / written[0]}" in err
    assert (out_dir / "notes.txt").read_text() == "mine"
    res = json.loads((out_dir / written[0]).read_text())
    assert res["config"]["model"] == "ivl" and res["config"]["model_args"]["scheme"] == "residual"
    assert res["config"]["limit"] == 2 and res["config"]["random_seed"] == 3
    assert set(res["results"]) == {"ivl_mc", "ivl_gen"} and "acc,none" in res["results"]["ivl_mc"]
    assert res["n-shot"] == {"ivl_mc": 1, "ivl_gen": 1} and "samples" not in res


def test_help_follows_the_cli_conventions():
    check_flags_explained("eval")  # every flag explained, with its default
    check_required_listed("eval", ["--base", "--value"])


def test_results_files_are_never_overwritten(tmp_path):
    (tmp_path / "results_x.json").write_text("old")
    p = _write_new(tmp_path, "results_x", "new")
    assert p.name == "results_x-1.json" and p.read_text() == "new"
    assert (tmp_path / "results_x.json").read_text() == "old"
    assert _write_new(tmp_path / "sub", "results_x", "a").name == "results_x.json"


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
        (["--suite", "paper", "--num-fewshot", "3"], "--num-fewshot does not go with --suite"),
        (["--tasks", "a", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--tasks", "a", "--limit", "0"], "--limit must be > 0, got 0"),
        (["--tasks", "a", "--limit", "2.5"], "--limit must be a whole number"),
        (["--tasks", "a", "--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
        (["--tasks", "a,,b"], "holds an empty task name"),
        (["--tasks", "a", "--include-path", "/nonexistent/tasks"], "is not a directory"),
        (["--tasks", "a", "--output-path", "FILE"], "is a file; give a directory"),
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
