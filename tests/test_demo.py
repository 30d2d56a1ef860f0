"""`ivl-fast demo --quick`: the whole pipeline end to end (pretraining, value training, fine-tuning, vocab map,
evaluation of every row, JSON/Markdown/PNG outputs), the cache on a second run, the two tokenizers really being
different, and README's table being exactly the committed results it claims. Not the science."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

import pytest
import torch
from doc_pages import documentation  # noqa: E402

from ivl_fast import FastIVLDecoder
from ivl_fast.cli import main as cli_main
from ivl_fast.demo import DemoConfig, demonstrations, make_tokenizers, make_world, pretraining_text
from ivl_fast.demo.report import ROW_NAMES, readme_block, seed_summary, to_markdown

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "demo_results.json"


def test_world_separates_demonstrated_and_evaluated_people():
    w = make_world(24, seed=0)
    assert not set(w["demo_people"]) & set(w["eval_people"])
    demo_text = json.dumps(demonstrations(w))
    assert all(p not in demo_text for p in w["eval_people"])  # held-out facts never appear in the demos
    assert make_world(24, seed=0) == w  # seeded


@pytest.mark.parametrize("quick", [True, False])
def test_the_two_tokenizers_are_of_different_kinds_and_sizes(quick):
    from ivl_fast.vocab.build import tokenizer_hash

    cfg = DemoConfig(quick=quick)
    w = make_world(cfg.n_people, 0)
    tok_a, tok_b = make_tokenizers(cfg, pretraining_text(w, w["people"], 6, 0))
    bpe, sp = cfg.tokenizer_sizes
    assert len(tok_a) == bpe and len(tok_b) == sp + 256  # exactly the sizes asked for (+ byte fallback)
    assert tokenizer_hash(tok_a) != tokenizer_hash(tok_b)
    a, b = set(tok_a.get_vocab()), set(tok_b.get_vocab())
    assert any("Ġ" in t for t in a) and not any("Ġ" in t for t in b)  # byte-level BPE vs SentencePiece "▁"
    assert any("▁" in t for t in b) and not any("▁" in t for t in a)
    text = f"{w['people'][0]} lives in {w['facts'][w['people'][0]]['city']}."
    assert tok_a.tokenize(text) != tok_b.tokenize(text)


def test_sentencepiece_style_tokenizer_round_trips_any_text_and_is_deterministic():
    from ivl_fast.tiny import corpus_text, train_sentencepiece_style_on
    from ivl_fast.vocab.build import tokenizer_hash

    texts = corpus_text(50_000).splitlines()
    tok = train_sentencepiece_style_on(texts, 300)
    assert len(tok) == 300 + 256
    assert tokenizer_hash(train_sentencepiece_style_on(texts, 300)) == tokenizer_hash(tok)
    for text in ["the cat sat", "unseen letters: qxz", "ünïcödé € 日本\nline two", "tabs\tand  spaces"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    with pytest.raises(ValueError, match="make .* tokens, not the 500 asked for"):
        train_sentencepiece_style_on(["the cat sat on the mat"] * 50, 500)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The first `ivl-fast demo --quick --json` run (from nothing): (work dir, parsed stdout, stderr, seconds)."""
    work = tmp_path_factory.mktemp("quick_demo") / "demo"
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["demo", "--quick", "--work-dir", str(work), "--json"])
    seconds = time.perf_counter() - t0
    assert rc == 0, err.getvalue()
    return work, json.loads(out.getvalue()), err.getvalue(), seconds


def test_quick_demo_end_to_end(quick_demo, tmp_path, capsys):
    work, out, first_err, first = quick_demo
    assert "building from nothing" in first_err
    assert [r["name"] for r in out["rows"]] == ROW_NAMES
    for r in out["rows"]:
        assert 0 <= r["accuracy"] <= r["format_rate"] <= 1 and r["questions"] == 16
        alone = r["name"] in ("small", "mid", "large", "continued", "other", "small_finetuned", "large_finetuned")
        assert (r["changed_fraction"] is None) == alone and (alone or 0 <= r["changed_fraction"] <= 1)
    toks = out["tokenizers"]
    a, b = toks["a (small, mid, large, continued, value)"], toks["b (other)"]
    assert a["hash"] != b["hash"] and a["size"] != b["size"]
    assert toks["map"]["shape"] == [b["size"], a["size"]]  # other (base) -> a (value): a real cross-vocab map
    prov = out["provenance"]
    assert prov["command"] == "ivl-fast demo --quick" and prov["machine"]["cores"] >= 1 and not prov["from_cache"]
    for f in ("results.json", "results.md", "results.png"):
        assert (work / f).stat().st_size > 0
    assert (work / "results.md").read_text() == to_markdown(out)
    assert (work / "value" / "ivl.json").is_file() and (work / "map_other_to_a.safetensors").is_file()
    # a second run reuses every artifact, says so, and evaluates to the same table
    t0 = time.perf_counter()
    assert cli_main(["demo", "--quick", "--work-dir", str(work), "--json"]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out)
    assert "reusing 18 models an earlier run built" in captured.err
    assert f"evaluating {len(ROW_NAMES)} rows" in captured.err
    stage_lines = [x for x in captured.err.splitlines() if x.startswith("demo: stage ")]
    assert [x.split()[2] for x in stage_lines] == [f"{i}/24" for i in range(1, 25)]
    assert sum("(reusing the work dir's)" in x for x in stage_lines) == 20  # every build stage: nothing retrained
    assert "fatal" not in captured.err
    assert again["provenance"]["from_cache"]
    assert again["tokenizers"] == out["tokenizers"]  # the cached tokenizers, the ones the models learnt
    assert [(r["accuracy"], r["format_rate"]) for r in again["rows"]] == [
        (r["accuracy"], r["format_rate"]) for r in out["rows"]
    ]
    assert time.perf_counter() - t0 < first
    # from scratch again, in another directory: the same tokenizers and the same table (one machine, one seed)
    assert cli_main(["demo", "--quick", "--work-dir", str(tmp_path / "again"), "--json"]) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert fresh["tokenizers"] == out["tokenizers"] and fresh["rows"] == [
        {**r, "seconds": f["seconds"]} for r, f in zip(out["rows"], fresh["rows"], strict=True)
    ]


ROW_MODELS = {  # the checkpoints (and weights) each same-vocabulary causal-LM row's logits are summed from
    "small": [("small", 1.0)],
    "mid": [("mid", 1.0)],
    "large": [("large", 1.0)],
    "continued": [("continued", 1.0)],
    "other": [("other", 1.0)],  # its own tokenizer (b): see _row_tokenizer
    "small_finetuned": [("small_finetuned", 1.0)],
    "large_finetuned": [("large_finetuned", 1.0)],
    "small+value": [("small", 1.0), ("value", 1.0)],
    "mid+value": [("mid", 1.0), ("value", 1.0)],
    "large+value": [("large", 1.0), ("value", 1.0)],
    "continued+value": [("continued", 1.0), ("value", 1.0)],
    "large+value_l1=0.01": [("large", 1.0), ("value_l1_0.01", 1.0)],
    "large+value_l1=0.1": [("large", 1.0), ("value_l1_0.1", 1.0)],
    "large+value_l1=1": [("large", 1.0), ("value_l1_1", 1.0)],
    "large+proxy": [("large", 1.0), ("small_finetuned", 1.0), ("small", -1.0)],
    "large+value_curriculum": [("large", 1.0), ("value_curriculum", 1.0)],
    "other+value_b": [("other", 1.0), ("value_b", 1.0)],  # tokenizer b
    "other+value_b_l1=1": [("other", 1.0), ("value_b_l1_1", 1.0)],  # tokenizer b
}
# recounted through the public API below: small+probe (not a causal LM: tests/test_probe.py checks its decoding
# against the definition), the cascade rows (tests/test_train.py checks cascade decoding against the definition)
# and other_vocab+value (across vocabularies)
API_ROWS = {
    "small+probe": ("small", "probe"),
    "small+value_cascade": ("small", "value_cascade"),
    "large+value_cascade": ("large", "value_cascade"),
    "small+value_cascade+": ("small", "value_cascade+"),
    "large+value_cascade+": ("large", "value_cascade+"),
}


def _row_tokenizer(work: Path, row: str):
    from ivl_fast.chat import load_tokenizer

    return load_tokenizer(work / ("other" if row in ("other", "other+value_b", "other+value_b_l1=1") else "small"))


def _float64_loader(work: Path):
    """name -> the demo's checkpoint ``work/name`` in plain transformers, float64, loaded once."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def hf(name):
        if name not in loaded:
            loaded[name] = AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float64).eval()
        return loaded[name]

    return hf


def _greedy_new_tokens(models, ids: list[int], n: int, eos_id: int) -> list[int]:
    """Greedy new ids under z = sum(alpha * logits) of ``models`` [(hf_model, alpha)]: a plain transformers loop
    (one prompt, no padding, its own KV cache), float64."""
    from transformers import DynamicCache

    new, caches, x = [], [DynamicCache() for _ in models], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            z = 0
            for (model, alpha), cache in zip(models, caches, strict=True):  # alpha: the model's weight in the sum
                # the cache goes 4th positionally: `past_key_values` in older transformers 5.x, `cache` in newer
                logits = model(x, None, None, cache, use_cache=True).logits
                z = z + alpha * logits[0, -1].double()  # [V]
            top2 = z.topk(2).values
            assert top2[0] - top2[1] > 1e-4, "near-tie: the demo's float32 greedy answer is not well defined here"
            new.append(int(z.argmax()))
            if new[-1] == eos_id:
                break
            x = torch.tensor([[new[-1]]])
    return new


def _answer_word(text: str) -> str | None:
    """The documented answer format, "ANSWER: <word>", on the first line of the answer: the word (a trailing
    full stop dropped), or None when the line is not in the format."""
    lines = text.strip().splitlines()
    m = re.match(r"ANSWER: +(\S+)", lines[0]) if lines else None
    return m.group(1).rstrip(".") if m else None


def test_quick_demo_accuracy_and_format_rate_are_a_recount_of_its_answers(quick_demo):
    """Each row's accuracy and format rate equal a recount over the row's own greedy answers to the held-out
    questions, regenerated here from the demo's checkpoints (plain transformers; residual rows: base + value
    logits) and parsed by _answer_word. The cross-vocabulary row is regenerated one question at a time through
    the public generate_text (the demo decodes all questions in one padded batch)."""

    from ivl_fast import FastIVLDecoder
    from ivl_fast.chat import load_tokenizer

    work, out, _, _ = quick_demo
    cfg = DemoConfig(quick=True)
    world = make_world(cfg.n_people, cfg.seed)
    qa = []  # (question, answer): the demo's two questions about each evaluated person
    for p in world["eval_people"][: cfg.eval_people]:
        qa += [
            (f"Where does {p} live?", world["facts"][p]["city"]),
            (f"What color does {p} like?", world["facts"][p]["color"]),
        ]
    assert len(qa) == out["rows"][0]["questions"]
    tok = load_tokenizer(work / "small")
    assert tok.chat_template is None  # so the documented default chat format applies, written out here
    prompts = [f"{tok.bos_token}<|user|>\n{q}\n<|assistant|>\n" for q, _ in qa]  # both tokenizers' BOS is <s>

    def recount(texts):
        words = [_answer_word(t) for t in texts]
        n = len(qa)
        return sum(w == a for w, (_, a) in zip(words, qa, strict=True)) / n, sum(w is not None for w in words) / n

    hf = _float64_loader(work)

    models_of = ROW_MODELS  # the residual value checkpoints record their scheme; the demo decodes with alpha 1
    for name in ("value", "value_l1_0.01", "value_l1_0.1", "value_l1_1", "value_curriculum", "value_b", "value_b_l1_1"):
        assert json.loads((work / name / "ivl.json").read_text())["scheme"] == "residual"
    got = {r["name"]: (r["accuracy"], r["format_rate"]) for r in out["rows"]}
    want = {}
    for row, parts in models_of.items():
        models = [(hf(m), w) for m, w in parts]
        rtok = _row_tokenizer(work, row)
        texts = []
        for prompt in prompts:
            ids = rtok(prompt, add_special_tokens=False)["input_ids"]
            texts.append(rtok.decode(_greedy_new_tokens(models, ids, 12, rtok.eos_token_id), skip_special_tokens=True))
        want[row] = recount(texts)
    for row, value in (("other_vocab+value", "value"), ("other_vocab+value_l1=1", "value_l1_1")):
        cross = FastIVLDecoder.from_pretrained(
            work / "other", work / value, vocab_map=work / "map_other_to_a.safetensors"
        )
        want[row] = recount([cross.generate_text(q, chat=True, max_new_tokens=12) for q, _ in qa])
    for row, (base, value) in API_ROWS.items():
        dec = FastIVLDecoder.from_pretrained(work / base, work / value)  # the scheme from the value's ivl.json
        assert dec.scheme == json.loads((work / value / "ivl.json").read_text())["scheme"] != "residual"
        want[row] = recount([dec.generate_text(q, chat=True, max_new_tokens=12) for q, _ in qa])
    assert got == want
    # the recount is not vacuous: some answers are in the format, some are right, some are not in the format
    assert any(f > 0 for _, f in want.values()) and any(a > 0 for a, _ in want.values())
    assert any(f < 1 for _, f in want.values())


def test_quick_demo_lm_eval_scores_are_a_recount_from_transformers_models(quick_demo):
    """Each same-vocabulary row's lm-eval multiple-choice accuracy is a recount here: for every question, the
    choice with the highest summed log-probability of its tokens after the chat-rendered question, under the
    row's models in plain transformers (float64, residual rows: base + value logits); split into context and
    continuation as lm-eval does (the whole text's tokens after the context's). Generation exact match: the
    greedy answer cut at the first newline, in the format, with the right word. The cross-vocabulary row's multiple
    choice is recounted through the decoder's own loglikelihood."""

    from ivl_fast.chat import load_tokenizer
    from ivl_fast.demo.tasks import questions

    work, out, _, _ = quick_demo
    cfg = DemoConfig(quick=True)
    world = make_world(cfg.n_people, cfg.seed)
    qs = questions(world, world["eval_people"][: cfg.eval_people])
    tok = load_tokenizer(work / "small")
    hf = _float64_loader(work)

    def summed_logits(parts, ids):
        with torch.no_grad():
            return sum(w * hf(n)(torch.tensor([ids])).logits[0] for n, w in parts)  # [T, V]

    rows = {r["name"]: r for r in out["rows"]}
    models_of = ROW_MODELS
    for row, names in models_of.items():
        tok = _row_tokenizer(work, row)
        right = exact = 0
        for q in qs:
            context = f"{tok.bos_token}<|user|>\n{q['question']}\n<|assistant|>\n"
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            scores = []
            for choice in q["choices"]:
                whole = tok(context + choice, add_special_tokens=False)["input_ids"]
                assert whole[: len(ctx)] == ctx
                lp = summed_logits(names, whole).log_softmax(-1)
                scores.append(sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            best = max(range(len(scores)), key=scores.__getitem__)
            assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-6, "a tie: the float32 pick is not well defined"
            right += best == q["gold"]
            new = _greedy_new_tokens([(hf(n), w) for n, w in names], ctx, 12, tok.eos_token_id)
            first_line = tok.decode(new, skip_special_tokens=True).split("\n")[0]
            m = re.search(r"(ANSWER: \S+?)\.?$", first_line)
            exact += m is not None and m.group(1) == q["answer"]
        got = rows[row]["lm_eval"]
        assert got["mc_acc"] == pytest.approx(right / len(qs)), row
        assert got["gen_exact_match"] == pytest.approx(exact / len(qs)), row
        assert 0 <= got["mc_acc_norm"] <= 1 and got["mc_note"] is None
    # across vocabularies: the same recount through the decoder's public loglikelihood (its scores are checked
    # against the definition in tests/test_cross_vocab_scoring.py), the base reading each context's text
    # and the generation task through generate_text (the chat turn rendered, the base reading its text)
    for row, value in (("other_vocab+value", "value"), ("other_vocab+value_l1=1", "value_l1_1")):
        cross = FastIVLDecoder.from_pretrained(
            work / "other", work / value, vocab_map=work / "map_other_to_a.safetensors"
        )
        tok = cross.tokenizer
        right = exact = 0
        for q in qs:
            context = f"{tok.bos_token}<|user|>\n{q['question']}\n<|assistant|>\n"
            scores = [lp for lp, _ in cross.loglikelihood([(context, choice) for choice in q["choices"]])]
            right += max(range(len(scores)), key=scores.__getitem__) == q["gold"]
            first_line = cross.generate_text(q["question"], chat=True, max_new_tokens=12).split("\n")[0]
            m = re.search(r"(ANSWER: \S+?)\.?$", first_line)
            exact += m is not None and m.group(1) == q["answer"]
        got = rows[row]["lm_eval"]
        assert got["mc_acc"] == pytest.approx(right / len(qs)) and got["mc_note"] is None, row
        assert got["gen_exact_match"] == pytest.approx(exact / len(qs)), row


def test_readme_demo_results_are_the_committed_runs():
    """README's demo block is readme_block() of docs/demo_results*.json: the full seed-0 run with its command,
    machine and commit, and every row's range over the other seeds (regenerate: docs/update_readme.py)."""
    main = json.loads(COMMITTED.read_text())
    others = [json.loads(p.read_text()) for p in sorted(COMMITTED.parent.glob("demo_results_seed*.json"))]
    readme = documentation()
    assert readme_block(main, others) in readme, "README's demo results differ from docs/: run docs/update_readme.py"
    summary = json.loads((ROOT / "docs" / "demo_summary.json").read_text())
    assert summary == json.loads(json.dumps(seed_summary([main, *others]))), "docs/demo_summary.json is stale"
    assert (ROOT / "docs" / "demo_seeds.png").stat().st_size > 0
    assert not main["world"]["quick"] and main["provenance"]["command"] == "ivl-fast demo"
    assert main["provenance"]["commit"] and not main["provenance"]["from_cache"]
    vb, vv = main["tokenizers"]["map"]["shape"]
    assert f"vocabulary map ({vb} x {vv})" in " ".join(readme.split())
    assert len(others) >= 2 and {r["world"]["seed"] for r in others} == {1, 2}
    for r in others:  # the same demo, the same machine, the same code
        assert r["provenance"]["machine"] == main["provenance"]["machine"]
        assert r["provenance"]["commit"] == main["provenance"]["commit"] and not r["world"]["quick"]


def test_readme_demo_prose_holds_for_every_committed_run():
    """The claims README makes in words about the demo, checked against docs/demo_results*.json."""
    runs = [json.loads(p.read_text()) for p in sorted(COMMITTED.parent.glob("demo_results*.json"))]
    assert len(runs) == 3
    # "changed the base's first choice at A% to B% of the answers' tokens over the three seeds"
    changed = [x["changed_fraction"] for r in runs for x in r["rows"] if x["changed_fraction"] is not None]
    text = " ".join(documentation().split())
    assert f"first choice at {min(changed):.0%} to {max(changed):.0%} of the answers' tokens" in text
    for r in runs:
        acc = {x["name"]: x["accuracy"] for x in r["rows"]}
        fmt = {x["name"]: x["format_rate"] for x in r["rows"]}
        mc = {x["name"]: x["lm_eval"]["mc_acc"] for x in r["rows"]}
        for row in ("small+value", "mid+value", "large+value", "continued+value"):
            assert fmt[row] >= 0.95  # "(nearly) every answer"
        assert acc["small+value"] < acc["mid+value"] < acc["large+value"]  # "small+value < mid+value < large+value"
        assert acc["large_finetuned"] - acc["large+value"] <= 0.06  # "within 0.06 of the fully fine-tuned large"
        assert acc["small+value"] <= 0.4  # "caps near a third"
        assert fmt["continued"] == 0 and acc["continued+value"] > acc["small+value"]  # continual pretraining
        assert abs(acc["small_finetuned"] - acc["small+value"]) <= 0.07  # "within 0.07"
        assert acc["large+value_l1=1"] >= acc["large+value"]  # "at least as good as no L1"
        assert abs(acc["small+probe"] - acc["small+value"]) <= 0.07  # the probe on its training base
        assert acc["large+proxy"] >= acc["large+value"]  # "at least as good as large+value in every seed"
        schemes = [acc["small+value"], acc["small+value_cascade"], acc["small+value_cascade+"]]
        assert max(schemes) - min(schemes) <= 0.05  # "within 0.05 of each other"
        assert min(acc["large+value_cascade"], acc["large+value_cascade+"]) >= acc["large+value"]  # transferred
        assert acc["large+value_curriculum"] < acc["large+value"]  # the curriculum: "does worse ... in every seed"
        assert acc["other+value_b"] > 0.9  # "its own family's value network transfers to it (above 0.9)"
        # Figure 4: "lifts the other-tokenizer base from its accuracy alone (0.28 at most) to 0.86 or more in every
        # seed, every answer in the format, within 0.04 of ... large+value"; its MC "now scored"
        cross = next(x for x in r["rows"] if x["name"] == "other_vocab+value")
        assert acc["other"] <= 0.28 and acc["other_vocab+value"] >= 0.86 and fmt["other_vocab+value"] == 1.0
        assert abs(acc["other_vocab+value"] - acc["large+value"]) <= 0.04 and cross["lm_eval"]["mc_acc"] is not None
        assert mc["other"] >= 0.95  # the base alone knows the facts
        pr = r["premise"]
        for b in ("mid", "large", "continued"):
            assert pr["kl"][b]["format"] < 1.1 and pr["kl"][b]["content"] > 1.8  # "below 1.1 ... above 1.8"
        for b in ("large", "continued", "other"):
            assert mc[b] >= 0.83  # "about 0.9-1.0"
        assert 0.25 <= mc["small"] <= 0.45  # "about a third"
        assert (
            r["tokenizers"]["a (small, mid, large, continued, value)"]["hash"] != r["tokenizers"]["b (other)"]["hash"]
        )
    # "does better in two seeds of three"; "0.93 and 1.07 of its accuracy in two seeds and 0.88 in the third"
    by_seed = [{x["name"]: x["accuracy"] for x in r["rows"]} for r in runs]
    # at L1 1: "0.91 or more in every seed by all three measures"; "0.91, 1.00 and 1.10 of ... accuracy"; "at L1 1
    # both rows gain"; "now both 0.86" (seed 0's lm-eval generation figure equals the demo's own accuracy)
    for r in runs:
        row = next(x for x in r["rows"] if x["name"] == "other_vocab+value_l1=1")
        assert min(row["accuracy"], row["lm_eval"]["mc_acc"], row["lm_eval"]["gen_exact_match"]) >= 0.91
    ratios_l1 = [a["other_vocab+value_l1=1"] / a["other+value_b_l1=1"] for a in by_seed]
    assert sorted(round(x, 2) for x in ratios_l1) == [0.91, 1.0, 1.1]
    assert all(a["other_vocab+value_l1=1"] > a["other_vocab+value"] for a in by_seed)
    assert all(a["large+value_l1=1"] > a["large+value"] for a in by_seed)
    seed0 = next(x for x in runs[0]["rows"] if x["name"] == "other_vocab+value")
    assert seed0["lm_eval"]["gen_exact_match"] == seed0["accuracy"] == 0.8625
    ratios = sorted(a["other_vocab+value"] / a["other+value_b"] for a in by_seed)
    assert sum(a["other+value_b"] > a["other_vocab+value"] for a in by_seed) == 2
    assert [round(x, 2) for x in ratios] == [0.88, 0.93, 1.07]
    # "it varies by seed": the value network's logits are not larger at the format position in every seed
    assert not all(r["premise"]["value_abs"]["format"] > r["premise"]["value_abs"]["content"] for r in runs)
