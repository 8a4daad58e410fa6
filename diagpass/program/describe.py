"""``print(program)``: what a :class:`~diagpass.program.runtime.DiagonalProgram` is made of and
what it decided, each with its reason."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from diagpass import placement
from diagpass.program import chunks

if TYPE_CHECKING:
    from diagpass.program.runtime import DiagonalProgram

__all__ = ["describe"]


def describe(program: DiagonalProgram) -> str:
    plan, config = program.plan, program.config
    length = "any number of segments" if plan.num_segments is None else f"{plan.num_segments} segments"
    lines = [f"DiagonalProgram ({program.name}): L={plan.num_layers}, T={plan.segment_size}, {length}"]
    lines.append("  variants:")
    for index, variant in enumerate(plan.variants):
        kinds = Counter(variant.slot_kinds)
        lines.append(
            f"    [{index}] {variant.name}: layers {variant.layers[0]}..{variant.layers[-1]}, "
            + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
            + (" (never padded)" if variant.single_lane else "")
        )
    lines.append("  units:")
    for unit in plan.units.values():
        hoisted = sum(1 for c in unit.chunks.values() if c.hoisted is not None)
        compiled = sum(1 for c in unit.chunks.values() if c.s_free)
        lines.append(
            f"    {unit.name}: variants {sorted(set(unit.variants))}, {len(unit.chunks)} chunks "
            f"({hoisted} with hoisted invariants, {compiled} free of s)"
        )
    lines.append(f"  schedule: {config.schedule}, pad={config.pad}, min_lanes={config.min_lanes}")
    layout = program.last_layout
    if layout is None and program.fixed_length is not None:
        layout = program.layout(*program.fixed_length)
    if layout is not None:
        per_step = Counter(len(layout.by_step[s]) for s in range(len(layout.by_step)))
        cells = Counter(len(g.cells) for g in layout.groups)
        lines.append(
            f"    {layout.segments} segments (last {layout.last}): {len(layout.by_step)} steps, "
            f"{len(layout.groups)} batched calls; calls per step {dict(sorted(per_step.items()))}; "
            f"cells per call {dict(sorted(cells.items()))}"
        )
        runner = layout.runner
        if runner is not None and runner.used_steps:
            shapes = sorted({(step.batch, step.batched_gemms) for step in runner.used_steps.values()})
            lines.append(f"    compiled step shapes (cells, batched GEMMs): {shapes}")
    lines.append(f"  carried lanes: {plan.carry_reason}")
    lines.append(
        "  lane views: "
        + ("on, for templates that write nothing in place" if config.lane_views else "off (lane_views=False)")
    )
    lines.append(
        "  hoisted invariants: "
        + ("on: what every segment shares runs once per run" if chunks.HOIST_INVARIANT else "off")
        + "; unread cell inputs dropped: "
        + ("on" if placement.DROP_UNUSED else "off")
    )
    graphs = program.graphs
    if graphs is None:
        reason = "off (cudagraph_program=False, per-step graphs, or no CUDA)"
    else:
        reason = f"on: {graphs.captures} captured, {graphs.replays} replays; last call {program.last_graph}"
        if graphs.failures:
            reason += f"; refused: {next(iter(graphs.failures.values()))}"
    lines.append(f"  whole-program CUDA graphs: {reason}")
    lines.extend(f"  {decision}" for decision in plan.decisions)
    return "\n".join(lines)
