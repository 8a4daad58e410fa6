"""Check your own recurrent-memory variant with ``diagpass.analyze`` before compiling it.

    python examples/check_variant.py             # analyze both variants
    python examples/check_variant.py --compile   # ... and also run them through the backend

Diagonal batching (run every cell with layer + segment = d at step d) is valid exactly when every
data-flow edge between cells, (l', s') -> (l, s), has l' + s' < l + s. ``diagpass.analyze`` traces
one forward with Dynamo, builds the cell graph and proves or refutes that, naming the edges that
break it (with their source lines). This file defines two small models, written from scratch in
plain PyTorch the way research code is written (state in module attributes, a Python loop over
segments):

* ``XLMemoryLM`` (diagonal-SAFE): a Transformer-XL-style cache. Layer l at segment s also attends
  to its own input at segment s-1, which is the output of layer l-1 at segment s-1. Its edges are
  (l-1, s) -> (l, s) and (l-1, s-1) -> (l, s): both come from earlier diagonals. (With no
  same-layer recurrence its critical path is only L steps; the report says so.)
* ``FeedbackMemoryLM`` (NOT diagonal-safe): vanilla-RMT-style feedback. The memory tokens that the
  LAST layer produces at segment s-1 are the input of layer 0 at segment s. The edge
  (L-1, s-1) -> (0, s) has (L-1) + (s-1) >= s for L >= 2, so every cell waits for the whole
  previous segment: there is no diagonal parallelism, and the ``diagbatch`` backend falls back.

The same checks from the command line (factories return ``(model, args)`` or
``(model, args, kwargs)``)::

    diagpass check examples/check_variant.py:make_safe_variant
    diagpass check examples/check_variant.py:make_unsafe_variant
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

import diagpass

VOCAB, D_MODEL, N_HEADS = 97, 32, 4
SEGMENT, MEM_TOKENS = 8, 2


class Block(nn.Module):
    """A pre-norm transformer block with causal self-attention over ``[context, x]``.

    ``context`` ([B, P, d], optional) holds earlier positions that every row of ``x`` may see.
    """

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def attend(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        B, T, d = x.shape
        h = self.n_heads
        x = self.norm1(x)
        ctx = x if context is None else torch.cat([self.norm1(context), x], dim=1)  # [B, P+T, d]
        P = ctx.shape[1] - T
        q = self.q(x).view(B, T, h, d // h).transpose(1, 2)  # [B, h, T, dh]
        k, v = self.kv(ctx).view(B, P + T, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, P+T, dh]
        mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)  # row i sees keys <= P+i
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, T, dh]
        return self.out(a.transpose(1, 2).reshape(B, T, d))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attend(x, context)
        return x + self.mlp(self.norm2(x))


class XLLayer(Block):
    """Block + Transformer-XL cache: this layer's input at the previous segment, kept as an attribute."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__(d, n_heads)
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, context=self.cache)  # first segment: no cache
        self.cache = x  # = the output of layer l-1 at this segment (Transformer-XL also detaches it)
        return out


class XLMemoryLM(nn.Module):
    """Segment-recurrent LM whose only memory is the per-layer Transformer-XL cache (diagonal-safe)."""

    def __init__(self, n_layers: int = 3, segment: int = SEGMENT) -> None:
        super().__init__()
        self.segment = segment
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.layers = nn.ModuleList(XLLayer(D_MODEL, N_HEADS) for _ in range(n_layers))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer.cache = None
        logits = []
        for start in range(0, input_ids.shape[1], self.segment):
            h = self.embed(input_ids[:, start : start + self.segment])  # [B, T, d]
            for layer in self.layers:
                h = layer(h)
            logits.append(self.head(self.norm(h)))  # [B, T, V]
        return torch.cat(logits, dim=1)  # [B, N, V]


class FeedbackMemoryLM(nn.Module):
    """Vanilla-RMT-style memory: the last layer's memory rows at segment s-1 feed layer 0 at s (NOT safe)."""

    def __init__(self, n_layers: int = 3, segment: int = SEGMENT, mem_tokens: int = MEM_TOKENS) -> None:
        super().__init__()
        self.segment = segment
        self.mem_tokens = mem_tokens
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.memory = nn.Parameter(torch.randn(mem_tokens, D_MODEL) * 0.02)  # [m, d]
        self.layers = nn.ModuleList(Block(D_MODEL, N_HEADS) for _ in range(n_layers))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.mem_tokens
        memory = self.memory.unsqueeze(0).expand(input_ids.shape[0], -1, -1)  # [B, m, d]
        logits = []
        for start in range(0, input_ids.shape[1], self.segment):
            x = self.embed(input_ids[:, start : start + self.segment])  # [B, T, d]
            h = torch.cat([memory, x, memory], dim=1)  # [B, m+T+m, d]: read rows, text, write rows
            for layer in self.layers:
                h = layer(h)
            memory = h[:, -m:]  # the LAST layer's write rows become the next segment's layer-0 input
            logits.append(self.head(self.norm(h[:, m:-m])))  # [B, T, V]
        return torch.cat(logits, dim=1)  # [B, N, V]


def _input_ids(segments: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (batch, segments * SEGMENT), generator=gen)


def make_safe_variant(layers: int = 3, segments: int = 4):
    """Factory for ``diagpass check``: the Transformer-XL-cache model and its input."""
    torch.manual_seed(0)
    return XLMemoryLM(layers).eval(), (_input_ids(segments),)


def make_unsafe_variant(layers: int = 3, segments: int = 4):
    """Factory for ``diagpass check``: the last-layer-feedback model and its input."""
    torch.manual_seed(0)
    return FeedbackMemoryLM(layers).eval(), (_input_ids(segments),)


def compile_and_compare(model: nn.Module, args: tuple) -> None:
    """Run ``model`` through ``torch.compile(backend="diagbatch")`` and compare with eager."""
    with torch.no_grad():
        ref = model(*args)
        compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={"compiler": "eager"})
        out = compiled(*args)
    record = diagpass.last_compile()
    verdict = "diagonal rewrite applied" if record.applied else f"fell back ({record.reason})"
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"-> torch.compile(backend='diagbatch'): {verdict}; max relative error vs eager {err:.1e}")
    if not err < 1e-5:
        raise SystemExit(f"compiled output differs from eager: {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Analyze two user-written RMT variants with diagpass.")
    parser.add_argument("--compile", action="store_true", help="also run each through the diagbatch backend")
    opts = parser.parse_args(argv)
    verdicts = {}
    for name, factory, expect_ok in [
        ("XLMemoryLM (Transformer-XL cache of layer l-1 at s-1)", make_safe_variant, True),
        ("FeedbackMemoryLM (last layer at s-1 feeds layer 0 at s)", make_unsafe_variant, False),
    ]:
        model, args = factory()
        report = diagpass.analyze(model, *args)
        print(f"=== {name}")
        print(report)
        if report.ok:
            print(f"-> diagonal-safe: {report.num_steps} steps instead of {report.num_layers * report.num_segments}")
        else:
            print(f"-> NOT diagonal-safe; torch.compile(backend='diagbatch') would fall back: {report.reason}")
        if opts.compile:
            compile_and_compare(model, args)
        print()
        verdicts[name] = report.ok == expect_ok
    if all(verdicts.values()):
        print("All verdicts as expected.")
        return 0
    print("UNEXPECTED verdicts: " + ", ".join(name for name, ok in verdicts.items() if not ok))
    return 1


if __name__ == "__main__":
    sys.exit(main())
