"""Truncated BPTT: a ``.detach()`` on a cell's recurrent input, stripped for the proof and
recorded per cell.

Truncated backpropagation through time cuts the memory's gradient between some segments and
not others (the RMT reference's ``manage_gradients`` with its ``k2`` window, ARMT's
``detach_mem``). The detach then sits in some segments and not in others, so the cells (or the
segments around them) would not be one template. In the forward a detach is the identity, so:

* :func:`find_recurrent_detaches` (analysis) finds the detaches on an edge from an earlier
  segment into a cell, whether inside the cell or between the layers, that only cells read;
* :func:`strip_detaches` (rewrite) lets those cells read the value itself; it returns what
  :func:`restore_detaches` needs to put the graph back (a fallback runs the graph as captured);
* :func:`detached_slots` says, per cell, which template slots it reads detached: the program
  detaches those inputs before stacking them, so backward stops exactly where eager's does;
* :class:`FixedDetaches` is that table for the one length the backend's graph runs;
  :func:`fit_detach_windows` generalises it over ``diagpass.compile``'s probes into
  :class:`DetachWindows`: per (layer, slot), the segments ``lo <= s <= S - k``, or refuses.

Pure, like every pass: graphs and labels in, plain data out (the rewrite edits the graph it is
given, and says so).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .cells import Cell, CellLabels

__all__ = [
    "STRIPPED_META",
    "RecurrentDetach",
    "StrippedDetaches",
    "DetachRule",
    "FixedDetaches",
    "DetachWindows",
    "find_recurrent_detaches",
    "strip_detaches",
    "restore_detaches",
    "redetach_outputs",
    "detached_slots",
    "fit_detach_windows",
]

STRIPPED_META = "diagpass_stripped_detaches"
"""``GraphModule.meta`` key of the :class:`StrippedDetaches` of a graph whose detaches were stripped."""
_EMPTY: frozenset[int] = frozenset()
_DETACH_FUNCTIONS = (torch.detach, torch.Tensor.detach, torch.ops.aten.detach.default)


def _is_detach(node: torch.fx.Node) -> bool:
    """``x.detach()`` / ``torch.detach(x)`` of one node and nothing else."""
    if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target == "detach"
    return node.op == "call_function" and node.target in _DETACH_FUNCTIONS


@dataclass(frozen=True, kw_only=True)
class RecurrentDetach:
    """A detach on an edge from an earlier segment into the cells of one segment, or on a value
    of the cells that only the graph's outputs read (the memory left after the last segment)."""

    node: torch.fx.Node
    """The detach."""
    source: torch.fx.Node
    """Its input: a value computed by the cells (a layer's memory)."""
    cells: frozenset[Cell]
    """The cells that read the detach (one segment); empty for an output."""
    inside: Cell | None
    """The cell the detach sits in; ``None``: between the layers (the segment loop)."""
    outputs: tuple[int, ...] = ()
    """Positions in the graph's output tuple where the detach is returned (state written back)."""


def _origins(graph: torch.fx.Graph, labels: CellLabels) -> dict[torch.fx.Node, int]:
    """Per node, the latest segment whose cells it depends on (-1: none), in one sweep."""
    origin: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        cell = labels.cell_of.get(node)
        if cell is not None:
            origin[node] = cell[1]
        else:
            origin[node] = max((origin.get(i, -1) for i in node.all_input_nodes), default=-1)
    return origin


def _returned(node: torch.fx.Node, output: torch.fx.Node) -> tuple[int, ...] | None:
    """Where ``node`` is an item of the output tuple, when the output reads it nowhere else."""
    items = output.args[0] if output.args else None
    if not isinstance(items, (tuple, list)):
        return None
    uses: list[torch.fx.Node] = []
    torch.fx.node.map_arg(output.args, lambda n: uses.append(n) or n)  # type: ignore[func-returns-value]
    positions = tuple(i for i, item in enumerate(items) if item is node)
    return positions if positions and sum(n is node for n in uses) == len(positions) else None


def find_recurrent_detaches(graph: torch.fx.Graph, labels: CellLabels) -> list[RecurrentDetach]:
    """The detaches that can be stripped: input computed by the cells of an earlier segment,
    read only by the cells of one later segment (which do not also read that input undetached:
    stripping would merge the two reads into one slot), or only returned. Any other detach
    stays in the graph, to be proven as written."""
    candidates = [n for n in graph.nodes if _is_detach(n)]
    if not candidates:
        return []
    origin = _origins(graph, labels)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    found: list[RecurrentDetach] = []
    for node in candidates:
        source = node.args[0]
        assert isinstance(source, torch.fx.Node)
        inside = labels.cell_of.get(node)
        if inside is None and set(node.users) == {output}:  # only returned: the state left after the call
            positions = _returned(node, output)
            if positions is not None and origin.get(source, -1) >= 0 and output not in source.users:
                found.append(RecurrentDetach(node=node, source=source, cells=frozenset(), inside=None, outputs=positions))
            continue
        readers = {labels.cell_of.get(user) for user in node.users}
        if not readers or None in readers or (inside is not None and readers != {inside}):
            continue  # read outside the cells too: not only on a cell's input
        if len({cell[1] for cell in readers}) != 1:  # type: ignore[index]
            continue
        segment = next(iter(readers))[1]  # type: ignore[index]
        if inside is not None and labels.cell_of.get(source) == inside:
            continue  # a detach within the cell (ARMT's gamma): the same in every cell
        if not 0 <= origin.get(source, -1) < segment:
            continue  # not from an earlier segment: a weight, an input
        if any(labels.cell_of.get(user) in readers for user in source.users if user is not node):
            continue
        found.append(RecurrentDetach(node=node, source=source, cells=frozenset(readers), inside=inside))  # type: ignore[arg-type]
    return found


@dataclass(kw_only=True)
class StrippedDetaches:
    """What :func:`strip_detaches` removed, and how to put it back."""

    detaches: list[RecurrentDetach] = field(default_factory=list)
    _undo: list[tuple[torch.fx.Node, list[torch.fx.Node], str, Any, str, dict[str, Any]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.detaches)

    @property
    def output_positions(self) -> list[int]:
        """Positions of the graph's output tuple that must be returned detached."""
        return sorted(p for item in self.detaches for p in item.outputs)


def strip_detaches(graph: torch.fx.Graph, labels: CellLabels, found: Sequence[RecurrentDetach]) -> StrippedDetaches:
    """Let the readers read each detach's input instead, and erase the detach (from the graph
    and the labels). Exact in the forward; the gradient cut is the program's job (cells'
    inputs: :func:`detached_slots`; outputs: :func:`redetach_outputs`)."""
    stripped = StrippedDetaches(detaches=list(found))
    for item in found:
        node = item.node
        users = list(node.users)
        for user in users:
            user.replace_input_with(node, item.source)
        if item.inside is not None:
            labels.cells[item.inside].remove(node)
            del labels.cell_of[node]
        labels.region_of.pop(node, None)
        stripped._undo.append((item.source, users, node.op, node.target, node.name, dict(node.meta)))
        graph.erase_node(node)
    return stripped


def restore_detaches(gm: torch.fx.GraphModule, stripped: StrippedDetaches) -> None:
    """Put the stripped detaches back into ``gm`` (their users read them again) and recompile:
    a fallback must run the graph as captured, gradient cuts included."""
    graph = gm.graph
    for source, users, op, target, name, meta in reversed(stripped._undo):
        with graph.inserting_after(source):
            node = graph.create_node(op, target, (source,), {}, name=name)
        node.meta = meta
        for user in users:
            user.replace_input_with(source, node)
    stripped._undo.clear()
    stripped.detaches.clear()
    gm.recompile()


def redetach_outputs(gm: torch.fx.GraphModule, positions: Sequence[int]) -> None:
    """Return items ``positions`` of ``gm``'s output tuple detached, as the model returned them."""
    if not positions:
        return
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    items = list(output.args[0])  # type: ignore[arg-type]
    for i in positions:
        if not isinstance(items[i], torch.fx.Node):
            raise ValueError(f"output {i} is not one value: cannot return it detached")
        with gm.graph.inserting_before(output):
            items[i] = gm.graph.call_method("detach", (items[i],))
    output.args = (type(output.args[0])(items),)  # type: ignore[call-arg]
    gm.recompile()


def detached_slots(bindings: Mapping[Cell, Any], found: Sequence[RecurrentDetach]) -> dict[Cell, frozenset[int]]:
    """Per cell, the input slots of its binding that it reads detached."""
    sources: dict[Cell, set[torch.fx.Node]] = defaultdict(set)
    for item in found:
        for cell in item.cells:
            sources[cell].add(item.source)
    table: dict[Cell, frozenset[int]] = {}
    for cell, nodes in sources.items():
        slots = frozenset(i for i, node in enumerate(bindings[cell].inputs) if node in nodes)
        if len(slots) != len(nodes):  # a stripped input that is no slot: the cut would be lost
            raise ValueError(f"cell {cell}: a detached input is not one of its template's inputs")
        table[cell] = slots
    return table


class DetachRule:
    """Which cells read which inputs detached, for a run of ``segments`` segments."""

    def slots(self, layer: int, segment: int, segments: int) -> frozenset[int]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class FixedDetaches(DetachRule):
    """The table of the one graph the backend received (its one number of segments)."""

    def __init__(self, table: Mapping[Cell, frozenset[int]]) -> None:
        self.table = dict(table)

    def slots(self, layer: int, segment: int, segments: int) -> frozenset[int]:
        return self.table.get((layer, segment), _EMPTY)

    def describe(self) -> str:
        segments = sorted({s for _, s in self.table})
        return f"truncated BPTT: {len(self.table)} cells read their recurrent inputs detached (segments {segments})"


class DetachWindows(DetachRule):
    """Any length: per ``(layer, slot)``, the input is read detached in segments
    ``lo <= s <= S - k`` of a run of ``S`` segments (``k = 1``: up to the last)."""

    def __init__(self, windows: Mapping[tuple[int, int], tuple[int, int]]) -> None:
        self.windows = dict(windows)
        self._by_layer: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for (layer, slot), (lo, k) in sorted(self.windows.items()):
            self._by_layer[layer].append((slot, lo, k))

    def slots(self, layer: int, segment: int, segments: int) -> frozenset[int]:
        windows = self._by_layer.get(layer)
        if not windows:
            return _EMPTY
        return frozenset(slot for slot, lo, k in windows if lo <= segment <= segments - k)

    def describe(self) -> str:
        parts = sorted({f"{lo} <= s <= S - {k}" for lo, k in self.windows.values()})
        return f"truncated BPTT: {len(self.windows)} recurrent inputs read detached in segments {' and '.join(parts)}"


def fit_detach_windows(observations: Sequence[tuple[int, Mapping[Cell, frozenset[int]]]]) -> DetachWindows:
    """The windows that reproduce every probe's detached cells: ``observations`` holds, per
    probe, its number of segments and :func:`detached_slots`. Raises ``ValueError`` (with the
    slot and the segments) where no window ``lo <= s <= S - k`` fits every probe."""
    keys = sorted({(layer, slot) for _, table in observations for (layer, _), slots in table.items() for slot in slots})
    windows: dict[tuple[int, int], tuple[int, int]] = {}
    for layer, slot in keys:
        seen = [
            (count, sorted(s for (l, s), slots in table.items() if l == layer and slot in slots))
            for count, table in observations
        ]
        # A window's ends are pinned by any probe where it is not clipped by 1 or S - 1.
        lo = next((segs[0] for _, segs in seen if segs and segs[0] > 1), 1)
        k = next((count - segs[-1] for count, segs in seen if segs and segs[-1] < count - 1), 1)
        for count, segs in seen:
            if segs != [s for s in range(1, count) if lo <= s <= count - k]:
                described = "; ".join(f"{c} segments: {found or 'none'}" for c, found in seen)
                raise ValueError(
                    f"the segments whose layer {layer} reads its input {slot} detached follow no window "
                    f"lo <= s <= S - k over the probes ({described})"
                )
        windows[(layer, slot)] = (lo, k)
    return DetachWindows(windows)
