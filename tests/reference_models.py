"""Independent, plainly written reference implementations of the zoo's models, for the tests.

Explicit Python loops over segments, layers, batch rows, positions and memory tokens; the memory updates
are per-token rank-1 updates. The base Hugging Face model is used only through black boxes: its
embeddings, its original decoder layers (called one by one, with an explicit boolean causal mask), its
rotary / position embeddings, its final norm and its LM head. Nothing here imports diagpass's code paths:
the zoo models are read only for their weights.

Run these in float64 to get a ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

EPS = 1e-5


# ---------------------------------------------------------------------------------------------------
# Black boxes of the base model
# ---------------------------------------------------------------------------------------------------


@dataclass
class BasePieces:
    """The parts of an HF causal LM the references call directly."""

    family: str  # "llama" (Llama, Qwen2: rotary) or "gpt2" (learned absolute positions)
    embed: nn.Module  # token embeddings
    layers: list[nn.Module]  # the ORIGINAL decoder layers, in order
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None = None  # Llama / Qwen2
    wpe: nn.Module | None = None  # GPT-2


def _unwrap(layer: nn.Module) -> nn.Module:
    """The original decoder layer inside a zoo wrapper (the wrapper keeps it as ``.layer``)."""
    return layer.layer if hasattr(layer, "layer") and isinstance(layer.layer, nn.Module) else layer


def base_pieces(causal_lm: nn.Module) -> BasePieces:
    """Split a Llama / Qwen2 / GPT-2 causal LM (possibly with wrapped layers) into black boxes."""
    if hasattr(causal_lm, "transformer"):  # GPT-2
        tr = causal_lm.transformer
        return BasePieces(
            family="gpt2",
            embed=tr.wte,
            layers=[_unwrap(layer) for layer in tr.h],
            final_norm=tr.ln_f,
            lm_head=causal_lm.lm_head,
            wpe=tr.wpe,
        )
    inner = causal_lm.model  # Llama, Qwen2
    return BasePieces(
        family="llama",
        embed=inner.embed_tokens,
        layers=[_unwrap(layer) for layer in inner.layers],
        final_norm=inner.norm,
        lm_head=causal_lm.lm_head,
        rotary=inner.rotary_emb,
    )


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class SegmentRunner:
    """Runs one segment row (text + memory) through the base model's pieces, one layer at a time."""

    def __init__(self, pieces: BasePieces, x: torch.Tensor) -> None:
        batch, n, _ = x.shape
        self.pieces = pieces
        self.position_ids = torch.arange(n, device=x.device).unsqueeze(0)  # [1, n]
        # Explicit causal mask: True = may attend. [1, 1, n, n]
        self.mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().view(1, 1, n, n)
        self.position_embeddings = None
        if pieces.family == "llama":
            self.position_embeddings = pieces.rotary(x, self.position_ids)

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the base model adds to ``inputs_embeds`` before layer 0 (GPT-2's absolute positions)."""
        if self.pieces.family == "gpt2":
            return x + self.pieces.wpe(self.position_ids)
        return x

    def layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index`` on ``x`` [B, n, d]."""
        layer = self.pieces.layers[index]
        if self.pieces.family == "gpt2":
            return _hidden(layer(x, attention_mask=self.mask))
        return _hidden(
            layer(
                x,
                attention_mask=self.mask,
                position_ids=self.position_ids,
                position_embeddings=self.position_embeddings,
            )
        )


def _segments(n_tokens: int, segment_size: int) -> list[tuple[int, int]]:
    bounds = []
    start = 0
    while start < n_tokens:
        bounds.append((start, min(start + segment_size, n_tokens)))
        start += segment_size
    return bounds


# ---------------------------------------------------------------------------------------------------
# ARMT
# ---------------------------------------------------------------------------------------------------


def ref_dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """DPFP of one vector x [n]: features[(j-1)*2n + i] = u[i] * u[(i - j) mod 2n], j = 1..nu."""
    u = torch.cat([x.clamp(min=0), (-x).clamp(min=0)])  # [2n]
    size = u.shape[0]
    idx = torch.arange(size, device=x.device)
    parts = []
    for j in range(1, nu + 1):
        parts.append(u * u[(idx - j) % size])
    return torch.cat(parts)  # [2n*nu]


@torch.no_grad()
def reference_armt_logits(armt: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """ARMT logits [B, N, V] computed by explicit loops, in the dtype of ``armt``'s weights."""
    pieces = base_pieces(armt.model)
    wrappers = list(armt.layers)
    T, m, nu = armt.segment_size, armt.num_mem_tokens, armt.nu
    memory = armt.memory  # [m, d]
    B, N = input_ids.shape
    d = memory.shape[1]
    d_key = 2 * nu * armt.d_mem
    dt, dev = memory.dtype, memory.device
    L = len(wrappers)

    W_mem = [torch.zeros(B, d_key, d, dtype=dt, device=dev) for _ in range(L)]
    z = [torch.zeros(B, d_key, dtype=dt, device=dev) for _ in range(L)]
    logits = []
    for s, (a, b) in enumerate(_segments(N, T)):
        x = torch.cat([pieces.embed(input_ids[:, a:b]), memory.unsqueeze(0).repeat(B, 1, 1)], dim=1)
        runner = SegmentRunner(pieces, x)
        x = runner.embed_input(x)
        n = x.shape[1]
        for l in range(L):
            w = wrappers[l]
            Wq, Wk, Wv = w.W_mq.weight, w.W_mk.weight, w.W_mv.weight
            wb, bb = w.W_mb.weight[0], w.W_mb.bias[0]
            # read
            if s > 0:
                x_read = x.clone()
                for bi in range(B):
                    for t in range(n):
                        q = ref_dpfp(Wq @ x[bi, t], nu)
                        x_read[bi, t] = x[bi, t] + (q @ W_mem[l][bi]) / (torch.dot(q, z[l][bi]) + EPS)
                x = x_read
            # layer
            y = runner.layer(l, x)
            # write, one memory token at a time, against the state from before this segment
            for bi in range(B):
                W_old, z_old = W_mem[l][bi].clone(), z[l][bi].clone()
                W_new, z_new = W_old.clone(), z_old.clone()
                for j in range(m):
                    row = y[bi, n - m + j]
                    k = ref_dpfp(Wk @ row, nu)
                    v = Wv @ row
                    beta = torch.sigmoid(torch.dot(wb, row) + bb)
                    if s == 0:
                        v_old = torch.zeros_like(v)
                        gamma = torch.ones((), dtype=dt, device=dev)
                    else:
                        kz = torch.dot(k, z_old) + EPS
                        v_old = (k @ W_old) / kz
                        gamma = (1 - kz / (torch.dot(k, k) + EPS)).clamp(0, 1)
                    W_new = W_new + beta * torch.outer(k, v - v_old)
                    z_new = z_new + gamma * k
                W_mem[l][bi], z[l][bi] = W_new, z_new
            x = y
        logits.append(pieces.lm_head(pieces.final_norm(x))[:, : b - a])
    return torch.cat(logits, dim=1)


# ---------------------------------------------------------------------------------------------------
# Vanilla RMT and per-layer-memory RMT
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_rmt_logits(rmt: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Vanilla RMT: rows [mem (read), text, mem (write)] (or [text, mem] without read memory); segment
    s>0 takes as mem the final (normed) hidden states at segment s-1's write rows."""
    pieces = base_pieces(rmt.model)
    T, m, read = rmt.segment_size, rmt.num_mem_tokens, rmt.read_memory
    B, N = input_ids.shape
    mem = rmt.memory.unsqueeze(0).repeat(B, 1, 1)  # [B, m, d]
    logits = []
    for a, b in _segments(N, T):
        text = pieces.embed(input_ids[:, a:b])
        x = torch.cat([mem, text, mem], dim=1) if read else torch.cat([text, mem], dim=1)
        runner = SegmentRunner(pieces, x)
        x = runner.embed_input(x)
        for l in range(len(pieces.layers)):
            x = runner.layer(l, x)
        final = pieces.final_norm(x)
        mem = final[:, final.shape[1] - m :]
        lead = m if read else 0
        logits.append(pieces.lm_head(final)[:, lead : lead + b - a])
    return torch.cat(logits, dim=1)


@torch.no_grad()
def reference_per_layer_memory_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-layer memory: layer l's write-row output at s-1 replaces layer l's read-row input at s.

    Rows are [mem (read), text, mem (write)]; without read memory [text, mem] and the write rows are
    replaced instead.
    """
    pieces = base_pieces(model.model)
    T, m, read = model.segment_size, model.num_mem_tokens, model.read_memory
    B, N = input_ids.shape
    L = len(pieces.layers)
    carried: list[torch.Tensor | None] = [None] * L
    logits = []
    for a, b in _segments(N, T):
        mem = model.memory.unsqueeze(0).repeat(B, 1, 1)
        text = pieces.embed(input_ids[:, a:b])
        x = torch.cat([mem, text, mem], dim=1) if read else torch.cat([text, mem], dim=1)
        runner = SegmentRunner(pieces, x)
        x = runner.embed_input(x)
        n = x.shape[1]
        read_rows = range(m) if read else range(n - m, n)
        for l in range(L):
            if carried[l] is not None:
                x = x.clone()
                for j, row in enumerate(read_rows):
                    x[:, row] = carried[l][:, j]
            x = runner.layer(l, x)
            carried[l] = x[:, n - m :].clone()
        lead = m if read else 0
        logits.append(pieces.lm_head(pieces.final_norm(x))[:, lead : lead + b - a])
    return torch.cat(logits, dim=1)


# ---------------------------------------------------------------------------------------------------
# Linear (Infini-attention-style) memory
# ---------------------------------------------------------------------------------------------------


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x + 1, torch.exp(x))  # elu(x) + 1


@torch.no_grad()
def reference_linear_memory_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Linear memory: per-position reads, per-row rank-1 writes ``S += outer(sigma(k), v)``."""
    pieces = base_pieces(model.model)
    wrappers = list(model.layers)
    T, m = model.segment_size, model.num_mem_tokens
    B, N = input_ids.shape
    L = len(wrappers)
    d = pieces.embed.weight.shape[1]
    dt, dev = pieces.embed.weight.dtype, pieces.embed.weight.device
    d_key = model.d_key
    S = [torch.zeros(B, d_key, d, dtype=dt, device=dev) for _ in range(L)]
    z = [torch.zeros(B, d_key, dtype=dt, device=dev) for _ in range(L)]
    logits = []
    for s, (a, b) in enumerate(_segments(N, T)):
        x = pieces.embed(input_ids[:, a:b])
        if m > 0:
            x = torch.cat([x, model.memory.unsqueeze(0).repeat(B, 1, 1)], dim=1)
        runner = SegmentRunner(pieces, x)
        x = runner.embed_input(x)
        n = x.shape[1]
        for l in range(L):
            w = wrappers[l]
            if s > 0:
                x_read = x.clone()
                for bi in range(B):
                    for t in range(n):
                        q = _elu1(w.W_q.weight @ x[bi, t])
                        x_read[bi, t] = x[bi, t] + (q @ S[l][bi]) / (torch.dot(q, z[l][bi]) + EPS)
                x = x_read
            y = runner.layer(l, x)
            for bi in range(B):
                for t in range(n):
                    k = _elu1(w.W_k.weight @ y[bi, t])
                    S[l][bi] = S[l][bi] + torch.outer(k, w.W_v.weight @ y[bi, t])
                    z[l][bi] = z[l][bi] + k
            x = y
        logits.append(pieces.lm_head(pieces.final_norm(x))[:, : b - a])
    return torch.cat(logits, dim=1)
