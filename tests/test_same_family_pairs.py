"""Same-family pairs (#31 items 3 and 4): one tokenizer under models whose embeddings are padded to different row
counts (Qwen2.5 0.5B 151,936 rows vs 7B 152,064; Gemma-3 1B 262,144 vs 4B 262,208) is one vocabulary, and a base
and value that differ only in special-token roles (an Instruct base) are one vocabulary that stops at both sides'
EOS ids.

The padded models are real transformers Llamas with random weights whose padding rows (ids >= the tokenizer's 512)
beat every real row at every position (logits of tens against a few; :func:`_padded`), so any path that let a
padding row through would pick it. Every path is compared with a plain two-model torch loop over the real
vocabulary."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import build_model, needs_triton, swap_token_ids
from transformers import GenerationConfig, PreTrainedTokenizerFast

from ivl_fast import FastIVLDecoder

V = 512  # the conftest tokenizer's ids: every row at or past it is padding
ALPHA = 0.8
PROMPTS = [[1, 5, 9, 22, 7, 40], [1, 300, 41]]
N = 6  # new tokens per check
CASES = {  # (base rows, value rows)
    "value_larger": (V, V + 64),
    "base_larger": (V + 64, V),
    "both_padded": (V + 88, V + 128),  # both past the tokenizer: 512 counts, not min(rows) = 600
}


def _padded(seed: int, rows: int, **overrides):
    """A tiny Llama with ``rows`` embedding rows whose padding rows win every argmax: hidden coordinate 0 is 2 for
    every token and no layer writes to it (so the final normed state is positive there at every position); real
    rows ignore it and padding rows weigh it 50."""
    m = build_model("llama", seed=seed, vocab_size=rows, **overrides)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 0] = 2.0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        m.lm_head.weight[:, 0] = 0.0
        m.lm_head.weight[V:] = 0.0
        m.lm_head.weight[V:, 0] = 50.0
    return m


@pytest.fixture(scope="module")
def checkpoints(save_checkpoint):
    """{case: (base model, value model, base dir, value dir)} plus a 576-row draft (the key "draft")."""
    out = {}
    for i, (name, (rb, rv)) in enumerate(CASES.items()):
        base, value = _padded(10 + i, rb), _padded(20 + i, rv)
        out[name] = (base, value, save_checkpoint(base, f"{name}_base"), save_checkpoint(value, f"{name}_value"))
    draft = _padded(30, V + 64)
    out["draft"] = (draft, save_checkpoint(draft, "padded_draft"))
    return out


def _logits(model, ids: torch.Tensor, inputs_embeds=None) -> torch.Tensor:
    with torch.no_grad():
        if inputs_embeds is not None:
            return model(inputs_embeds=inputs_embeds).logits[0].double()
        return model(ids).logits[0].double()


def _combined(base, value, ids: list[int], scheme: str = "residual") -> torch.Tensor:
    """[T, V] z_base + alpha * z_value over the real vocabulary at every position of ``ids`` (cascade: the value
    reads softmax(z_base over the real ids) @ E_value[:V])."""
    x = torch.tensor([ids])
    zb = _logits(base, x)
    if scheme == "cascade":
        p = zb[:, :V].softmax(-1)
        emb = p @ value.get_input_embeddings().weight.double()[:V]
        zv = _logits(value, None, inputs_embeds=emb[None].float())
    else:
        zv = _logits(value, x)
    for z in (zb, zv):  # at every position every padding row would beat every real row
        assert z.shape[1] == V or bool((z[:, V:].min(-1).values > z[:, :V].max(-1).values + 5).all())
    return zb[:, :V] + ALPHA * zv[:, :V]


def _greedy(base, value, prompt: list[int], n: int = N, scheme: str = "residual") -> tuple[list[int], list[float]]:
    """The plain loop: (n greedy ids, their log-probabilities under the combined law over the real vocabulary)."""
    ids, lps = list(prompt), []
    for _ in range(n):
        z = _combined(base, value, ids, scheme)[-1]
        nxt = int(z.argmax())
        lps.append(float(z.log_softmax(-1)[nxt]))
        ids.append(nxt)
    return ids[len(prompt) :], lps


def _new_tokens(out, i: int) -> list[int]:
    t = out.prompt_length
    return out.sequences[i, t : t + int(out.num_new_tokens[i])].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_generate_and_stream_equal_the_two_model_loop(checkpoints, case):
    base, value, base_dir, value_dir = checkpoints[case]
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, alpha=ALPHA)
    assert dec.vocab_size == V  # prompt ids, eos, pad and sampled ids live in [0, 512)
    out = dec.generate(PROMPTS, max_new_tokens=N, eos_token_id=[], return_logprobs=True)
    for i, prompt in enumerate(PROMPTS):
        want, lps = _greedy(base, value, prompt)
        assert _new_tokens(out, i) == want
        torch.testing.assert_close(out.logprobs[i].double(), torch.tensor(lps, dtype=torch.float64), atol=1e-4, rtol=0)
    steps = torch.stack(list(dec.stream(PROMPTS, max_new_tokens=N, eos_token_id=[])), 1)
    assert torch.equal(steps, out.sequences[:, out.prompt_length :])
    # graph semantics (the emulator replays the recorded step): the views are graph-safe
    emulated = FastIVLDecoder.from_pretrained(base_dir, value_dir, alpha=ALPHA, graphs="emulate")
    assert torch.equal(emulated.generate(PROMPTS, max_new_tokens=N, eos_token_id=[]).sequences, out.sequences)
    # sampling never draws a padding id (they beat every real id: any leak would show)
    drawn = dec.generate(PROMPTS, max_new_tokens=N, eos_token_id=[], do_sample=True, seed=0, num_return_sequences=4)
    assert int(drawn.sequences.max()) < V
    with pytest.raises(ValueError, match=r"input_ids holds token ids outside \[0, 512\)"):
        dec.generate([[1, V + 3]], max_new_tokens=2)


@pytest.mark.parametrize("case", list(CASES))
def test_scoring_equals_the_two_models_by_hand(checkpoints, case):
    base, value, base_dir, value_dir = checkpoints[case]
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, alpha=ALPHA)
    reqs = [([1, 5, 6, 7], [8, 9]), ([1, 300], [41, 42, 43]), ([44], [V - 1])]
    got = dec.loglikelihood(reqs, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(reqs, got, strict=True):
        logp = _combined(base, value, ctx + cont[:-1]).log_softmax(-1)[-len(cont) :]
        y = torch.tensor(cont)
        assert lp == pytest.approx(float(logp.gather(1, y[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == y).all())
    text = "The for statement iterates."
    ids = dec.tokenizer(text)["input_ids"]  # the BOS is the prefix token: the rolling window predicts the rest
    (rolling,) = dec.loglikelihood_rolling([text])
    logp = _combined(base, value, [1] + ids[:-1]).log_softmax(-1)
    want = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
    assert rolling == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match=r"token ids in \[0, 512\)"):
        dec.loglikelihood([([1], [V + 1])])


@pytest.mark.parametrize("case", list(CASES))
def test_open_batch_equals_the_two_model_loop(checkpoints, case):
    base, value, base_dir, value_dir = checkpoints[case]
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, alpha=ALPHA)
    batch = dec.open_batch(slots=2, max_seq_len=24, eos_token_id=[], per_request=True, top_logprobs=3)
    first = batch.admit(PROMPTS[0], N, top_logprobs=3)
    batch.step()
    second = batch.admit(PROMPTS[1], N)  # joins mid-way
    while not batch.step():
        pass
    for slot, prompt in ((first, PROMPTS[0]), (second, PROMPTS[1])):
        assert batch.tokens(slot) == _greedy(base, value, prompt)[0]
    assert int(batch.bufs.top_ids[first, :N].max()) < V  # the top alternatives are real ids too


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_decoding_with_a_padded_draft(checkpoints, case):
    base, value, base_dir, value_dir = checkpoints[case]
    _, draft_dir = checkpoints["draft"]  # 576 rows: not the base's row count in two cases of three
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, alpha=ALPHA, draft=draft_dir, num_draft_tokens=3)
    out = dec.generate(PROMPTS, max_new_tokens=N, eos_token_id=[])
    for i, prompt in enumerate(PROMPTS):
        assert _new_tokens(out, i) == _greedy(base, value, prompt)[0]
    batch = dec.open_batch(slots=2, max_seq_len=24, eos_token_id=[])
    slot = batch.admit(PROMPTS[1], N)
    while not batch.step():
        pass
    assert batch.tokens(slot) == _greedy(base, value, PROMPTS[1])[0]


@pytest.mark.parametrize("case", list(CASES))
def test_cascade_reads_the_base_distribution_over_the_real_vocabulary(checkpoints, case):
    base, value, base_dir, value_dir = checkpoints[case]
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, alpha=ALPHA, scheme="cascade")
    out = dec.generate(PROMPTS, max_new_tokens=4, eos_token_id=[])
    for i, prompt in enumerate(PROMPTS):
        assert _new_tokens(out, i) == _greedy(base, value, prompt, 4, scheme="cascade")[0]
    ((lp, _),) = dec.loglikelihood([([1, 5, 6], [7, 8])])
    logp = _combined(base, value, [1, 5, 6, 7], scheme="cascade").log_softmax(-1)[-2:]
    assert lp == pytest.approx(float(logp.gather(1, torch.tensor([[7], [8]])).sum()), abs=1e-4)


@needs_triton
def test_the_fused_kernel_reads_the_trimmed_rows_in_place(checkpoints):
    """The Triton op (interpreter on CPU) takes the [B, 512] views of [B, 576] logits through their row stride."""
    base, value, base_dir, value_dir = checkpoints["base_larger"]
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, alpha=ALPHA, sample_backend="triton")
    out = dec.generate(PROMPTS, max_new_tokens=3, eos_token_id=[], return_logprobs=True)
    for i, prompt in enumerate(PROMPTS):
        want, lps = _greedy(base, value, prompt, 3)
        assert _new_tokens(out, i) == want
        torch.testing.assert_close(out.logprobs[i].double(), torch.tensor(lps, dtype=torch.float64), atol=1e-4, rtol=0)


def test_in_memory_models_need_the_tokenizer_to_tell_padding_apart(checkpoints, tokenizer):
    base, value, _, _ = checkpoints["value_larger"]
    with pytest.raises(ValueError, match=r"\(512 tokens\).*\(576 tokens\).*pass the tokenizer.*ivl-fast vocab-map"):
        FastIVLDecoder(base, value)
    dec = FastIVLDecoder(base, value, alpha=ALPHA, tokenizer=tokenizer)
    out = dec.generate(PROMPTS[:1], max_new_tokens=N, eos_token_id=[])
    assert _new_tokens(out, 0) == _greedy(base, value, PROMPTS[0])[0]


def test_tokenizers_that_really_differ_are_still_refused(checkpoints, tmp_path):
    _, _, base_dir, value_dir = checkpoints["value_larger"]
    other = tmp_path / "other_value"
    shutil.copytree(value_dir, other)
    swap_token_ids(other, 300, 301)
    with pytest.raises(ValueError, match=r"tokenizers of .* differ .*maps .* to 301, the base tokenizer to 300"):
        FastIVLDecoder.from_pretrained(base_dir, other)
    # a draft padded to other rows than the base is checked against the pair's tokenizer too
    _, draft_dir = checkpoints["draft"]
    other_draft = tmp_path / "other_draft"
    shutil.copytree(draft_dir, other_draft)
    swap_token_ids(other_draft, 300, 301)
    base_dir = checkpoints["both_padded"][2]
    with pytest.raises(ValueError, match=r"tokenizer of the draft .* differs from the pair's"):
        FastIVLDecoder.from_pretrained(base_dir, value_dir, draft=other_draft)


# ----------------------------------------------------------------------------- special-token roles (item 4)


@pytest.fixture(scope="module")
def instruct_pair(tmp_path_factory, tokenizer):
    """An Instruct-like base (tokenizer EOS 2 = '</s>', generation_config.json EOS [2, 5]) and a value network whose
    tokenizer and generation_config.json say EOS 0 ('<unk>'): the same tokens, other roles."""
    root = tmp_path_factory.mktemp("instruct")
    base = build_model("llama", seed=40)
    value = _padded(41, V, eos_token_id=0)  # _padded: rows boosted below can win every position
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "base" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5], "bos_token_id": 1}))
    value.save_pretrained(root / "value")
    value_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        bos_token="<s>",
        eos_token="<unk>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    value_tok.save_pretrained(root / "value")
    assert json.loads((root / "value" / "generation_config.json").read_text())["eos_token_id"] == 0
    return root / "base", root / "value"


def test_an_instruct_base_stops_at_the_union_of_both_eos_lists(instruct_pair, caplog):
    base_dir, value_dir = instruct_pair
    with caplog.at_level(logging.INFO, logger="ivl_fast"):
        dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)  # refused before: eos_token_id base 2, value 0
        assert dec.options().eos_token_id == (0, 2, 5)
        head = dec.value.head_weight()
        saved = head.detach().clone()
        stopped = {}
        try:
            for tid in (0, 2, 5, 7):  # the value network's EOS, the base's tokenizer's, the base's config's; none
                with torch.no_grad():
                    head.copy_(saved)
                    head[tid, 0] = 50.0  # this id wins every position
                out = dec.generate(PROMPTS[:1], max_new_tokens=4)
                stopped[tid] = _new_tokens(out, 0)
            # an explicit eos_token_id still wins: 7 stops, 5 no longer does
            explicit = dec.generate(PROMPTS[:1], max_new_tokens=4, eos_token_id=[7])
            passed = dec.generate(PROMPTS[:1], generation_config=GenerationConfig(eos_token_id=7, max_new_tokens=4))
            with torch.no_grad():
                head.copy_(saved)
                head[5, 0] = 50.0
            past_five = dec.generate(PROMPTS[:1], max_new_tokens=4, eos_token_id=[7])
        finally:
            with torch.no_grad():
                head.copy_(saved)
    assert stopped == {0: [0], 2: [2], 5: [5], 7: [7, 7, 7, 7]}
    assert _new_tokens(explicit, 0) == [7] and _new_tokens(passed, 0) == [7]
    assert _new_tokens(past_five, 0) == [5, 5, 5, 5]
    lines = [r.getMessage() for r in caplog.records if "stop ids" in r.getMessage()]
    assert lines == [
        "ivl-fast: stop ids [0, 2, 5], the union of the value's generation_config.json 0; the base's "
        "generation_config.json [2, 5]; the base's tokenizer's EOS 2; the value's tokenizer's EOS 0 "
        "(eos_token_id=... overrides)"
    ]  # once, at load, not per generate() call
    assert [r.levelno for r in caplog.records if "stop ids" in r.getMessage()] == [logging.WARNING]


def test_the_base_eos_list_counts_without_a_value_config_too(instruct_pair, tmp_path, caplog):
    """The value directory without its own generation_config.json: the base's list and both tokenizers' EOS."""
    base_dir, value_dir = instruct_pair
    bare = tmp_path / "value"
    shutil.copytree(value_dir, bare)
    (bare / "generation_config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="ivl_fast"):
        assert FastIVLDecoder.from_pretrained(base_dir, bare).options().eos_token_id == (2, 5, 0)
    assert sum("stop ids [2, 5, 0]" in r.getMessage() for r in caplog.records) == 1
    # transformers models passed in: their own generation configs join the same way
    base, value = build_model("llama", seed=40), build_model("llama", seed=41)
    base.generation_config = GenerationConfig(eos_token_id=[2, 5])
    value.generation_config = GenerationConfig(eos_token_id=0)
    assert FastIVLDecoder(base, value).options().eos_token_id == (0, 2, 5)


def test_a_value_network_trains_on_a_base_with_more_rows(checkpoints, tmp_path):
    """`ivl-fast train` of the 512-row value network on the 576-row base (one tokenizer): the loss runs over the
    rows both have (the base's padding rows, which win every argmax, take no part), falls, and the trained pair
    decodes as the two-model loop over the real vocabulary."""
    from train_fixtures import train_cli
    from transformers import AutoModelForCausalLM

    base, _, bdir, vdir = checkpoints[next(c for c, (rb, rv) in CASES.items() if rb > rv)]
    rc, out, log = train_cli(bdir, vdir, tmp_path, steps=24)
    assert rc == 0 and sum(r["loss"] for r in log[-4:]) < 0.8 * sum(r["loss"] for r in log[:4])
    trained = AutoModelForCausalLM.from_pretrained(out).float().eval()
    dec = FastIVLDecoder.from_pretrained(bdir, out, device="cpu")
    prompt = [1, 17, 42, 99]
    got = dec.generate([prompt], max_new_tokens=8, eos_token_id=[])
    seq = list(prompt)
    for _ in range(8):  # alpha 1 (the trained run's), over the real vocabulary
        x = torch.tensor([seq])
        seq.append(int((_logits(base, x)[-1, :V] + _logits(trained, x)[-1, :V]).argmax()))
    assert got.sequences[0, got.prompt_length :].tolist() == seq[len(prompt) :]
    # --scheme cascade reads one model's rows in the other: refused up front, naming the scheme
    rc, _, _ = train_cli(bdir, vdir, tmp_path / "c", steps=2, extra=["--scheme", "cascade"])
    assert rc != 0
