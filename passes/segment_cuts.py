"""Write the ways a forward cuts its input into segments as one: ``split``.

``torch.chunk(x, c, dim)`` is ``x.split(ceil(n / c), dim)`` (that is how torch defines it), and
``x.view(B, S, T).unbind(1)`` hands out ``x[:, s*T:(s+1)*T]``, which is chunk ``s`` of
``x.split(T, 1)``. Rewriting both as ``split`` with the chunk size they have in this graph lets
the unit cut and :func:`~diagpass.passes.reroll.find_length_axes` treat every cut the same way.
Whether the size is the same for other lengths is then for the probes to show: ``chunk`` into
``ceil(n / T)`` parts gives parts of ``T`` only when ``T`` divides ``n``, and a view into ``(S, T)``
exists only then.

Pure: edits the graph it is given; counter ``segment_cuts_rewritten``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
from torch._dynamo.utils import counters

from .template import _arg, node_value

__all__ = ["rewrite_segment_cuts"]

_CHUNKS = {torch.chunk, torch.Tensor.chunk, "chunk"}
_UNBINDS = {torch.unbind, torch.Tensor.unbind, "unbind"}
_VIEWS = {torch.reshape, torch.Tensor.view, torch.Tensor.reshape, "view", "reshape"}


def _split_node(graph: torch.fx.Graph, node: torch.fx.Node, source: torch.fx.Node, size: int, dim: int) -> None:
    """Replace ``node`` (a tuple of chunks) by ``source.split(size, dim)``."""
    with graph.inserting_before(node):
        split = graph.call_method("split", (source, size, dim))
    split.meta.update(node.meta)
    node.replace_all_uses_with(split)
    graph.erase_node(node)
    counters["diagpass"]["segment_cuts_rewritten"] += 1


def _unbound_view(node: torch.fx.Node) -> tuple[torch.fx.Node, int, int] | None:
    """``(x, T, dim)`` when ``node`` is ``unbind(view(x, shape), dim)`` with ``shape`` cutting dim
    ``dim`` of ``x`` into ``(S, T)`` and keeping every other dim."""
    view = node.args[0] if node.args else None
    if not isinstance(view, torch.fx.Node) or view.target not in _VIEWS or len(view.users) != 1:
        return None
    source = view.args[0] if view.args else None
    before, after = node_value(source) if isinstance(source, torch.fx.Node) else None, node_value(view)
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return None
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(dim, int):
        return None
    dim = dim % after.dim()
    if after.dim() != before.dim() + 1 or dim >= before.dim():
        return None
    old, new = tuple(before.shape), tuple(after.shape)
    if new[:dim] != old[:dim] or new[dim + 2 :] != old[dim + 1 :] or new[dim] * new[dim + 1] != old[dim]:
        return None
    return source, int(new[dim + 1]), dim  # type: ignore[return-value]


def rewrite_segment_cuts(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``chunk`` and ``unbind``-of-a-view cuts as ``split`` (see module doc); how many."""
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or not all(
            user.op == "call_function" and user.target is operator.getitem for user in node.users
        ):
            continue
        if node.target in _CHUNKS and node.args and isinstance(node.args[0], torch.fx.Node):
            value = node_value(node.args[0])
            count, dim = _arg(node, 1, "chunks", None), _arg(node, 2, "dim", 0)
            if isinstance(value, torch.Tensor) and isinstance(count, int) and isinstance(dim, int) and count > 0:
                dim %= value.dim()
                _split_node(graph, node, node.args[0], math.ceil(value.shape[dim] / count), dim)
                rewritten += 1
        elif node.target in _UNBINDS:
            cut = _unbound_view(node)
            if cut is not None:
                view = node.args[0]
                _split_node(graph, node, *cut)
                graph.erase_node(view)  # type: ignore[arg-type]
                rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten
