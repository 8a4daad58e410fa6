"""Build the cell dependency DAG and check the wavefront theorem (DESIGN.md §2).

An edge ``(l', s') -> (l, s)`` exists when a value computed in cell ``(l', s')`` reaches
cell ``(l, s)``, directly or through nodes outside every cell (a slice, a concat, the
final norm). The schedule "step d runs every cell with l + s = d" is valid exactly
when every edge has ``l' + s' < l + s``. The longest path of the DAG gives the fewest
steps any schedule can take.

This pass is pure: it reads a graph and the cell labels and returns plain data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx
import torch.fx

from .cells import Cell, CellLabels

__all__ = ["Violation", "DependencyAnalysis", "analyze_dependencies", "source_line", "diagonal_schedule"]

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


@dataclass(frozen=True, kw_only=True)
class Violation:
    """An edge that breaks the wavefront theorem."""

    src: Cell
    """Producing cell ``(layer, segment)``."""
    dst: Cell
    """Consuming cell ``(layer, segment)``."""
    reason: str
    """Why the edge breaks the diagonal schedule."""
    source: str
    """``file:line`` of the user code where the value enters the consuming cell."""
    code: str = ""
    """The text of that source line, when known."""

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} at {self.source}: {self.reason}"


@dataclass(kw_only=True)
class DependencyAnalysis:
    """The cell DAG and what it proves."""

    graph: nx.DiGraph
    """Nodes are ``(layer, segment)`` cells; edge attribute ``source`` is ``file:line``."""
    acyclic: bool
    """Whether the cell graph is a DAG (cells are convex regions of the node graph)."""
    violations: list[Violation] = field(default_factory=list)
    """Edges with ``l' + s' >= l + s``, sorted by destination."""
    critical_path: int = 0
    """Fewest steps any schedule can take (cells on the longest path)."""


def source_line(node: torch.fx.Node) -> tuple[str, str]:
    """``("file:line", code)`` of the innermost user frame that created ``node``.

    Nodes without a stack trace (getitem, views Dynamo adds) borrow one from an input.
    """
    seen = 0
    frontier = [node]
    while frontier and seen < 64:
        current = frontier.pop(0)
        seen += 1
        trace = current.meta.get("stack_trace")
        if trace:
            lines = trace.rstrip().splitlines()
            for i in range(len(lines) - 1, -1, -1):
                match = _FRAME.search(lines[i])
                if match:
                    code = lines[i + 1].strip() if i + 1 < len(lines) else ""
                    return f"{match.group('file')}:{match.group('line')}", code
        frontier.extend(current.all_input_nodes)
    return "<unknown>", ""


def analyze_dependencies(graph: torch.fx.Graph, labels: CellLabels) -> DependencyAnalysis:
    """Contract the node graph onto cells and check the theorem.

    Linear in graph size, up to the size of the cell sets that flow through non-cell
    nodes (one cell each in every RMT variant seen so far).
    """
    cell_of = labels.cell_of
    dag = nx.DiGraph()
    dag.add_nodes_from(labels.cells)
    # For nodes outside the cells: the cells whose values reach them.
    reach: dict[torch.fx.Node, frozenset[Cell]] = {}
    witness: dict[tuple[Cell, Cell], torch.fx.Node] = {}
    empty: frozenset[Cell] = frozenset()
    for node in graph.nodes:
        if node.op == "placeholder":
            continue  # shared weights would otherwise make false edges (DESIGN.md §7)
        own = cell_of.get(node)
        if own is None:
            sources: list[frozenset[Cell]] = []
            for inp in node.all_input_nodes:
                if inp in cell_of:
                    sources.append(frozenset((cell_of[inp],)))
                elif inp in reach and reach[inp]:
                    sources.append(reach[inp])
            if not sources:
                reach[node] = empty
            elif len(sources) == 1:
                reach[node] = sources[0]
            else:
                reach[node] = frozenset().union(*sources)
            continue
        for inp in node.all_input_nodes:
            if inp in cell_of:
                src_cells: frozenset[Cell] | tuple[Cell, ...] = (cell_of[inp],)
                via = node
            else:
                src_cells = reach.get(inp, empty)
                via = inp
            for src in src_cells:
                if src != own and (src, own) not in witness:
                    witness[(src, own)] = via
    for (src, dst), via in witness.items():
        dag.add_edge(src, dst, source=source_line(via)[0])

    analysis = DependencyAnalysis(graph=dag, acyclic=nx.is_directed_acyclic_graph(dag))
    for (src, dst), via in sorted(witness.items(), key=lambda item: (item[0][1][1], item[0][1][0], item[0][0])):
        if src[0] + src[1] < dst[0] + dst[1]:
            continue
        where, code = source_line(via)
        src_diag, dst_diag = src[0] + src[1], dst[0] + dst[1]
        relation = "the same diagonal" if src_diag == dst_diag else f"a later diagonal ({src_diag} > {dst_diag})"
        why = (
            f"layer {src[0]} of segment {src[1]} feeds layer {dst[0]} of segment {dst[1]}, which sits on "
            f"{relation}: a diagonal step would read it before it exists"
        )
        analysis.violations.append(Violation(src=src, dst=dst, reason=why, source=where, code=code))
    if analysis.acyclic and dag.number_of_nodes():
        analysis.critical_path = nx.dag_longest_path_length(dag) + 1
    return analysis


def diagonal_schedule(num_layers: int, num_segments: int) -> list[list[Cell]]:
    """Step ``d`` runs cells ``(l, d - l)`` for the contiguous layers that exist."""
    steps: list[list[Cell]] = []
    for d in range(num_layers + num_segments - 1):
        first, last = max(0, d - num_segments + 1), min(d, num_layers - 1)
        steps.append([(layer, d - layer) for layer in range(first, last + 1)])
    return steps
