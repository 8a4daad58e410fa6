"""An ARMT written the way the public reference code is written (DESIGN.md §1.2).

Plain PyTorch, no Hugging Face: state lives in module attributes that are reassigned,
a Python bool flag switches the first segment, ``.to(device)`` calls sit inside
forward, the wrapper loops over segments in Python and collects per-segment outputs,
and the layer returns a tuple that the wrapper indexes with ``out[0]``. It is small
and fast to trace, so property tests can sweep many shapes with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    x_rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    x_repeat = torch.cat([x] * nu, dim=-1)
    return x_repeat * x_rolled


class Block(nn.Module):
    """A pre-norm decoder block; returns a tuple like HF 4.x layers."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, t, d = x.shape  # [B, T+m, d]
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T+m, d/H]
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.down(F.gelu(self.up(self.norm2(x))))
        return (x, None)


class AssociativeBlock(nn.Module):
    """Reference-style associative memory around a block."""

    def __init__(self, block: Block, width: int, num_mem_tokens: int, d_mem: int, nu: int = 3) -> None:
        super().__init__()
        self.block = block
        self.num_mem_tokens = num_mem_tokens
        self.nu = nu
        self.W_mq = nn.Linear(width, d_mem, bias=False)
        self.W_mk = nn.Linear(width, d_mem, bias=False)
        self.W_mv = nn.Linear(width, width, bias=False)
        self.W_mb = nn.Linear(width, 1)
        self.d_key = 2 * nu * d_mem
        self.first_seg = True
        self.W_mem = None
        self.z = None

    def zero_mem(self) -> None:
        self.first_seg = True
        self.W_mem = None
        self.z = None

    def associate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q = dpfp(self.W_mq(hidden_states), self.nu)
        num = q @ self.W_mem.to(q.device)
        denom = (q * self.z.to(q.device)[:, None, :]).sum(-1, keepdim=True) + 1e-5
        return hidden_states + num / denom

    def update_mem(self, mem_tokens: torch.Tensor) -> None:
        k = dpfp(self.W_mk(mem_tokens), self.nu)  # [B, m, d_key]
        v = self.W_mv(mem_tokens)  # [B, m, d]
        beta = torch.sigmoid(self.W_mb(mem_tokens))  # [B, m, 1]
        if self.first_seg:
            self.W_mem = torch.zeros(k.shape[0], self.d_key, v.shape[-1], device=k.device, dtype=k.dtype)
            self.z = torch.zeros(k.shape[0], self.d_key, device=k.device, dtype=k.dtype)
            new_v = v
            gamma = torch.ones_like(beta)
        else:
            kz = (k * self.z[:, None, :]).sum(-1, keepdim=True) + 1e-5
            new_v = v - (k @ self.W_mem) / kz
            gamma = torch.clip(1 - kz / ((k * k).sum(-1, keepdim=True) + 1e-5), 0, 1).detach()
        self.W_mem = self.W_mem + (k * beta).transpose(1, 2) @ new_v
        self.z = self.z + (gamma * k).sum(1)
        self.first_seg = False

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        if not self.first_seg:
            hidden_states = self.associate(hidden_states)
        out = self.block(hidden_states)
        self.update_mem(out[0][:, -self.num_mem_tokens :])
        return out


class ReferenceStyleARMT(nn.Module):
    """Segment loop over embedded tokens + memory tokens, per-segment outputs collected."""

    def __init__(
        self,
        *,
        vocab: int = 64,
        width: int = 16,
        heads: int = 2,
        layers: int = 2,
        segment_size: int = 8,
        num_mem_tokens: int = 2,
        d_mem: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.segment_size = segment_size
        self.num_mem_tokens = num_mem_tokens
        self.embed = nn.Embedding(vocab, width)
        self.memory = nn.Parameter(torch.randn(num_mem_tokens, width) * 0.5)
        self.layers = nn.ModuleList(
            AssociativeBlock(Block(width, heads), width, num_mem_tokens, d_mem) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        with torch.no_grad():  # the reference zero-inits W_mv; non-zero exercises the memory path
            for layer in self.layers:
                layer.W_mv.weight.normal_(0.0, 0.02)
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for start in range(0, input_ids.shape[1], self.segment_size):
            logits.append(self.segment_logits(input_ids[:, start : start + self.segment_size]))
        return torch.cat(logits, dim=1)

    def segment_logits(self, segment: torch.Tensor) -> torch.Tensor:
        """One segment through every layer, memory tokens appended (read and written)."""
        x = self.embed(segment.to(self.embed.weight.device))
        mem = self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x, mem], dim=1)  # [B, T+m, d]
        for layer in self.layers:
            x = layer(x)[0]
        return self.head(self.norm(x[:, : -self.num_mem_tokens]))

    def memory_state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.W_mem, layer.z) for layer in self.layers]


class TruncatedReferenceARMT(ReferenceStyleARMT):
    """Truncated BPTT written as the RMT reference writes it: after every segment, the wrapper
    passes each layer's memory through ``manage_gradients(memory_state, seg_num)``, which
    detaches it unless ``seg_num == 0``, ``k2`` is -1 or None, or ``seg_num + k2 > max_n_segments``
    (``max_n_segments`` None: this forward's number of segments)."""

    def __init__(self, *, k2: int | None = 2, max_n_segments: int | None = None, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.rmt_config = {"k2": k2, "max_n_segments": max_n_segments}

    def manage_gradients(self, memory_state: torch.Tensor, seg_num: int, n_segments: int) -> torch.Tensor:
        k2, max_n_segments = self.rmt_config.get("k2"), self.rmt_config.get("max_n_segments") or n_segments
        if seg_num == 0 or k2 in {-1, None} or seg_num + k2 > max_n_segments:
            return memory_state
        memory_state = memory_state.detach()
        return memory_state

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer.zero_mem()
        n_segments = -(-input_ids.shape[1] // self.segment_size)
        logits = []
        for seg_num, start in enumerate(range(0, input_ids.shape[1], self.segment_size)):
            logits.append(self.segment_logits(input_ids[:, start : start + self.segment_size]))
            for layer in self.layers:
                layer.W_mem = self.manage_gradients(layer.W_mem, seg_num, n_segments)
                layer.z = self.manage_gradients(layer.z, seg_num, n_segments)
        return torch.cat(logits, dim=1)
