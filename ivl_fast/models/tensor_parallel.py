"""Tensor parallelism for the lean Llama-family engine over ``torch.distributed`` (Megatron-style, as gpt-fast).

Each of the N ranks of a process group holds (``ShardPlan``):

- q/k/v and gate/up, column-parallel (rows of the weight, the output features): rank r's query heads
  [r H/N, (r+1) H/N), the KV heads they read, and its I/N of the MLP's intermediate features. Fused weights
  (Phi-3's qkv_proj and gate_up_proj) are cut into the same pieces, each rank's pieces concatenated.
- q/k norms: per head (Qwen3, Gemma 3) replicated; over the whole projection (OLMo 2) each rank holds its heads'
  weights and the mean of squares is all-reduced (two more all-reduces per layer). With fewer KV heads
  than ranks (Hkv < N, N a multiple of Hkv) each rank holds the one KV head its query heads read, so that head is
  replicated on N/Hkv ranks. Query head q reads KV head q // (H/Hkv), as in transformers' ``repeat_kv``.
- o and down, row-parallel (columns, the input features): each rank's partial sum goes through one all-reduce per
  layer and projection; a bias is added once, after it.
- the head, vocabulary-parallel: ceil(V/N) rows per rank (the last rank's zero-padded). ``project`` all-gathers the
  slices into the whole [.., V] logits on every rank.
- embedding, norms, rotary tables: replicated. The embedding is V x H, 0.5 GB of Llama-2-70B's 138 GB in bf16, and
  a vocabulary-parallel embedding would cost one more all-reduce per step.

Sampling: every rank gets the same whole logits after the gather. All-gather copies; a ring all-reduce finishes each
element's sum on one rank and copies it to the others, so every rank holds the same bits. Each rank then runs the
same (replicated) value network and the same sampler with the same seed, and draws the same ids. There is no
broadcast of ids per step: no extra collective, no host sync, and each rank's step stays one capturable graph.
The tests check that the ids agree across ranks.

Each rank reads only its slices from the safetensors files (``safe_open(...).get_slice``): its memory is about 1/N
of the sharded weights plus the replicated ones.

NOTE: CUDA (NCCL, the step captured in CUDA graphs with its collectives, which NCCL supports) is not yet validated:
no GPU has been lent to this project's tensor-parallel work. The CPU path (gloo) is tested with 2 processes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import LeanConfig
from .families import text_weight_name
from .layers import RMSNorm
from .llama import LeanCausalLM


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What rank ``rank`` of ``world`` holds: query heads, KV heads, intermediate features, head rows ([lo, hi))."""

    rank: int
    world: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_rows: int  # ceil(V / world): every rank's head holds this many rows (the last zero-padded)


def shard_plan(cfg: LeanConfig, rank: int, world: int) -> ShardPlan:
    """The slices of rank ``rank`` of ``world``; ValueError (naming tensor_parallel) when the model cannot be split
    that way."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tensor_parallel={world} with rank {rank}: need world >= 1 and 0 <= rank < world")
    h, hkv, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    if h % world:
        raise ValueError(f"tensor_parallel={world} must divide num_attention_heads={h}")
    if hkv % world and world % hkv:
        raise ValueError(
            f"tensor_parallel={world} and num_key_value_heads={hkv}: one must divide the other (KV heads are split, "
            "or replicated when there are fewer than ranks)"
        )
    if inter % world:
        raise ValueError(f"tensor_parallel={world} must divide intermediate_size={inter}")
    per_h = h // world
    if hkv >= world:
        per_kv = hkv // world
        kv = (rank * per_kv, (rank + 1) * per_kv)
    else:  # fewer KV heads than ranks: the one KV head this rank's query heads read
        j = rank // (world // hkv)
        kv = (j, j + 1)
    rows = -(-cfg.vocab_size // world)
    per_i = inter // world
    return ShardPlan(
        rank=rank,
        world=world,
        heads=(rank * per_h, (rank + 1) * per_h),
        kv_heads=kv,
        intermediate=(rank * per_i, (rank + 1) * per_i),
        vocab=(min(rank * rows, cfg.vocab_size), min((rank + 1) * rows, cfg.vocab_size)),
        vocab_rows=rows,
    )


def slice_of(name: str, cfg: LeanConfig, plan: ShardPlan) -> tuple[int, list[tuple[int, int]]] | None:
    """(dim, [(lo, hi), ...]) of the checkpoint tensor ``name`` that this rank reads (the pieces concatenated
    along dim: several for fused weights), or None for the whole tensor."""
    d, h, hkv, inter = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    q = (plan.heads[0] * d, plan.heads[1] * d)
    kv = (plan.kv_heads[0] * d, plan.kv_heads[1] * d)
    i0, i1 = plan.intermediate
    if name.endswith(("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias")):  # rows [q (H D); k (Hkv D); v]
        k_at, v_at = h * d, (h + hkv) * d
        return 0, [q, (k_at + kv[0], k_at + kv[1]), (v_at + kv[0], v_at + kv[1])]
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return 0, [q]
    if name.endswith(tuple(f"self_attn.{p}_proj.{w}" for p in "kv" for w in ("weight", "bias"))):
        return 0, [kv]
    if name.endswith("self_attn.o_proj.weight"):
        return 1, [q]
    if name.endswith(("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias")):
        return 0, [(i0, i1)]
    if name.endswith(("mlp.gate_up_proj.weight", "mlp.gate_up_proj.bias")):  # rows [gate (I); up (I)]
        return 0, [(i0, i1), (inter + i0, inter + i1)]
    if name.endswith("mlp.down_proj.weight"):
        return 1, [(i0, i1)]
    if cfg.arch.qk_norm == "proj" and name.endswith("self_attn.q_norm.weight"):
        return 0, [q]
    if cfg.arch.qk_norm == "proj" and name.endswith("self_attn.k_norm.weight"):
        return 0, [kv]
    if name == "lm_head.weight":
        return 0, [plan.vocab]
    return None


# torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated there); older ones only have the latter
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: W [out, in/N] holds this rank's input columns (o_proj, down_proj)."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)  # the one collective per row-parallel projection
        return y if self.bias is None else y + self.bias


class ShardedRMSNorm(RMSNorm):
    """An RMSNorm over a dimension split across the ranks (OLMo 2's q/k norm over the whole projection): this rank
    holds [.., dim/N]; the sum of squares is all-reduced. Every rank holds the same number of features, so the
    mean is the sum over world * local features (with replicated KV heads each copy is counted N/Hkv times, in
    the numerator and the denominator alike)."""

    def __init__(self, dim: int, eps: float, group, world: int, *, offset: bool, upcast: bool):
        super().__init__(dim, eps, offset=offset, upcast=upcast)
        self.group, self.world = group, world

    def mean_square(self, h: torch.Tensor) -> torch.Tensor:
        s = h.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(s, group=self.group)
        return s / (self.world * h.shape[-1])


class TensorParallelLlama(LeanCausalLM):
    """The lean engine holding one rank's shard (see the module docstring). Same interface and capabilities; its
    ``config`` is the whole model's, ``local_config`` what this rank's modules were built from."""

    def __init__(self, cfg: LeanConfig, plan: ShardPlan, group, attn_backend: str = "sdpa"):
        local = dataclasses.replace(
            cfg,
            num_heads=plan.heads[1] - plan.heads[0],
            num_kv_heads=plan.kv_heads[1] - plan.kv_heads[0],
            intermediate_size=plan.intermediate[1] - plan.intermediate[0],
            tie_word_embeddings=False,  # the head is this rank's rows, even when the checkpoint ties it
        )
        super().__init__(local, attn_backend=attn_backend)
        self.config, self.local_config, self.plan, self.group = cfg, local, plan, group
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.o_proj = RowParallelLinear(a.h * a.d, cfg.hidden_size, cfg.o_bias, group)
            m.down_proj = RowParallelLinear(local.intermediate_size, cfg.hidden_size, cfg.mlp_bias, group)
            if a.qk_norm == "proj":
                flags = dict(offset=cfg.arch.norm_offset, upcast=cfg.arch.norm_upcast)
                a.q_norm = ShardedRMSNorm(a.h * a.d, cfg.rms_norm_eps, group, plan.world, **flags)
                a.k_norm = ShardedRMSNorm(a.hkv * a.d, cfg.rms_norm_eps, group, plan.world, **flags)
        self.lm_head = nn.Linear(cfg.hidden_size, plan.vocab_rows, bias=False)

    def head_weight(self) -> torch.Tensor:
        raise NotImplementedError(
            "a tensor-parallel base holds 1/N of the head (use project() for logits); training and the fused "
            "CE+L1 loss need the whole base on one device"
        )

    def head(self, hn: torch.Tensor) -> torch.Tensor:
        """hn [.., H] -> the head's output [.., V]: this rank's rows, then an all-gather of every rank's."""
        local = F.linear(hn, self.lm_head.weight).contiguous()  # [.., V/N]
        out = torch.empty((self.plan.world * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        _all_gather(out, local, group=self.group)  # [N * B, .., V/N], rank-major
        full = out.view(self.plan.world, *local.shape).movedim(0, -2)  # [B, .., N, V/N]
        return full.reshape(*local.shape[:-1], -1)[..., : self.config.vocab_size]


def current_group(tensor_parallel: int):
    """The default process group, checked to have ``tensor_parallel`` ranks (RuntimeError otherwise)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"tensor_parallel={tensor_parallel} needs an initialised process group (torch.distributed."
            "init_process_group, e.g. under torchrun --nproc_per_node N)"
        )
    world = dist.get_world_size()
    if world != tensor_parallel:
        raise RuntimeError(f"tensor_parallel={tensor_parallel} but the process group has {world} ranks")
    return dist.group.WORLD


def local_device(device) -> torch.device | None:
    """The device of this rank when none was given: ``cuda:LOCAL_RANK`` when CUDA is there (one GPU per rank)."""
    if device is not None or not torch.cuda.is_available():
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))


def read_shard(path: str | Path, files: list[Path], cfg: LeanConfig, plan: ShardPlan) -> dict[str, torch.Tensor]:
    """This rank's slices of every tensor in the safetensors ``files`` (only those bytes are read), on CPU in the
    stored dtype; the head's rows zero-padded to ``plan.vocab_rows`` (from the embedding when the head is tied)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for stored in sf.keys():
                name = stored if cfg.multimodal is None else text_weight_name(cfg.multimodal, stored)
                if name is None or name.endswith("rotary_emb.inv_freq"):  # (a multimodal checkpoint's vision tower)
                    continue
                cut = slice_of(name, cfg, plan)
                sl = sf.get_slice(stored)
                if cut is None:
                    state[name] = sl[:]
                else:
                    dim, pieces = cut
                    parts = [sl[lo:hi] if dim == 0 else sl[:, lo:hi] for lo, hi in pieces]
                    state[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    if cfg.tie_word_embeddings:
        if "model.embed_tokens.weight" not in state:
            raise ValueError(f"checkpoint {str(path)!r} ties its head but has no model.embed_tokens.weight")
        state["lm_head.weight"] = state["model.embed_tokens.weight"][plan.vocab[0] : plan.vocab[1]]
    head = state.get("lm_head.weight")
    if head is not None and head.shape[0] < plan.vocab_rows:  # the last rank: zero rows, cut off after the gather
        pad = head.new_zeros(plan.vocab_rows - head.shape[0], head.shape[1])
        state["lm_head.weight"] = torch.cat([head, pad])
    return state
