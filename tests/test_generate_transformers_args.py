"""generate() with the arguments transformers users bring, checked against transformers itself: max_length,
min_new_tokens, streamer (transformers' own TextStreamer and TextIteratorStreamer), return_dict_in_generate with
output_scores / output_logits (shaped and valued as transformers' processors make them), per-row finish reasons,
and the refusal, by name, of what has no meaning here."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ivl_fast import FastIVLDecoder

PROMPT = "def main"


@pytest.fixture(scope="module")
def models(pair, tokenizer):
    base, value = pair[0].eval(), pair[1].eval()
    return base, value, tokenizer


@pytest.fixture(scope="module")
def ivl(models):
    base, value, tok = models
    return FastIVLDecoder(base, value, tokenizer=tok, alpha=0.7, sample_backend="torch")


@pytest.fixture(scope="module")
def base_only(models):
    base, _, tok = models
    return FastIVLDecoder(base, None, tokenizer=tok, scheme="base", sample_backend="torch")


def _ids(tok, text=PROMPT) -> torch.Tensor:
    return tok(text, return_tensors="pt")["input_ids"]


# ------------------------------------------------------------------------------------------------ lengths
def test_max_length_counts_the_prompt_and_max_new_tokens_wins(ivl, models):
    tok = models[2]
    ids = _ids(tok)
    t = ids.shape[1]
    want = ivl.generate(ids, max_new_tokens=5, eos_token_id=[]).sequences
    assert torch.equal(ivl.generate(ids, max_length=t + 5, eos_token_id=[]).sequences, want)
    got = ivl.generate(ids, generation_config=GenerationConfig(max_length=t + 5), eos_token_id=[]).sequences
    assert torch.equal(got, want)
    both = ivl.generate(ids, max_length=t + 2, max_new_tokens=5, eos_token_id=[]).sequences
    assert torch.equal(both, want)  # transformers: max_new_tokens takes precedence
    with pytest.raises(ValueError, match=rf"^the prompt is {t} tokens wide but max_length is {t} "):
        ivl.generate(ids, max_length=t, eos_token_id=[])


def _min_new_tokens_as_transformers(dec, model, tok, new: int) -> tuple[torch.Tensor, int]:
    """EOS set to the token ``dec`` draws first greedily: ours and transformers' generate on ``model`` (the same
    model as ``dec``'s base alone) with min_new_tokens=3 draw the same tokens, none of the first 3 that EOS
    -> (prompt ids, that EOS)."""
    ids = _ids(tok)
    first = int(dec.generate(ids, max_new_tokens=1, eos_token_id=[]).sequences[0, -1])
    ours = dec.generate(ids, max_new_tokens=new, eos_token_id=[first], min_new_tokens=3)
    theirs = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, eos_token_id=first, pad_token_id=first,
        min_new_tokens=3, do_sample=False,
    )  # fmt: skip
    n = int(ours.num_new_tokens[0])
    assert n >= 3 and first not in ours.sequences[0, ids.shape[1] : ids.shape[1] + 3].tolist()
    assert ours.sequences[0, : ids.shape[1] + n].tolist() == theirs[0, : ids.shape[1] + n].tolist()
    return ids, first


def test_min_new_tokens_as_transformers_does_it(base_only, models):
    """With EOS set to the token greedy decoding draws first, transformers' generate and ours (the base alone: the
    same model) draw the same tokens with min_new_tokens=3; without it both stop at once."""
    base, _, tok = models
    ids, first = _min_new_tokens_as_transformers(base_only, base, tok, 8)
    stopped = base_only.generate(ids, max_new_tokens=8, eos_token_id=[first])
    assert stopped.num_new_tokens.tolist() == [1] and stopped.finish_reasons == ["eos"]


def test_min_new_tokens_across_vocabularies_draws_the_best_other_token(cross_setting, tokenizer):
    """Across vocabularies (the base's side pushed through the map): at a step where the EOS ban holds, the token
    drawn is the most likely non-EOS token of the combined logits."""
    base_tok, vmap, base, value = cross_setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok, sample_backend="torch")
    ids = tokenizer(PROMPT)["input_ids"]
    plain = dec.generate([ids], max_new_tokens=1, eos_token_id=[], return_dict_in_generate=True, output_logits=True)
    first = int(plain.sequences[0, -1])
    banned = dec.generate([ids], max_new_tokens=2, eos_token_id=[first], min_new_tokens=1)
    z = plain.logits[0][0].clone()
    z[first] = float("-inf")
    assert int(banned.sequences[0, len(ids)]) == int(z.argmax())


# ------------------------------------------------------------------------------------------------ scores, logits
def _processors(sequences_len: int, prompt_len: int, eos: int, sample: bool) -> LogitsProcessorList:
    procs = [RepetitionPenaltyLogitsProcessor(1.3), MinNewTokensLengthLogitsProcessor(prompt_len, 2, eos)]
    if sample:
        procs += [TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.9)]
    return LogitsProcessorList(procs)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_scores_and_logits_are_what_transformers_processors_make_of_the_ivl_logits(ivl, models, do_sample):
    """output_logits: z_base + alpha * z_value of the two transformers models at every step (teacher-forced on the
    generated sequence); output_scores: transformers' own processors (repetition penalty, min_new_tokens, and when
    sampling temperature, top-k, top-p) applied to those logits."""
    base, value, tok = models
    ids = _ids(tok)
    t = ids.shape[1]
    eos = tok.eos_token_id
    kw = dict(do_sample=do_sample, seed=1, temperature=0.7, top_k=5, top_p=0.9) if do_sample else {}
    out = ivl.generate(
        ids, max_new_tokens=6, eos_token_id=[eos], min_new_tokens=2, repetition_penalty=1.3,
        return_dict_in_generate=True, output_scores=True, output_logits=True, **kw,
    )  # fmt: skip
    n = out.sequences.shape[1] - t
    assert len(out.scores) == len(out.logits) == n and out.scores[0].shape == (1, len(tok))
    with torch.no_grad():
        seq = out.sequences
        z = base(seq).logits[:, t - 1 : -1].float() + 0.7 * value(seq).logits[:, t - 1 : -1].float()
    procs = _processors(seq.shape[1], t, eos, do_sample)
    for i in range(n):
        torch.testing.assert_close(out.logits[i], z[:, i], atol=2e-4, rtol=1e-4)
        want = procs(seq[:, : t + i], out.logits[i].clone())
        assert torch.equal(torch.isinf(out.scores[i]), torch.isinf(want)), i
        fin = torch.isfinite(want)
        torch.testing.assert_close(out.scores[i][fin], want[fin], atol=1e-4, rtol=1e-4)
        assert torch.isfinite(out.scores[i][0, seq[0, t + i]])  # the drawn token was allowed


def test_without_return_dict_in_generate_scores_are_not_kept(ivl, models):
    ids = _ids(models[2])
    out = ivl.generate(ids, max_new_tokens=3, output_scores=True, eos_token_id=[])
    assert out.scores is None and out.logits is None
    plain = ivl.generate(ids, max_new_tokens=3, return_dict_in_generate=False, eos_token_id=[])
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.sequences)
    assert torch.equal(out["sequences"], out.sequences)
    with pytest.raises(KeyError):
        out["nope"]


# ------------------------------------------------------------------------------------------------ streamers
def test_transformers_streamers_get_what_generate_returns(ivl, models, capsys):
    tok = models[2]
    ids = _ids(tok)
    out = ivl.generate(ids, max_new_tokens=12, eos_token_id=[])
    text = tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
    ivl.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out == text + "\n"  # TextStreamer ends with a newline
    it = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    got = {}
    th = threading.Thread(target=lambda: got.update(seqs=ivl.generate(ids, max_new_tokens=12, eos_token_id=[],
                                                                       streamer=it).sequences))  # fmt: skip
    th.start()
    streamed = "".join(it)
    th.join(60)
    assert streamed == text and torch.equal(got["seqs"], out.sequences)


def test_a_streamer_gets_the_prompt_then_each_steps_ids(ivl, models):
    tok = models[2]
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(value.clone())

        def end(self):
            calls.append("end")

    rows = [tok("import os")["input_ids"], tok("class A:")["input_ids"]]
    out = ivl.generate(rows, max_new_tokens=5, eos_token_id=[], streamer=Recorder())
    t = out.prompt_length
    assert torch.equal(calls[0], out.sequences[:, :t]) and calls[-1] == "end"
    steps = calls[1:-1]
    assert [s.shape for s in steps] == [(2,)] * 5
    assert torch.equal(torch.stack(steps, 1), out.sequences[:, t:])


# ------------------------------------------------------------------------------------------------ finish reasons
def test_each_row_says_why_it_ended(ivl, models):
    tok = models[2]
    rows = [tok(p)["input_ids"] for p in ("def main", "import os", "class A:")]
    ref = ivl.generate(rows, max_new_tokens=8, eos_token_id=[])
    t = ref.prompt_length
    new = ref.sequences[:, t:].tolist()
    eos = new[0][2]  # row 0 ends at its 3rd token by EOS
    stop = tok.decode(new[1][3:5])  # row 1 by a stop string
    if eos in new[1][:5] or eos in new[2] or not stop.strip() or stop in tok.decode(new[2]):
        pytest.skip("the random models' tokens do not separate the three cases")
    out = ivl.generate(rows, max_new_tokens=8, eos_token_id=[eos], stop_strings=[stop])
    assert out.finish_reasons == ["eos", "stop", "length"]


# ------------------------------------------------------------------------------------------------ refusals
def test_what_has_no_meaning_here_is_refused_by_name(ivl, models):
    ids = _ids(models[2])
    ok = ivl.generate(ids, max_new_tokens=2, num_beams=1, use_cache=True, output_attentions=False, eos_token_id=[])
    assert ok.sequences.shape[1] == ids.shape[1] + 2
    with pytest.raises(ValueError, match=r"^num_beams=4 is not supported by ivl-fast"):
        ivl.generate(ids, num_beams=4)
    with pytest.raises(ValueError, match=r"^output_attentions=True: ivl-fast returns no attentions"):
        ivl.generate(ids, output_attentions=True)
    with pytest.raises(TypeError, match=r"^generation arguments ivl-fast does not know: max_new_token, temprature "):
        ivl.generate(ids, max_new_token=3, temprature=0.5)
    with pytest.raises(ValueError, match="^min_new_tokens must be"):
        ivl.generate(ids, min_new_tokens=-1)


def test_open_batch_refuses_the_generate_only_options(ivl):
    with pytest.raises(ValueError, match="are generate[(][)] options"):
        ivl.open_batch(slots=2, max_seq_len=32, return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("path", [dict(sample_backend="triton"), dict(graphs="emulate", kv_block=8)],
                         ids=["fused_sampler", "graphs"])  # fmt: skip
def test_the_fused_sampler_and_graph_replays_keep_the_same_scores_and_ban(ivl, models, path):
    """min_new_tokens and the kept scores and logits on the fused Triton sampler and in captured graphs (emulated
    on CPU): the tokens, scores and logits of the torch sampler's eager run."""
    base, value, tok = models
    dec = FastIVLDecoder(base, value, tokenizer=tok, alpha=0.7, **path)
    rows = [tok(p)["input_ids"] for p in ("def main", "import os")]
    first = int(ivl.generate(rows, max_new_tokens=1, eos_token_id=[]).sequences[0, -1])
    kw = dict(max_new_tokens=6, eos_token_id=[first], min_new_tokens=3, return_dict_in_generate=True,
              output_scores=True, output_logits=True, repetition_penalty=1.2)  # fmt: skip
    want, got = ivl.generate(rows, **kw), dec.generate(rows, **kw)
    assert torch.equal(got.sequences, want.sequences) and got.finish_reasons == want.finish_reasons
    assert first not in want.sequences[:, want.prompt_length : want.prompt_length + 3].flatten().tolist()
    for a, b in zip(got.scores + got.logits, want.scores + want.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kept_logits_include_the_logit_terms(models):
    """With logit terms (proxy tuning's arithmetic) the kept logits are z_base + alpha z_value + w z_term."""
    base, value, tok = models
    dec = FastIVLDecoder(base, value, tokenizer=tok, alpha=0.7, terms=[(value, -0.4)], sample_backend="torch")
    ids = _ids(tok)
    out = dec.generate(ids, max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True, output_logits=True)
    t = ids.shape[1]
    with torch.no_grad():
        zb, zv = base(out.sequences).logits[:, t - 1 : -1], value(out.sequences).logits[:, t - 1 : -1]
    for i, got in enumerate(out.logits):
        torch.testing.assert_close(got, zb[:, i] + (0.7 - 0.4) * zv[:, i], atol=2e-4, rtol=1e-4)


def test_min_new_tokens_in_half_precision_stays_finite(models):
    """The early-EOS floor is finite in the logits' own dtype: in float16 a quarter of its lowest value (-16376),
    which adding the other side's logits cannot push to -inf (float16's -1e30 would be -inf, and so would four
    times its lowest), so the non-finite check stays quiet and EOS is still never drawn early; the tokens are
    transformers' own (the base alone, float16, min_new_tokens=3)."""
    import copy

    base, _, tok = models
    half = copy.deepcopy(base).half()
    dec = FastIVLDecoder(half, None, tokenizer=tok, scheme="base", sample_backend="torch")
    _min_new_tokens_as_transformers(dec, half, tok, 6)
