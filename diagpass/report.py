"""The dependency report: what the analyzer proved about a captured forward."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import networkx as nx
import torch.fx
from torch._dynamo.utils import counters

from diagpass.passes import (
    Cell,
    CellLabels,
    TemplateAnalysis,
    Violation,
    analyze_dependencies,
    diagonal_schedule,
    extract_templates,
    label_cells,
)
from diagpass.passes.detach import STRIPPED_META, StrippedDetaches, detached_slots, find_recurrent_detaches, strip_detaches
from diagpass.passes.functionalize import FunctionalizeResult, functionalize_local_writes
from diagpass.passes.segment_cuts import rewrite_segment_cuts

log = logging.getLogger("diagpass.analyze")

__all__ = ["DependencyReport", "GraphAnalysis", "analyze_graph"]

_GRID_MAX_LAYERS = 24
_GRID_MAX_SEGMENTS = 40


@dataclass(kw_only=True)
class DependencyReport:
    """Verdict of the wavefront theorem (DESIGN.md §2) on one captured forward."""

    ok: bool
    """The diagonal schedule is proven valid (and there is segment recurrence to use)."""
    reason: str | None
    """Why ``ok`` is False (``None`` when it is True)."""
    num_layers: int
    """``L``: layers found in the module call structure."""
    num_segments: int
    """``S``: calls of each layer."""
    graph: nx.DiGraph
    """Cell DAG: nodes are ``(layer, segment)``, edges carry ``source`` (``file:line``)."""
    violations: list[Violation] = field(default_factory=list)
    """Edges that break the theorem, each with ``src``, ``dst``, ``reason``, ``source``."""
    critical_path: int = 0
    """Fewest steps any schedule can take: S+L-1 for ARMT, S*L for vanilla RMT."""
    schedule: list[list[Cell]] = field(default_factory=list)
    """Steps of cells. The diagonals when ``ok``; otherwise the fastest valid order."""
    uniform: bool = False
    """Every cell is one template up to weights and state (first/last segment variants allowed)."""
    uniformity: str = ""
    """Variants found, and the first cell and op that differ when not uniform."""
    variants: list[tuple[str, int]] = field(default_factory=list)
    """``(role, number of cells)`` per template variant."""
    layer_container: str | None = None
    """Module path of the layer list the cells come from."""
    graph_breaks: list[str] = field(default_factory=list)
    """Dynamo's graph-break reasons (the analysis covers the largest graph)."""
    num_graphs: int = 1
    """How many graphs Dynamo produced for the forward."""
    num_nodes: int = 0
    """Nodes in the analysed FX graph."""
    analysis_s: float = 0.0
    """Seconds spent in the analysis itself (Dynamo's trace excluded)."""
    trace_s: float | None = None
    """Seconds Dynamo spent tracing, when known."""

    @property
    def num_steps(self) -> int:
        """Steps of :attr:`schedule`."""
        return len(self.schedule)

    def __str__(self) -> str:
        lines = [
            f"diagpass dependency report: {'PROVEN' if self.ok else 'NOT PROVEN'}",
            f"  layers L={self.num_layers}, segments S={self.num_segments}"
            + (f", layer list {self.layer_container}" if self.layer_container else ""),
        ]
        if self.reason:
            lines.append(f"  reason: {self.reason}")
        if self.graph.number_of_nodes():
            lines.append(
                f"  cell graph: {self.graph.number_of_nodes()} cells, {self.graph.number_of_edges()} edges; "
                f"critical path {self.critical_path} steps "
                f"(sequential {self.num_layers * self.num_segments}, diagonal {self.num_layers + self.num_segments - 1})"
            )
        edge_kinds = sorted({(d[0] - s[0], d[1] - s[1]) for s, d in self.graph.edges})
        if edge_kinds:
            lines.append("  edge offsets (dlayer, dsegment): " + ", ".join(map(str, edge_kinds)))
        if self.violations:
            lines.append(f"  violations ({len(self.violations)}):")
            for v in self.violations[:5]:
                lines.append(f"    {v.src} -> {v.dst} at {v.source}" + (f"  `{v.code}`" if v.code else ""))
                lines.append(f"      {v.reason}")
            if len(self.violations) > 5:
                lines.append(f"    ... and {len(self.violations) - 5} more")
        if self.uniformity:
            lines.append(f"  uniformity: {self.uniformity}")
        if self.graph_breaks:
            lines.append(f"  graph breaks ({self.num_graphs} graphs): " + "; ".join(self.graph_breaks[:3]))
        lines.append(f"  schedule: {self.num_steps} steps")
        lines.extend(self._grid())
        return "\n".join(lines)

    def _grid(self) -> list[str]:
        """Step of every cell, layers top-down; ``!`` marks cells a violation feeds."""
        L, S = self.num_layers, self.num_segments
        if not (0 < L <= _GRID_MAX_LAYERS and 0 < S <= _GRID_MAX_SEGMENTS) or not self.schedule:
            return []
        step_of = {cell: i for i, step in enumerate(self.schedule) for cell in step}
        bad = {v.dst for v in self.violations}
        width = max(3, len(str(self.num_steps)) + 2)
        out = ["  step of each cell (rows: layers, columns: segments; ! = violating input):"]
        out.append("        " + "".join(f"s{s}".rjust(width) for s in range(S)))
        for layer in reversed(range(L)):
            row = "".join(
                (f"{step_of.get((layer, s), '?')}" + ("!" if (layer, s) in bad else "")).rjust(width) for s in range(S)
            )
            out.append(f"    l{layer}".ljust(8) + row)
        return out


@dataclass(kw_only=True)
class GraphAnalysis:
    """Everything the passes found on one graph: the report and the data behind it."""

    report: DependencyReport
    labels: CellLabels
    templates: TemplateAnalysis | None
    writes: FunctionalizeResult
    """The in-place writes into graph-local values that were made out-of-place first."""
    detaches: StrippedDetaches = field(default_factory=StrippedDetaches)
    """The detaches on cells' recurrent inputs stripped from the graph (truncated BPTT): the
    program puts the gradient cut back; a fallback must :func:`~diagpass.passes.detach.restore_detaches`."""


def analyze_graph(gm: torch.fx.GraphModule) -> GraphAnalysis:
    """Run the analysis passes on a captured graph (linear in graph size)."""
    start = time.perf_counter()
    writes = functionalize_local_writes(gm)
    rewrite_segment_cuts(gm)
    if writes.rewritten:
        log.debug("functionalized %d in-place write(s): %s", len(writes.rewritten), "; ".join(writes.rewritten[:5]))
    graph = gm.graph
    labels = label_cells(graph)
    # Truncated BPTT: a detach is the identity in the forward; strip it so that the cells are
    # one template again, and keep per cell which inputs are read detached.
    detaches = strip_detaches(graph, labels, find_recurrent_detaches(graph, labels))
    if detaches:
        gm.meta[STRIPPED_META] = detaches  # for a fallback, which must run the graph as captured
        counters["diagpass"]["stripped_detaches"] += len(detaches.detaches)
        gm.recompile()
    deps = analyze_dependencies(graph, labels)
    L, S = labels.num_layers, labels.num_segments
    templates = extract_templates(graph, labels) if labels.cells else None
    if templates is not None and detaches:
        templates.detached = detached_slots(templates.bindings, detaches.detaches)

    reason: str | None = None
    if labels.container is None:
        reason = "no segment-recurrent structure: no indexed layer list (e.g. model.layers.<i>) runs in the forward"
    elif S < 2:
        reason = (
            f"no segment recurrence: each of the {L} layers of {labels.container} runs once (a single "
            "segment, or a graph break inside the segment loop: diagpass.analyze() reports breaks)"
        )
    elif labels.problems:
        reason = "; ".join(labels.problems)
    elif not deps.acyclic:
        reason = "the cell graph has a cycle: layer calls interleave in a way no schedule of whole cells can run"
    elif deps.violations:
        first = deps.violations[0]
        reason = (
            f"{len(deps.violations)} edge(s) break the wavefront theorem; first: {first.src} -> {first.dst} "
            f"at {first.source}"
        )
    ok = reason is None

    if ok:
        schedule = diagonal_schedule(L, S)
    elif deps.acyclic and deps.graph.number_of_nodes():
        schedule = [sorted(gen, key=lambda c: (c[1], c[0])) for gen in nx.topological_generations(deps.graph)]
    else:
        schedule = []

    uniform = bool(templates and templates.uniform)
    variants = [(t.role, len(t.cells)) for t in templates.templates] if templates else []
    if templates is None:
        uniformity = ""
    elif templates.uniform:
        uniformity = "uniform: " + ", ".join(f"{role} ({n} cells)" for role, n in variants)
    else:
        uniformity = f"NOT uniform: {templates.difference}"

    report = DependencyReport(
        ok=ok,
        reason=reason,
        num_layers=L,
        num_segments=S,
        graph=deps.graph,
        violations=deps.violations,
        critical_path=deps.critical_path,
        schedule=schedule,
        uniform=uniform,
        uniformity=uniformity,
        variants=variants,
        layer_container=labels.container,
        num_nodes=len(graph.nodes),
    )
    report.analysis_s = time.perf_counter() - start
    return GraphAnalysis(report=report, labels=labels, templates=templates, writes=writes, detaches=detaches)
