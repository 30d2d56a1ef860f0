"""Tiny random-weight checkpoints built offline: the embedded default of the README and the test fixtures.

Tokenizers: a byte-level BPE trained in about a second on Python's own documentation text
(``pydoc_data.topics``, shipped with CPython), or on given texts; a SentencePiece-style BPE with byte fallback
(the demo's other tokenizer); each a ``transformers`` fast tokenizer with <unk>/<s>/</s>/<pad> = 0/1/2/3.
Models: random Llama weights saved with ``save_pretrained`` (safetensors), i.e. real Hugging Face checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .safe_output import UnsafeOutputError, check_output_location

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def corpus_text(max_chars: int | None = None) -> str:
    """Real English text available offline: the topics of CPython's pydoc (~750 KB)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars] if max_chars else text


def prose_documents(min_chars: int = 600, max_chars: int = 3000) -> list[str]:
    """Real English prose available offline, as documents: the docstrings (modules, classes, functions) of this
    Python's standard library sources of ``min_chars`` to ``max_chars`` characters, in a fixed order (files sorted,
    each file's docstrings in ``ast.walk`` order); tests and test suites of the library are left out. 533
    documents of 1066 characters on average on CPython 3.11.7. Read with ``ast``: nothing is imported."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                d = ast.get_docstring(node)
                if d and min_chars <= len(d) <= max_chars:
                    docs.append(d)
    return docs


def train_tokenizer(vocab_size: int = 1024, *, max_chars: int = 300_000):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <s>/</s>/<pad>/<unk> (ids 1/2/3/0), trained on pydoc text."""
    text = corpus_text(max_chars)
    return train_tokenizer_on([text[i : i + 4096] for i in range(0, len(text), 4096)], vocab_size)


def train_tokenizer_on(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 style, "Ġ" markers) trained on ``texts`` (deterministic), with
    <unk>/<s>/</s>/<pad> = 0/1/2/3 and <s> before every sequence.

    BPE stops merging when the texts hold no more pairs, so it may come out smaller than ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return _as_transformers(tok)


def train_sentencepiece_style_on(texts: list[str], vocab_size: int):
    """A SentencePiece-style tokenizer as Llama 2 has it: BPE over words marked with "▁" for a space, plus the 256
    byte-fallback tokens ``<0x00>..<0xFF>``, so any text encodes and decodes back (except SentencePiece's
    dropped leading space). Deterministic for the same texts.

    ``vocab_size`` learnt tokens (special tokens included) + 256. Raises if the texts cannot fill ``vocab_size``:
    a tokenizer smaller than asked would misreport itself.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # a newline is a piece of its own (SentencePiece never merges across lines: Llama 2 writes it as <0x0A>)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(iter(texts), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the texts make {tok.get_vocab_size()} BPE tokens, not the {vocab_size} asked for")
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]  # token -> id; the byte tokens follow the learnt ones
    vocab.update({f"<0x{b:02X}>": vocab_size + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _as_transformers(tok)


def _as_transformers(tok):
    """<s> before every sequence; a ``transformers`` fast tokenizer with <unk>/<s>/</s>/<pad> = 0/1/2/3."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def llama_config(vocab_size: int, *, hidden: int, layers: int, heads: int, kv_heads: int, **overrides):
    """A ``LlamaConfig``: intermediate size 8/3 of ``hidden`` rounded down to a multiple of 16, context 1024,
    bos/eos/pad = 1/2/3 (the tokenizers' ids here), untied embeddings; ``overrides`` replace any field."""
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16 or 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_random_model(config, out: str | Path, *, seed: int, tokenizer=None, dtype=torch.float32) -> Path:
    """A causal LM of ``config`` with random weights (``torch.manual_seed(seed)``) in ``dtype``, saved to ``out``
    with ``save_pretrained`` (and ``tokenizer``'s files when given); returns ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def make_tiny_pair(out_dir: str | Path, *, vocab_size: int = 1024, seed: int = 0) -> dict[str, Path]:
    """Write ``out_dir/base`` (4 layers, 256 wide, 8 heads / 4 KV heads, weights of ``seed``) and
    ``out_dir/value`` (2 layers, 128 wide, 4 / 2 heads, ``seed + 1``), both with one pydoc BPE tokenizer of
    ``vocab_size`` tokens (fewer if BPE runs out of merges; the models get its size). Returns
    ``{"base": Path, "value": Path}``. Refuses (UnsafeOutputError) when either directory exists and is not empty."""
    out = Path(out_dir)
    check_output_location(out, {})  # never the working directory or above it (`--out /` would write /base)
    if out.exists() and not out.is_dir():
        raise UnsafeOutputError(f"--out {str(out)!r} is a file, not a directory")
    for sub in ("base", "value"):  # save_pretrained would overwrite a checkpoint that is already there
        if (out / sub).exists() and (not (out / sub).is_dir() or any((out / sub).iterdir())):
            raise UnsafeOutputError(
                f"--out {str(out)!r}: {str(out / sub)!r} already exists and is not empty; refusing to overwrite it "
                "(choose another --out)"
            )
    tok = train_tokenizer(vocab_size)
    v = len(tok)
    base = llama_config(v, hidden=256, layers=4, heads=8, kv_heads=4)
    value = llama_config(v, hidden=128, layers=2, heads=4, kv_heads=2)
    return {
        "base": save_random_model(base, out / "base", seed=seed, tokenizer=tok),
        "value": save_random_model(value, out / "value", seed=seed + 1, tokenizer=tok),
    }
