"""Triton kernels, each with a plain-torch reference; installed as `specdec.kernels`.

Importing this package imports triton. On a machine without a GPU, set TRITON_INTERPRET=1 before
the import to run the kernels in Triton's interpreter (how CI tests them).
"""

from .fused import rms_norm, rms_norm_reference, rope, rope_fits, rope_reference, silu_mul, silu_mul_reference
from .kv_ops import compact_kv, compact_kv_reference, store_kv, store_kv_reference
from .paged_attention import paged_tree_attention, paged_tree_attention_reference

__all__ = [
    "compact_kv",
    "compact_kv_reference",
    "paged_tree_attention",
    "paged_tree_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_fits",
    "rope_reference",
    "silu_mul",
    "silu_mul_reference",
    "store_kv",
    "store_kv_reference",
]
