"""The ``ivl-fast`` command line, run in-process through ``ivl_fast.cli.main`` (fast), plus one real subprocess.

Checkpoints come from the conftest ``pair`` fixture (real HF directories with a tokenizer). ``main`` returns 0 on
success and 2 on bad input, printing ``ivl-fast <cmd>: error: ...`` to stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import build_model, save_with_template
from transformers import AutoModelForCausalLM, AutoTokenizer

import ivl_fast
from ivl_fast import FastIVLDecoder
from ivl_fast.cli import main

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def dirs(pair):
    """(base_dir, value_dir) as strings, as a shell would pass them."""
    return str(pair[2]), str(pair[3])


def greedy_reference(models, ids, max_new_tokens, *, eos_id=2) -> list[int]:
    """Greedy new token ids under z = sum(alpha * logits) of ``models`` [(hf_model, alpha)], from the definition:
    a full float64 forward over the whole sequence at every step (no KV cache, no padding, no fused sampler)."""
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([seq])
            z = sum(a * m(x).logits[0, -1].double() for m, a in models if a != 0)  # [V]
            top2 = z.topk(2).values
            # the decoder runs in float32: a near-tie would make "equal to greedy" ill-defined, so refuse one
            assert top2[0] - top2[1] > 1e-4, f"near-tie at step {len(new)}: choose another prompt"
            nxt = int(z.argmax())
            new.append(nxt)
            seq.append(nxt)
            if nxt == eos_id:
                break
    return new


@pytest.fixture(scope="module")
def ref(dirs):
    """float64 transformers copies of the pair's checkpoints and their tokenizer, loaded from the same dirs."""
    base = AutoModelForCausalLM.from_pretrained(dirs[0], dtype=torch.float64).eval()
    value = AutoModelForCausalLM.from_pretrained(dirs[1], dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(dirs[1])

    class Ref:
        tokenizer = tok

        @staticmethod
        def text(ids, n, alpha=1.0, value_model=value) -> str:
            """The text of the greedy continuation of token ids under base + alpha * value."""
            return tok.decode(greedy_reference([(base, 1.0), (value_model, alpha)], ids, n), skip_special_tokens=True)

        @staticmethod
        def prompt_text(prompt: str, n: int, alpha=1.0) -> str:
            return Ref.text(tok(prompt)["input_ids"], n, alpha)

        @staticmethod
        def first_step_logits(prompt: str) -> torch.Tensor:
            x = torch.tensor([tok(prompt)["input_ids"]])
            with torch.no_grad():
                return base(x).logits[0, -1].double() + value(x).logits[0, -1].double()  # [V]

    Ref.base, Ref.value = base, value
    return Ref


def default_chat_prompt(bos: str, messages: list[dict]) -> str:
    """README/ivl_fast.chat's documented default format, written out by hand:
    ``<bos><|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n`` (generation prompt at the end)."""
    return bos + "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def generate(capsys, dirs, *extra) -> tuple[int, str, str]:
    base, value = dirs
    return run_cli(capsys, "generate", "--base", base, "--value", value, *extra)


# ----------------------------------------------------------------------------- generate


def test_generate_json_text_is_the_greedy_continuation_of_base_plus_value(capsys, dirs, ref):
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 8, "--json")
    assert rc == 0, err
    report = json.loads(out)  # stdout is exactly one JSON object
    assert report["outputs"][0]["prompt"] == PROMPT
    expected = ref.prompt_text(PROMPT, 8)  # plain transformers, float64: argmax of z_base + z_value per step
    assert expected and report["outputs"][0]["text"] == expected
    assert report["speed"]["tokens"] > 0
    assert report["base_alone"] is None
    assert "tokens/s" in err


def test_generate_compare_base(capsys, dirs):
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 4, "--json", "--compare-base")
    assert rc == 0, err
    assert "base alone:" in err and "pair/base time per token" in err
    base_alone = json.loads(out)["base_alone"]
    assert base_alone["tokens"] > 0
    assert base_alone["pair_over_base_time_per_token"] > 0


def test_generate_explain_shows_what_the_value_network_changed(capsys, dirs):
    """--explain K: after the answer, per token the top-K of the base, of the value's delta and of the combination,
    '*' where the value network changed the choice: the Python API's components, as text and in --json."""
    dec = FastIVLDecoder.from_pretrained(dirs[0], dirs[1])
    ids = dec.tokenizer(PROMPT)["input_ids"]
    out = dec.generate([ids], max_new_tokens=5, return_components=3, eos_token_id=[])
    changed = out.components.changed[0].tolist()
    rc, stdout, _ = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 5, "--explain", 3, "--no-eos")
    assert rc == 0
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line[9] == "*" for line in steps] == changed and len(steps) == 5
    assert stdout.count("\n    value     ") == 5
    assert stdout.rstrip().endswith(f"the value network changed {sum(changed)} of 5 tokens (*)")
    rc, stdout, _ = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 5, "--explain", "--no-eos", "--json")
    (o,) = json.loads(stdout)["outputs"]
    assert [e["changed"] for e in o["explain"]] == changed and len(o["explain"][0]["base"]) == 5  # K: 5 by default
    assert o["changed_fraction"] == pytest.approx(sum(changed) / 5)


def test_generate_matches_python_api(capsys, dirs):
    # greedy decoding: the CLI and generate_text must agree token for token
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 8, "--json")
    assert rc == 0, err
    expected = FastIVLDecoder.from_pretrained(*dirs).generate_text(PROMPT, max_new_tokens=8)
    assert json.loads(out)["outputs"][0]["text"] == expected


@pytest.mark.parametrize("mode", ["fused", "two_stream"])
def test_generate_with_emulated_graphs_matches_eager(capsys, dirs, mode):
    args = ("--prompt", PROMPT, "--max-new-tokens", 8, "--json", "--compare-base")
    rc, out, err = generate(capsys, dirs, *args, "--graphs", "emulate", "--graph-mode", mode)
    assert rc == 0, err
    rc2, eager, err2 = generate(capsys, dirs, *args, "--graphs", "off")
    assert rc2 == 0, err2
    assert json.loads(out)["outputs"] == json.loads(eager)["outputs"]
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--graphs", "cuda")
    assert rc == 2 and "graphs='cuda' needs the models on a CUDA device" in err


def test_generate_plain_text_output(capsys, dirs):
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--max-new-tokens", 4)
    assert rc == 0, err
    expected = FastIVLDecoder.from_pretrained(*dirs).generate_text(PROMPT, max_new_tokens=4)
    assert out == expected + "\n"


def test_prompts_file_txt_batched_each_text_is_its_prompts_own_greedy_continuation(capsys, dirs, tmp_path, ref):
    f = tmp_path / "prompts.txt"
    f.write_text("def f(x):\n\nclass A:\nimport os\n")  # the blank line is skipped
    rc, out, err = generate(capsys, dirs, "--prompts-file", f, "--batch-size", 2, "--max-new-tokens", 4, "--json")
    assert rc == 0, err
    outputs = json.loads(out)["outputs"]
    assert [o["prompt"] for o in outputs] == ["def f(x):", "class A:", "import os"]  # 2 batches, order kept
    # each row of a padded batch decodes exactly as its prompt alone would (no padding leak, no row mix-up)
    expected = [ref.prompt_text(o["prompt"], 4) for o in outputs]
    assert len(set(expected)) == 3  # distinct, so a row swap would show
    assert [o["text"] for o in outputs] == expected


def test_prompts_file_jsonl_chat_renders_the_default_template_with_the_system_message(capsys, dirs, tmp_path, ref):
    f = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "Write a loop."}]
    f.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"messages": messages}) + "\n")
    rc, out, err = generate(
        capsys, dirs, "--prompts-file", f, "--chat", "--system", "Be brief.", "--max-new-tokens", 6, "--json"
    )
    assert rc == 0, err
    outputs = json.loads(out)["outputs"]
    assert [o["prompt"] for o in outputs] == ["Hello", messages]
    # the pair's tokenizer has no chat template: the documented default format, system message first
    tok, system = ref.tokenizer, {"role": "system", "content": "Be brief."}
    convs = [[system, {"role": "user", "content": "Hello"}], [system, *messages]]
    expected = [
        ref.text(tok(default_chat_prompt(tok.bos_token, c), add_special_tokens=False)["input_ids"], 6) for c in convs
    ]
    assert [o["text"] for o in outputs] == expected


def test_prompts_file_malformed_jsonl(capsys, dirs, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n')
    rc, _, err = generate(capsys, dirs, "--prompts-file", f)
    assert rc == 2
    assert f"ivl-fast generate: error: {f}:2: malformed JSON" in err


def test_prompts_file_jsonl_wrong_shape(capsys, dirs, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "no prompt key"}\n')
    rc, _, err = generate(capsys, dirs, "--prompts-file", f)
    assert rc == 2
    assert f"{f}:1: expected a string or an object with 'prompt' or 'messages'" in err


def test_prompts_file_messages_without_chat(capsys, dirs, tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    rc, _, err = generate(capsys, dirs, "--prompts-file", f, "--max-new-tokens", 2)
    assert rc == 2
    assert "--chat" in err  # generate_text says "use chat=True for messages"; the CLI should say --chat


def test_prompts_file_missing_or_empty(capsys, dirs, tmp_path):
    rc, _, err = generate(capsys, dirs, "--prompts-file", tmp_path / "nope.txt")
    assert rc == 2 and "nope.txt" in err and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc, _, err = generate(capsys, dirs, "--prompts-file", empty)
    assert rc == 2 and "holds no prompts" in err


def test_scheme_base_without_value(capsys, dirs):
    rc, out, err = run_cli(
        capsys, "generate", "--base", dirs[0], "--scheme", "base", "--prompt", PROMPT, "--max-new-tokens", 4, "--json"
    )
    assert rc == 0, err
    assert json.loads(out)["speed"]["scheme"] == "base"
    assert "base alone:" in err


# ----------------------------------------------------------------------------- --chat / --system

# a template unlike the default one, so that using the default instead of the checkpoint's would show
OWN_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def templated_dirs(pair, tokenizer, tmp_path_factory):
    """The pair's weights saved with a tokenizer that carries its own chat template."""
    return tuple(map(str, save_with_template(pair[:2], tokenizer, tmp_path_factory, OWN_TEMPLATE, "tmpl")))


def test_chat_and_system_render_the_checkpoints_own_template(capsys, templated_dirs, ref):
    user = "Hello"
    tok = AutoTokenizer.from_pretrained(templated_dirs[1])
    assert tok.chat_template == OWN_TEMPLATE

    def templated(messages):  # transformers' own rendering of the checkpoint's template
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return ref.text(tok(text, add_special_tokens=False)["input_ids"], 8)

    with_system = templated([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": user}])
    without_system = templated([{"role": "user", "content": user}])
    plain = ref.prompt_text(user, 8)
    assert len({with_system, without_system, plain}) == 3  # each flag changes the greedy text of this pair

    def cli(*extra):
        rc, out, err = generate(capsys, templated_dirs, "--prompt", user, "--max-new-tokens", 8, "--json", *extra)
        assert rc == 0, err
        return json.loads(out)["outputs"][0]["text"]

    assert cli("--chat", "--system", "Answer in French.") == with_system
    assert cli("--chat") == without_system
    assert cli() == plain  # no --chat: the raw prompt (with BOS), no template


def test_chat_without_own_template_uses_the_documented_default_format(capsys, dirs, ref):
    tok = ref.tokenizer
    assert tok.chat_template is None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    expected = ref.text(tok(default_chat_prompt(tok.bos_token, msgs), add_special_tokens=False)["input_ids"], 8)
    assert expected != ref.prompt_text("Hello", 8)
    rc, out, err = generate(capsys, dirs, "--prompt", "Hello", "--chat", "--system", "Be brief.", "--max-new-tokens", 8)
    assert rc == 0, err
    assert out == expected + "\n"


# ----------------------------------------------------------------------------- sampling flags


def _cli_text(capsys, dirs, *extra) -> str:
    rc, out, err = generate(capsys, dirs, "--prompt", PROMPT, "--json", *extra)
    assert rc == 0, err
    return json.loads(out)["outputs"][0]["text"]


def test_alpha_scales_the_value_logits(capsys, dirs, ref):
    ids = ref.tokenizer(PROMPT)["input_ids"]
    base_alone = ref.tokenizer.decode(greedy_reference([(ref.base, 1.0)], ids, 8), skip_special_tokens=True)
    half = ref.text(ids, 8, alpha=0.5)
    assert len({base_alone, half, ref.text(ids, 8)}) == 3  # alpha matters for this prompt
    assert _cli_text(capsys, dirs, "--max-new-tokens", 8, "--alpha", 0) == base_alone
    assert _cli_text(capsys, dirs, "--max-new-tokens", 8, "--alpha", 0.5) == half


SAMPLING = ("--do-sample", "--temperature", 1.0, "--top-p", 0.9, "--min-p", 0.05, "--max-new-tokens", 8)


def test_seed_makes_sampling_reproducible_and_matches_the_python_api(capsys, dirs):
    first = _cli_text(capsys, dirs, *SAMPLING, "--seed", 7)
    assert _cli_text(capsys, dirs, *SAMPLING, "--seed", 7) == first
    api = FastIVLDecoder.from_pretrained(*dirs).generate_text(
        PROMPT, do_sample=True, temperature=1.0, top_p=0.9, min_p=0.05, seed=7, max_new_tokens=8
    )
    assert api == first
    others = {_cli_text(capsys, dirs, *SAMPLING, "--seed", s) for s in (8, 9, 10)}
    assert others - {first}  # the seed is used: other seeds draw other texts


@pytest.mark.parametrize("restrict", [("--top-p", 1e-9), ("--min-p", 1.0)])
def test_sampling_restricted_to_the_top_token_is_greedy(capsys, dirs, ref, restrict):
    # top_p -> 0 keeps only the most likely token; min_p = 1 keeps tokens with p >= p_max: the argmax
    args = ("--do-sample", "--temperature", 1.5, "--seed", 3, "--max-new-tokens", 8)
    greedy = ref.prompt_text(PROMPT, 8)
    assert _cli_text(capsys, dirs, *args) != greedy  # unrestricted, this seed strays from greedy
    assert _cli_text(capsys, dirs, *args, *restrict) == greedy


def _nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' top-p: the smallest set of most likely tokens whose probability mass reaches top_p."""
    order = p.argsort(descending=True)
    k = int((p[order].cumsum(0) < top_p).sum()) + 1
    return order[:k]


# chi-square quantile at p = 0.001 for 3 degrees of freedom (4 kept tokens); the draws are seeded, so fixed
CHI2_3DOF_P001 = 16.27


@pytest.mark.parametrize("flag, temperature", [("--top-p", 1.5), ("--min-p", 0.7)])
def test_sampled_first_tokens_follow_the_warped_distribution(capsys, dirs, ref, tmp_path, flag, temperature):
    """1000 rows of one prompt, one token each: every draw is in the support the flag keeps (written from its
    definition, after temperature), and the counts fit the renormalised probabilities (chi-square)."""
    p = torch.softmax(ref.first_step_logits(PROMPT) / temperature, dim=0)  # [V] float64
    sorted_p, order = p.sort(descending=True)
    if flag == "--top-p":  # a mass between the 3rd and 4th cumulative sums: 4 tokens kept, far from an edge
        c = sorted_p.cumsum(0)
        value = float(c[2] + c[3]) / 2
        margin = float(c[3] - c[2]) / 2
        keep = _nucleus(p, value)
    else:  # a ratio between the 4th and 5th tokens' p / p_max: 4 tokens kept
        value = float(sorted_p[3] + sorted_p[4]) / 2 / float(sorted_p[0])
        margin = float(sorted_p[3] - sorted_p[4]) / 2 / float(sorted_p[0])
        keep = (p >= value * p.max()).nonzero().flatten()
    assert margin > 1e-3  # the cut is far from a token's edge, so the decoder's float32 keeps the same tokens
    assert len(keep) == 4
    q = p[keep] / p[keep].sum()  # the renormalised distribution over the kept tokens
    tok = ref.tokenizer
    names = [tok.decode([int(i)], skip_special_tokens=True) for i in keep]
    assert len(set(names)) == 4  # the draws are read back from text: the kept tokens must decode apart

    n = 1000
    f = tmp_path / "same.txt"
    f.write_text((PROMPT + "\n") * n)
    argv = ["--prompts-file", f, "--batch-size", n, "--max-new-tokens", 1, "--json", "--no-progress"]
    rc, out, err = generate(capsys, dirs, *argv, "--do-sample", "--seed", 11, "--temperature", temperature, flag, value)
    assert rc == 0, err
    counts = Counter(o["text"] for o in json.loads(out)["outputs"])
    outside = sorted(set(counts) - set(names))
    assert not outside, f"sampled {len(outside)} tokens outside the kept ones, e.g. {outside[:8]}"
    chi2 = sum((counts[name] - n * float(qi)) ** 2 / (n * float(qi)) for name, qi in zip(names, q, strict=True))
    assert chi2 < CHI2_3DOF_P001, (chi2, dict(counts), q.tolist())


def test_stop_strings_truncate_at_the_first_one_reached(capsys, dirs, ref):
    ids = ref.tokenizer(PROMPT)["input_ids"]
    new = greedy_reference([(ref.base, 1.0), (ref.value, 1.0)], ids, 16)
    tok = ref.tokenizer

    def text(k):
        return tok.decode(new[:k], skip_special_tokens=True)

    full = text(len(new))

    def stop_at(stop):  # documented: decoding ends with the token that completes the stop string (kept)
        return next(text(k) for k in range(1, len(new) + 1) if stop in text(k))

    def pick(start):  # two letters/digits from the greedy text, first seen at or after character `start`
        return next(
            full[i : i + 2]
            for i in range(start, len(full) - 1)
            if full[i : i + 2].isalnum() and full[i : i + 2] not in full[: i + 1]
        )

    early, late = pick(len(text(4))), pick(len(text(10)))
    assert len(stop_at(early)) < len(stop_at(late)) < len(full)
    base = ("--max-new-tokens", 16)
    assert _cli_text(capsys, dirs, *base) == full
    assert _cli_text(capsys, dirs, *base, "--stop", late) == stop_at(late)
    # repeatable; the first one reached wins, whatever the order on the command line
    assert _cli_text(capsys, dirs, *base, "--stop", late, "--stop", early) == stop_at(early)
    assert _cli_text(capsys, dirs, *base, "--stop", "never in the text", "--stop", late) == stop_at(late)


# ----------------------------------------------------------------------------- bad input


def test_missing_base_directory(capsys, dirs, tmp_path):
    missing = tmp_path / "no_base_here"
    rc, _, err = run_cli(capsys, "generate", "--base", missing, "--value", dirs[1], "--prompt", PROMPT)
    assert rc == 2
    assert err.startswith("ivl-fast generate: error:")
    assert str(missing) in err and "does not exist" in err


def test_negative_temperature(capsys, dirs):
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--temperature", -1)
    assert rc == 2
    assert "temperature must be a finite number >= 0" in err


def _one_line_error(rc: int, err: str, match: str) -> None:
    """README's promise: bad input exits with code 2 and one line on stderr, no traceback."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ivl-fast generate: error: "), err
    assert match in lines[0], err


def test_prompt_and_prompts_file_together(capsys, dirs, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("x\n")
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--prompts-file", f)
    _one_line_error(rc, err, "exactly one of --prompt or --prompts-file")


def test_neither_prompt_nor_file(capsys, dirs):
    rc, _, err = generate(capsys, dirs)
    _one_line_error(rc, err, "exactly one of --prompt or --prompts-file")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "x", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--prompt", "x", "--system", "Be brief."], "--system needs --chat"),  # not silently dropped
    ],
)
def test_bad_prompt_options(capsys, dirs, extra, match):
    rc, _, err = generate(capsys, dirs, *extra)
    _one_line_error(rc, err, match)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", "x"], "--base is required"),  # not the Python name base_path
        (["--prompt", "x", "--scheme", "residual"], "--base is required"),
    ],
)
def test_missing_base_names_the_flag(capsys, dirs, argv, match):
    rc, _, err = run_cli(capsys, "generate", "--value", dirs[1], *argv)
    _one_line_error(rc, err, match)
    assert "base_path" not in err


def test_missing_value_names_the_flag(capsys, dirs):
    rc, _, err = run_cli(capsys, "generate", "--base", dirs[0], "--prompt", "x")
    _one_line_error(rc, err, "--value is required")


def test_unsupported_dtype(capsys, dirs):
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--dtype", "int8")
    assert rc == 2 and "dtype 'int8' is not supported" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys, dirs):
    rc, _, err = generate(capsys, dirs, "--prompt", PROMPT, "--device", "cuda")
    assert rc == 2 and "device='cuda'" in err


def test_bin_checkpoint_needs_allow_pickle(capsys, dirs, pair, tmp_path, tokenizer):
    # a pickle-only value checkpoint (written by hand: transformers 5 always saves safetensors)
    value_bin = tmp_path / "value_bin"
    value_bin.mkdir()
    pair[1].config.save_pretrained(value_bin)
    torch.save(pair[1].state_dict(), value_bin / "pytorch_model.bin")
    tokenizer.save_pretrained(value_bin)
    bin_dirs = (dirs[0], str(value_bin))
    rc, _, err = generate(capsys, bin_dirs, "--prompt", PROMPT, "--max-new-tokens", 2)
    assert rc == 2 and "--allow-pickle" in err
    rc, _, err = generate(capsys, bin_dirs, "--prompt", PROMPT, "--max-new-tokens", 2, "--allow-pickle")
    assert rc == 0, err


def test_checkpoints_without_tokenizer(capsys, pair, save_checkpoint):
    base = save_checkpoint(pair[0], "cli_base_notok", with_tokenizer=False)
    value = save_checkpoint(pair[1], "cli_value_notok", with_tokenizer=False)
    capsys.readouterr()  # (the saves' own progress bars)
    rc, _, err = run_cli(capsys, "generate", "--base", base, "--value", value, "--prompt", PROMPT)
    _one_line_error(rc, err, "no tokenizer files in")
    assert str(base) in err


def test_non_finite_logits_exit_code(capsys, dirs, save_checkpoint):
    # a value checkpoint whose lm_head makes one logit inf at every step: exit 2, not a traceback
    value = build_model("llama", seed=1)
    with torch.no_grad():
        value.lm_head.weight[7] = float("inf")
    bad_value = save_checkpoint(value, "cli_value_inf")
    rc, out, err = generate(capsys, (dirs[0], str(bad_value)), "--prompt", PROMPT, "--max-new-tokens", 2)
    assert rc == 2
    assert "non-finite (NaN/inf) logits" in err
    assert out == ""  # no garbage text


# ----------------------------------------------------------------------------- make-tiny and the entry point


def test_make_tiny_writes_the_documented_pair_and_it_decodes_as_plain_transformers(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "make-tiny", "--out", tmp_path / "tiny", "--vocab-size", 300)
    assert rc == 0, err
    assert f"base: {tmp_path / 'tiny' / 'base'}" in out and f"value: {tmp_path / 'tiny' / 'value'}" in out
    for name in ("base", "value"):
        assert (tmp_path / "tiny" / name / "config.json").is_file()
        assert (tmp_path / "tiny" / name / "model.safetensors").is_file()
    base_dir, value_dir = tmp_path / "tiny" / "base", tmp_path / "tiny" / "value"
    # `make_tiny_pair`'s documented shapes: base 4 layers x 256 wide, value 2 layers x 128 wide, one tokenizer
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    value = AutoModelForCausalLM.from_pretrained(value_dir, dtype=torch.float64).eval()
    assert (base.config.num_hidden_layers, base.config.hidden_size) == (4, 256)
    assert (value.config.num_hidden_layers, value.config.hidden_size) == (2, 128)
    assert (base_dir / "tokenizer.json").read_bytes() == (value_dir / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(value_dir)
    assert base.config.vocab_size == value.config.vocab_size == len(tok) <= 300
    dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    ids = greedy_reference([(base, 1.0), (value, 1.0)], tok(PROMPT)["input_ids"], 4)
    assert dec.generate_text(PROMPT, max_new_tokens=4) == tok.decode(ids, skip_special_tokens=True) != ""


def test_console_script_version():
    # the installed `ivl-fast` entry point next to this interpreter (falls back to `python -m ivl_fast.cli`)
    script = Path(sys.executable).with_name("ivl-fast")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "ivl_fast.cli"]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ivl-fast {ivl_fast.__version__}"
