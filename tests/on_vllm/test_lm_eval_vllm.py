"""lm-evaluation-harness's own ``vllm`` model on an exported pair (``--model vllm --model_args pretrained=DIR``):
the same requests and answers as ivl-fast's ``ivl`` model on the same checkpoints (multiple choice, greedy
generation, rolling log-likelihood), log-likelihoods within 1e-4. One engine (lm-eval's) for the module."""

from __future__ import annotations

import pytest
from vllm_fixtures import MAX_MODEL_LEN

from ivl_fast.tiny import make_tiny_pair
from ivl_fast.vllm import export_pair

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval_tasks import TASKS, same_samples, write_tasks  # noqa: E402

from ivl_fast.lm_eval import IVLLM  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_lm_eval")
    write_tasks(d)
    paths = make_tiny_pair(d / "ckpt", vocab_size=512, seed=0)
    out = export_pair(paths["base"], paths["value"], d / "pair")
    return paths, out, TaskManager(include_path=str(d), include_defaults=False)


def _evaluate(model, manager, **kw):
    return lm_eval.simple_evaluate(
        model=model,
        tasks=list(TASKS),
        num_fewshot=1,
        limit=4,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        **kw,
    )


def test_lm_eval_vllm_model_equals_ivl(setup):
    paths, out, manager = setup
    ours = _evaluate(IVLLM(base=str(paths["base"]), value=str(paths["value"]), dtype="float32"), manager)
    theirs = _evaluate(
        "vllm", manager, model_args=f"pretrained={out},dtype=float32,max_model_len={MAX_MODEL_LEN},seed=0"
    )
    # vLLM's detokenizer holds back an incomplete UTF-8 character at the end of a generation, where lm-eval's hf
    # model and ours decode its bytes as U+FFFD: the same tokens, one character less of text
    same_samples(ours, theirs, TASKS, text=lambda t: t.rstrip("\ufffd"))
    for task in TASKS:
        figures = {k: v for k, v in ours["results"][task].items() if isinstance(v, float)}
        assert figures and figures == pytest.approx({k: theirs["results"][task][k] for k in figures}, rel=1e-4), task
