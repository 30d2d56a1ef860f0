"""``chat_template_kwargs``: extra variables for a checkpoint's chat template (vLLM's request field, e.g.
``{"enable_thinking": false}`` for Qwen3), through ``ivl_fast.chat.render_chat``, ``FastIVLDecoder.generate_text``,
``ivl-fast generate --chat-template-kwargs JSON`` and the server's ``/v1/chat/completions`` (a real uvicorn server on
loopback, the official ``openai`` client, ``extra_body=``). The checkpoints carry a real tokenizer whose template
reads ``enable_thinking`` as Qwen3's does: an empty think block after the assistant header when it is false."""

from __future__ import annotations

import json

import pytest
from conftest import save_with_template

from ivl_fast import FastIVLDecoder
from ivl_fast.chat import RESERVED_CHAT_TEMPLATE_KWARGS, check_chat_template_kwargs, render_chat
from ivl_fast.cli import main

# Qwen3's switch, on a small template of our own
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
MSGS = [{"role": "user", "content": "Where does Kalo live?"}]
OFF = {"enable_thinking": False}
N = 8


@pytest.fixture(scope="module")
def thinking_dirs(pair, tokenizer, tmp_path_factory):
    """The pair's weights saved with a real tokenizer whose chat template reads ``enable_thinking``."""
    return save_with_template(pair[:2], tokenizer, tmp_path_factory, THINKING_TEMPLATE, "think")


@pytest.fixture(scope="module")
def dec(thinking_dirs):
    return FastIVLDecoder.from_pretrained(*thinking_dirs)


def _greedy(dec, text: str, n: int = N) -> str:
    """The decoder's greedy continuation of a rendered prompt (its token ids, no special tokens added), as text."""
    tok = dec.tokenizer
    out = dec.generate([tok(text, add_special_tokens=False)["input_ids"]], max_new_tokens=n, do_sample=False)
    t = out.prompt_length
    return tok.decode(out.sequences[0, t : t + int(out.num_new_tokens[0])].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected(dec):
    """(text with thinking, text with enable_thinking false): the two renderings decode differently."""
    tok = dec.tokenizer
    on, off = render_chat(tok, MSGS), render_chat(tok, MSGS, chat_template_kwargs=OFF)
    assert off == on + "<think>\n\n</think>\n\n"
    # the variable reaches transformers' own rendering the same way
    assert off == tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    want = _greedy(dec, on), _greedy(dec, off)
    assert want[0] != want[1], "the think block must change this pair's greedy text (pick another prompt)"
    return want


# ----------------------------------------------------------------------------- render_chat / generate_text
def test_render_chat_passes_the_variables_and_refuses_reserved_keys(dec):
    tok = dec.tokenizer
    assert render_chat(tok, MSGS, chat_template_kwargs={"enable_thinking": True}) == render_chat(tok, MSGS)
    assert render_chat(tok, MSGS, chat_template_kwargs={}) == render_chat(tok, MSGS, chat_template_kwargs=None)
    for key in ("messages", "tokenize", "add_generation_prompt", "conversation", "chat_template", "return_dict"):
        assert key in RESERVED_CHAT_TEMPLATE_KWARGS
        with pytest.raises(ValueError, match=f"chat_template_kwargs may not set '{key}'"):
            render_chat(tok, MSGS, chat_template_kwargs={key: True})
    for bad in ([["enable_thinking", False]], "enable_thinking=false", 1):
        with pytest.raises(TypeError, match="chat_template_kwargs must be an object"):
            render_chat(tok, MSGS, chat_template_kwargs=bad)
    with pytest.raises(TypeError, match="keys must be strings"):
        check_chat_template_kwargs({1: True})


def test_generate_text_takes_chat_template_kwargs(dec, expected):
    on, off = expected
    assert dec.generate_text(MSGS, chat=True, max_new_tokens=N, do_sample=False) == on
    got = dec.generate_text(MSGS, chat=True, chat_template_kwargs=OFF, max_new_tokens=N, do_sample=False)
    assert got == off
    with pytest.raises(ValueError, match="'tokenize'"):
        dec.generate_text(MSGS, chat=True, chat_template_kwargs={"tokenize": True}, max_new_tokens=N)


# ----------------------------------------------------------------------------- ivl-fast generate
def _generate(capsys, dirs, *extra):
    capsys.readouterr()
    argv = ["generate", "--base", str(dirs[0]), "--value", str(dirs[1]), "--no-progress", *map(str, extra)]
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_chat_template_kwargs(capsys, thinking_dirs, expected):
    on, off = expected
    common = ("--prompt", MSGS[0]["content"], "--chat", "--max-new-tokens", N, "--no-do-sample", "--json")
    rc, out, err = _generate(capsys, thinking_dirs, *common, "--chat-template-kwargs", json.dumps(OFF))
    assert rc == 0, err
    assert json.loads(out)["outputs"][0]["text"] == off
    rc, out, err = _generate(capsys, thinking_dirs, *common, "--chat-template-kwargs", '{"enable_thinking": true}')
    assert rc == 0, err
    assert json.loads(out)["outputs"][0]["text"] == on


@pytest.mark.parametrize(
    "value, extra, needles",
    [
        ("{enable_thinking: false}", ["--chat"], ["--chat-template-kwargs is not valid JSON"]),
        ('["enable_thinking", false]', ["--chat"], ["--chat-template-kwargs must be a JSON object, got list"]),
        ("false", ["--chat"], ["--chat-template-kwargs must be a JSON object, got bool"]),
        ('{"tokenize": true}', ["--chat"], ["--chat-template-kwargs may not set 'tokenize'"]),
        ('{"messages": []}', ["--chat"], ["--chat-template-kwargs may not set 'messages'"]),
        (json.dumps(OFF), [], ["--chat-template-kwargs needs --chat"]),
    ],
)
def test_cli_bad_chat_template_kwargs_is_one_line_naming_the_flag(capsys, thinking_dirs, value, extra, needles):
    from cli_fixtures import one_line

    rc, _, err = _generate(capsys, thinking_dirs, "--prompt", "hi", "--chat-template-kwargs", value, *extra)
    one_line(rc, err, *needles)


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def srv(thinking_dirs):
    pytest.importorskip("openai")
    from serve_fixtures import Server

    s = Server(
        "--base", thinking_dirs[0], "--value", thinking_dirs[1], "--served-model-name", "ivl",
        "--max-batch-size", 2, "--max-model-len", 128,
    )  # fmt: skip
    yield s
    s.stop()


def _chat(srv, **kw):
    return srv.client().chat.completions.create(model="ivl", messages=MSGS, max_tokens=N, temperature=0, **kw)


def test_server_chat_template_kwargs_through_the_openai_client(srv, expected):
    on, off = expected
    assert _chat(srv).choices[0].message.content == on
    assert _chat(srv, extra_body={"chat_template_kwargs": OFF}).choices[0].message.content == off
    assert _chat(srv, extra_body={"chat_template_kwargs": None}).choices[0].message.content == on
    # streamed: the same text, and the prompt's token count is the rendered one
    chunks = list(
        _chat(srv, extra_body={"chat_template_kwargs": OFF}, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == off
    tok = srv.scheduler.tokenizer
    rendered = render_chat(tok, MSGS, chat_template_kwargs=OFF)
    assert chunks[-1].usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "value, needle",
    [
        ({"messages": []}, "'messages'"),
        ({"tokenize": True}, "'tokenize'"),
        ({"add_generation_prompt": False}, "'add_generation_prompt'"),
        ({"conversation": []}, "'conversation'"),
        ({"chat_template": "{{ 'x' }}"}, "'chat_template'"),
        ({"enable_thinking": False, "return_dict": True}, "'return_dict'"),
        ([["enable_thinking", False]], "must be an object"),
        ("enable_thinking", "must be an object"),
        (True, "must be an object"),
    ],
)
def test_server_refuses_bad_chat_template_kwargs_with_a_400_naming_the_key(srv, value, needle):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        _chat(srv, extra_body={"chat_template_kwargs": value})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "chat_template_kwargs", err
    assert needle in err["message"] and "chat_template_kwargs" in err["message"], err
    assert srv.scheduler.running == 0
    assert _chat(srv).choices[0].message.content  # the server goes on
