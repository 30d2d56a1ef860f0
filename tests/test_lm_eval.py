"""The lm-eval model type "ivl" (ivl_fast/lm_eval.py) against lm-eval's own ``hf`` model on the same checkpoint
(scheme="base": every request's answer equal), and the pair against a reference built from the two transformers
models; offline, on local tasks written to a temp dir."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval_tasks import DOCS, TASKS, TOL, close_ll, same_samples, write_tasks  # noqa: E402

import ivl_fast.lm_eval  # noqa: E402, F401  (registers "ivl")
from ivl_fast.chat import DEFAULT_CHAT_TEMPLATE, render_chat  # noqa: E402
from ivl_fast.lm_eval import IVLLM  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(d)
    return d


@pytest.fixture(scope="module")
def manager(tasks_dir):
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def _hf(path, **kw):
    return HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=2, **kw)


def _ivl(base=None, value=None, **kw):
    args = dict(base=None if base is None else str(base), value=None if value is None else str(value))
    return IVLLM(**{k: v for k, v in args.items() if v is not None}, device="cpu", dtype="float32", batch_size=2, **kw)


@pytest.fixture(scope="module")
def models(pair):
    """(hf, ivl scheme=base) on the base checkpoint."""
    return _hf(pair[2]), _ivl(pair[2], scheme="base")


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _evaluate(lm, manager, **kw):
    kw = {"tasks": list(TASKS), "num_fewshot": 1, "limit": 4, **kw}
    return lm_eval.simple_evaluate(model=lm, task_manager=manager, log_samples=True, bootstrap_iters=0, **kw)


# ---------------------------------------------------------------------- registration and model_args
def test_ivl_is_registered_and_built_from_model_args(pair):
    assert get_model("ivl") is IVLLM
    lm = IVLLM.create_from_arg_string(
        f"base={pair[2]},value={pair[3]},alpha=0.5,dtype=float32,max_length=64",
        {"batch_size": 3, "max_batch_size": None, "device": "cpu"},  # what simple_evaluate passes
    )
    assert (lm.dec.scheme, lm.dec.alpha, lm.batch_size, lm.max_length) == ("residual", 0.5, 3, 64)


def test_unknown_and_unsupported_model_args_are_refused(pair):
    with pytest.raises(ValueError, match=r"unknown model_args \['bogus', 'pretrained'\]"):
        IVLLM.create_from_arg_string(f"base={pair[2]},pretrained=x,bogus=1")
    with pytest.raises(ValueError, match="trust_remote_code"):
        IVLLM(base=str(pair[2]), scheme="base", trust_remote_code=True)
    with pytest.raises(ValueError, match=r"^model_args batch_size must be an integer >= 1 or 'auto', got 'auto8'"):
        IVLLM(base=str(pair[2]), scheme="base", batch_size="auto8")
    with pytest.raises(ValueError, match=r"^model_args max_batch_size must be an integer >= 1"):
        IVLLM(base=str(pair[2]), scheme="base", batch_size="auto", max_batch_size=0)
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[1, 256\]"):
        IVLLM(base=str(pair[2]), scheme="base", max_length=257)


# ---------------------------------------------------------------------- scheme=base equals lm-eval's hf model
def test_base_scheme_equals_hf_model_on_local_tasks(models, manager):
    hf, ivl = models
    a, b = _evaluate(hf, manager), _evaluate(ivl, manager)
    same_samples(a, b, TASKS)
    for task in TASKS:
        for key, value in a["results"][task].items():
            if isinstance(value, float):
                assert b["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)


def _greedy(model, ids, n):
    """n greedy tokens of a transformers model after ids (no EOS)."""
    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(x).logits[0, -1].argmax()))
            x = torch.cat([x, torch.tensor([[out[-1]]])], dim=1)
    return out


def test_loglikelihood_requests_equal_hf(pair, models):
    """Odd requests too: an empty context, trailing spaces, a text starting with the BOS text; and token-level
    requests whose continuation is the greedy one (is_greedy True) or one token off it."""
    hf, ivl = models
    reqs = [
        ("Question: What is 3 plus 4?\nAnswer:", " 7"),
        ("Question: What is 3 plus 4?\nAnswer: ", "7"),
        ("", "The sum of 1 and 2 is 3."),
        ("<s>The sum of", " 1 and 2"),
    ]
    close_ll(ivl.loglikelihood(_instances("loglikelihood", reqs)), hf.loglikelihood(_instances("loglikelihood", reqs)))
    ctx = hf.tok_encode("Q: What is 1 plus 2?\nA:")
    g = _greedy(pair[0], ctx, 5)
    tokens = [(None, ctx, g), (None, ctx, g[:2]), (None, ctx, g[:-1] + [(g[-1] + 1) % 512]), (None, ctx[:1], ctx[1:])]
    want = hf._loglikelihood_tokens(tokens)
    assert [x for _, x in want] == [True, True, False, False]
    close_ll(ivl._loglikelihood_tokens(tokens), want)


def test_short_window_truncation_and_rolling_equal_hf(pair, models):
    hf = _hf(pair[2], max_length=12)
    ivl = _ivl(pair[2], scheme="base", max_length=12)
    text = DOCS[0]["text"]
    reqs = [(text, " and more"), (text[:-6], text[-6:])]  # longer than the window: left-truncated
    close_ll(ivl.loglikelihood(_instances("loglikelihood", reqs)), hf.loglikelihood(_instances("loglikelihood", reqs)))
    rolling = [(text,), ("short",), (DOCS[1]["text"][:70],)]  # several windows of 12 tokens, and one
    got = ivl.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling))
    want = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling))
    assert got == pytest.approx(want, rel=TOL)
    # the full-window models agree too, and the short window scores the long text differently
    full = models[1].loglikelihood_rolling(_instances("loglikelihood_rolling", rolling[:1]))
    assert full == pytest.approx(models[0].loglikelihood_rolling(_instances("loglikelihood_rolling", rolling[:1])))
    assert full[0] != pytest.approx(got[0], rel=1e-3)
    # generation: the context left-truncated to max_length - max_gen_toks tokens
    gen = [(text, {"until": [], "max_gen_toks": 4}), (text[:30], {"until": [], "max_gen_toks": 4})]
    assert ivl.generate_until(_instances("generate_until", gen)) == hf.generate_until(_instances("generate_until", gen))


def test_generate_until_stops_and_cuts_like_hf(models):
    """until strings (cut off, as HFLM cuts them) and EOS stop decoding, with the same text as HFLM's."""
    hf, ivl = models
    contexts = [f"Q: {d['question']}\nA:" for d in DOCS[:4]]
    free = hf.generate_until(_instances("generate_until", [(c, {"until": [], "max_gen_toks": 10}) for c in contexts]))
    assert all(len(t) > 6 for t in free)
    stop = free[0][4:6]  # a text the model writes mid-answer
    kwargs = {"until": [stop, "\n\n"], "max_gen_toks": 10, "do_sample": False}
    reqs = _instances("generate_until", [(c, dict(kwargs)) for c in contexts])
    calls = []
    real = ivl.dec.generate

    def spy(ids, **options):
        out = real(ids, **options)
        calls.append((options, out.num_new_tokens.tolist()))
        return out

    ivl.dec.generate = spy
    try:
        got = ivl.generate_until(reqs)
    finally:
        del ivl.dec.generate
    want = hf.generate_until(_instances("generate_until", [(c, dict(kwargs)) for c in contexts]))
    assert got == want
    assert got[0] == free[0][:4] and stop not in got[0]
    # decoding stopped at the stop string (not only cut afterwards)
    assert all(o["stop_strings"] == [stop, "\n\n", "</s>"] for o, _ in calls)
    assert min(n for _, ns in calls for n in ns) < 10
    # a batch whose first (longest) context starts with the BOS text: no special tokens for any of its contexts
    batch = [("<s>Q: What is 9 plus 10?\nA: a long answer", {"max_gen_toks": 5}), ("Q: hi\nA:", {"max_gen_toks": 5})]
    assert ivl.generate_until(_instances("generate_until", batch)) == hf.generate_until(
        _instances("generate_until", batch)
    )


def test_cache_hook_gets_every_answer(models):
    """What lm-eval's request cache (--use_cache) stores: one entry per request, keyed as HFLM keys them."""
    from lm_eval.api.model import CacheHook

    ivl = models[1]
    seen = []

    class Hook:
        def add_partial(self, attr, req, res):
            seen.append((attr, req, res))

    ll = [("Q: hi\nA:", " yes"), ("Q: hi\nA:", " no")]
    gen = [("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 3})]
    ivl.set_cache_hook(Hook())
    try:
        a = ivl.loglikelihood(_instances("loglikelihood", ll))
        b = ivl.loglikelihood_rolling(_instances("loglikelihood_rolling", [("some text",)]))
        c = ivl.generate_until(_instances("generate_until", gen))
    finally:
        ivl.set_cache_hook(CacheHook(None))
    assert seen == [
        ("loglikelihood", ll[0], a[0]),
        ("loglikelihood", ll[1], a[1]),
        ("loglikelihood_rolling", ("some text",), b[0]),
        ("generate_until", gen[0], c[0]),
    ]


def test_generate_until_stops_at_the_checkpoints_eos(pair, save_checkpoint, models):
    """A checkpoint whose EOS is a token the model writes at step k: both models stop there."""
    hf = models[0]
    ctx = "Q: What is 5 plus 6?\nA:"
    ids = torch.tensor([hf.tok_encode(ctx)])
    model = copy.deepcopy(pair[0])
    gen = []
    with torch.no_grad():
        for _ in range(10):
            nxt = int(model(ids).logits[0, -1].argmax())
            gen.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    k = next(i for i in range(2, 10) if gen[i] not in gen[:i] and gen[i] > 3)
    model.generation_config.eos_token_id = gen[k]
    path = save_checkpoint(model, "eos_at_k")
    req = [(ctx, {"until": [], "max_gen_toks": 10})]
    want = _hf(path).generate_until(_instances("generate_until", req))
    got = _ivl(path, scheme="base").generate_until(_instances("generate_until", req))
    assert got == want == [hf.tok_decode(gen[: k + 1])]


def test_unsupported_gen_kwargs_are_refused(models, tasks_dir, tmp_path):
    ivl = models[1]
    for bad, match in (
        ({"until": ["\n"], "top_p": 0.9}, r"unsupported gen_kwargs \['top_p'\]"),
        ({"until": ["\n"], "max_length": 9}, r"unsupported gen_kwargs \['max_length'\]"),
        ({"do_sample": True, "max_gen_toks": 4}, "needs temperature > 0"),
        ({"max_gen_toks": 256}, "leaves no room"),
    ):
        with pytest.raises(ValueError, match=match):
            ivl.generate_until(_instances("generate_until", [("Q: hi\nA:", bad)]))
    # from a task's YAML too, before anything runs
    text = (tasks_dir / "ivl_gen.yaml").read_text().replace("do_sample: false", "do_sample: false\n  top_k: 5")
    (tmp_path / "ivl_gen_bad.yaml").write_text(text.replace("task: ivl_gen", "task: ivl_gen_bad"))
    bad_manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(ValueError, match=r"unsupported gen_kwargs \['top_k'\] \(task 'ivl_gen_bad'\)"):
        lm_eval.simple_evaluate(model=ivl, tasks=["ivl_gen_bad"], limit=1, task_manager=bad_manager)


# ---------------------------------------------------------------------- the pair
def _reference(base, value, alpha, reqs):
    """log_softmax(z_base + alpha * z_value) summed over the continuation, from the transformers models."""
    out = []
    for ctx, cont in reqs:
        x = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            z = base(x).logits[0].double() + alpha * value(x).logits[0].double()
        lp = z.log_softmax(-1)[-len(cont) :]
        y = torch.tensor(cont)
        out.append((float(lp.gather(1, y[:, None]).sum()), bool((lp.argmax(-1) == y).all())))
    return out


def test_pair_equals_summed_logits_reference(pair, models):
    base, value, base_dir, value_dir = pair
    hf = models[0]  # tokenizes as lm-eval's hf model does (the reference's ids)
    ivl = _ivl(base_dir, value_dir, alpha=0.7, scheme="residual")
    texts = [(f"Question: {d['question']}\nAnswer:", f" {c}") for d in DOCS for c in d["choices"]] + [("", "Hello")]
    ids = [
        hf._encode_pair(c, x) if c else ([hf.prefix_token_id], hf.tok_encode(x, add_special_tokens=False))
        for c, x in texts
    ]
    # the pair's own greedy continuation, so that is_greedy is true somewhere
    out = ivl.dec.generate([ids[0][0]], max_new_tokens=4, eos_token_id=[])
    ids.append((ids[0][0], out.sequences[0, out.prompt_length :].tolist()))
    want = _reference(base, value, 0.7, ids)
    assert any(g for _, g in want)
    close_ll(ivl._loglikelihood_tokens([(None, c, x) for c, x in ids]), want)
    close_ll(ivl.loglikelihood(_instances("loglikelihood", texts)), want[: len(texts)])
    assert ivl.loglikelihood(_instances("loglikelihood", texts[:1]))[0][0] != pytest.approx(
        hf.loglikelihood(_instances("loglikelihood", texts[:1]))[0][0], rel=1e-3
    )  # the value network counts


# ---------------------------------------------------------------------- chat templates
@pytest.fixture(scope="module")
def chat_checkpoint(pair, save_checkpoint, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    path = save_checkpoint(pair[0], "chat_base", with_tokenizer=False)
    tok.save_pretrained(path)
    return path


def test_apply_chat_template_renders_as_hf(chat_checkpoint, manager):
    hf, ivl = _hf(chat_checkpoint), _ivl(chat_checkpoint, scheme="base")
    assert ivl.chat_template(True) == hf.chat_template(True) == CHAT_TEMPLATE
    assert ivl.tokenizer_name == hf.tokenizer_name
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for gen_prompt in (True, False):
        history = msgs + ([] if gen_prompt else [{"role": "assistant", "content": "Hel"}])
        assert ivl.apply_chat_template(history, gen_prompt) == hf.apply_chat_template(history, gen_prompt)
    kw = dict(tasks=["ivl_mc", "ivl_gen"], apply_chat_template=True, system_instruction="Answer with a number.")
    a, b = _evaluate(hf, manager, **kw), _evaluate(ivl, manager, **kw)
    assert "<|system|>\nAnswer with a number.\n<|user|>" in b["samples"]["ivl_gen"][0]["arguments"][0][0]
    same_samples(a, b, ["ivl_mc", "ivl_gen"])


def test_default_chat_template_without_one_in_the_tokenizer(models):
    ivl = models[1]
    assert not ivl.tokenizer.chat_template
    assert ivl.chat_template(True) == DEFAULT_CHAT_TEMPLATE and ivl.chat_template(False) is None
    msgs = [{"role": "user", "content": "Hi"}]
    assert ivl.apply_chat_template(msgs) == render_chat(ivl.tokenizer, msgs) == "<s><|user|>\nHi\n<|assistant|>\n"
    # the rendered text starts with the BOS text, so no second BOS is added (as HFLM does)
    assert ivl.tok_encode(ivl.apply_chat_template(msgs))[:2] != [1, 1]
