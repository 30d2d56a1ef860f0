"""The demo's rows measured by lm-evaluation-harness, as the paper measures Table 1: the miniature world's
questions as a multiple-choice task scored by log-likelihood (like ARC / MMLU) and as a generation task
(``ivl_fast.demo.tasks``), run through ``lm_eval.simple_evaluate`` on the ``"ivl"`` model over each row's decoder.

Prompts are rendered with the chat template (lm-eval's ``apply_chat_template``), as the value network was trained
and as the demo's own greedy evaluation asks. Across vocabularies both tasks run too: the multiple choice is scored
under the distribution cross-vocabulary decoding samples from (:mod:`ivl_fast.decode.cross_vocab_scoring`).
"""

from __future__ import annotations

import os
from pathlib import Path

TASK_DIR = "lm_eval_tasks"  # under the demo's work dir; written (and rewritten) by the demo only


def lm_eval_rows(decs: dict, world: dict, people: list[str], work: Path, *, batch_size: int = 16) -> dict[str, dict]:
    """Run the two demo tasks on every decoder of ``decs`` (row name -> FastIVLDecoder) over ``people``; -> row name
    -> ``{"mc_acc", "mc_acc_norm", "gen_exact_match", "mc_note"}`` (``mc_note``: why a figure is missing; None)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm_eval imports datasets: local JSON tasks only
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ..lm_eval import IVLLM, quiet_git
    from .tasks import write_tasks

    task_dir = write_tasks(world, people, work / TASK_DIR)
    manager = TaskManager(include_path=str(task_dir))
    out = {}
    for name, dec in decs.items():
        with quiet_git():  # lm-eval runs git once per call: outside a checkout, 23 lines of "fatal: ..." otherwise
            res = lm_eval.simple_evaluate(
                model=IVLLM.from_decoder(dec, batch_size=batch_size),
                tasks=["ivl_demo_mc", "ivl_demo_gen"],
                task_manager=manager,
                apply_chat_template=True,
                log_samples=False,
                verbosity="ERROR",
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )["results"]
        mc = res["ivl_demo_mc"]
        out[name] = {
            "mc_acc": mc["acc,none"],
            "mc_acc_norm": mc["acc_norm,none"],
            "gen_exact_match": res["ivl_demo_gen"]["exact_match,first_line"],
            "mc_note": None,
        }
    return out
