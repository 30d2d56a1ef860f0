"""`ivl-fast serve`, the request features beyond plain decoding: per-request seeds with sampling, logprobs and top
alternatives, continuous batching across vocabularies (--vocab-map) and in speculative rounds (--draft), and the
per-step token budget (--max-num-batched-tokens); a real uvicorn server on loopback and the official `openai`
client, as in tests/test_serve.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from serve_fixtures import PROMPTS, Server, _error  # noqa: E402

from ivl_fast import FastIVLDecoder  # noqa: E402


def test_serving_across_vocabularies_with_a_vocab_map(tmp_path, tokenizer, save_checkpoint):
    """--vocab-map: the value network on its tokenizer steers a base with another one; concurrent completions and
    chat requests (more than the slots) each equal the decoder's own cross-vocabulary answer alone."""
    from conftest import build_model

    from ivl_fast.tiny import corpus_text, train_tokenizer
    from ivl_fast.vocab import VocabMap

    base_tok = train_tokenizer(700, max_chars=150_000)
    base = build_model("llama", seed=0, vocab_size=len(base_tok), hidden_size=96, num_attention_heads=6)
    bdir = tmp_path / "xbase"
    base.save_pretrained(bdir)
    base_tok.save_pretrained(bdir)
    vdir = save_checkpoint(build_model("llama", seed=1, vocab_size=len(tokenizer)), "xvalue")
    VocabMap.build(base_tok, tokenizer, [corpus_text()[200_000:260_000]], top_k=3).save(tmp_path / "m.safetensors")
    dec = FastIVLDecoder.from_pretrained(bdir, vdir, tmp_path / "m.safetensors")
    srv = Server(
        "--base",
        bdir,
        "--value",
        vdir,
        "--vocab-map",
        tmp_path / "m.safetensors",
        "--served-model-name",
        "x",
        "--max-batch-size",
        2,
        "--max-model-len",
        96,
    )
    try:
        jobs = [(p, 5 + 2 * i) for i, p in enumerate(PROMPTS[:5])]
        msgs = [{"role": "user", "content": "Where does Kalo live?"}]

        def ask(job):
            p, n = job
            return srv.client().completions.create(model="x", prompt=p, max_tokens=n, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(jobs) + 1) as pool:
            chat = pool.submit(
                lambda: srv.client().chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
            )
            got = list(pool.map(ask, jobs))
        assert got == [dec.generate_text(p, max_new_tokens=n) for p, n in jobs]
        assert chat.result().choices[0].message.content == dec.generate_text(msgs, chat=True, max_new_tokens=8)
    finally:
        srv.stop()


def test_serving_with_a_draft_model(pair, save_checkpoint):
    """--draft: the batch decodes in speculative rounds; concurrent greedy requests (more than the slots, joining
    running rounds) each equal plain decoding alone, streamed or not; what one alpha and one random stream cannot
    give is a 400 naming the field."""
    from conftest import build_model

    _, _, base_dir, value_dir = pair
    draft_dir = save_checkpoint(build_model("llama", seed=2), "serve-draft")
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    srv = Server(
        "--base",
        base_dir,
        "--value",
        value_dir,
        "--draft",
        draft_dir,
        "--num-draft-tokens",
        3,
        "--served-model-name",
        "d",
        "--max-batch-size",
        3,
        "--max-model-len",
        96,
    )
    try:
        jobs = [(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)]

        def ask(job):
            p, n = job
            return srv.client().completions.create(model="d", prompt=p, max_tokens=n, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(ask, jobs))
        assert got == [dec.generate_text(p, max_new_tokens=n) for p, n in jobs]
        msgs = [{"role": "user", "content": "Where does Kalo live?"}]
        chunks = srv.client().chat.completions.create(
            model="d", messages=msgs, max_tokens=10, temperature=0, stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == dec.generate_text(msgs, chat=True, max_new_tokens=10)
        r = srv.client().completions.create(model="d", prompt="def main", max_tokens=6, temperature=0.8, n=2)
        assert len(r.choices) == 2 and r.usage.completion_tokens >= 2
        for body, param in (
            ({"seed": 3, "temperature": 0.7}, "seed"),
            ({"alpha": 0.5}, "alpha"),
            ({"logprobs": 2}, "logprobs"),
        ):
            status, err = _error(srv, "/v1/completions", {"model": "d", "prompt": "hi", **body})
            assert status == 400 and err["param"] == param, err
    finally:
        srv.stop()


def test_a_seed_reproduces_a_sampled_answer_whatever_else_runs(served):
    """A sampled request with a seed gets the same choices alone and amid concurrent sampled traffic (its rows
    draw from their own streams); its n choices differ (choice i draws from seed + i, vLLM's rule), and another
    seed gives other answers."""
    srv, _ = served

    def ask(seed, prompt="def main", n=2):
        r = srv.client().completions.create(model="ivl", prompt=prompt, max_tokens=12, temperature=1.2, n=n, seed=seed)
        return [c.text for c in r.choices]

    alone = ask(42)
    assert alone[0] != alone[1]
    with ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(ask, None, p) for p in PROMPTS[:4]]
        again = [pool.submit(ask, 42) for _ in range(2)]
        [f.result() for f in noise]
        assert [f.result() for f in again] == [alone, alone]
    assert ask(43) != alone
    # one choice with seed s + 1 is the second choice of seed s
    assert ask(43, n=1) == [alone[1]] and ask(42, n=1) == [alone[0]]


def test_logprobs_and_top_logprobs_in_openai_shape(served):
    """chat: logprobs=true + top_logprobs=k gives per token the k most likely alternatives, most likely first,
    the greedy token first among them with its own logprob; completions: logprobs=k gives {token: logprob} dicts
    holding the sampled token."""
    srv, dec = served
    c = srv.client()
    msgs = [{"role": "user", "content": "Where does Kalo live?"}]
    r = c.chat.completions.create(
        model="ivl", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        alts = t.top_logprobs
        assert len(alts) == 4 and [a.logprob for a in alts] == sorted((a.logprob for a in alts), reverse=True)
        assert alts[0].token == t.token and abs(alts[0].logprob - t.logprob) < 1e-5
        assert sum(2.718281828**a.logprob for a in alts) <= 1 + 1e-4
        assert alts[0].bytes == list(alts[0].token.encode())
    # streamed: the same alternatives, chunk by chunk
    chunks = c.chat.completions.create(
        model="ivl", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4, stream=True
    )
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [[a.token for a in t.top_logprobs] for t in content]
    r = c.completions.create(model="ivl", prompt="def main", max_tokens=5, temperature=0.9, seed=1, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) == len(lp.token_logprobs)
    for tok_s, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # up to k + 1 entries; fewer when alternatives decode to the same text (byte tokens: "\ufffd")
        assert tok_s in top and abs(top[tok_s] - tok_lp) < 1e-5 and 1 <= len(top) <= 3
    status, err = _error(srv, "/v1/chat/completions", {"model": "ivl", "messages": msgs, "top_logprobs": 2})
    assert status == 400 and err["param"] == "top_logprobs"
    status, err = _error(
        srv, "/v1/chat/completions", {"model": "ivl", "messages": msgs, "logprobs": True, "top_logprobs": 21}
    )
    assert status == 400 and err["param"] == "top_logprobs"


@pytest.mark.parametrize("budget", [None, 14])
def test_max_num_batched_tokens_bounds_each_steps_tokens(pair, budget):
    """--max-num-batched-tokens: one token per running row + the prompt tokens admitted before a step stay within
    the budget (a request alone may exceed it: prompts are not split); without it a burst is admitted at once.
    Every answer is still its own."""
    import asyncio

    from ivl_fast.sampling import SamplingParams
    from ivl_fast.serve.scheduler import Scheduler
    from ivl_fast.serve.sequence import Finished, SequenceRequest

    dec = FastIVLDecoder.from_pretrained(pair[2], pair[3])
    sched = Scheduler(dec, max_batch_size=4, max_model_len=64, max_queue=8, max_num_batched_tokens=budget)
    prompts = [dec.tokenizer(p)["input_ids"] for p in PROMPTS]
    admitted = []
    admit = sched.batch.admit_many

    def spy(reqs):
        admitted.append((sched.running, [len(r.prompt_ids) for r in reqs]))
        return admit(reqs)

    sched.batch.admit_many = spy

    async def run():
        loop = asyncio.get_running_loop()
        seqs = [sched.submit(SequenceRequest(p, 5, SamplingParams(False)), loop) for p in prompts]
        sched.start()
        out = []
        for s in seqs:
            toks = []
            while not isinstance(ev := await s.events.get(), Finished):
                toks += ev.token_ids
            out.append(toks)
        return out

    try:
        got = asyncio.run(run())
    finally:
        sched.shutdown(timeout=5)
    want = [dec.generate([p], max_new_tokens=5, eos_token_id=[]).sequences[0, len(p) :].tolist() for p in prompts]
    assert got == want
    if budget is None:
        assert admitted[0][1] == [len(p) for p in prompts[:4]]  # the burst at once (4 slots)
    else:
        assert len(admitted) > 2
        for running, lens in admitted:
            assert len(lens) == 1 or running + sum(lens) <= budget, admitted
