"""The miniature world as lm-evaluation-harness tasks, written as local files (no hub): a multiple-choice task
scored by log-likelihood like ARC / MMLU, and the generation task the demo table reports.

- ``ivl_demo_mc``: "Where does X live?" / "What color does X like?" with every city (or colour) of the world as
  the choices, each written in the post-training format ("ANSWER: Rome"); accuracy = the right choice has the
  highest log-likelihood (``acc``; ``acc_norm`` by length). With ``--apply_chat_template`` the question is
  rendered as a chat turn, as the value network was trained.
- ``ivl_demo_gen``: the same questions answered greedily (``until`` a newline, 12 tokens at most), exact match
  against "ANSWER: <word>".

``write_tasks(world, people, out_dir)`` writes ``<out_dir>/ivl_demo_{mc,gen}.yaml`` and their JSONL data; pass
``out_dir`` as lm-eval's ``--include_path`` (``TaskManager(include_path=...)``).
"""

from __future__ import annotations

import json
from pathlib import Path

_MC = """task: ivl_demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_GEN = """task: ivl_demo_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
filter_list:
  - name: first_line
    filter:
      - function: regex
        regex_pattern: "(ANSWER: \\\\S+?)\\\\.?$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
metadata:
  version: 1.0
"""


def questions(world: dict, people: list[str]) -> list[dict]:
    """The demo's questions about ``people``: {question, choices, gold, answer} per question (choices: every value
    the world has for that attribute, in the post-training format)."""
    cities = sorted({f["city"] for f in world["facts"].values()})
    colors = sorted({f["color"] for f in world["facts"].values()})
    out = []
    for p in people:
        f = world["facts"][p]
        for q, options, right in (
            (f"Where does {p} live?", cities, f["city"]),
            (f"What color does {p} like?", colors, f["color"]),
        ):
            out.append(
                {
                    "question": q,
                    "choices": [f"ANSWER: {o}" for o in options],
                    "gold": options.index(right),
                    "answer": f"ANSWER: {right}",
                }
            )
    return out


def write_tasks(world: dict, people: list[str], out_dir: str | Path) -> Path:
    """Write both tasks (YAML + JSONL) into ``out_dir`` (created; the files are ivl-fast's own and rewritten each
    run); -> out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out.absolute() / "ivl_demo_questions.jsonl"  # absolute: the task files work from any directory
    data.write_text("".join(json.dumps(q) + "\n" for q in questions(world, people)))
    (out / "ivl_demo_mc.yaml").write_text(_MC.format(data=json.dumps(str(data))))
    (out / "ivl_demo_gen.yaml").write_text(_GEN.format(data=json.dumps(str(data))))
    return out
