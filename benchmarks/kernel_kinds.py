"""Which part of the model a profiled CUDA kernel belongs to: GEMM, attention or other.

Inductor names its fused Triton kernels after the ATen ops they fuse, so a RoPE kernel feeding
attention is called ``triton_poi_fused__scaled_dot_product_cudnn_attention_...`` and a SiLU·mul
after a decomposed bmm ``triton_poi_fused_..._bmm_mul_silu``: those are pointwise work ("other"),
whatever ops their names list. Only Inductor's GEMM templates (``triton_tem``) count as GEMMs.
"""

from __future__ import annotations

GEMM_KEYS = ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "mm_", "bmm")
ATTENTION_KEYS = ("flash", "attention", "fmha", "sdpa", "cudnn")


def kernel_kind(name: str) -> str:
    """``"gemm"``, ``"attention"`` or ``"other"`` for a CUDA kernel's name."""
    lower = name.lower()
    if lower.startswith("triton_tem"):
        return "gemm"
    if lower.startswith("triton_"):  # Inductor's pointwise / reduction kernels
        return "other"
    if any(key in lower for key in GEMM_KEYS):
        return "gemm"
    if any(key in lower for key in ATTENTION_KEYS):
        return "attention"
    return "other"
