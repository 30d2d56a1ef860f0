"""Peak memory and time of one forward+backward of the IVL loss: fused_ce_l1 vs the naive torch loss.

Run as a script for one variant (``python bench/fused_ce_l1_mem.py fused|naive``); it prints one JSON line.
Each variant runs in its own process so that CPU peak memory (VmHWM, reset after the inputs are built) is
measured cleanly; on CUDA it uses torch.cuda.max_memory_allocated. bench/test_fused_ce_l1.py drives it.
Size: IVL_CE_N (8192), IVL_CE_V (32000), IVL_CE_H (2048); dtype fp32 on CPU, bf16 on GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def naive_loss(vh, vw, bh, bw, labels, l1):
    zb = (bh @ bw.T).float()  # [N, V]
    zd = (vh @ vw.T).float()  # [N, V]
    mask = labels != -100
    n = mask.sum().clamp(min=1)
    ce = torch.nn.functional.cross_entropy(zb + zd, labels, ignore_index=-100, reduction="sum")
    return (ce + l1 * (zd.abs().sum(-1) * mask).sum() / zd.shape[1]) / n


def main(variant: str) -> dict:
    from ivl_fast.ops import fused_ce_l1

    n, v, h = (int(os.environ.get(k, d)) for k, d in (("IVL_CE_N", 8192), ("IVL_CE_V", 32000), ("IVL_CE_H", 2048)))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    vh = torch.randn(n, h, device=dev, dtype=dt, generator=g).requires_grad_()
    vw = (torch.randn(v, h, device=dev, dtype=dt, generator=g) * 0.02).requires_grad_()
    bh = torch.randn(n, h, device=dev, dtype=dt, generator=g)
    bw = torch.randn(v, h, device=dev, dtype=dt, generator=g) * 0.02
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    labels[: n // 4] = -100  # prompt tokens

    def reset_peak() -> int:
        """Restart peak tracking at the current usage; returns that usage (bytes)."""
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        return _vm("VmRSS")

    def peak() -> int:
        if dev == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _vm("VmHWM")

    def forward():
        return naive_loss(vh, vw, bh, bw, labels, 1.0) if variant == "naive" else fused_ce_l1(vh, vw, bh, bw, labels)

    forward().backward()  # warm-up (Triton compile, allocator)
    times, fwd_peaks, bwd_peaks = [], [], []
    for _ in range(int(os.environ.get("IVL_CE_REPEAT", "3" if dev == "cuda" else "1"))):
        vh.grad = vw.grad = None
        base = reset_peak()  # inputs only: what the loss adds is measured against this
        t0 = time.perf_counter()
        loss = forward()
        fwd_peaks.append(peak() - base)
        reset_peak()  # the backward's own peak, still counted from the inputs-only usage
        loss.backward()
        bwd_peaks.append(peak() - base)
        times.append(time.perf_counter() - t0)
    # peak_extra_bytes: the larger of the two phases (the old single figure); the phases say where it comes from
    fwd_peak, bwd_peak = max(fwd_peaks), max(bwd_peaks)
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "N": n,
        "V": v,
        "H": h,
        "dtype": str(dt),
        "loss": float(loss),
        "peak_extra_bytes": int(max(fwd_peak, bwd_peak)),
        "forward_peak_extra_bytes": int(fwd_peak),
        "backward_peak_extra_bytes": int(bwd_peak),
        "seconds_min": min(times),
        "seconds_all": times,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
