"""Ops with batching rules that ``torch.func.vmap`` lacks.

``scaled_dot_product_attention`` has no vmap batching rule for some of its kernels
(e.g. the CPU flash kernel), so vmap would run it once per cell in a Python loop.
:func:`batched_sdpa` is the same op as a custom op whose vmap rule folds the cell
dimension into the batch dimension: one attention call for the whole diagonal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["batched_sdpa", "SDPA_TARGETS"]

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
"""The callables Dynamo records for ``F.scaled_dot_product_attention``."""


@torch.library.custom_op("diagpass::sdpa", mutates_args=())
def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    ).clone(memory_format=torch.contiguous_format)  # the fake's layout: Inductor asserts it (kernels differ)


@_sdpa.register_fake
def _sdpa_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):  # type: ignore[no-untyped-def]
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _sdpa_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = inputs
    ctx.save_for_backward(query, key, value, attn_mask)
    ctx.options = (dropout_p, is_causal, scale, enable_gqa)


def _sdpa_backward(ctx, grad):  # type: ignore[no-untyped-def]
    """Recompute the attention differentiably and take its vector-Jacobian product (attention is
    cheap to recompute; this keeps the forward the fused kernel, as flash attention's backward does)."""
    query, key, value, attn_mask = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa = ctx.options
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(t.is_floating_point())
            for t in (query, key, value, attn_mask)
        ]
        out = F.scaled_dot_product_attention(
            leaves[0], leaves[1], leaves[2], attn_mask=leaves[3], dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
        needs = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        grads = iter(torch.autograd.grad(out, needs, grad, allow_unused=True))
    result = [next(grads) if leaf is not None and leaf.requires_grad else None for leaf in leaves]
    return (*result, None, None, None, None)


_sdpa.register_autograd(_sdpa_backward, setup_context=_sdpa_setup)


def _fold(x: torch.Tensor | None, dim: int | None, size: int) -> torch.Tensor | None:
    """Move the vmapped dim to the front and fold it into the next (batch) dim."""
    if x is None:
        return None
    if dim is None:
        x = x.unsqueeze(0).expand(size, *x.shape)
    else:
        x = x.movedim(dim, 0)
    if x.dim() < 2:
        return x
    return x.reshape(size * x.shape[1], *x.shape[2:])


@_sdpa.register_vmap
def _sdpa_vmap(info, in_dims, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):  # type: ignore[no-untyped-def]
    size = info.batch_size
    q_dim, k_dim, v_dim, m_dim = in_dims[:4]
    q = _fold(query, q_dim, size)  # [G*B, H, T, D]
    k = _fold(key, k_dim, size)
    v = _fold(value, v_dim, size)
    mask = attn_mask
    if mask is not None:
        # Per cell the mask broadcasts against [B, H, T, S]; make it [G, B, h, T, S] and fold.
        mask = mask.unsqueeze(0).expand(size, *mask.shape) if m_dim is None else mask.movedim(m_dim, 0)
        while mask.dim() < 5:
            mask = mask.unsqueeze(1)
        batch = q.shape[0] // size
        mask = mask.expand(size, batch, *mask.shape[2:]).reshape(size * batch, *mask.shape[2:])
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    return out.reshape(size, -1, *out.shape[1:]), 0


def batched_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with a vmap rule that batches over cells."""
    return _sdpa(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale, bool(enable_gqa))


def sdpa_supported(*args: Any, **kwargs: Any) -> bool:
    """Whether a recorded SDPA call fits :func:`batched_sdpa` (4-D q/k/v, no extra kwargs, no
    dropout: its backward recomputes the attention, which would draw another dropout mask; SDPA
    with dropout stays itself, batched by vmap with a mask per cell)."""
    allowed = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
    dropout = kwargs["dropout_p"] if "dropout_p" in kwargs else (args[4] if len(args) > 4 else 0.0)
    return len(args) <= 3 + len(allowed) and set(kwargs) <= allowed and isinstance(dropout, (int, float)) and dropout == 0
