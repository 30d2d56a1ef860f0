"""The IVL schemes: how the value network reads its input, and which models a decode runs.

One definition shared by the decoder, the trainer and the CLI (bottom layer: imports nothing of the package).

- residual: the value network sees the tokens only (both models can run at the same time);
- cascade:  its input embedding is softmax(z_base) @ E_value (the base runs first);
- cascade+: that plus the token embedding;
- probe:    no network over the tokens: the Llama MLP on the base's final hidden state, its own head
            (:mod:`ivl_fast.models.probe`; paper Section 3.2, Figure 2). It runs after the base, on its width only;
- base / value_only: one model alone (decoding only: the baselines of the transfer table).
"""

from __future__ import annotations

TRAIN_SCHEMES = ("residual", "cascade", "cascade+", "probe")  # what a value network can be trained for
DECODE_SCHEMES = (*TRAIN_SCHEMES, "base", "value_only")  # what a decode can run
CASCADE_SCHEMES = ("cascade", "cascade+")


def check_scheme(scheme, allowed: tuple[str, ...] = DECODE_SCHEMES, name: str = "scheme") -> str:
    """``scheme`` if it is one of ``allowed``, else a ValueError naming the argument."""
    if scheme not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {scheme!r}")
    return scheme


def uses_base(scheme: str) -> bool:
    return scheme != "value_only"


def uses_value(scheme: str) -> bool:
    return scheme != "base"


def is_cascade(scheme: str) -> bool:
    return scheme in CASCADE_SCHEMES


def is_probe(scheme: str) -> bool:
    return scheme == "probe"


def value_is_engine(scheme: str) -> bool:
    """The value model is a causal LM with its own KV cache (not a probe on the base's hidden state)."""
    return uses_value(scheme) and not is_probe(scheme)


def scheme_of_checkpoint(value_path) -> str:
    """The scheme recorded by ``ivl-fast train`` in a value checkpoint's ivl.json (default residual)."""
    import json
    from pathlib import Path

    if value_path is None:
        return "residual"
    meta = Path(value_path) / "ivl.json"
    if meta.is_file():
        scheme = json.loads(meta.read_text()).get("scheme", "residual")
        return scheme if scheme in TRAIN_SCHEMES else "residual"
    return "residual"
