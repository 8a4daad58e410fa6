"""A per-layer linear-attention memory carried across segments (Infini-attention-style).

Every decoder layer is replaced, in place in the base model's layer ``nn.ModuleList``, by a
:class:`LinearMemoryLayer` that keeps ``S`` ([B, d_k, d]) and ``z`` ([B, d_k]). Before the layer it reads
``h <- h + (sigma(Q) @ S) / (sigma(Q) . z + eps)`` with ``Q = W_q h`` and ``sigma = elu + 1`` (skipped on the
first segment); after the layer it writes ALL rows of the layer output ``o``:
``S += sigma(K)^T V``, ``z += sum_rows sigma(K)`` with ``K = W_k o``, ``V = W_v o``.
Diagonal-safe: layer l at segment s reads layer l's state from s-1 only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._common import copy_layer_attributes, layer_hidden_states
from ._segment_loop import SegmentedMemoryLM

__all__ = ["elu_plus_one", "LinearMemoryLayer", "LinearMemoryTransformer"]

EPS = 1e-5


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """The positive feature map of linear attention: ``elu(x) + 1``."""
    return F.elu(x) + 1


class LinearMemoryLayer(nn.Module):
    """A decoder layer plus a compressive linear-attention memory ``S`` [B, d_k, d], ``z`` [B, d_k]."""

    def __init__(self, layer: nn.Module, d_model: int, d_key: int = 64) -> None:
        super().__init__()
        self.layer = layer
        self.d_model = d_model
        self.d_key = d_key
        param = next(layer.parameters())
        factory = {"dtype": param.dtype, "device": param.device}
        self.W_q = nn.Linear(d_model, d_key, bias=False, **factory)
        self.W_k = nn.Linear(d_model, d_key, bias=False, **factory)
        self.W_v = nn.Linear(d_model, d_model, bias=False, **factory)
        # Zero values: a freshly wrapped model starts out as the base model (like ARMT's W_mv).
        nn.init.zeros_(self.W_v.weight)
        copy_layer_attributes(self, layer)
        self.read_only = False  # generation: read the memory, never write it
        self.reset_memory()

    def reset_memory(self) -> None:
        """Forget everything: the next segment is a first segment."""
        self.S: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.first_seg = True

    def detach_memory(self) -> None:
        """Truncated BPTT: keep the memory's value, cut its gradient."""
        if self.S is not None:
            self.S = self.S.detach()
            self.z = self.z.detach()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Read (not on the first segment), run the layer, write all its output rows."""
        if not self.first_seg:
            S = self.S.to(hidden_states.device)  # [B, d_k, d]
            z = self.z.to(hidden_states.device)  # [B, d_k]
            sq = elu_plus_one(self.W_q(hidden_states))  # [B, T+m, d_k]
            hidden_states = hidden_states + (sq @ S) / (sq @ z.unsqueeze(-1) + EPS)  # [B, T+m, d]
        out = self.layer(hidden_states, *args, **kwargs)
        if self.read_only:
            return out
        o = layer_hidden_states(out)  # [B, T+m, d]
        sk = elu_plus_one(self.W_k(o))  # [B, T+m, d_k]
        v = self.W_v(o)  # [B, T+m, d]
        if self.first_seg:
            S = torch.zeros(o.shape[0], self.d_key, self.d_model, dtype=o.dtype, device=o.device)  # [B, d_k, d]
            z = torch.zeros(o.shape[0], self.d_key, dtype=o.dtype, device=o.device)  # [B, d_k]
        else:
            S = self.S.to(o.device)
            z = self.z.to(o.device)
        self.S = S + sk.transpose(-2, -1) @ v  # [B, d_k, d]
        self.z = z + sk.sum(dim=1)  # [B, d_k]
        self.first_seg = False
        return out


class LinearMemoryTransformer(SegmentedMemoryLM):
    """A Hugging Face causal LM run segment by segment with a linear-attention memory in every layer.

    ``num_mem_tokens`` learned memory embeddings may be appended to each segment (default 0: none).
    """

    def __init__(
        self,
        base_model: nn.Module,
        *,
        segment_size: int,
        d_key: int = 64,
        num_mem_tokens: int = 0,
        memory_init_std: float | None = None,
        k2: int | None = None,
    ) -> None:
        super().__init__(
            base_model,
            segment_size=segment_size,
            num_mem_tokens=num_mem_tokens,
            memory_init_std=memory_init_std,
            k2=k2,
        )
        self.d_key = d_key
        self._wrap_layers(lambda layer, i: LinearMemoryLayer(layer, self.d_model, d_key))

    def memory_states(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer, the ``(S [B, d_k, d], z [B, d_k])`` left by the last forward."""
        return [(layer.S, layer.z) for layer in self.layers]
