"""FastIVLDecoder end to end on real checkpoints: exactness against a plain two-model loop and transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, needs_triton
from transformers import GenerationConfig

from ivl_fast import FastIVLDecoder

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [1, 20, 30, 40, 50, 60, 70, 80, 90], [44]]


def reference_loop(base, value, rows, *, alpha=1.0, new=64):
    """The straightforward IVL loop: both transformers models on the whole sequence, add logits, argmax.

    Returns per row the generated ids and their log-probabilities under the combined distribution.
    """
    out, lps = [], []
    for r in rows:
        seq, lp = list(r), []
        for _ in range(new):
            x = torch.tensor([seq])
            with torch.no_grad():
                z = base(x).logits[0, -1].double()
                if value is not None:
                    z = z + alpha * value(x).logits[0, -1].double()
            nxt = int(z.argmax())
            lp.append(float(z.log_softmax(-1)[nxt]))
            seq.append(nxt)
        out.append(seq[len(r) :])
        lps.append(lp)
    return out, lps


@pytest.fixture(scope="module")
def reference(pair):
    base, value, _, _ = pair
    return {alpha: reference_loop(base, value, PROMPTS, alpha=alpha) for alpha in (1.0, 0.5)}


@pytest.mark.parametrize("engine", ["lean", "hf"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_reference_loop(pair, reference, engine, batch):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, engine=engine)
    rows = PROMPTS[:batch]
    out = dec.generate(rows, max_new_tokens=64, eos_token_id=[], return_logprobs=True)
    t = out.prompt_length
    assert out.sequences.shape == (batch, t + 64)
    ref_ids, ref_lp = reference[1.0]
    for i, r in enumerate(rows):
        assert out.sequences[i, t - len(r) : t].tolist() == r  # prompt kept, left-padded
        assert out.sequences[i, t:].tolist() == ref_ids[i], f"row {i} diverged from the two-model loop"
        torch.testing.assert_close(
            out.logprobs[i].double(), torch.tensor(ref_lp[i], dtype=torch.float64), atol=1e-4, rtol=0
        )
    tm = out.timings  # what the CLI's tokens/s and the benchmarks read
    assert tm["steps"] == 64 and tm["batch"] == batch and tm["graphs"] == "off"
    assert 0 < tm["prefill_s"] < tm["total_s"]


def test_alpha_and_transformers_models_share_weights(pair, reference):
    base, value, _, _ = pair
    dec = FastIVLDecoder(base, value, alpha=0.5)
    assert dec.base.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert dec.value.lm_head.weight.data_ptr() == value.lm_head.weight.data_ptr()
    out = dec.generate(PROMPTS, max_new_tokens=64, eos_token_id=[])
    t = out.prompt_length
    assert out.sequences[:, t:].tolist() == reference[0.5][0]


@pytest.mark.parametrize("sync_every", [1, 8])
def test_base_scheme_matches_transformers_generate(pair, sync_every):
    """scheme='base' is plain decoding: identical to transformers' generate, EOS padding and trimming included."""
    base, _, base_dir, _ = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, None, scheme="base", sync_every=sync_every)
    rows = PROMPTS
    free = dec.generate(rows, max_new_tokens=30, eos_token_id=[])
    t = free.prompt_length
    # pick EOS ids that the rows really produce at different steps, so rows stop at different times
    eos = [free.sequences[0, t + 3].item(), free.sequences[2, t + 10].item()]
    pad = 3
    ids = free.sequences[:, :t]
    mask = (torch.arange(t)[None] >= (t - torch.tensor([len(r) for r in rows]))[:, None]).long()
    hf = base.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=pad, top_k=None
    )
    ours = dec.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=pad)
    assert ours.sequences.shape == hf.shape
    assert torch.equal(ours.sequences, hf)
    # num_new_tokens counts up to and including EOS
    for i in range(len(rows)):
        new = ours.sequences[i, t:].tolist()
        n = ours.num_new_tokens[i].item()
        if n < len(new):
            assert new[n - 1] in eos and all(x == pad for x in new[n:])


def test_value_only_scheme(pair):
    _, value, _, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(None, value_dir, scheme="value_only")
    out = dec.generate(PROMPTS[:2], max_new_tokens=12, eos_token_id=[])
    ref, _ = reference_loop(value, None, PROMPTS[:2], new=12)
    assert out.sequences[:, out.prompt_length :].tolist() == ref


def test_right_padding_and_tensor_inputs_are_equivalent(pair):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    left = dec.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    t = max(map(len, PROMPTS))
    ids = torch.full((len(PROMPTS), t), 3)
    mask = torch.zeros((len(PROMPTS), t), dtype=torch.long)
    for i, r in enumerate(PROMPTS):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    right = dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(left.sequences[:, t:], right.sequences[:, t:])
    single = dec.generate(torch.tensor(PROMPTS[0]), max_new_tokens=10, eos_token_id=[])
    assert torch.equal(single.sequences[0, -10:], left.sequences[0, t:])


def test_stream_yields_the_generate_tokens(pair):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=11)
    out = dec.generate(PROMPTS, **kw, eos_token_id=[])
    steps = list(dec.stream(PROMPTS, **kw, eos_token_id=[]))
    assert len(steps) == 16 and all(s.shape == (len(PROMPTS),) for s in steps)
    assert torch.equal(torch.stack(steps, 1), out.sequences[:, out.prompt_length :])


def test_seeded_sampling_is_reproducible_and_seed_dependent(pair):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.3, eos_token_id=[])
    a = dec.generate(PROMPTS, seed=1, **kw).sequences
    b = dec.generate(PROMPTS, seed=1, **kw).sequences
    c = dec.generate(PROMPTS, seed=2, **kw).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampled_tokens_respect_top_k(pair):
    """Every sampled token lies in the top-k of the combined logits at its step (checked with the models)."""
    base, value, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    out = dec.generate(PROMPTS[:2], max_new_tokens=12, do_sample=True, top_k=3, seed=5, eos_token_id=[])
    t = out.prompt_length
    for i, r in enumerate(PROMPTS[:2]):
        seq = list(r)
        for tok in out.sequences[i, t:].tolist():
            x = torch.tensor([seq])
            with torch.no_grad():
                z = base(x).logits[0, -1] + value(x).logits[0, -1]
            assert tok in z.topk(3).indices.tolist()
            seq.append(tok)


def test_generation_config_is_accepted(pair):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    gc = GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=None)
    a = dec.generate(PROMPTS, generation_config=gc, eos_token_id=[])
    b = dec.generate(PROMPTS, max_new_tokens=7, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)
    # explicit arguments override the config
    c = dec.generate(PROMPTS, generation_config=gc, max_new_tokens=3, eos_token_id=[])
    assert c.sequences.shape[1] == a.sequences.shape[1] - 4


def test_generate_text_plain_and_chat(pair, tokenizer):
    """The returned text is the decoding of the independent two-model loop's greedy tokens, for plain prompts
    (tokenized with the special tokens) and chat messages (the default template's text, tokenized as is)."""
    base, value, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    assert dec.tokenizer is not None and dec.tokenizer.get_vocab() == tokenizer.get_vocab()

    def expected(ids_rows, new):
        ref, _ = reference_loop(base, value, ids_rows, new=new)
        return [tokenizer.decode(r, skip_special_tokens=True) for r in ref]

    text = dec.generate_text("The for statement", max_new_tokens=10, eos_token_id=[])
    ids = tokenizer("The for statement")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # the tokenizer's own special tokens are kept
    assert [text] == expected([ids], 10)
    prompts = ["a", "longer prompt here"]
    texts = dec.generate_text(prompts, max_new_tokens=5, eos_token_id=[])
    assert texts == expected([tokenizer(p)["input_ids"] for p in prompts], 5)
    # chat: the default template renders the messages (the tiny tokenizer has no template of its own)
    chat = dec.generate_text([{"role": "user", "content": "hi"}], chat=True, max_new_tokens=5, eos_token_id=[])
    rendered = "<s><|user|>\nhi\n<|assistant|>\n"
    assert [chat] == expected([tokenizer(rendered, add_special_tokens=False)["input_ids"]], 5)
    from ivl_fast.chat import as_messages, render_chat

    assert render_chat(tokenizer, as_messages("hi")) == rendered
    rendered = render_chat(tokenizer, as_messages("hi", "be brief"))
    assert rendered.startswith("<s><|system|>\nbe brief\n<|user|>\nhi\n") and rendered.endswith("<|assistant|>\n")


@pytest.mark.parametrize("do_sample", [False, True])
def test_eager_decode_step_reads_no_tensor_value_on_the_host(pair, do_sample):
    """DESIGN: the decode path never syncs the host inside a step. The whole eager step of the decoder (both
    models, the sampler with every warper on, EOS bookkeeping, log-probs) runs under the host-read trap, and the
    tokens it produced are those of generate()."""
    from host_reads import no_host_reads

    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, sample_backend="torch")
    kw = dict(max_new_tokens=6, eos_token_id=[2, 7], return_logprobs=True)
    if do_sample:
        kw.update(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, seed=3)
    from ivl_fast.decode.step import decode_step

    loop = dec.start_loop(PROMPTS, **kw)  # prefill and the first token: outside the step
    with torch.inference_mode():
        for _ in range(5):
            kv = loop.kv_need()  # the host mirror, outside the step
            with no_host_reads():
                decode_step(dec.models, loop.bufs, loop.cfg, loop.eos, kv)
            loop.note_rounds(1)
    want = dec.generate(PROMPTS, **kw)
    t = want.prompt_length
    assert torch.equal(loop.bufs.out[:, :6], want.sequences[:, t:])
    assert torch.equal(loop.bufs.logprobs[:, :6], want.logprobs)


def test_stop_strings_end_rows_at_the_completing_token(pair, tokenizer):
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    free = dec.generate(PROMPTS, max_new_tokens=40, eos_token_id=[])
    t = free.prompt_length
    row0 = free.sequences[0, t:].tolist()
    # a stop string taken from row 0's own text, completed by its 12th token
    stop = tokenizer.decode(row0[10:12])
    assert stop.strip(), "degenerate stop string"
    out = dec.generate(PROMPTS, max_new_tokens=40, eos_token_id=[], stop_strings=[stop])
    new0 = out.sequences[0, t:].tolist()
    n0 = out.num_new_tokens[0].item()
    assert n0 <= 12 and stop in tokenizer.decode(new0[:n0])
    assert stop not in tokenizer.decode(new0[: n0 - 1])
    assert all(x == 3 for x in new0[n0:])  # padded after the stop
    # rows that never produce the string are untouched
    for i in range(1, len(PROMPTS)):
        txt = tokenizer.decode(free.sequences[i, t:].tolist())
        if stop not in txt:
            assert torch.equal(out.sequences[i, t:], free.sequences[i, t : t + out.sequences.shape[1] - t])


def test_mistral_and_qwen_pairs(save_checkpoint):
    """IVL across families with the same vocabulary: a Qwen2 base steered by a Mistral value net, exactly."""
    base = build_model("qwen2", seed=4)
    value = build_model("mistral", seed=6)
    dec = FastIVLDecoder.from_pretrained(
        save_checkpoint(base, "q-base", with_tokenizer=False), save_checkpoint(value, "m-value", with_tokenizer=False)
    )
    out = dec.generate(PROMPTS[:2], max_new_tokens=16, eos_token_id=[])
    ref, _ = reference_loop(base, value, PROMPTS[:2], new=16)
    assert out.sequences[:, out.prompt_length :].tolist() == ref


@needs_triton
def test_decoder_with_the_fused_triton_sampler(pair):
    """The decoder's per-step op through the Triton kernel (interpreter): greedy identical to the torch path,
    seeded sampling reproducible, and the kernel's NaN flag reaches the stop check."""
    _, _, base_dir, value_dir = pair
    torch_dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, sample_backend="torch")
    tri_dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, sample_backend="triton")
    a = torch_dec.generate(PROMPTS, max_new_tokens=12, eos_token_id=[], return_logprobs=True)
    b = tri_dec.generate(PROMPTS, max_new_tokens=12, eos_token_id=[], return_logprobs=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=3, eos_token_id=[])
    s1, s2 = tri_dec.generate(PROMPTS, **kw).sequences, tri_dec.generate(PROMPTS, **kw).sequences
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, tri_dec.generate(PROMPTS, **{**kw, "seed": 4}).sequences)


@needs_triton
def test_fused_sampler_nan_flag_raises_in_the_decoder(pair):
    from ivl_fast import NonFiniteLogitsError

    _, value, base_dir, _ = pair
    import copy

    bad_value = copy.deepcopy(value)
    with torch.no_grad():
        bad_value.lm_head.weight[7] = float("inf")  # every step's logits hold inf at token 7
    base = FastIVLDecoder.from_pretrained(base_dir, None, scheme="base").base
    dec = FastIVLDecoder(base, bad_value, sample_backend="triton")
    with pytest.raises(NonFiniteLogitsError, match="non-finite"):
        dec.generate(PROMPTS[:2], max_new_tokens=3, eos_token_id=[])


def test_stop_string_before_eos_in_the_same_sync_window(pair, tokenizer):
    """A stop string completed before an EOS that falls in the same batched check must still end the row."""
    _, _, base_dir, value_dir = pair
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir, sync_every=8)
    free = dec.generate(PROMPTS[:1], max_new_tokens=12, eos_token_id=[])
    t = free.prompt_length
    row = free.sequences[0, t:].tolist()
    eos = row[5]
    if eos in row[:5]:
        pytest.skip("test design: need a token first produced at step 5")
    stop = tokenizer.decode(row[1:3])
    kw = dict(max_new_tokens=12, eos_token_id=[eos], stop_strings=[stop])
    out = dec.generate(PROMPTS[:1], **kw)
    n = out.num_new_tokens[0].item()
    assert n <= 3 and stop in tokenizer.decode(out.sequences[0, t : t + n].tolist())
    streamed = [int(x[0]) for x in dec.stream(PROMPTS[:1], **kw)]
    assert out.sequences[0, t:].tolist() == streamed
