"""The server as vLLM's users know it, through the official openai client and plain HTTP on loopback: content parts,
``model`` left out, ``/v1/models/{id}``, OpenAI-shaped errors for every status, the checkpoint's generation config as
request defaults (``--generation-config auto|vllm``), ``/tokenize`` ``/detokenize`` ``/version``, vLLM's metric
names, ``--chat-template``."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import openai  # noqa: E402
from serve_fixtures import Server  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from ivl_fast import __version__  # noqa: E402
from ivl_fast.chat import render_chat  # noqa: E402

MSGS = [{"role": "user", "content": "Where does Kalo live?"}]


def test_content_parts_are_the_text_they_hold(served):
    srv, dec = served
    c = srv.client()
    want = c.chat.completions.create(
        model="ivl", messages=[{"role": "user", "content": "Where does\nKalo live?"}], max_tokens=8, temperature=0
    )
    parts = [{"type": "text", "text": "Where does"}, {"type": "text", "text": "Kalo live?"}]
    got = c.chat.completions.create(model="ivl", messages=[{"role": "user", "content": parts}], max_tokens=8,
                                    temperature=0)  # fmt: skip
    assert got.choices[0].message.content == want.choices[0].message.content
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="ivl", messages=[{"role": "user", "content": image}], max_tokens=2)
    e = err.value.body
    assert e["param"] == "messages"
    assert e["message"] == "messages[0].content[0]: only text parts are supported, got 'image_url'"


def test_model_may_be_left_out_and_each_model_is_retrievable(served):
    srv, dec = served
    body = {"messages": MSGS, "max_tokens": 6, "temperature": 0}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "ivl"
    assert r.json()["choices"][0]["message"]["content"] == dec.generate_text(MSGS, chat=True, max_new_tokens=6)
    card = srv.client().models.retrieve("ivl")
    assert card.id == "ivl" and card.object == "model" and card.owned_by == "ivl-fast"
    with pytest.raises(openai.NotFoundError) as err:
        srv.client().models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "other", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    "method, path, status",
    [("get", "/v1/completions", 405), ("delete", "/v1/models", 405), ("get", "/v1/nothing-here", 404),
     ("post", "/version", 405)],
)  # fmt: skip
def test_every_error_is_openai_shaped(served, method, path, status):
    srv, _ = served
    r = getattr(httpx, method)(f"{srv.url}{path}", timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert path in err["message"]


def test_tokenize_detokenize_and_version_as_vllm_serves_them(served):
    srv, dec = served
    tok = dec.tokenizer
    r = httpx.post(f"{srv.url}/tokenize", json={"model": "ivl", "prompt": "Where does Kalo live?"}).json()
    ids = tok("Where does Kalo live?")["input_ids"]
    assert r == {"count": len(ids), "max_model_len": 128, "tokens": ids, "token_strs": None}
    r = httpx.post(f"{srv.url}/tokenize", json={"prompt": "Kalo", "add_special_tokens": False,
                                                "return_token_strs": True}).json()  # fmt: skip
    assert r["tokens"] == tok("Kalo", add_special_tokens=False)["input_ids"]
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    r = httpx.post(f"{srv.url}/tokenize", json={"messages": MSGS}).json()
    assert r["tokens"] == tok(render_chat(tok, MSGS), add_special_tokens=False)["input_ids"]
    back = httpx.post(f"{srv.url}/detokenize", json={"tokens": ids}).json()
    assert back == {"prompt": tok.decode(ids)}
    bad = httpx.post(f"{srv.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(f"{srv.url}/tokenize", json={"prompt": "a", "messages": MSGS})
    assert both.status_code == 400 and both.json()["error"]["message"] == "give exactly one of 'prompt' or 'messages'"
    assert httpx.get(f"{srv.url}/version").json() == {"version": __version__}


def test_vllms_metric_names_beside_ours(served):
    srv, _ = served
    r = srv.client().completions.create(model="ivl", prompt="import os", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 4
    text = httpx.get(f"{srv.url}/metrics").text

    def value(line_start: str) -> float:
        (line,) = [x for x in text.splitlines() if x.startswith(line_start)]
        return float(line.rsplit(" ", 1)[1])

    assert value('vllm:generation_tokens_total{model_name="ivl"}') >= 4
    assert value('vllm:prompt_tokens_total{model_name="ivl"}') >= r.usage.prompt_tokens
    assert value('vllm:request_success_total{finished_reason="length",model_name="ivl"}') >= 1
    assert value('vllm:time_to_first_token_seconds_count{model_name="ivl"}') >= 1
    assert value('vllm:e2e_request_latency_seconds_count{model_name="ivl"}') >= 1
    assert value('vllm:num_requests_running{model_name="ivl"}') == 0
    assert value('vllm:num_requests_waiting{model_name="ivl"}') == 0
    assert value("ivl_generated_tokens_total") >= 4


@pytest.fixture(scope="module")
def value_with_config(pair, tmp_path_factory):
    """The pair's value network with a generation_config.json that sets request defaults."""
    d = tmp_path_factory.mktemp("value_with_config")
    shutil.copytree(pair[3], d, dirs_exist_ok=True)
    GenerationConfig(max_new_tokens=5, repetition_penalty=1.6, do_sample=True, top_k=1).save_pretrained(d)
    return d


def test_the_checkpoints_generation_config_gives_request_defaults(pair, value_with_config):
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    auto = Server("--base", pair[2], "--value", value_with_config, "--served-model-name", "ivl", "--max-model-len",
                  96, "--chat-template", template)  # fmt: skip
    plain = Server("--base", pair[2], "--value", value_with_config, "--served-model-name", "ivl", "--max-model-len",
                   96, "--generation-config", "vllm")  # fmt: skip
    try:
        a, p = auto.client(), plain.client()

        def ask(client, **extra):
            return client.completions.create(model="ivl", prompt="return x", extra_body={"ignore_eos": True, **extra})

        short = ask(a)
        assert short.usage.completion_tokens == 5  # max_new_tokens of the file, not OpenAI's 16
        assert ask(p).usage.completion_tokens == 16
        # repetition_penalty=1.6 and top_k=1 of the file (top_k=1: greedy whatever the temperature), unless asked
        explicit = ask(p, max_tokens=5, repetition_penalty=1.6, temperature=0)
        assert short.choices[0].text == explicit.choices[0].text
        plain_text = ask(p, max_tokens=5, temperature=0).choices[0].text
        assert ask(a, repetition_penalty=1.0, temperature=0).choices[0].text == plain_text
        assert plain_text != short.choices[0].text  # the penalty of the file changed the answer
        # --chat-template: the messages rendered with it
        tok = httpx.post(f"{auto.url}/tokenize", json={"messages": MSGS}).json()["tokens"]
        ids = httpx.post(f"{auto.url}/tokenize", json={"prompt": "<<Where does Kalo live?>>",
                                                      "add_special_tokens": False}).json()["tokens"]  # fmt: skip
        assert tok == ids
    finally:
        auto.stop()
        plain.stop()


def test_a_chat_template_flag_that_is_neither_file_nor_template_is_refused(pair, capsys):
    from ivl_fast.cli import main

    rc = main(["serve", "--base", str(pair[2]), "--value", str(pair[3]), "--chat-template", "no/such/file.jinja"])
    err = capsys.readouterr().err
    assert rc == 2 and "--chat-template 'no/such/file.jinja' is neither a file nor a Jinja template" in err
    rc = main(["serve", "--base", str(pair[2]), "--value", str(pair[3]), "--chat-template", "{% for %}"])
    assert rc == 2 and "--chat-template does not parse" in capsys.readouterr().err


def test_return_components_shows_what_the_value_network_changed(served):
    """ivl-fast's extension field: per token the top entries of the base alone, of the value's delta and of the
    combination, and whether the value network changed the choice: generate(return_components=k)'s, through the
    batch, in a chat answer (whole and streamed) and a completion."""
    srv, dec = served
    tok = dec.tokenizer
    from ivl_fast.chat import render_chat

    ids = tok(render_chat(tok, MSGS), add_special_tokens=False)["input_ids"]
    want = dec.generate([ids], max_new_tokens=6, return_components=2, eos_token_id=[])
    body = {"messages": MSGS, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_components": 2}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
    comps = r["choices"][0]["components"]
    assert len(comps) == 6
    for t, c in enumerate(comps):
        assert c["changed"] == bool(want.components.changed[0, t])
        assert [e["token"] for e in c["base"]] == [tok.decode([i]) for i in want.components.ids[0, t, 0].tolist()]
        assert [e["delta"] for e in c["value"]] == pytest.approx(want.components.values[0, t, 1].tolist(), abs=1e-4)
        assert c["combined"][0]["token"] == c["token"]  # greedy: the combination's first choice was emitted
    raw = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    streamed = [c for ch in chunks for choice in ch["choices"] for c in choice.get("components", [])]
    assert streamed == comps
    r = srv.client().completions.create(model="ivl", prompt="import os", max_tokens=3, temperature=0,
                                        extra_body={"return_components": 1})  # fmt: skip
    assert len(r.choices[0].model_extra["components"]) == 3
    plain = srv.client().completions.create(model="ivl", prompt="x", max_tokens=2)
    assert "components" not in plain.choices[0].model_extra
    bad = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "return_components": 9}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_components"


def test_max_components_zero_turns_the_extension_off(pair):
    srv = Server("--base", pair[2], "--value", pair[3], "--served-model-name", "ivl", "--max-model-len", 64,
                 "--max-components", 0)  # fmt: skip
    try:
        body = {"messages": MSGS, "max_tokens": 2, "return_components": 1}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == (
            "'return_components' is not available on this server (--max-components 0, a draft model, or one model "
            "only)"
        )
        assert httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "return_components": 0}).status_code == 200
    finally:
        srv.stop()
