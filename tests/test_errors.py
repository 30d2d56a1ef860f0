"""Bad inputs get a clear exception whose message names what is wrong.

Checkpoints are real Hugging Face directories written by the conftest fixtures; the models are the tiny random
ones of ``conftest.build_model``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_model

from ivl_fast import FastIVLDecoder, NonFiniteLogitsError, load_model
from ivl_fast.models.checkpoint import iter_tensors
from ivl_fast.tiny import train_tokenizer

PROMPT = [1, 50, 60]  # a fixed token prompt (bos + two ordinary tokens)


def save_bin_checkpoint(model, out, tokenizer=None):
    """A pickle-only checkpoint: config.json + pytorch_model.bin.

    Written by hand because transformers 5 ignores ``save_pretrained(safe_serialization=False)`` and always
    writes safetensors.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one prompt through the engine interface."""
    x = torch.tensor([ids])
    engine.allocate(1, len(ids))
    return engine.prefill(x, torch.ones_like(x, dtype=torch.bool))


@pytest.fixture(scope="module")
def dec(pair):
    """The decoder of the conftest pair, loaded from its checkpoint directories (tokenizer included)."""
    _, _, base_dir, value_dir = pair
    return FastIVLDecoder.from_pretrained(base_dir, value_dir)


@pytest.fixture(scope="module")
def bin_value(pair, tmp_path_factory, tokenizer):
    """The pair's value model saved again as a pickle-only checkpoint."""
    _, value, _, _ = pair
    return save_bin_checkpoint(value, tmp_path_factory.mktemp("value_bin"), tokenizer)


# load_model and from_pretrained must both report a bad checkpoint path (from_pretrained gets it as the base)
LOADERS = {
    "load_model": lambda path, value_dir: load_model(path),
    "from_pretrained": lambda path, value_dir: FastIVLDecoder.from_pretrained(path, value_dir),
}


@pytest.fixture(params=sorted(LOADERS))
def loader(request, pair):
    value_dir = pair[3]
    return lambda path: LOADERS[request.param](path, value_dir)


# ----------------------------------------------------------------------------- checkpoint directories


def test_missing_checkpoint_directory(loader, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match=r"no_such_checkpoint.*does not exist"):
        loader(missing)


def test_checkpoint_path_is_a_file(loader, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        loader(f)


def test_directory_without_config(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        loader(tmp_path)


def test_config_is_invalid_json(loader, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')  # truncated
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        loader(tmp_path)


def test_config_without_weights(loader, pair, tmp_path):
    shutil.copy(pair[3] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="has config.json but no weights"):
        loader(tmp_path)


def test_config_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_config_missing_required_key(pair, tmp_path):
    cfg = json.loads((pair[3] / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(pair[3] / "model.safetensors", tmp_path)
    # the CLI only turns ValueError/FileNotFoundError/... into exit code 2; a KeyError is a traceback
    with pytest.raises(ValueError, match=r"config.json.*hidden_size"):
        load_model(tmp_path)


def test_safetensors_index_is_invalid_json(pair, tmp_path):
    shutil.copy(pair[3] / "config.json", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{bad")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        load_model(tmp_path)


def test_corrupt_safetensors_file(pair, tmp_path):
    shutil.copy(pair[3] / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")  # e.g. a truncated download
    with pytest.raises((ValueError, OSError), match="model.safetensors"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- pickle (.bin) checkpoints


def test_bin_checkpoint_refused_by_load_model(bin_value):
    with pytest.raises(ValueError, match=r"pickled weights \(pytorch_model.bin\).*allow_pickle=True"):
        load_model(bin_value)


def test_bin_checkpoint_refused_by_from_pretrained(pair, bin_value):
    with pytest.raises(ValueError, match=r"pickled weights.*allow_pickle=True"):
        FastIVLDecoder.from_pretrained(pair[2], bin_value)


@pytest.mark.parametrize("engine", ["lean", "hf"])
def test_bin_checkpoint_loads_with_allow_pickle(pair, bin_value, engine):
    # the pickled and the safetensors copy of one model: bit-identical weights, the same logits. Not bitwise
    # logits: the two files give tensors of different memory alignment, and CPU BLAS rounds differently then.
    value_dir = pair[3]
    pickled, safe = dict(iter_tensors(bin_value, allow_pickle=True)), dict(iter_tensors(value_dir))
    assert pickled.keys() == safe.keys()
    assert all(torch.equal(pickled[k], safe[k]) for k in safe)
    from_bin = load_model(bin_value, allow_pickle=True, engine=engine)
    from_safe = load_model(value_dir, engine=engine)
    torch.testing.assert_close(prefill_logits(from_bin, PROMPT), prefill_logits(from_safe, PROMPT))


def test_bin_checkpoint_decodes_with_allow_pickle(pair, bin_value, dec):
    base_dir = pair[2]
    pickled = FastIVLDecoder.from_pretrained(base_dir, bin_value, allow_pickle=True)
    a = pickled.generate([PROMPT], max_new_tokens=6).sequences
    b = dec.generate([PROMPT], max_new_tokens=6).sequences
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- vocabularies and tokenizers


def test_vocab_sizes_differ_without_map_or_tokenizer(pair, save_checkpoint, tokenizer):
    value640 = build_model("llama", seed=1, vocab_size=640)
    value_dir = save_checkpoint(value640, "value640")  # same tokenizer files, bigger embedding
    # one tokenizer padded to two sizes is one vocabulary (#31; tests/test_same_family_pairs.py)
    assert FastIVLDecoder.from_pretrained(pair[2], value_dir).vocab_size == 512
    # without a tokenizer nothing tells padding rows from another vocabulary: refused, naming both ways out
    with pytest.raises(ValueError, match=r"\(512 tokens\).*\(640 tokens\).*pass the tokenizer.*`ivl-fast vocab-map"):
        FastIVLDecoder(pair[0], value640)
    bare = save_checkpoint(value640, "value640_bare", with_tokenizer=False)
    base_bare = save_checkpoint(pair[0], "base_bare", with_tokenizer=False)
    with pytest.raises(ValueError, match="ivl-fast vocab-map"):
        FastIVLDecoder.from_pretrained(base_bare, bare)
    assert FastIVLDecoder(pair[0], value640, tokenizer=tokenizer).vocab_size == 512


def test_tokenizers_differ(pair, save_checkpoint):
    # same model vocabulary size (512), but the value checkpoint ships a tokenizer trained differently
    other = train_tokenizer(400, max_chars=30_000)
    value_dir = save_checkpoint(pair[1], "value_other_tok", with_tokenizer=False)
    other.save_pretrained(value_dir)
    with pytest.raises(ValueError, match=r"tokenizers of .* differ.*ivl-fast vocab-map"):
        FastIVLDecoder.from_pretrained(pair[2], value_dir)


# ----------------------------------------------------------------------------- prompts


def test_prompt_plus_new_tokens_exceeds_context(dec):
    prompt = list(range(4, 254))  # 250 tokens; tiny_config has max_position_embeddings=256
    with pytest.raises(ValueError, match=r"250 \+ max_new_tokens 10 = 260 exceeds the model context of 256"):
        dec.generate([prompt], max_new_tokens=10)
    # exactly the context is fine
    out = dec.generate([prompt], max_new_tokens=6, eos_token_id=[])
    assert out.sequences.shape == (1, 256)


@pytest.mark.parametrize(
    "input_ids, match",
    [
        ([[]], "prompt 0 is empty"),
        ([], "prompt 0 is empty"),
        ([[1, 2], []], "prompt 1 is empty"),
        (torch.empty((1, 0), dtype=torch.long), r"input_ids is empty \(shape \(1, 0\)\)"),
    ],
    ids=["empty-row", "empty-list", "second-row-empty", "tensor-1x0"],
)
def test_empty_prompt(dec, input_ids, match):
    with pytest.raises(ValueError, match=match):
        dec.generate(input_ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=match):  # stream validates before its first token
        next(dec.stream(input_ids, max_new_tokens=2))


def test_attention_mask_row_of_zeros(dec):
    ids = torch.tensor([[5, 6], [7, 8]])
    with pytest.raises(ValueError, match="prompt 1 is empty: its attention_mask has no 1s"):
        dec.generate(ids, attention_mask=torch.tensor([[1, 1], [0, 0]]), max_new_tokens=2)


def test_generate_text_with_no_prompts(dec):
    with pytest.raises(ValueError, match="prompts is empty"):
        dec.generate_text([], max_new_tokens=2)


def test_attention_mask_as_list(dec):
    # _prepare_inputs calls torch.as_tensor(attention_mask) but then attention_mask.dim() on the original
    ids = torch.tensor([[3, 5, 6]])
    as_list = dec.generate(ids, attention_mask=[[0, 1, 1]], max_new_tokens=2).sequences
    as_tensor = dec.generate(ids, attention_mask=torch.tensor([[0, 1, 1]]), max_new_tokens=2).sequences
    assert torch.equal(as_list, as_tensor)


# ----------------------------------------------------------------------------- sampling arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.5, do_sample=True), "temperature"),
        (dict(temperature=-1.0), "temperature"),  # validated even when greedy
        (dict(top_p=0.0, do_sample=True), "top_p"),
        (dict(top_p=1.5, do_sample=True), "top_p"),
        (dict(top_k=-1, do_sample=True), "top_k"),
        (dict(min_p=1.5, do_sample=True), "min_p"),
        (dict(min_p=-0.1, do_sample=True), "min_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
    ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_invalid_sampling_values(dec, kwargs, name):
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        dec.generate([PROMPT], **kwargs)


# ----------------------------------------------------------------------------- token ids


@pytest.mark.parametrize(
    "input_ids",
    [[[1, 512]], [[-1, 5]], torch.tensor([[1, 600]])],
    ids=["list-512", "list-negative", "tensor-600"],
)
def test_token_ids_outside_vocabulary(dec, input_ids):
    with pytest.raises(ValueError, match=r"token ids outside \[0, 512\)"):
        dec.generate(input_ids, max_new_tokens=2)


def test_input_ids_float_tensor(dec):
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        dec.generate(torch.tensor([[1.0, 5.0]]), max_new_tokens=2)


def test_input_ids_wrong_rank(dec):
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] or \[T\], got shape \(1, 1, 2\)"):
        dec.generate(torch.tensor([[[1, 5]]]), max_new_tokens=2)


def test_input_ids_float_list(dec):
    with pytest.raises(ValueError, match="integer"):
        dec.generate([[1.5, 2.7]], max_new_tokens=2)


def test_pad_token_id_outside_vocabulary(dec):
    # eos_token_id is range-checked; pad_token_id is not, and a padded batch feeds it to the embedding
    with pytest.raises(ValueError, match="pad_token_id"):
        dec.generate([[1, 5, 6], [1]], max_new_tokens=2, pad_token_id=-5)


# ----------------------------------------------------------------------------- NaN / inf logits


@pytest.fixture(scope="module")
def poisoned(tokenizer):
    """(decoder, x): the value net's embedding row of token x is NaN, x being the first greedy token after PROMPT.

    So prefill of PROMPT is finite, step 0 emits x, and the decode step that feeds x back gives NaN logits.
    """
    base, value = build_model("llama", seed=0), build_model("llama", seed=1)
    x = int(FastIVLDecoder(base, value).generate([PROMPT], max_new_tokens=1, eos_token_id=[]).sequences[0, -1])
    assert x not in PROMPT  # otherwise the prefill would already be NaN
    with torch.no_grad():
        value.model.embed_tokens.weight[x] = float("nan")
    return FastIVLDecoder(base, value, tokenizer=tokenizer), x


def test_nan_during_decode_generate(poisoned):
    d, _ = poisoned
    with pytest.raises(NonFiniteLogitsError, match=r"non-finite \(NaN/inf\) logits for batch row\(s\) \[0\]"):
        d.generate([PROMPT], max_new_tokens=4, eos_token_id=[])


def test_nan_during_decode_stream_stops_before_garbage(poisoned):
    d, x = poisoned
    got = []
    with pytest.raises(NonFiniteLogitsError, match=r"steps \[1, 2\)"):
        for ids in d.stream([PROMPT], max_new_tokens=4, eos_token_id=[]):
            got.append(ids.tolist())
    assert got == [[x]]  # the good first token, then the error: nothing sampled from NaN logits


def test_nan_at_prefill(poisoned):
    d, x = poisoned
    prompt = PROMPT[:-1] + [x]
    with pytest.raises(NonFiniteLogitsError):
        d.generate([prompt], max_new_tokens=4)
    with pytest.raises(NonFiniteLogitsError):
        next(d.stream([prompt], max_new_tokens=4))  # not even one token
    # a batch names the bad row only (max_new_tokens=1: no decode step, row 0 stays finite)
    with pytest.raises(NonFiniteLogitsError, match=r"batch row\(s\) \[1\]"):
        d.generate([PROMPT, prompt], max_new_tokens=1)


def test_inf_in_lm_head(tokenizer):
    base, value = build_model("llama", seed=0), build_model("llama", seed=1)
    with torch.no_grad():
        value.lm_head.weight[7] = float("inf")  # token 7's logit is +-inf (or NaN) at every step
    d = FastIVLDecoder(base, value, tokenizer=tokenizer)
    with pytest.raises(NonFiniteLogitsError, match="non-finite"):
        d.generate([PROMPT], max_new_tokens=3)
    assert issubclass(NonFiniteLogitsError, FloatingPointError)  # what the CLI catches


def test_alpha_infinite(pair):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        FastIVLDecoder(pair[0], pair[1], alpha=float("inf"))


def test_alpha_nan(pair):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        FastIVLDecoder(pair[0], pair[1], alpha=float("nan"))


# ----------------------------------------------------------------------------- dtype and device


@pytest.mark.parametrize("dtype", ["int8", "float8", torch.int8, torch.float8_e4m3fn], ids=str)
def test_unsupported_dtype(pair, dtype):
    with pytest.raises(ValueError, match=r"dtype .*(int8|float8).* is not supported"):
        load_model(pair[3], dtype=dtype)


def test_unsupported_dtype_from_pretrained(pair):
    with pytest.raises(ValueError, match="dtype 'float8' is not supported"):
        FastIVLDecoder.from_pretrained(pair[2], pair[3], dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(pair):
    with pytest.raises(ValueError, match=r"device='cuda' was asked for but torch sees no CUDA device"):
        load_model(pair[3], device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda:0'"):
        FastIVLDecoder.from_pretrained(pair[2], pair[3], device="cuda:0")


def test_unsupported_device_type(pair):
    with pytest.raises(ValueError, match=r"device='mps' is not supported"):
        load_model(pair[3], device="mps")


# ----------------------------------------------------------------------------- schemes and tokenizer needs


@pytest.mark.parametrize("scheme", ["cascade++", "foo"])
def test_unknown_scheme(pair, scheme):
    with pytest.raises(ValueError, match=r"scheme must be one of .*got '" + scheme.replace("+", r"\+")):
        FastIVLDecoder(pair[0], pair[1], scheme=scheme)


def test_cascade_needs_the_lean_engine(pair):
    with pytest.raises(ValueError, match="needs the lean engine"):
        FastIVLDecoder.from_pretrained(pair[2], pair[3], scheme="cascade", engine="hf")


def test_residual_without_value_model(pair):
    with pytest.raises(ValueError, match="scheme='residual' needs a value_model"):
        FastIVLDecoder(pair[0], None)
    with pytest.raises(ValueError, match="scheme='residual' needs value_path"):
        FastIVLDecoder.from_pretrained(pair[2], None)


def test_stop_strings_without_tokenizer(pair, save_checkpoint):
    # real checkpoints saved without tokenizer files: the decoder has no tokenizer
    base_dir = save_checkpoint(pair[0], "base_notok", with_tokenizer=False)
    value_dir = save_checkpoint(pair[1], "value_notok", with_tokenizer=False)
    d = FastIVLDecoder.from_pretrained(base_dir, value_dir)
    assert d.tokenizer is None
    with pytest.raises(ValueError, match="stop_strings needs a tokenizer"):
        d.generate([PROMPT], max_new_tokens=2, stop_strings=["\n"])
    with pytest.raises(ValueError, match="generate_text needs a tokenizer"):
        d.generate_text("def f(x):", max_new_tokens=2)
