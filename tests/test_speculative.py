"""Speculative IVL decoding: a small draft base + the value network propose tokens, the large base + the value
network verify them. Greedy output equals plain IVL decoding token for token; sampled output is distributed
exactly as plain IVL sampling (checked by frequency against the enumerated distribution); the round runs as a
captured graph (emulated on CPU); bad combinations are refused."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder
from ivl_fast.decode.slot_request import SlotRequest
from ivl_fast.sampling import SamplingParams, apply_penalties, warp_logits

PROMPTS = [[1, 5, 9, 22, 7], [1, 40, 41], [1, 8, 9, 10, 11, 12, 13, 14], [1, 300]]


@pytest.fixture(scope="module")
def models():
    """(base, value, draft, same): hf models; ``draft`` disagrees with the base (another init), ``same`` is the
    base itself (every draft accepted)."""
    base = build_model("llama", seed=0, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    value = build_model("llama", seed=1)
    draft = build_model("llama", seed=2)
    return base, value, draft, base


def _dec(models, draft="draft", k=3, **kw):
    base, value, d, same = models
    drafts = {"draft": d, "same": same, None: None}
    graphs = kw.pop("graphs", "off")
    return FastIVLDecoder(base, value, graphs=graphs, draft_model=drafts[draft], num_draft_tokens=k, **kw)


def test_lean_extend_equals_the_full_forward(models):
    """extend() over M tokens from each row's own position gives the logits of a full pass, and leaves the cache
    as M decode steps would (rows of different lengths)."""
    from ivl_fast.models import from_hf_model

    eng = from_hf_model(models[0])
    ids = torch.tensor([[3, 3, 1, 5, 9], [1, 40, 41, 42, 43]])
    mask = ids != 3
    eng.allocate(2, 32)
    eng.prefill(ids, mask)
    more = torch.tensor([[7, 8, 9], [10, 11, 12]])
    got = eng.extend(more, kv_len=16)
    for r in range(2):
        full = torch.cat([ids[r][mask[r]], more[r]])
        want = eng(full[None])[0, -3:]
        torch.testing.assert_close(got[r], want, atol=1e-4, rtol=1e-4)
    assert eng.seq_lens.tolist() == [6, 8]
    nxt = eng.decode(torch.tensor([20, 21]))
    for r in range(2):
        full = torch.cat([ids[r][mask[r]], more[r], torch.tensor([20 + r])])
        torch.testing.assert_close(nxt[r], eng(full[None])[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("draft", ["draft", "same"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_equals_plain_decoding_token_for_token(models, draft, k):
    plain = _dec(models, None).generate(PROMPTS, max_new_tokens=17, eos_token_id=[], return_logprobs=True)
    spec = _dec(models, draft, k).generate(PROMPTS, max_new_tokens=17, eos_token_id=[], return_logprobs=True)
    assert torch.equal(spec.sequences, plain.sequences)
    torch.testing.assert_close(spec.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)
    assert torch.equal(spec.num_new_tokens, plain.num_new_tokens)
    t = spec.timings
    assert t["num_draft_tokens"] == k and t["drafted"] > 0 and 0 <= t["accepted"] <= t["drafted"]
    assert t["acceptance_rate"] == pytest.approx(t["accepted"] / t["drafted"])
    if draft == "same":  # the draft is the target: every token accepted, k + 1 per round
        assert t["acceptance_rate"] == 1.0 and t["rounds"] == math.ceil(16 / (k + 1))
    else:
        assert t["acceptance_rate"] < 0.5  # another init disagrees: the rejection path ran


def test_greedy_equal_with_eos_budgets_stop_strings_penalties(models, tokenizer):
    """EOS ids that occur mid-round, a stop string, repetition / presence penalties: the same as plain."""
    plain = _dec(models, None, tokenizer=tokenizer)
    ref = plain.generate(PROMPTS, max_new_tokens=20, eos_token_id=[])
    new = ref.sequences[:, ref.prompt_length :]
    eos = [int(new[0, 5]), int(new[2, 3])]  # tokens the rows really produce, mid-sequence
    for kw in (
        dict(eos_token_id=eos),
        dict(eos_token_id=[], repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
        dict(eos_token_id=eos, max_new_tokens=7),
        dict(eos_token_id=[], stop_strings=[tokenizer.decode(new[1, 4:6].tolist())]),
    ):
        kw = {"max_new_tokens": 20, **kw}
        want = plain.generate(PROMPTS, **kw)
        for k in (2, 3):
            got = _dec(models, "draft", k, tokenizer=tokenizer).generate(PROMPTS, **kw)
            assert torch.equal(got.sequences, want.sequences), kw
            assert torch.equal(got.num_new_tokens, want.num_new_tokens), kw


def test_streaming_equals_plain_streaming(models):
    plain = list(_dec(models, None).stream(PROMPTS, max_new_tokens=12, eos_token_id=[2, 77]))
    spec = list(_dec(models, "draft", 3).stream(PROMPTS, max_new_tokens=12, eos_token_id=[2, 77]))
    assert len(spec) == len(plain) and all(torch.equal(a, b) for a, b in zip(spec, plain, strict=True))


def test_num_return_sequences_with_a_single_token_support(models):
    """Sampling with top_k=1 is deterministic, so speculative and plain runs must agree for every return
    sequence (the sampling path, with rows laid out as in transformers)."""
    kw = dict(max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=1, num_return_sequences=3, seed=5)
    want = _dec(models, None).generate(PROMPTS[:2], **kw)
    got = _dec(models, "draft", 2).generate(PROMPTS[:2], **kw)
    assert got.sequences.shape[0] == 6 and torch.equal(got.sequences, want.sequences)


def test_emulated_graphs_equal_eager(models):
    for kw in (
        dict(eos_token_id=[2]),
        dict(eos_token_id=[], do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=3),
        dict(eos_token_id=[], repetition_penalty=1.2, return_logprobs=True),
    ):
        eager = _dec(models, "draft", 3).generate(PROMPTS, max_new_tokens=14, **kw)
        dec = _dec(models, "draft", 3, graphs="emulate")
        graphed = dec.generate(PROMPTS, max_new_tokens=14, **kw)
        assert graphed.timings["graphs"] == "emulate" and graphed.timings["graph_captures"] >= 1
        assert torch.equal(graphed.sequences, eager.sequences), kw
        again = dec.generate(PROMPTS, max_new_tokens=14, **kw)  # replayed from the cache
        assert again.timings["graph_captures"] == 0 and torch.equal(again.sequences, eager.sequences)
        for key in ("rounds", "drafted", "accepted"):  # the counters the replayed graphs update are this call's
            assert again.timings[key] == graphed.timings[key] == eager.timings[key], key


# ---------------------------------------------------------------------------------------- the output law
def _target_law(models, prompt, n, sp: SamplingParams):
    """Exact distribution of the first ``n`` new tokens under plain IVL sampling: {tuple: prob}, enumerated over
    the warped support (float64, the reference warpers on base + value logits)."""
    base, value = models[0], models[1]
    law = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in law.items():
            ids = torch.tensor([prompt + list(seq)])
            with torch.no_grad():
                z = (base(ids).logits[0, -1] + value(ids).logits[0, -1]).double()[None]
            if sp.penalties_on:
                counts = torch.zeros_like(z, dtype=torch.int32)
                for t in seq:
                    counts[0, t] += 1
                pm = torch.zeros_like(z, dtype=torch.bool)
                pm[0, prompt] = True
                z = apply_penalties(z, pm, counts, sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty)
            p = warp_logits(z, sp.temperature, sp.top_k, sp.top_p, sp.min_p).softmax(-1)[0]
            for t in p.nonzero().flatten().tolist():
                nxt[seq + (t,)] = pr * float(p[t])
        law = nxt
    return law


def _chi2_ok(counts: dict, law: dict, n: int) -> tuple[float, float]:
    """(statistic, threshold): Pearson chi-square over the law's cells (cells of expected count < 5 pooled),
    threshold at p = 1e-4 by the Wilson-Hilferty approximation."""
    assert set(counts) <= set(law), "a sequence outside the target's support was produced"
    cells, pool_o, pool_e = [], 0, 0.0
    for seq, pr in law.items():
        e, o = pr * n, counts.get(seq, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
        else:
            cells.append((o, e))
    if pool_e > 0:
        cells.append((pool_o, pool_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "draft,k,options",
    [
        ("draft", 2, dict(temperature=1.0, top_k=4)),  # the draft's top-4 support differs from the target's
        ("draft", 1, dict(temperature=0.5, top_p=0.5)),
        ("same", 1, dict(temperature=0.8, top_k=5, repetition_penalty=1.5)),  # token 3 is always a bonus token
    ],
)
def test_sampled_output_follows_plain_ivl_sampling(models, draft, k, options):
    """Three new tokens per sample: the first from the prefill, then one speculative round (k = 2: two drafts,
    the third token cut by the budget; k = 1: a draft, then the correction or the bonus token), 3000 samples
    against the exact enumerated law."""
    prompt, n, samples = [1, 5, 9, 22], 3, 3000
    sp = SamplingParams(do_sample=True, **options)
    law = _target_law(models, prompt, n, sp)
    dec = _dec(models, draft, k)
    out = dec.generate(
        [prompt], max_new_tokens=n, eos_token_id=[], do_sample=True, num_return_sequences=samples, seed=11, **options
    )
    got: dict = {}
    for row in out.sequences[:, len(prompt) :].tolist():
        got[tuple(row)] = got.get(tuple(row), 0) + 1
    stat, limit = _chi2_ok(got, law, samples)
    assert stat < limit, (stat, limit)
    if draft == "draft":
        assert out.timings["acceptance_rate"] < 0.9  # rejections happened: the residual law was exercised
    else:
        assert out.timings["acceptance_rate"] > 0.99


def test_refusals(models, tokenizer):
    base, value, draft, _ = models
    other_vocab = build_model("llama", seed=3, vocab_size=300)
    with pytest.raises(ValueError, match="draft model's vocabulary"):
        FastIVLDecoder(base, value, draft_model=other_vocab)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        FastIVLDecoder(base, value, draft_model=draft, num_draft_tokens=0)
    with pytest.raises(ValueError, match="scheme 'residual' or 'base'"):
        FastIVLDecoder(base, value, draft_model=draft, scheme="cascade")
    dec = FastIVLDecoder(base, value, draft_model=draft)
    with pytest.raises(ValueError, match=r"max_seq_len must be an integer in \[2, 251\]"):
        dec.open_batch(2, 256)  # the context minus the k + 1 tokens a round reads past a row's end
    with pytest.raises(ValueError, match="num_draft_tokens 4"):
        dec.generate([[1] * 200], max_new_tokens=60)


def test_base_alone_with_a_draft_is_plain_speculative_decoding(models):
    base, _, draft, _ = models
    plain = FastIVLDecoder(base, None, scheme="base", graphs="off").generate(PROMPTS, max_new_tokens=12)
    spec = FastIVLDecoder(base, None, scheme="base", graphs="off", draft_model=draft, num_draft_tokens=3)
    assert torch.equal(spec.generate(PROMPTS, max_new_tokens=12).sequences, plain.sequences)


# ---------------------------------------------------------------------------------------- CLI and lm-eval
@pytest.fixture(scope="module")
def draft_dir(save_checkpoint):
    return save_checkpoint(build_model("llama", seed=2), "draft")


def _cli(capsys, *argv):
    from ivl_fast.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generate_with_a_draft_prints_the_same_text_and_the_acceptance(capsys, pair, draft_dir):
    import json

    _, _, base_dir, value_dir = pair
    common = ["generate", "--base", base_dir, "--value", value_dir, "--prompt", "def main", "--max-new-tokens", "12"]
    rc, plain, _ = _cli(capsys, *common, "--json", "--no-progress")
    assert rc == 0
    rc, spec, err = _cli(capsys, *common, "--draft", draft_dir, "--num-draft-tokens", "3", "--json", "--no-progress")
    assert rc == 0, err
    plain, spec = json.loads(plain), json.loads(spec)
    assert spec["outputs"] == plain["outputs"]
    s = spec["speed"]["speculative"]
    assert s["num_draft_tokens"] == 3 and s["rounds"] >= 1 and 0 <= s["accepted"] <= s["drafted"]
    assert "drafted tokens accepted" in err
    rc, _, err = _cli(capsys, *common, "--num-draft-tokens", "3")
    assert rc == 2 and "--num-draft-tokens needs --draft" in err


def test_lm_eval_model_args_take_a_draft(pair, draft_dir):
    pytest.importorskip("lm_eval")
    from ivl_fast.lm_eval import IVLLM

    _, _, base_dir, value_dir = pair
    lm = IVLLM(base=str(base_dir), value=str(value_dir), draft=str(draft_dir), num_draft_tokens="2")
    assert lm.dec.draft is not None and lm.dec.num_draft_tokens == 2
    with pytest.raises(ValueError, match="num_draft_tokens needs draft"):
        IVLLM(base=str(base_dir), value=str(value_dir), num_draft_tokens=2)
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer"):
        IVLLM(base=str(base_dir), value=str(value_dir), draft=str(draft_dir), num_draft_tokens="x")


def test_cli_eval_with_a_draft_gives_the_same_results(pair, draft_dir, tmp_path, capsys):
    """`ivl-fast eval --draft`: lm-eval's generation results (greedy) are those of the run without a draft."""
    pytest.importorskip("lm_eval")
    import json

    from lm_eval_tasks import write_tasks

    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks")
    _, _, base_dir, value_dir = pair
    results = []
    for extra in ([], ["--draft", draft_dir, "--num-draft-tokens", "2"]):
        out = tmp_path / f"out{len(results)}"
        out.mkdir()
        argv = ["eval", "--base", base_dir, "--value", value_dir, "--tasks", "ivl_gen", "--include-path"]
        argv += [tmp_path / "tasks", "--limit", 3, "--output-path", out, "--device", "cpu", *extra]
        rc, _, err = _cli(capsys, *argv)
        assert rc == 0, err
        (written,) = out.glob("*/results_*.json")  # lm-eval's layout: DIR/<model>/results_<time>.json
        results.append(json.loads(written.read_text()))
    assert results[1]["config"]["model_args"]["draft"] == str(draft_dir)
    assert results[0]["results"] == results[1]["results"]


def test_a_continuous_speculative_batch_decodes_each_greedy_request_as_alone(models):
    """open_batch with a draft: requests join between rounds, leave, and a freed slot is reused; every greedy row
    equals plain decoding alone (rows emit 1 to k + 1 tokens per round, at different positions)."""
    plain = _dec(models, None)
    dec = _dec(models, "draft", k=3)
    budgets = [11, 4, 9, 7]
    want = [
        plain.generate([p], max_new_tokens=n, eos_token_id=[]).sequences[0, len(p) :].tolist()
        for p, n in zip(PROMPTS, budgets, strict=True)
    ]
    batch = dec.open_batch(slots=3, max_seq_len=40, eos_token_id=[])
    slots = {0: batch.admit(PROMPTS[0], budgets[0])}
    batch.step()
    slots.update(zip((1, 2), batch.admit_many([(PROMPTS[1], budgets[1]), (PROMPTS[2], budgets[2])]), strict=True))
    got = {}
    while len(got) < 4:
        batch.step()
        for i, s in list(slots.items()):
            if i not in got and batch.is_finished(s):
                got[i] = batch.tokens(s)
                batch.retire(s)
                if i == 1:
                    slots[3] = batch.admit(PROMPTS[3], budgets[3])  # takes the freed slot
        assert batch.rounds < 40
    assert [got[i] for i in range(4)] == want
    assert batch.timings()["accepted"] > 0
    with pytest.raises(ValueError, match="^top_logprobs and components are not supported with a draft model"):
        dec.open_batch(slots=1, max_seq_len=40, top_logprobs=2)
    with pytest.raises(ValueError, match="per_request=True"):
        batch.admit(PROMPTS[0], 3, alpha=0.5)
    with pytest.raises(ValueError, match="alpha=0.5 differs from the decoder's 1.0: speculative rounds combine"):
        dec.open_batch(slots=1, max_seq_len=40, per_request=True).admit(PROMPTS[0], 3, alpha=0.5)


def test_per_request_values_in_a_speculative_batch_follow_plain_sampling(models):
    """per_request=True with a draft: greedy rows (temperature 0) and sampled rows (their own temperature and
    top_k) in one batch; the greedy rows equal plain greedy decoding, the sampled rows' 3-token outputs follow the
    exact law of plain IVL sampling (chi-square)."""
    prompt, n, samples = [1, 5, 9, 22], 3, 1500
    options = dict(temperature=1.0, top_k=4)
    sp = SamplingParams(do_sample=True, **options)
    law = _target_law(models, prompt, n, sp)
    greedy = _dec(models, None).generate([prompt], max_new_tokens=n, eos_token_id=[]).sequences[0, 4:].tolist()
    dec = _dec(models, "draft", k=2)
    batch = dec.open_batch(slots=samples + 4, max_seq_len=16, eos_token_id=[], per_request=True, seed=5)
    g = [(prompt, n, dec.options(do_sample=False).sampling)] * 4
    slots = batch.admit_many(g + [(prompt, n, sp)] * samples)
    while not batch.step():
        pass
    assert all(batch.tokens(s) == greedy for s in slots[:4])
    got: dict = {}
    for s in slots[4:]:
        t = tuple(batch.tokens(s))
        got[t] = got.get(t, 0) + 1
    stat, limit = _chi2_ok(got, law, samples)
    assert stat < limit, (stat, limit)
    with pytest.raises(ValueError, match="seed with sampling is not supported with a draft model"):
        batch.check_request(0, SlotRequest(prompt, 2, sp, seed=3))


def test_sampled_logprobs_are_the_targets_at_the_emitted_tokens(models):
    """Sampling with a draft and return_logprobs: each emitted token's logprob is log_softmax(z_base + z_value) at
    it (no penalties: the distribution before the warpers, top-k among them), so a row's sum is its continuation's
    log-likelihood."""
    dec = _dec(models, "draft", 2)
    out = dec.generate(
        PROMPTS[:2], max_new_tokens=7, eos_token_id=[], do_sample=True, top_k=4, seed=5, return_logprobs=True
    )
    assert out.timings["acceptance_rate"] < 0.9  # rejections: the sampled rounds' residual path ran
    t = out.prompt_length
    for r, p in enumerate(PROMPTS[:2]):
        ((lp, _),) = dec.loglikelihood([(p, out.sequences[r, t:].tolist())])
        assert float(out.logprobs[r].sum()) == pytest.approx(lp, abs=1e-3)


def test_a_stronger_frequency_penalty_counts_each_draft_once(models):
    """Greedy with a frequency penalty strong enough to flip choices: a draft counted by the positions after it in
    its round once, as plain decoding counts an emitted token."""
    want = _dec(models, None).generate(PROMPTS, max_new_tokens=20, eos_token_id=[], frequency_penalty=0.6)
    for k in (2, 4):
        got = _dec(models, "same", k).generate(PROMPTS, max_new_tokens=20, eos_token_id=[], frequency_penalty=0.6)
        assert torch.equal(got.sequences, want.sequences), k


def test_acceptance_counts_only_the_rows_still_decoding(models):
    """With the base as its own draft every draft is accepted: accepted == drafted also after a row stopped at EOS
    mid-run (a finished row drafts nothing and accepts nothing)."""
    ref = _dec(models, None).generate(PROMPTS, max_new_tokens=16, eos_token_id=[])
    eos = int(ref.sequences[1, ref.prompt_length + 2])  # row 1 stops early
    out = _dec(models, "same", 2).generate(PROMPTS, max_new_tokens=16, eos_token_id=[eos])
    assert int(out.num_new_tokens.min()) < 16  # a row stopped early
    t = out.timings
    assert t["accepted"] == t["drafted"] and t["acceptance_rate"] == 1.0


def test_a_non_finite_draft_is_reported(models):
    """A draft model whose logits are NaN (a poisoned embedding row of a token in the prompt) is reported as
    non-finite logits of that row, though the target's own logits are finite."""
    import copy

    from ivl_fast import NonFiniteLogitsError

    base, value, draft, _ = models
    broken = copy.deepcopy(draft)
    with torch.no_grad():
        broken.model.embed_tokens.weight[300] = float("nan")  # PROMPTS[3] holds token 300
    dec = FastIVLDecoder(base, value, graphs="off", draft_model=broken, num_draft_tokens=2)
    with pytest.raises(NonFiniteLogitsError) as err:
        dec.generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    assert err.value.rows == [3]
    assert _dec(models, None).generate(PROMPTS, max_new_tokens=8, eos_token_id=[]).num_new_tokens.tolist() == [8] * 4
