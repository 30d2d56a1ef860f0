"""Model engines: the lean Llama-family decoder and the transformers adapter, plus checkpoint loading.

``load_model(path)`` returns an engine with the interface ``allocate / prefill / decode`` (see
:class:`LeanCausalLM`). Checkpoints of the lean families (``LEAN_MODEL_TYPES``: Llama, Mistral, Qwen2/3, Gemma 2/3,
Phi-3, OLMo 2, Granite, SmolLM3) get the lean engine; any other causal LM runs through :class:`HFCausalLM` with a
one-line notice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import checkpoint_dir, iter_tensors, read_config, weight_files
from .config import LEAN_MODEL_TYPES, LeanConfig, UnsupportedArchitecture, parse_dtype
from .families import text_weight_name
from .hf_adapter import HFCausalLM
from .llama import ATTN_BACKENDS, LeanCausalLM
from .probe import ProbeValue, is_probe_config, load_probe

logger = logging.getLogger("ivl_fast")

__all__ = [
    "ATTN_BACKENDS",
    "HFCausalLM",
    "LEAN_MODEL_TYPES",
    "LeanCausalLM",
    "LeanConfig",
    "ProbeValue",
    "UnsupportedArchitecture",
    "checkpoint_dir",
    "from_hf_model",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

ENGINES = ("auto", "lean", "hf")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a valid device; expected 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was asked for but torch sees no CUDA device (torch {torch.__version__})"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is not supported; expected 'cpu' or 'cuda[:N]'")
    return dev


def resolve_dtype(dtype, device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype: explicit, else the checkpoint's on CUDA and float32 on CPU."""
    dt = parse_dtype(dtype)
    if dt is None:
        if device.type == "cpu":
            return torch.float32
        dt = checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    supported = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    if dt not in supported:
        raise ValueError(f"dtype {dt} is not supported; expected float32, float16 or bfloat16")
    if device.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported on {torch.cuda.get_device_name(device)}; use float16")
    if device.type == "cuda" and dt == torch.float64:
        raise ValueError("dtype float64 is only supported on the CPU (it exists for reference checks)")
    return dt


def _build_lean(
    cfg: LeanConfig, state: dict[str, torch.Tensor], device, dtype, attn_backend, model=None
) -> LeanCausalLM:
    """``state`` loaded into a lean engine built on the meta device (``model``: one built there already, e.g. a
    tensor-parallel shard, with ``cfg`` the config its modules follow)."""
    if model is None:
        with torch.device("meta"):
            model = LeanCausalLM(cfg, attn_backend=attn_backend)
    if cfg.multimodal is not None:  # the text model of a multimodal checkpoint: its weights, renamed
        renamed = ((text_weight_name(cfg.multimodal, k), v) for k, v in state.items())
        state = {k: v for k, v in renamed if k is not None}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint weights do not match a {cfg.model_type} model with this config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for k, v in model.state_dict().items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"weight {k!r} has shape {tuple(state[k].shape)}, config implies {tuple(v.shape)}")
    # .to() is a no-op (shares storage) when device and dtype already match
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    # the rotary buffers were created on the meta device with the module; compute them for real
    model.reset_buffers(device)
    model.requires_grad_(False)
    return model.eval()


def _hf_dtype_kwargs(dtype: torch.dtype) -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_model(
    path: str | Path,
    *,
    device=None,
    dtype=None,
    engine: str = "auto",
    attn_backend: str = "sdpa",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tensor_parallel: int | None = None,
):
    """Load a Hugging Face checkpoint directory as an engine (lean when the architecture allows it).

    ``tensor_parallel=N`` (N > 1): this process's shard of the model, inside an initialised process group of N
    ranks (``ivl_fast.models.tensor_parallel``); lean engine and safetensors only. The device defaults to
    ``cuda:LOCAL_RANK`` when CUDA is there."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if tensor_parallel is not None and (not isinstance(tensor_parallel, int) or tensor_parallel < 1):
        raise ValueError(f"tensor_parallel must be an integer >= 1, got {tensor_parallel!r}")
    if tensor_parallel is not None and tensor_parallel > 1:
        return _load_tensor_parallel(path, tensor_parallel, device, dtype, engine, attn_backend, allow_pickle)
    raw = read_config(path)
    dev = resolve_device(device)
    ckpt_dtype = parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or None)
    dt = resolve_dtype(dtype, dev, ckpt_dtype)
    _, fmt = weight_files(path, allow_pickle=allow_pickle)  # refuses pickle-only checkpoints early
    if is_probe_config(raw):  # a linear-probe value model (scheme "probe"): no engine, no KV cache
        return load_probe(path, raw, dev, dt)
    if engine != "hf":
        try:
            cfg = LeanConfig.from_dict(raw)
        except UnsupportedArchitecture as e:
            if engine == "lean":
                raise
            logger.warning("ivl-fast: %s: %s; using the transformers fallback (no fast path)", path, e)
        else:
            state = dict(iter_tensors(path, allow_pickle=allow_pickle))
            return _build_lean(cfg, state, dev, dt, attn_backend)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        use_safetensors=fmt == "safetensors",
        trust_remote_code=trust_remote_code,
        **_hf_dtype_kwargs(dt),
    ).to(dev)
    return HFCausalLM(model)


def _load_tensor_parallel(path, tp: int, device, dtype, engine: str, attn_backend: str, allow_pickle: bool):
    from .tensor_parallel import TensorParallelLlama, current_group, local_device, read_shard, shard_plan

    if engine == "hf":
        raise ValueError(
            f"tensor_parallel={tp} needs the lean engine ({', '.join(LEAN_MODEL_TYPES)}); engine='hf' was given"
        )
    raw = read_config(path)
    if is_probe_config(raw):
        raise ValueError(f"tensor_parallel={tp}: {str(path)!r} is a linear probe, not a model to shard")
    cfg = LeanConfig.from_dict(raw)  # UnsupportedArchitecture: only the lean engine shards
    files, fmt = weight_files(path, allow_pickle=allow_pickle)
    if fmt != "safetensors":
        raise ValueError(f"tensor_parallel={tp} reads each rank's slices from safetensors files; {path} is pickled")
    group = current_group(tp)
    import torch.distributed as dist

    plan = shard_plan(cfg, dist.get_rank(), tp)
    dev = resolve_device(local_device(device))
    dt = resolve_dtype(dtype, dev, parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or None))
    state = read_shard(path, files, cfg, plan)
    with torch.device("meta"):
        model = TensorParallelLlama(cfg, plan, group, attn_backend=attn_backend)
    return _build_lean(model.local_config, state, dev, dt, attn_backend, model=model)


def from_hf_model(model, *, engine: str = "auto", attn_backend: str = "sdpa"):
    """Wrap an already loaded ``transformers`` model; the lean engine shares its weight tensors (no copy)."""
    if isinstance(model, LeanCausalLM | HFCausalLM):
        return model
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "hf":
        try:
            cfg = LeanConfig.from_dict(model.config.to_dict())
        except UnsupportedArchitecture as e:
            if engine == "lean":
                raise
            logger.warning("ivl-fast: %s: %s; using the transformers fallback (no fast path)", type(model).__name__, e)
        else:
            p = next(model.parameters())
            return _build_lean(cfg, dict(model.state_dict()), p.device, p.dtype, attn_backend)
    return HFCausalLM(model)
