"""ARMT: the Associative Recurrent Memory Transformer (Rodkin et al., arXiv 2407.04841).

Wraps any Hugging Face causal LM. Every decoder layer is replaced, in place in the base model's layer
``nn.ModuleList``, by an :class:`AssociativeLayer` that carries an associative memory ``W_mem``
([B, d_key, d]) and a normaliser ``z`` ([B, d_key]) from one segment to the next. Written in the style
of the public reference code (state in reassigned attributes, a Python ``first_seg`` flag, a Python
loop over segments) because that is what users' models look like.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._common import copy_layer_attributes, layer_hidden_states
from ._segment_loop import SegmentedMemoryLM

__all__ = ["dpfp", "AssociativeLayer", "ARMT"]

EPS = 1e-5


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection: ``[..., n] -> [..., 2*nu*n]`` (non-negative features)."""
    u = torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)  # [..., 2n]
    return torch.cat([u * torch.roll(u, shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)  # [..., 2n*nu]


class AssociativeLayer(nn.Module):
    """A decoder layer plus ARMT's associative memory (read before the layer, write after it).

    State (plain attributes, reassigned every segment): ``W_mem`` [B, d_key, d], ``z`` [B, d_key] and the
    bool ``first_seg``. ``d_key = 2 * nu * d_mem``. With ``read_only`` set (generation, as the reference's
    ``generate_mode``) the layer reads the memory but never writes it.
    """

    def __init__(
        self,
        layer: nn.Module,
        d_model: int,
        num_mem_tokens: int,
        d_mem: int = 64,
        nu: int = 3,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.d_model = d_model
        self.num_mem_tokens = num_mem_tokens
        self.d_mem = d_mem
        self.nu = nu
        self.d_key = 2 * nu * d_mem

        param = next(layer.parameters())
        factory = {"dtype": param.dtype, "device": param.device}
        self.W_mq = nn.Linear(d_model, d_mem, bias=False, **factory)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False, **factory)
        self.W_mv = nn.Linear(d_model, d_model, bias=False, **factory)
        self.W_mb = nn.Linear(d_model, 1, bias=True, **factory)
        # As in the reference code: a freshly wrapped model starts out as the base model.
        nn.init.zeros_(self.W_mv.weight)

        copy_layer_attributes(self, layer)
        self.read_only = False
        self.reset_memory()

    def reset_memory(self) -> None:
        """Forget everything: the next segment is a first segment."""
        self.W_mem: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.first_seg = True

    def detach_memory(self) -> None:
        """Truncated BPTT: keep the memory's value, cut its gradient (the reference's ``detach_mem``)."""
        if self.W_mem is not None:
            self.W_mem = self.W_mem.detach()
            self.z = self.z.detach()

    def associate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Read the memory at every position: ``(phi(q) @ W_mem) / (phi(q) . z + eps)``."""
        self.W_mem = self.W_mem.to(hidden_states.device)
        self.z = self.z.to(hidden_states.device)
        q = dpfp(self.W_mq(hidden_states), self.nu)  # [B, T+m, d_key]
        num = q @ self.W_mem  # [B, T+m, d]
        denom = q @ self.z.unsqueeze(-1) + EPS  # [B, T+m, 1]
        return num / denom  # [B, T+m, d]

    def update_mem(self, mem_tokens: torch.Tensor) -> None:
        """Write the memory tokens' layer outputs ``mem_tokens`` [B, m, d] into ``W_mem`` and ``z``."""
        batch = mem_tokens.shape[0]
        k = dpfp(self.W_mk(mem_tokens), self.nu)  # [B, m, d_key]
        v = self.W_mv(mem_tokens)  # [B, m, d]
        beta = torch.sigmoid(self.W_mb(mem_tokens))  # [B, m, 1]
        if self.first_seg:
            W_mem = torch.zeros(batch, self.d_key, self.d_model, dtype=k.dtype, device=k.device)  # [B, d_key, d]
            z = torch.zeros(batch, self.d_key, dtype=k.dtype, device=k.device)  # [B, d_key]
            v_old = torch.zeros_like(v)  # [B, m, d]
            gamma = torch.ones_like(beta)  # [B, m, 1]
        else:
            W_mem = self.W_mem.to(mem_tokens.device)
            z = self.z.to(mem_tokens.device)
            kz = k @ z.unsqueeze(-1) + EPS  # [B, m, 1]
            v_old = (k @ W_mem) / kz  # [B, m, d]
            k_norm2 = (k * k).sum(dim=-1, keepdim=True) + EPS  # [B, m, 1]
            gamma = torch.clip(1 - kz / k_norm2, 0, 1).detach()  # [B, m, 1]
        self.W_mem = W_mem + k.transpose(-2, -1) @ (beta * (v - v_old))  # [B, d_key, d]
        self.z = z + (gamma * k).sum(dim=1)  # [B, d_key]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Read (not on the first segment), run the layer, write; return the layer's own output."""
        if not self.first_seg:
            hidden_states = hidden_states + self.associate(hidden_states)  # [B, T+m, d]
        out = self.layer(hidden_states, *args, **kwargs)
        if self.read_only:  # decoding: the rows are text tokens, not memory tokens
            return out
        layer_out = layer_hidden_states(out)  # [B, T+m, d]
        self.update_mem(layer_out[:, -self.num_mem_tokens :])  # [B, m, d]
        self.first_seg = False
        return out


class ARMT(SegmentedMemoryLM):
    """Associative Recurrent Memory Transformer around a Hugging Face causal LM.

    ``forward(input_ids)`` splits the tokens into segments of ``segment_size`` (the last may be shorter),
    appends the ``num_mem_tokens`` learned memory embeddings to each, runs the base model once per segment
    and returns ``CausalLMOutputWithPast`` with the text logits ``[B, N, V]``. Memory is reset at the start
    of every forward.
    """

    def __init__(
        self,
        base_model: nn.Module,
        *,
        segment_size: int,
        num_mem_tokens: int,
        d_mem: int = 64,
        nu: int = 3,
        memory_init_std: float | None = None,
        k2: int | None = None,
    ) -> None:
        if num_mem_tokens < 1:
            raise ValueError(f"ARMT needs at least one memory token, got num_mem_tokens={num_mem_tokens}")
        super().__init__(
            base_model,
            segment_size=segment_size,
            num_mem_tokens=num_mem_tokens,
            memory_init_std=memory_init_std,
            k2=k2,
        )
        self.d_mem = d_mem
        self.nu = nu
        self._wrap_layers(lambda layer, i: AssociativeLayer(layer, self.d_model, num_mem_tokens, d_mem, nu))

    def memory_states(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer, the ``(W_mem [B, d_key, d], z [B, d_key])`` left by the last forward."""
        return [(layer.W_mem, layer.z) for layer in self.layers]
