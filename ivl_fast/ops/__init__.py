"""Public ops with a Triton path and a torch path (``backend="triton" | "torch" | "auto"``), each with a
plain-torch reference (``*_ref``) that defines it."""

from .combine_and_sample import combine_and_sample, combine_and_sample_ref
from .fused_ce_l1 import fused_ce_l1, fused_ce_l1_ref

__all__ = ["combine_and_sample", "combine_and_sample_ref", "fused_ce_l1", "fused_ce_l1_ref"]
