"""What the value network changed: per decode step and row, the top-k of the base alone, of the value network's
delta (alpha * z_value) and of their combination, and whether the value network changed the choice (the
combination's most likely token is not the base's). Read by ``generate(..., return_components=k)``,
``ivl-fast generate --explain`` and the server's ``return_components`` extension.

All three are taken before penalties and warpers (so "changed" is the value network's doing, not a penalty's); the
base's side is in the sampled (value) vocabulary, pushed through the vocab map when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIDES = ("base", "value", "combined")


@dataclass
class Components:
    """ids, values: [B, n, 3, k] (sides in :data:`SIDES` order: base log-probabilities, the value network's delta
    alpha * z_value in logits, combined log-probabilities, each most likely first); num_new_tokens: [B] (the steps
    of each row that count: after EOS a row's steps are padding)."""

    ids: torch.Tensor
    values: torch.Tensor
    num_new_tokens: torch.Tensor

    @property
    def changed(self) -> torch.Tensor:
        """[B, n] bool: the combination's most likely token is not the base's (False past a row's end)."""
        n = self.ids.shape[1]
        live = torch.arange(n, device=self.ids.device)[None] < self.num_new_tokens[:, None].to(self.ids.device)
        return (self.ids[:, :, 0, 0] != self.ids[:, :, 2, 0]) & live

    def changed_fraction(self) -> torch.Tensor:
        """[B] the share of each row's tokens at which the value network changed the choice."""
        return self.changed.sum(1).double() / self.num_new_tokens.clamp(min=1).double().to(self.ids.device)

    def steps(self, row: int, tokenizer=None) -> list[dict]:
        """Row ``row`` step by step: {"changed", "base", "value", "combined"}, each side a list of (token, value)
        (token: the id, or its text with a tokenizer)."""
        out = []
        name = (lambda i: tokenizer.decode([i])) if tokenizer is not None else (lambda i: i)
        ids, vals = self.ids[row].tolist(), self.values[row].tolist()
        for t in range(int(self.num_new_tokens[row])):
            step = {"changed": ids[t][0][0] != ids[t][2][0]}
            for s, side in enumerate(SIDES):
                step[side] = [(name(i), v) for i, v in zip(ids[t][s], vals[t][s], strict=True)]
            out.append(step)
        return out


def format_steps(steps: list[dict], emitted: list[str]) -> str:
    """A plain-text table of :meth:`Components.steps` (token texts): per step the token emitted, "*" where the value
    network changed the choice, and the three top-k lists."""

    def show(pairs, fmt):
        return "  ".join(f"{tok!r} {fmt.format(v)}" for tok, v in pairs)

    lines = []
    for t, (step, tok) in enumerate(zip(steps, emitted, strict=True)):
        lines.append(f"step {t:>3} {'*' if step['changed'] else ' '} {tok!r}")
        lines.append(f"    base      {show(step['base'], '{:.2f}')}")
        lines.append(f"    value     {show(step['value'], '{:+.2f}')}")
        lines.append(f"    combined  {show(step['combined'], '{:.2f}')}")
    changed = sum(s["changed"] for s in steps)
    lines.append(f"the value network changed {changed} of {len(steps)} tokens (*)")
    return "\n".join(lines)
