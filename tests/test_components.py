"""What the value network changed (generate(return_components=k), ivl-fast generate --explain): each step's top-k
of the base alone, of the value network's delta and of the combination, against the two transformers models'
logits; "changed" where the combination's first choice is not the base's; across vocabularies through the map."""

from __future__ import annotations

import pytest
import torch

from ivl_fast import FastIVLDecoder
from ivl_fast.decode.components import format_steps


@pytest.fixture(scope="module")
def models(pair, tokenizer):
    return pair[0].eval(), pair[1].eval(), tokenizer


def test_components_are_the_models_own_top_k(models):
    base, value, tok = models
    dec = FastIVLDecoder(base, value, tokenizer=tok, alpha=0.8, sample_backend="torch")
    rows = [tok(p)["input_ids"] for p in ("def main", "import os")]
    out = dec.generate(rows, max_new_tokens=6, eos_token_id=[], return_components=4)
    c = out.components
    t = out.prompt_length
    seq = out.sequences
    assert c.ids.shape == (2, 6, 3, 4) and c.values.shape == (2, 6, 3, 4)
    mask = seq != dec.options().pad_token_id
    mask[:, t:] = True
    with torch.no_grad():
        zb = base(seq, attention_mask=mask.long()).logits[:, t - 1 : -1].float()
        zv = value(seq, attention_mask=mask.long()).logits[:, t - 1 : -1].float()
    for side, z in enumerate((zb.log_softmax(-1), 0.8 * zv, (zb + 0.8 * zv).log_softmax(-1))):
        want = z.topk(4, dim=-1)
        assert torch.equal(c.ids[:, :, side], want.indices), side
        torch.testing.assert_close(c.values[:, :, side], want.values, atol=2e-4, rtol=1e-4)
    changed = zb.argmax(-1) != (zb + 0.8 * zv).argmax(-1)
    assert torch.equal(c.changed, changed)
    assert torch.equal(seq[:, t:], (zb + 0.8 * zv).argmax(-1))  # greedy: the combination's first choice
    torch.testing.assert_close(c.changed_fraction(), changed.double().mean(1))
    steps = c.steps(0, tok)
    assert len(steps) == 6 and steps[0]["combined"][0][0] == tok.decode([int(seq[0, t])])
    text = format_steps(steps, [tok.decode([i]) for i in seq[0, t:].tolist()])
    assert text.count("\n    base ") == 6 and text.endswith(f"changed {int(changed[0].sum())} of 6 tokens (*)")


def test_components_stop_counting_at_a_rows_end_and_alpha_zero_changes_nothing(models):
    base, value, tok = models
    dec = FastIVLDecoder(base, value, tokenizer=tok, alpha=0.0, sample_backend="torch")
    ids = tok("def main")["input_ids"]
    first = int(dec.generate([ids], max_new_tokens=1, eos_token_id=[]).sequences[0, -1])
    out = dec.generate([ids, tok("import os")["input_ids"]], max_new_tokens=5, eos_token_id=[first],
                       return_components=2)  # fmt: skip
    c = out.components
    assert out.num_new_tokens.tolist()[0] == 1 and not c.changed.any()  # alpha 0: the base's choices
    assert len(c.steps(0)) == 1 and c.changed_fraction().tolist() == [0.0, 0.0]


def test_components_across_vocabularies_push_the_base_through_the_map(cross_setting, tokenizer):
    base_tok, vmap, base, value = cross_setting
    dec = FastIVLDecoder(base, value, vmap, tokenizer=tokenizer, base_tokenizer=base_tok, sample_backend="torch")
    ids = tokenizer("def main")["input_ids"]
    out = dec.generate([ids], max_new_tokens=4, eos_token_id=[], return_components=3, return_dict_in_generate=True,
                       output_logits=True)  # fmt: skip
    c = out.components
    assert int(c.ids.max()) < vmap.v_value
    for i in range(4):  # the combination's first choice is the emitted (greedy) token, its logits the kept ones
        assert int(c.ids[0, i, 2, 0]) == int(out.sequences[0, out.prompt_length + i])
        want = out.logits[i][0].log_softmax(-1).topk(3)
        assert torch.equal(c.ids[0, i, 2], want.indices)


def test_components_need_both_models(models):
    base, _, tok = models
    dec = FastIVLDecoder(base, None, tokenizer=tok, scheme="base")
    with pytest.raises(ValueError, match="^return_components needs both models"):
        dec.generate([tok("x")["input_ids"]], return_components=2)


def test_a_continuous_batch_records_the_components_of_the_rows_that_ask(models):
    """open_batch(components=K): a request asking for k reads, per token, what generate(return_components=k) gives
    for it alone; a request beside it that asks for none reads none (and decodes as alone)."""
    from ivl_fast.decode.slot_request import SlotRequest

    base, value, tok = models
    dec = FastIVLDecoder(base, value, tokenizer=tok, alpha=0.8, sample_backend="torch")
    a, b = tok("def main")["input_ids"], tok("import os")["input_ids"]
    want = dec.generate([a], max_new_tokens=5, eos_token_id=[], return_components=3)
    want_b = dec.generate([b], max_new_tokens=5, eos_token_id=[]).sequences[0, len(b) :].tolist()
    batch = dec.open_batch(slots=2, max_seq_len=32, eos_token_id=[], per_request=True, components=4)
    sa, sb = batch.admit_many([SlotRequest(a, 5, components=3), SlotRequest(b, 5)])
    while not (batch.is_finished(sa) and batch.is_finished(sb)):
        batch.step()
    got, other = batch.read_new([sa, sb], [0, 0], 5, components=3)
    assert got.ids == want.sequences[0, want.prompt_length :].tolist()
    for t, comp in enumerate(got.components):
        for side in range(3):
            assert [i for i, _ in comp[side]] == want.components.ids[0, t, side].tolist()
            assert [v for _, v in comp[side]] == pytest.approx(want.components.values[0, t, side].tolist(), abs=1e-5)
    assert other.ids == want_b  # (read_new reads k for every slot listed; a reader keeps what each asked for)
    batch.retire(sa)
    with pytest.raises(ValueError, match=r"^components must be an integer in \[0, 4\] \(the batch's components\)"):
        batch.admit_many([SlotRequest(a, 5, components=5)])

