"""A tiny, configurable segment-recurrent model family for the analyzer's property tests.

:class:`SyntheticRMT` has ``num_layers`` layers in an ``nn.ModuleList`` (module paths end in
``.<l>``); every layer is called once per segment. Within a segment the hidden state flows
layer ``l-1 -> l``. Each cross-segment edge ``(a, b, k)`` (``k >= 1``) adds "layer ``a``'s output
at segment ``s-k`` feeds layer ``b`` at segment ``s``": the wrapper keeps every layer's outputs in
Python lists and passes their sum to layer ``b`` as its ``memory`` input (zeros when no edge
reaches that cell), which layer ``b`` projects and adds to its input.

So every cell runs the same ops (one template) unless ``acts`` gives a layer another
activation, and the cell DAG is exactly

* ``(l-1, s) -> (l, s)`` for ``l >= 1``, and
* ``(a, s-k) -> (b, s)`` for every edge and every ``s >= k``.

The wavefront theorem predicts a violation for edge ``(a, b, k)`` exactly when
``a + (s-k) >= b + s``, i.e. ``a - k >= b``. :func:`predict` computes the verdict and the
critical path of that DAG independently of diagpass (a plain DP), for the tests to compare.

The module also holds the example factories the CLI tests load with
``tests/synthetic.py:<factory>`` specs. It imports nothing from diagpass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SyntheticLayer",
    "SyntheticRMT",
    "Prediction",
    "predict",
    "example_input",
    "diagonal_factory",
    "rmt_factory",
    "rmt_kwargs_factory",
    "mlp_factory",
    "bad_factory",
    "bad_tuple_factory",
    "raising_factory",
    "not_callable",
]

Edge = tuple[int, int, int]
"""``(a, b, k)``: layer ``a`` at segment ``s-k`` feeds layer ``b`` at segment ``s``."""

_ACTS = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


class SyntheticLayer(nn.Module):
    """``h <- act(W h + M memory)``; ``memory`` is the sum of the cross-segment inputs."""

    def __init__(self, width: int, act: str = "relu") -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.mix = nn.Linear(width, width, bias=False)
        self.act = act

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return _ACTS[self.act](self.lin(h) + self.mix(memory))  # [B, T, width]


class SyntheticRMT(nn.Module):
    """``num_layers`` layers run over segments of ``segment_len`` rows, plus cross-segment ``edges``.

    ``forward(x)`` takes ``x`` of shape ``[B, N, width]`` and returns ``[B, N, width]`` (the last
    layer's output of every segment, concatenated). The number of segments is
    ``ceil(N / segment_len)``; the last one may be shorter.
    """

    def __init__(
        self,
        num_layers: int,
        segment_len: int,
        width: int = 8,
        edges: Iterable[Edge] = (),
        acts: dict[int, str] | None = None,
        graph_break: bool = False,
    ) -> None:
        super().__init__()
        edges = sorted(set((int(a), int(b), int(k)) for a, b, k in edges))
        for a, b, k in edges:
            if not (0 <= a < num_layers and 0 <= b < num_layers and k >= 1):
                raise ValueError(f"bad edge {(a, b, k)} for {num_layers} layers (need k >= 1)")
        acts = acts or {}
        self.embed = nn.Linear(width, width)  # per segment, outside the cells (like a token embedding)
        self.layers = nn.ModuleList(SyntheticLayer(width, acts.get(i, "relu")) for i in range(num_layers))
        self.segment_len = segment_len
        self.width = width
        self.edges = edges
        self.graph_break = graph_break
        # Edges into each layer: (a, k).
        self.into: dict[int, list[tuple[int, int]]] = {b: [] for b in range(num_layers)}
        for a, b, k in edges:
            self.into[b].append((a, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        history: list[list[torch.Tensor]] = [[] for _ in self.layers]  # history[l][s]: output of (l, s)
        outputs = []
        for s, start in enumerate(range(0, x.shape[1], self.segment_len)):
            h = self.embed(x[:, start : start + self.segment_len])  # [B, T, width]
            for b, layer in enumerate(self.layers):
                memory = torch.zeros_like(h)
                for a, k in self.into[b]:
                    if s - k >= 0:
                        memory = memory + history[a][s - k][:, : h.shape[1]]  # the edge (a, s-k) -> (b, s)
                h = layer(h, memory)
                history[b].append(h)
            if self.graph_break:
                torch._dynamo.graph_break()
            outputs.append(h)
        return torch.cat(outputs, dim=1)


def example_input(num_segments: int, segment_len: int, width: int = 8, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """``[batch, num_segments * segment_len, width]`` random input."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_segments * segment_len, width, generator=g)


@dataclass(frozen=True)
class Prediction:
    """What the wavefront theorem says about a :class:`SyntheticRMT` run (DESIGN.md §2)."""

    violations: frozenset[tuple[tuple[int, int], tuple[int, int]]]
    """Violating ``(src, dst)`` cell pairs."""
    critical_path: int
    """Cells on the longest path of the cell DAG."""
    ok: bool
    """No violation, and more than one segment (a single segment has no recurrence to prove)."""


def predict(num_layers: int, num_segments: int, edges: Iterable[Edge]) -> Prediction:
    """The theorem's verdict and the DAG's critical path, by a plain DP over cells in (s, l) order."""
    edges = set(edges)
    violations = set()
    longest: dict[tuple[int, int], int] = {}
    for s in range(num_segments):
        for b in range(num_layers):
            preds = [(b - 1, s)] if b >= 1 else []
            for a, bb, k in edges:
                if bb == b and s - k >= 0:
                    preds.append((a, s - k))
                    if a + (s - k) >= b + s:
                        violations.add(((a, s - k), (b, s)))
            # (s, l) order is topological: cross edges always come from an earlier segment.
            longest[(b, s)] = 1 + max((longest[p] for p in preds), default=0)
    critical = max(longest.values(), default=0)
    return Prediction(frozenset(violations), critical, ok=not violations and num_segments >= 2)


# -- example factories for the CLI (``diagpass check tests/synthetic.py:<name>``) --------------------


def diagonal_factory() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """3 layers x 4 segments with per-layer memory (l, l, 1) and an XL-style edge (l-1, l, 1): proven."""
    torch.manual_seed(0)
    edges = [(l, l, 1) for l in range(3)] + [(0, 1, 1), (1, 2, 1)]
    return SyntheticRMT(3, 4, edges=edges), (example_input(4, 4),)


def rmt_factory() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Vanilla-RMT-like: the last layer at s-1 feeds layer 0 at s: refuted."""
    torch.manual_seed(0)
    return SyntheticRMT(3, 4, edges=[(2, 0, 1)]), (example_input(4, 4),)


def rmt_kwargs_factory() -> tuple[nn.Module, tuple, dict]:
    """Like :func:`rmt_factory`, with the input passed as a keyword argument."""
    model, (x,) = rmt_factory()
    return model, (), {"x": x}


def mlp_factory() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """No layer list, no segments: not provable."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), (torch.randn(2, 8),)


def bad_factory() -> str:
    """Returns the wrong thing."""
    return "not a model"


def bad_tuple_factory() -> tuple[nn.Module, torch.Tensor]:
    """Returns ``(model, tensor)``: args must be a tuple or list."""
    return nn.Linear(8, 8), torch.randn(2, 8)


def raising_factory() -> None:
    """Fails while building the model."""
    raise RuntimeError("factory failed on purpose")


not_callable = 42
