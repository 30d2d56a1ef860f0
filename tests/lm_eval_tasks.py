"""lm-evaluation-harness tasks over a local JSONL file and the comparison of two runs' samples, shared by the lm-eval
tests of the main suite (tests/test_lm_eval.py) and of the vLLM stage (tests/on_vllm/test_lm_eval_vllm.py)."""

from __future__ import annotations

import json

TOL = 1e-4
DOCS = [
    {
        "question": f"What is {a} plus {b}?",
        "choices": [str(a + b), str(a + b + 1), "none of them"],
        "answer": 0,
        "text": f"The sum of {a} and {b} is {a + b}, as every table of sums says. " * 3,
    }
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]
]
TASKS = ("ivl_mc", "ivl_gen", "ivl_ppl")


def write_tasks(directory) -> None:
    """A multiple_choice, a generate_until and a loglikelihood_rolling task over one local JSONL file."""
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\nfewshot_split: test\n"
    )
    (directory / "ivl_mc.yaml").write_text(
        "task: ivl_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (directory / "ivl_gen.yaml").write_text(
        "task: ivl_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{choices[0]}}"\n'
        'generation_kwargs:\n  until: ["\\n", "st"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (directory / "ivl_ppl.yaml").write_text(
        "task: ivl_ppl\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
    )


def close_ll(got, want):
    assert len(got) == len(want)
    for i, ((a, ga), (b, gb)) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= TOL * max(1.0, abs(b)), (i, a, b)
        assert ga == gb, (i, ga, gb)


def same_samples(a: dict, b: dict, tasks, text=lambda t: t) -> None:
    """Per document of each task: the same requests (rendered prompts), the same answers (generated texts compared
    as ``text`` reads them)."""
    for task in tasks:
        sa, sb = a["samples"][task], b["samples"][task]
        assert len(sa) == len(sb) > 0, task
        for x, y in zip(sa, sb, strict=True):
            assert x["arguments"] == y["arguments"], (task, x["doc_id"])
            for rx, ry in zip(x["resps"], y["resps"], strict=True):
                (rx,), (ry,) = rx, ry
                if isinstance(rx, str):  # generate_until: the same text
                    assert text(rx) == text(ry), (task, x["doc_id"], rx, ry)
                elif isinstance(rx, tuple):  # loglikelihood: (log p, is_greedy)
                    close_ll([ry], [rx])
                else:  # loglikelihood_rolling
                    assert abs(rx - ry) <= TOL * max(1.0, abs(rx)), (task, rx, ry)
