"""lm-eval's own command line with the model type "ivl" registered.

lm-evaluation-harness finds model types only in its own table (``lm_eval.models.MODEL_MAPPING``) and in modules
imported before it looks (it reads no plugin entry point for models), so the plain ``lm_eval`` command does not know
"ivl". This is that command after the one import (:mod:`ivl_fast.lm_eval`): every flag of ``lm_eval`` works as
documented there::

    python -m ivl_fast.lm_eval_cli --model ivl --model_args base=BASE_DIR,value=VALUE_DIR,alpha=1.0 \\
        --tasks arc_easy --num_fewshot 5 --batch_size auto --output_path results/ --log_samples

(``ivl-lm-eval`` is the same as a console script.) In Python, ``import ivl_fast.lm_eval`` before
``lm_eval.simple_evaluate(model="ivl", ...)`` does the same.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval  # noqa: F401  (registers the model type "ivl")

    cli_evaluate()


if __name__ == "__main__":
    main()
