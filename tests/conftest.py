"""Shared fixtures: real tokenizers and real (random-weight) Hugging Face checkpoints saved to temp dirs."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # kernels run in the Triton interpreter on CPU; set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of the -n 2 workers: one torch thread each, not two on two cores;
    # the processes a test starts get one too (a killed and resumed run must sum in the order of the one in here)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from ivl_fast.ops._backend import TRITON_MIN, triton_available  # noqa: E402
from ivl_fast.tiny import train_tokenizer  # noqa: E402

# the kernels' tests: skipped only where the installed triton is older than the tested floor (the lowest-versions
# stage, torch 2.5 with its triton 3.1); the main suite pins a newer one
needs_triton = pytest.mark.skipif(
    not triton_available(), reason=f"needs triton >= {'.'.join(map(str, TRITON_MIN))} (ivl_fast.ops._backend)"
)

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


# the tiny models' config values (any family); initializer_range is raised so logits are far from uniform
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def tiny_config(kind: str = "llama", **overrides):
    """A small config of the given family (Llama, Mistral, Qwen2)."""
    return CONFIGS[kind](**{**TINY, **overrides})


def build_model(kind: str = "llama", *, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **overrides)).to(dtype).eval()


def save_with_template(models, tokenizer, tmp_path_factory, template: str, prefix: str) -> tuple:
    """Each model saved with ``tokenizer`` carrying its own chat ``template``: (dir per model), named prefix_i."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    out = []
    for i, model in enumerate(models):
        d = tmp_path_factory.mktemp(f"{prefix}_{i}")
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return tuple(out)


def swap_token_ids(tok_dir, a: int, b: int) -> tuple[str, str]:
    """Swap the ids of two BPE tokens in tok_dir/tokenizer.json; returns (token that was a, token that was b)."""
    import json

    path = Path(tok_dir) / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    ta, tb = (next(t for t, i in vocab.items() if i == k) for k in (a, b))
    vocab[ta], vocab[tb] = b, a
    path.write_text(json.dumps(spec), encoding="utf-8")
    return ta, tb


@pytest.fixture(scope="session")
def tokenizer():
    """A real byte-level BPE tokenizer (512 tokens) trained on CPython's pydoc text."""
    return train_tokenizer(512, max_chars=100_000)


@pytest.fixture(scope="session")
def save_checkpoint(tmp_path_factory, tokenizer):
    """save_checkpoint(model, name, with_tokenizer=True) -> Path of a real HF checkpoint directory."""

    def _save(model, name: str, *, with_tokenizer: bool = True, **save_kwargs) -> Path:
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out, **save_kwargs)
        if with_tokenizer:
            tokenizer.save_pretrained(out)
        return out

    return _save


@pytest.fixture(scope="session")
def pair(save_checkpoint):
    """(base_model, value_model, base_dir, value_dir): a wider base and a narrower value net, same tokenizer."""
    base = build_model("llama", seed=0, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    value = build_model("llama", seed=1)
    return base, value, save_checkpoint(base, "base"), save_checkpoint(value, "value")


@pytest.fixture(scope="session")
def vocab_map_files(tmp_path_factory, tokenizer):
    """(tokenizer dir, corpus file) for `ivl-fast vocab-map` runs: one real tokenizer on both sides."""
    d = tmp_path_factory.mktemp("vocab_map_inputs")
    tokenizer.save_pretrained(d / "tok")
    corpus = d / "corpus.txt"
    corpus.write_text("The for statement is used to iterate over a sequence.\nA while loop repeats.\n" * 40)
    return d / "tok", corpus


@pytest.fixture
def vocab_map_cli(capsys, vocab_map_files):
    """vocab_map_cli(*extra) -> (exit code, stdout, stderr) of `ivl-fast vocab-map` on vocab_map_files."""
    from ivl_fast.cli import main

    tok, corpus = vocab_map_files

    def run(*extra):
        argv = ["vocab-map", "--base-tokenizer", str(tok), "--value-tokenizer", str(tok), "--corpus", str(corpus)]
        rc = main(argv + [str(x) for x in extra])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture(scope="module")
def served(pair):
    """A real ``ivl-fast serve`` of the tiny pair (4 slots) for one test module (tests/test_serve*.py), with the
    decoder whose answers each request must equal."""
    from serve_fixtures import Server

    from ivl_fast import FastIVLDecoder

    _, _, base_dir, value_dir = pair
    srv = Server(
        "--base",
        base_dir,
        "--value",
        value_dir,
        "--served-model-name",
        "ivl",
        "--max-batch-size",
        4,
        "--max-model-len",
        128,
    )
    yield srv, FastIVLDecoder.from_pretrained(base_dir, value_dir)
    srv.stop()


@pytest.fixture(scope="session")
def cross_setting(tokenizer):
    """(base tokenizer, map, base, value): a pair across two real vocabularies (tests/cross_vocab_reference.py)."""
    from cross_vocab_reference import build_cross_setting

    return build_cross_setting(tokenizer)
