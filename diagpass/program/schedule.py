"""The schedule of one run: which cells each step batches, and when every phase runs.

A unit (one segment) has ``2L + 1`` phases: even phases run the nodes outside the layers
(chunks: before layer 0, between layers ``l`` and ``l+1``, after the last layer), odd phase
``2l + 1`` runs the cell of layer ``l``. The schedule maps ``(segment, phase)`` to a time:

* ``"diagonal"``: ``2s + phase``. Step ``d`` (time ``2d + 1``) runs every cell with
  ``l + s = d``, batched per template variant;
* ``"sequential"``: ``s * (2L + 1) + phase``: one cell per step, with the same kernels
  (the ablation that isolates the gain of batching).

A :class:`Layout` holds that for one ``(segments, last length)``: the batched calls
(:class:`~diagpass.program.steps.StepGroup`, padded or split as ``config.pad`` says) and,
per time, the phases that run then and the segments whose values are all dead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from diagpass.config import DiagbatchConfig
from diagpass.lower import StepCompiler
from diagpass.passes import Cell
from diagpass.program.steps import StepGroup, StepRunner, VariantPlan

__all__ = ["Layout", "build_layout", "step_groups", "contiguous_groups"]


@dataclass(kw_only=True)
class Layout:
    """The schedule of ``segments`` segments, the last of length ``last``."""

    segments: int
    last: int
    plans: list[VariantPlan]
    """The variants this run's groups index (``StepGroup.variant``)."""
    groups: list[StepGroup]
    """Batched calls, in execution order."""
    by_step: list[list[int]]
    """Per step, its groups."""
    phases_at: list[list[tuple[int, int]]] = field(default_factory=list)
    """Per time, the ``(segment, phase)`` that run then."""
    step_at: list[int | None] = field(default_factory=list)
    """Per time, the step that runs then (``None``: chunks only)."""
    dead_at: list[list[int]] = field(default_factory=list)
    """Per time, the segments whose every reader has run by its end."""
    runner: StepRunner | None = None


def contiguous_groups(
    *, step: int, variant: int, cells: list[Cell], positions: list[int], num_layers: int, limit: int, mode: str, floor: int
) -> list[StepGroup]:
    """The batched calls for cells at the contiguous layer ``positions`` of one diagonal.

    One call, padded as ``mode`` says; or, for ``mode="split"``, power-of-two calls of at least
    ``floor`` cells (13 cells: 8 + 4 + 1 padded to ``floor``), so that little work is wasted
    with few compiled shapes. Padded lanes repeat a real cell's input; their outputs are dropped.
    """
    floor = min(floor, limit)
    if mode == "split":
        sizes: list[int] = []
        rest = len(cells)
        while rest > 0:
            size = max(floor, 1 << (rest.bit_length() - 1))
            sizes.append(size)
            rest -= min(size, rest)
    else:
        sizes = [_pad(len(cells), limit, mode, floor)]
    groups = []
    start = 0
    for size in sizes:
        take = min(size, len(cells) - start)
        mine = positions[start : start + take]
        first = min(mine[0], num_layers - size)
        group = StepGroup(step=step, variant=variant, cells=cells[start : start + take])
        group.lanes = list(range(first, first + size))
        group.cell_lane = [p - first for p in mine]
        groups.append(group)
        start += take
    return groups


def _pad(count: int, limit: int, mode: str, floor: int = 1) -> int:
    if mode == "none" or count >= limit:
        return count
    count = max(count, min(floor, limit))
    if mode == "max":
        return limit
    padded = 1
    while padded < count:
        padded *= 2
    return min(padded, limit)


def step_groups(
    step: int, cells: list[Cell], variant_of: Callable[[Cell], int], plans: list[VariantPlan], limit: int, config: DiagbatchConfig
) -> list[StepGroup]:
    """One step's cells as batched calls: per variant, contiguous layer runs split or padded
    (``config.pad``), a non-contiguous set as one gathering call."""
    by_variant: dict[int, list[Cell]] = {}
    for cell in sorted(cells):
        by_variant.setdefault(variant_of(cell), []).append(cell)
    groups: list[StepGroup] = []
    for variant, mine in sorted(by_variant.items()):
        plan = plans[variant]
        position = {layer: i for i, layer in enumerate(plan.layers)}
        positions = [position[c[0]] for c in mine]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            group = StepGroup(step=step, variant=variant, cells=mine, contiguous=False)
            group.lanes, group.cell_lane = positions, list(range(len(mine)))
            groups.append(group)
            continue
        groups.extend(
            contiguous_groups(
                step=step,
                variant=variant,
                cells=mine,
                positions=positions,
                num_layers=len(plan.layers),
                limit=min(len(plan.layers), limit),
                mode=config.pad,
                floor=1 if plan.single_lane else config.min_lanes,
            )
        )
    return groups


def build_layout(
    *,
    segments: int,
    last: int,
    num_layers: int,
    plans: list[VariantPlan],
    variant_of: Callable[[Cell], int],
    config: DiagbatchConfig,
    compiler: StepCompiler,
) -> Layout:
    """The :class:`Layout` of one run (``variant_of(cell)`` indexes ``plans``)."""
    L, width = num_layers, 2 * num_layers + 1
    if config.schedule == "diagonal":
        steps = [[(l, d - l) for l in range(max(0, d - segments + 1), min(L - 1, d) + 1)] for d in range(segments + L - 1)]

        def time(s: int, phase: int) -> int:
            return 2 * s + phase

    else:
        steps = [[(l, s)] for s in range(segments) for l in range(L)]

        def time(s: int, phase: int) -> int:
            return s * width + phase

    groups: list[StepGroup] = []
    by_step: list[list[int]] = []
    # A diagonal never holds more than min(L, S) cells: pad no further.
    for index, cells in enumerate(steps):
        made = step_groups(index, cells, variant_of, plans, min(L, segments), config)
        by_step.append(list(range(len(groups), len(groups) + len(made))))
        groups.extend(made)
    total = time(segments - 1, 2 * L) + 1
    layout = Layout(segments=segments, last=last, plans=plans, groups=groups, by_step=by_step)
    layout.phases_at = [[] for _ in range(total)]
    layout.step_at = [None] * total
    layout.dead_at = [[] for _ in range(total)]
    for s in range(segments):
        for phase in range(width):
            layout.phases_at[time(s, phase)].append((s, phase))
    for index, cells in enumerate(steps):
        layer, s = cells[0]
        layout.step_at[time(s, 2 * layer + 1)] = index
    for s in range(segments - 1):  # the next segment's last layer is the last reader of its state
        layout.dead_at[max(time(s, 2 * L), time(s + 1, 2 * L - 1))].append(s)
    layout.runner = StepRunner(groups, plans, compiler, config)
    return layout
