"""``diagpass.analyze``: prove or refute the diagonal structure of a model's forward."""

from __future__ import annotations

import logging
from typing import Any

import networkx as nx
import torch

from diagpass.capture import capture_whole
from diagpass.report import DependencyReport, analyze_graph

log = logging.getLogger("diagpass.analyze")

__all__ = ["analyze"]


def _refuted(reason: str, **fields: Any) -> DependencyReport:
    return DependencyReport(ok=False, reason=reason, num_layers=0, num_segments=0, graph=nx.DiGraph(), **fields)


def analyze(model: Any, /, *args: Any, **kwargs: Any) -> DependencyReport:
    """Capture ``model(*args, **kwargs)`` with Dynamo and check the wavefront theorem.

    Runs the forward once (under ``torch.no_grad()``), so module state is updated as an
    eager call would update it; twice when the first trace has graph breaks (the second
    trace, after any lazy initialisation the first call did, is the one analysed). Never
    raises on a model that runs eagerly: a forward Dynamo cannot capture, one with graph
    breaks, or one with no segment-recurrent structure gets ``ok=False`` and a reason.
    """
    try:
        with torch.no_grad():
            captured = capture_whole(model, args, kwargs)
    except Exception as error:  # Dynamo failed where eager may not: report it, don't raise
        log.warning("diagpass.analyze: Dynamo could not capture the forward: %s", error)
        return _refuted(f"Dynamo could not capture the forward: {type(error).__name__}: {error}")
    gm = captured.graph_module
    if gm is None:
        breaks = f": {'; '.join(captured.break_reasons[:3])}" if captured.break_reasons else ""
        return _refuted(
            f"Dynamo captured no graph (the forward ran no tensor ops, or was skipped){breaks}",
            graph_breaks=captured.break_reasons,
            num_graphs=0,
        )
    report = analyze_graph(gm).report
    report.trace_s = captured.trace_s
    report.num_graphs = len(captured.graphs)
    report.graph_breaks = captured.break_reasons
    if captured.has_breaks:
        reasons = "; ".join(captured.break_reasons[:3]) or "reason not recorded"
        skipped = f", {captured.skipped_frames} frame(s) skipped and run eagerly" if captured.skipped_frames else ""
        report.ok = False
        report.reason = (
            f"the forward has graph breaks ({len(captured.graphs)} graphs{skipped}; analysed the largest): {reasons}"
            + (f". Without them: {report.reason}" if report.reason else "")
        )
    log.info("analyze: %s", report.reason or "proven")
    return report
