"""The per-rank memory-bandwidth floor of tensor-parallel decoding at batch 1 (issue #20), printed as README's table.

    python bench/tp_floor.py

At batch 1 a decode step reads every weight once, so a rank's step takes at least (its bytes) / (its HBM
bandwidth). With the base sharded N ways and the value network replicated, rank bytes = base / N + value. The
all-reduces (2 per layer, of one hidden vector) and the head's all-gather add latency on top, not counted here.
Bandwidths are the vendors' peak figures; parameter counts are the models' own (Llama-2-70B: 68.98e9, TinyLlama-1.1B:
1.10e9), in bf16.
"""

from __future__ import annotations

BASE_PARAMS = 68.98e9  # Llama-2-70B
VALUE_PARAMS = 1.10e9  # TinyLlama-1.1B, the paper's value network base
BYTES = 2  # bf16
GPUS = {"A100 80GB SXM (2.04 TB/s)": 2.039e12, "H100 / H800 SXM (3.35 TB/s)": 3.35e12}
RANKS = (2, 4, 8)
# gpt-fast's reported Llama-2-70B tensor-parallel decoding on A100s, batch 1 (its README), tokens/s
GPT_FAST_A100 = {2: 21.3, 4: 38.0, 8: 62.5}


def rows() -> list[tuple]:
    out = []
    for n in RANKS:
        per_rank = (BASE_PARAMS / n + VALUE_PARAMS) * BYTES
        cells = [f"{per_rank / 1e9:.1f} GB"]
        for bw in GPUS.values():
            ms = per_rank / bw * 1e3
            cells.append(f"{ms:.1f} ms = {1e3 / ms:.0f} tokens/s")
        out.append((n, *cells, f"{GPT_FAST_A100[n]} tokens/s"))
    return out


def table() -> str:
    head = ["ranks", "bytes per rank per token (70B / N + 1.1B value)", *(f"floor, {g}" for g in GPUS)]
    head.append("gpt-fast, 70B alone, A100s (its figure)")
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
