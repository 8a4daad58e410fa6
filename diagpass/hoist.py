"""Loop-invariant code motion for the rerolled program's segment chunks.

A chunk (the nodes outside the layers at one phase of a segment, ``diagpass.program.chunks``)
runs once per segment. Part of it often computes the same values for every segment: Hugging
Face's rotary tables (``arange`` -> ``inv_freq`` product -> ``cos``/``sin``) depend only on the
segment length ``n`` and on buffers, never on the segment index ``s`` or on the segment's
data. :func:`split_invariant` moves that part into a second module, run once per
``(chunk, n)`` in each run of the program; the rest reads its results as extra inputs.

Invariant: a node that reads only ``n``, constants, the program's global inputs (parameters,
buffers, the call's arguments) and other invariant nodes, and that is neither random nor
in place. The values are the same function of the same inputs, so results are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx

from diagpass.lower import _example
from diagpass.passes.template import writes_in_place

__all__ = ["HoistedChunk", "split_invariant"]

_RANDOM = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform", "poisson", "exponential", "seed")


@dataclass(kw_only=True)
class HoistedChunk:
    """A chunk split into its invariant part and the rest."""

    invariant: torch.fx.GraphModule
    """``invariant(n, *global_inputs) -> tuple`` of the hoisted values."""
    invariant_inputs: list[int]
    """Indices (into the chunk's inputs after ``s`` and ``n``) that ``invariant`` reads."""
    variant: torch.fx.GraphModule
    """``variant(s, n, *inputs, *hoisted)``: the chunk, reading the hoisted values."""
    hoisted: int
    """How many values cross from ``invariant`` to ``variant``."""
    moved: int
    """How many nodes moved out of the per-segment chunk."""


def _is_random(node: torch.fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return any(word in str(name).lower() for word in _RANDOM)


def split_invariant(
    module: torch.fx.GraphModule, *, global_inputs: Iterable[int], owner: torch.nn.Module | None = None
) -> HoistedChunk | None:
    """Split ``module(s, n, *inputs)`` into its per-``(n)`` invariant part and the rest.

    ``global_inputs``: indices of the ``inputs`` that are the same tensors for every segment.
    ``None`` when nothing worth moving (no ``call_*`` node) is invariant.
    """
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]  # s, n, *inputs
    n_node, inputs = placeholders[1], placeholders[2:]
    global_set = set(global_inputs)
    invariant: set[torch.fx.Node] = {n_node} | {p for i, p in enumerate(inputs) if i in global_set}
    for node in module.graph.nodes:
        if node.op == "get_attr":  # a constant of the captured graph
            invariant.add(node)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        if writes_in_place(node) or _is_random(node):
            continue
        if all(arg in invariant for arg in node.all_input_nodes):
            invariant.add(node)
    computed = [n for n in module.graph.nodes if n in invariant and n.op != "placeholder"]
    if not any(_example(n) is not None for n in computed if n.op != "get_attr"):
        return None  # only int arithmetic (or constants): nothing a kernel would run
    output = next(n for n in module.graph.nodes if n.op == "output")
    # The hoisted values: invariant nodes read by a per-segment node or returned.
    crossing = [n for n in computed if any(user not in invariant or user is output for user in n.users)]
    if not crossing:
        return None

    inv_graph = torch.fx.Graph()
    inv_env: dict[torch.fx.Node, torch.fx.Node] = {n_node: inv_graph.placeholder("n")}
    moved = set(computed)
    invariant_inputs = [i for i, p in enumerate(inputs) if p in invariant and any(u in moved for u in p.users)]
    for i in invariant_inputs:
        inv_env[inputs[i]] = inv_graph.placeholder(inputs[i].name)
    for node in computed:
        inv_env[node] = inv_graph.node_copy(node, lambda a: inv_env[a])
    inv_graph.output(tuple(inv_env[n] for n in crossing))

    var_graph = torch.fx.Graph()
    var_env: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in placeholders:
        var_env[p] = var_graph.node_copy(p)
    for i, node in enumerate(crossing):
        var_env[node] = var_graph.placeholder(f"hoisted{i}_{node.name}")
        var_env[node].meta = dict(node.meta)
    for node in module.graph.nodes:
        if node.op == "placeholder" or node in invariant:
            continue
        var_env[node] = var_graph.node_copy(node, lambda a: var_env[a])
    var_graph.eliminate_dead_code()
    root = owner if owner is not None else module
    return HoistedChunk(
        invariant=torch.fx.GraphModule(root, inv_graph, class_name="SegmentChunkInvariant"),
        invariant_inputs=invariant_inputs,
        variant=torch.fx.GraphModule(root, var_graph, class_name="SegmentChunk"),
        hoisted=len(crossing),
        moved=len(computed),
    )
