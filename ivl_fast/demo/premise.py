"""IVL's premise, measured on the demo's held-out questions (the paper's "norm" argument and its transfer claim).

At two positions of every held-out question rendered as a chat prompt:

- format:  the first assistant token (which style the answer takes: "ANSWER: ..." or another);
- content: the token after "ANSWER:" (the word itself, which needs knowledge of the person).

Reported per pair of bases (each against the value network's training base, the small one): KL(other || small) of
their next-token distributions and how often their top-1 agree; and the mean absolute value-network logit
(mean over the vocabulary of |z_value|) at each position. The premise holds when the bases agree at the format
position (low KL, same top-1), and the value network's logits are large where it selects the format and small
where knowledge is needed.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch


def _next_logits(model, tok, texts: list[str]) -> torch.Tensor:
    """[N, V] fp64 next-token logits after each text (one forward each: no padding effects)."""
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            out.append(model(ids).logits[0, -1].double())
    return torch.stack(out)


def premise_stats(work: Path, world: dict, people: list[str], bases: list[str], value: str = "value") -> dict:
    """``bases``: the work dir's base checkpoints compared with "small" (e.g. ["mid", "large", "continued"]);
    -> {"kl": {base: {"format", "content"}}, "top1_agree": {...}, "value_abs": {"format", "content"},
    "questions": n}."""
    from transformers import AutoModelForCausalLM

    from ..chat import as_messages, load_tokenizer, render_chat

    tok = load_tokenizer(work / "small")
    prompts = []
    for p in people:
        prompts += [render_chat(tok, as_messages(f"Where does {p} live?"))]
        prompts += [render_chat(tok, as_messages(f"What color does {p} like?"))]
    at = {"format": prompts, "content": [t + "ANSWER:" for t in prompts]}

    def load(name):
        return AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32).eval()

    small = load("small")
    z_small = {k: _next_logits(small, tok, v) for k, v in at.items()}
    kl, agree = {}, {}
    for name in bases:
        m = load(name)
        kl[name], agree[name] = {}, {}
        for k, texts in at.items():
            z = _next_logits(m, tok, texts)
            lp, lq = z.log_softmax(-1), z_small[k].log_softmax(-1)
            kl[name][k] = float((lp.exp() * (lp - lq)).sum(-1).mean())
            agree[name][k] = float((z.argmax(-1) == z_small[k].argmax(-1)).double().mean())
    v = load(value)
    value_abs = {k: statistics.mean(_next_logits(v, tok, texts).abs().mean(-1).tolist()) for k, texts in at.items()}
    return {"kl": kl, "top1_agree": agree, "value_abs": value_abs, "questions": len(prompts), "against": "small"}


__all__ = ["premise_stats"]
