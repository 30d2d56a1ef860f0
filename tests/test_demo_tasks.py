"""The miniature world as lm-eval tasks: lm-eval builds them offline from the written files, and on their
requests ivl-fast's scoring (scheme base) equals lm-eval's own HF model."""

from __future__ import annotations

import pytest

from ivl_fast.demo import make_world
from ivl_fast.demo.tasks import questions, write_tasks


def test_questions_hold_every_choice_and_the_right_one():
    world = make_world(20, 0)
    people = world["eval_people"][:4]
    qs = questions(world, people)
    assert len(qs) == 2 * len(people)
    for q, p in zip(qs[::2], people, strict=True):
        assert q["choices"][q["gold"]] == q["answer"] == f"ANSWER: {world['facts'][p]['city']}"
        assert len(set(q["choices"])) == len(q["choices"]) >= 2


def test_lm_eval_runs_the_tasks_and_ivl_scores_its_requests_as_hf_does(tmp_path, monkeypatch, pair):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ivl_fast import FastIVLDecoder

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, _, base_dir, _ = pair
    world = make_world(20, 0)
    tasks = write_tasks(world, world["eval_people"][:3], tmp_path / "tasks")
    hf = HFLM(pretrained=str(base_dir), device="cpu", dtype="float32", batch_size=4)
    res = lm_eval.simple_evaluate(
        model=hf,
        tasks=["ivl_demo_mc", "ivl_demo_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    assert res["results"]["ivl_demo_mc"]["sample_len"] == 6 and res["results"]["ivl_demo_gen"]["sample_len"] == 6
    dec = FastIVLDecoder.from_pretrained(base_dir, None, scheme="base")
    n = 0
    for s in res["samples"]["ivl_demo_mc"]:
        reqs = (
            [tuple(a) for a in s["arguments"].values()]
            if isinstance(s["arguments"], dict)
            else [tuple(a) for a in s["arguments"]]
        )
        ours = dec.loglikelihood(reqs)
        for (lp, greedy), theirs in zip(ours, s["resps"], strict=True):
            want_lp, want_greedy = float(theirs[0][0]), bool(theirs[0][1])
            assert abs(lp - want_lp) < 1e-4 and greedy == want_greedy
            n += 1
    assert n == sum(len(q["choices"]) for q in questions(world, world["eval_people"][:3]))


def test_task_files_written_under_a_relative_directory_work_from_any_other(tmp_path, monkeypatch):
    """The demo's task files name their data by an absolute path: lm-eval builds them from another directory."""
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    world = make_world(20, 0)
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    write_tasks(world, world["eval_people"][:2], "tasks")  # relative, as `--work-dir out` makes it
    data = (tmp_path / "run" / "tasks" / "ivl_demo_questions.jsonl").absolute()
    assert str(data) in (tmp_path / "run" / "tasks" / "ivl_demo_mc.yaml").read_text()
    monkeypatch.chdir(tmp_path / "elsewhere")
    manager = lm_eval_tasks.TaskManager(include_path=str(tmp_path / "run" / "tasks"))
    built = lm_eval_tasks.get_task_dict(["ivl_demo_mc"], manager)
    (task,) = built.values()
    assert len(list(task.eval_docs)) == 4
