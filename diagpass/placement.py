"""Where the nodes outside the cells run: as late as they may.

The program interleaves the eager nodes outside the cells (a segment's embedding, its
attention mask and rotary tables, the final norm) with the batched steps. Placed as early
as their inputs allow, every segment's prologue depends on the inputs alone and runs before
the first step: at 128 segments that is thousands of small eager ops (CPU time, the GPU
mostly idle) ahead of the first GEMM, and every segment's mask and embedding alive at once.

Placed as late as their readers allow, the prologue of segment s runs just before step s,
which reads it: its CPU work overlaps the GPU work of the steps already queued, and its
values live for a few steps only. Nodes that feed no cell (the epilogue: final norm, LM
head, the output ``cat``) keep their early place, so their inputs are freed early.

A node only ever moves later, and never past a reader, so every value is still computed
before it is read. Graphs with in-place ops outside the cells keep the early placement:
moving a read past a write would change what it reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx

from diagpass.passes.template import writes_in_place

__all__ = ["LATE", "DROP_UNUSED", "place_late", "has_mutation", "unused_slots", "erase_unread"]

LATE = True
"""Place the nodes that feed a cell as late as possible (off: as early as possible)."""

DROP_UNUSED = True
"""Pass nothing for cell inputs the template does not read, and drop what computed them."""

def has_mutation(nodes: Sequence[torch.fx.Node], cell_of: Mapping[torch.fx.Node, Any]) -> bool:
    """Whether a node outside the cells may write a tensor in place."""
    return any(node not in cell_of and writes_in_place(node) for node in nodes)


def place_late(
    nodes: Sequence[torch.fx.Node], cell_of: Mapping[torch.fx.Node, Any], time_of: dict[torch.fx.Node, int]
) -> int:
    """Move each node outside the cells that feeds a cell to the latest time before its
    first reader (in place in ``time_of``, whose cell nodes hold ``2 * step + 1``).

    Returns how many nodes moved. Ties keep graph order (the caller's stable sort), so a
    node placed at its reader's time still runs before it.
    """
    if has_mutation(nodes, cell_of):
        return 0
    feeders: set[torch.fx.Node] = set()
    moved = 0
    for node in reversed(nodes):  # readers first: their times are final when a node is reached
        if node.op in ("placeholder", "output") or node in cell_of:
            continue
        latest: int | None = None
        for user in node.users:
            if user.op == "output":
                continue
            if user in cell_of:
                feeders.add(node)
                t = time_of[user] - 1
            else:
                if user in feeders:
                    feeders.add(node)
                t = time_of[user]
            latest = t if latest is None else min(latest, t)
        if node in feeders and latest is not None and latest > time_of[node]:
            time_of[node] = latest
            moved += 1
    return moved


def unused_slots(template: torch.fx.GraphModule, slot_kinds: Sequence[str]) -> list[str]:
    """``slot_kinds`` with ``"unused"`` for the cell inputs the template no longer reads.

    A mask proven causal (``lower.use_causal_attention``) leaves its slot unread: the
    step then takes ``None`` there, nothing is gathered for it, and the nodes that only
    computed it are dropped from the program (:func:`erase_unread`). Weights keep their
    kind: their stacks are built once.
    """
    placeholders = [n for n in template.graph.nodes if n.op == "placeholder"]
    return [
        "unused" if kind in ("per_cell", "shared") and not placeholder.users else kind
        for placeholder, kind in zip(placeholders, slot_kinds)
    ]


def erase_unread(graph: torch.fx.Graph, roots: Sequence[torch.fx.Node]) -> int:
    """Erase ``roots`` and their inputs, transitively, where nothing reads them any more
    and they write nothing. Returns how many nodes were erased."""
    pending = list(dict.fromkeys(roots))
    erased: set[torch.fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in erased or node.graph is not graph or node.users:
            continue
        if node.op not in ("call_function", "call_method") or writes_in_place(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)
    return len(erased)
