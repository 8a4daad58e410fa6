"""Label every node of a captured forward with its cell (layer, segment).

A *cell* is one call of one layer module: cell ``(l, s)`` is the ``s``-th call of the
``l``-th module of the model's layer list. Both come from the graph's own metadata,
never from class or attribute names:

* the layer is the integer index at the end of the outermost indexed module path in
  ``node.meta["nn_module_stack"]`` (``...layers.3``, ``...h[3]``, ``...blocks.3``);
* the segment is the call counter that Dynamo appends to that module's stack key
  (``"<id>@2"`` is the third time the module was entered in this trace).

Nodes outside every layer call are labelled by where they sit in the data flow:
``prologue`` of the first segment they feed, ``epilogue`` of the last segment they
read, or ``global`` (depends on no cell and feeds none, e.g. the input slicing that
only the output uses). Placeholders are ``input``.

This pass is pure: it reads a ``torch.fx.Graph`` and returns plain data.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch.fx

__all__ = ["Cell", "Region", "CellLabels", "label_cells"]

Cell = tuple[int, int]
"""``(layer, segment)``."""

Region = tuple[str, int]
"""``("prologue" | "epilogue", segment)``, ``("global", -1)`` or ``("input", -1)``."""

# `prefix.3`, `prefix[3]` or `prefix['3']` at the end of a module path.
_INDEXED_PATH = re.compile(r"^(?P<prefix>.+?)(?:\.(?P<a>\d+)|\[['\"]?(?P<b>\d+)['\"]?\])$")


@dataclass(kw_only=True)
class CellLabels:
    """Where every node of the graph belongs."""

    container: str | None
    """Module path of the layer list whose calls are the cells (``None``: none found)."""
    num_layers: int
    """Number of distinct layer indices seen (``L``)."""
    num_segments: int
    """Number of calls of each layer (``S``); 0 when no layer list was found."""
    cell_of: dict[torch.fx.Node, Cell] = field(default_factory=dict)
    """Cell of every node that runs inside a layer call."""
    cells: dict[Cell, list[torch.fx.Node]] = field(default_factory=dict)
    """Nodes of each cell, in graph order."""
    region_of: dict[torch.fx.Node, Region] = field(default_factory=dict)
    """Region of every node outside the cells."""
    problems: list[str] = field(default_factory=list)
    """Why the grid is irregular (layers called a different number of times, ...)."""


def _outermost_indexed(node: torch.fx.Node) -> tuple[str, int, int] | None:
    """``(container, layer, call)`` of the outermost indexed module ``node`` runs in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for key, value in stack.items():  # outermost first
        path = value[0] if isinstance(value, tuple) else str(value)
        match = _INDEXED_PATH.match(path)
        if match is None:
            continue
        index = int(match.group("a") or match.group("b"))
        call = int(key.rsplit("@", 1)[1]) if "@" in str(key) else 0
        return match.group("prefix"), index, call
    return None


def label_cells(graph: torch.fx.Graph) -> CellLabels:
    """Label the nodes of ``graph`` with cells and regions (linear in graph size)."""
    nodes = list(graph.nodes)
    found: dict[torch.fx.Node, tuple[str, int, int]] = {}
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        where = _outermost_indexed(node)
        if where is not None:
            found[node] = where
    if not found:
        labels = CellLabels(container=None, num_layers=0, num_segments=0)
        _label_regions(nodes, labels)
        return labels

    # The layer list is the indexed container that holds the most nodes.
    container = Counter(prefix for prefix, _, _ in found.values()).most_common(1)[0][0]
    calls: dict[int, set[int]] = defaultdict(set)
    for prefix, layer, call in found.values():
        if prefix == container:
            calls[layer].add(call)
    layer_ids = sorted(calls)
    layer_index = {layer: i for i, layer in enumerate(layer_ids)}
    # Call counters per layer, renumbered 0..n-1 in call order.
    segment_index = {layer: {c: s for s, c in enumerate(sorted(cs))} for layer, cs in calls.items()}
    counts = {layer: len(cs) for layer, cs in calls.items()}
    num_segments = max(counts.values())
    problems: list[str] = []
    if layer_ids != list(range(layer_ids[0], layer_ids[0] + len(layer_ids))):
        problems.append(f"layer indices of {container} are not contiguous: {layer_ids}")
    uneven = {layer: n for layer, n in counts.items() if n != num_segments}
    if uneven:
        problems.append(
            f"layers of {container} ran a different number of times: "
            + ", ".join(f"layer {layer}: {n}" for layer, n in sorted(uneven.items()))
            + f" (most ran {num_segments})"
        )

    labels = CellLabels(container=container, num_layers=len(layer_ids), num_segments=num_segments, problems=problems)
    for node in nodes:
        where = found.get(node)
        if where is None or where[0] != container:
            continue
        _, layer, call = where
        cell = (layer_index[layer], segment_index[layer][call])
        labels.cell_of[node] = cell
        labels.cells.setdefault(cell, []).append(node)
    _label_regions(nodes, labels)
    return labels


def _label_regions(nodes: list[torch.fx.Node], labels: CellLabels) -> None:
    """Prologue/epilogue/global labels for non-cell nodes, by two linear sweeps."""
    cell_of = labels.cell_of
    last_read: dict[torch.fx.Node, int] = {}  # latest segment among the cells a node reads
    for node in nodes:
        if node in cell_of:
            last_read[node] = cell_of[node][1]
            continue
        segs = [last_read[i] for i in node.all_input_nodes if i in last_read]
        if segs:
            last_read[node] = max(segs)
    first_fed: dict[torch.fx.Node, int] = {}  # earliest segment among the cells a node feeds
    for node in reversed(nodes):
        if node in cell_of:
            first_fed[node] = cell_of[node][1]
            continue
        segs = [first_fed[u] for u in node.users if u in first_fed]
        if segs:
            first_fed[node] = min(segs)
    for node in nodes:
        if node in cell_of:
            continue
        if node.op == "placeholder":
            labels.region_of[node] = ("input", -1)
        elif node.op == "output":
            labels.region_of[node] = ("output", -1)
        elif node in first_fed:
            labels.region_of[node] = ("prologue", first_fed[node])
        elif node in last_read:
            labels.region_of[node] = ("epilogue", last_read[node])
        else:
            labels.region_of[node] = ("global", -1)
