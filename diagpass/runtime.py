"""The diagonal program: the captured graph with its cells replaced by batched steps.

The program is an FX ``GraphModule`` with exactly the inputs and outputs of the graph
Dynamo captured (so Dynamo's own bytecode writes the final recurrent state back to the
model's attributes). Its body:

* the nodes outside every cell (embeddings, memory-token concat, final norm, LM head),
  each placed right after the last step it reads and before the first step it feeds;
* one ``steps`` call per (step, template variant): it gathers the cells' inputs, runs the
  compiled batched step once, and hands each cell's outputs back. A step whose next step
  starts a new segment at its first layer may carry (``carry_lanes``): it writes its
  hidden states one lane up, after that segment's input (computed one step early), so the
  next step reads them as a lane view instead of a stacked copy.

The program is plain Python (FX codegen frees each value after its last use); only the
steps go to Inductor, so compile cost does not grow with the number of segments.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

from diagpass import placement
from diagpass.config import DiagbatchConfig
from diagpass.graphs import ProgramGraphs, program_graphs
from diagpass.lower import StepCompiler, prepare_attention
from diagpass.passes import Cell, CellLabels, TemplateAnalysis, build_template_module
from diagpass.passes.template import SlotKind

log = logging.getLogger("diagpass.runtime")

__all__ = ["StepGroup", "DiagonalProgram", "build_program"]


@dataclass(kw_only=True)
class StepGroup:
    """The cells of one step that share a template: one batched call."""

    step: int
    """Index of the step in the schedule."""
    variant: int
    """Template variant."""
    cells: list[Cell]
    """Cells in ascending layer order."""
    lanes: list[int] = field(default_factory=list)
    """Layer position (in the variant's layer stack) of each lane, padding included."""
    cell_lane: list[int] = field(default_factory=list)
    """Lane of each cell."""
    contiguous: bool = True
    """Whether :attr:`lanes` is a contiguous range (weights are then a slice, not a gather)."""


@dataclass(kw_only=True)
class _VariantPlan:
    template: torch.fx.GraphModule
    key: str
    slot_kinds: list[SlotKind]
    in_dims: list[int | None]
    layers: list[int]
    """Sorted layers of the variant's cells; a by_layer stack is indexed by position here."""
    stack_ids: dict[int, int]
    """by_layer slot -> index into the program's weight stacks."""
    config: DiagbatchConfig | None = None
    """Overrides the program's config for this variant's steps (e.g. an eager short tail)."""
    carry: tuple[int, int] | None = None
    """``(slot, output)``: output ``output`` of lane l is slot ``slot`` of lane l+1 at the next
    step (the hidden states). Every step of the variant then writes that output one lane up,
    after a ``head`` (:func:`diagpass.lower.with_carry`). ``None``: no such pair was found."""


class WeightStacks(torch.nn.Module):
    """Per-layer inputs (weights, buffers) stacked once as ``[L, ...]``.

    Restacked only when an input changed: another tensor, or an in-place update
    (``Tensor._version``), so a stale copy is never used. The stacks cost one extra
    copy of the per-layer weights; ``extra_bytes`` reports it.
    """

    def __init__(self, layouts: list[list[int]]) -> None:
        super().__init__()
        self.layouts = layouts  # per stack: positions of its members in forward's args
        self._stamps: list[tuple[Any, ...] | None] = [None] * len(layouts)
        self._stacks: list[torch.Tensor | None] = [None] * len(layouts)

    @property
    def extra_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._stacks if s is not None)

    def forward(self, *members: torch.Tensor) -> list[torch.Tensor]:
        for i, layout in enumerate(self.layouts):
            tensors = [members[j] for j in layout]
            stamp = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors)
            if stamp != self._stamps[i]:
                with torch.no_grad():
                    self._stacks[i] = torch.stack([t.detach() for t in tensors])  # [L, ...]
                self._stamps[i] = stamp
                counters["diagpass"]["weight_restacks"] += 1
        return list(self._stacks)  # type: ignore[arg-type]


class StepRunner(torch.nn.Module):
    """Runs one :class:`StepGroup`: gather inputs, call the compiled step, scatter outputs."""

    def __init__(
        self, groups: list[StepGroup], plans: list[_VariantPlan], compiler: StepCompiler, config: DiagbatchConfig
    ) -> None:
        super().__init__()
        self.groups = groups
        self.plans = plans
        self.compiler = compiler
        self.config = config
        self.compile_s = 0.0
        self.batched_gemms = 0
        self.used_steps: dict[int, Any] = {}  # id -> CompiledStep this program ran
        self._resolved: dict[tuple[int, int | None], Any] = {}  # (group id, carry) -> its CompiledStep
        self._readonly: dict[int, bool] = {}  # id(plan) -> its template writes no tensor in place

    def _lane_view(self, plan: _VariantPlan, values: Sequence[Any]) -> torch.Tensor | None:
        """``values`` as one ``[G, ...]`` view when they already lie as consecutive lanes of
        one tensor (``config.lane_views``, templates that write nothing in place)."""
        if not self.config.lane_views:
            return None
        readonly = self._readonly.get(id(plan))
        if readonly is None:
            readonly = self._readonly[id(plan)] = not placement.has_mutation(list(plan.template.graph.nodes), {})
        return lane_view(values) if readonly else None

    def forward(
        self, group_id: int, stacks: list[torch.Tensor], *inputs: Any, head: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The cells' outputs, cell by cell. A template with ``plan.carry`` writes output
        ``plan.carry[1]`` one lane up; given ``head`` (the input of slot ``plan.carry[0]`` of the
        next step's lane 0), the result ends with that buffer's lane 0: ``head``'s values,
        where the next step reads them in place."""
        group = self.groups[group_id]
        plan = self.plans[group.variant]
        num_cells, num_lanes = len(group.cells), len(group.lanes)
        args: list[Any] = []
        cursor = 0
        for slot, kind in enumerate(plan.slot_kinds):
            if kind == "shared":
                args.append(inputs[cursor])
                cursor += 1
            elif kind == "unused":  # no longer read by the template (diagpass.placement.unused_slots)
                args.append(None)
            elif kind == "per_cell":
                values = inputs[cursor : cursor + num_cells]
                cursor += num_cells
                run = self._lane_view(plan, values) if num_lanes == num_cells else None
                if run is not None:
                    args.append(run)  # [G, ...], read in place
                    counters["diagpass"]["lane_views"] += 1
                elif num_lanes == num_cells:
                    args.append(torch.stack(values))  # [G, ...]
                else:  # padded lanes repeat the first cell's input; their outputs are dropped
                    lane_values = [values[0]] * num_lanes
                    for cell_index, lane in enumerate(group.cell_lane):
                        lane_values[lane] = values[cell_index]
                    args.append(torch.stack(lane_values))
            else:
                stack = stacks[plan.stack_ids[slot]]
                if group.contiguous:
                    args.append(stack[group.lanes[0] : group.lanes[0] + num_lanes])  # [G, ...], no copy
                else:
                    index = torch.tensor(group.lanes, device=stack.device)
                    args.append(stack.index_select(0, index))
        carry = None
        if plan.carry is not None:
            # Every step of a carrying template carries, so a template compiles once per
            # lane count. Without a next segment to start, lane 0 of the step's own input for
            # that slot fills the head's lane (one lane copied, never read).
            carry = plan.carry[1]
            args.append(head if head is not None else args[plan.carry[0]][0])
        else:
            assert head is None, "a head for a template without a proven carry"
        step = self._resolved.get((group_id, carry))
        if step is None:  # a group's argument layouts never change: look its step up once
            step, fresh = self.compiler.get(
                key=plan.key,
                template=plan.template,
                in_dims=plan.in_dims,
                args=args,
                batch=num_lanes,
                config=plan.config or self.config,
                static=[kind == "by_layer" for kind in plan.slot_kinds],
                carry=carry,
            )
            self._resolved[(group_id, carry)] = step
            if id(step) not in self.used_steps:
                self.used_steps[id(step)] = step
                self.batched_gemms += step.batched_gemms
            if fresh:
                self.compile_s += step.compile_s
        outputs = step.fn(*args)
        counters["diagpass"]["batched_steps"] += 1
        counters["diagpass"]["cells_run"] += num_cells
        if carry is None:
            return tuple(out[lane] for lane in group.cell_lane for out in outputs)
        shift = [int(i == carry) for i in range(len(outputs))]  # the carried output: one lane up
        cells = tuple(out[lane + up] for lane in group.cell_lane for out, up in zip(outputs, shift))
        if head is None:
            return cells
        counters["diagpass"]["carried_steps"] += 1
        return (*cells, outputs[carry][0])


def lane_view(values: Sequence[Any]) -> torch.Tensor | None:
    """``values`` stacked along a new dim 0, as a view, when no copy is needed: one tensor
    (``v.unsqueeze(0)``), the same tensor for every lane (an ``expand``), or tensors of one
    storage with one shape and strides at evenly spaced, non-overlapping offsets (the lanes
    ``out[a]``, ..., ``out[a+n-1]`` of a step's output ``out``). ``None`` otherwise.
    """
    first = values[0] if values else None
    if not isinstance(first, torch.Tensor):
        return None
    if len(values) == 1:
        return first.unsqueeze(0)
    if all(value is first for value in values):  # one tensor for every cell (e.g. hoisted rotary tables)
        return first.unsqueeze(0).expand(len(values), *first.shape)
    second = values[1]
    if not isinstance(second, torch.Tensor):
        return None
    step = second.storage_offset() - first.storage_offset()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(first.shape, first.stride()))
    if first.numel() == 0 or step < extent:  # lanes must not overlap (nor run backwards)
        return None
    storage = first.untyped_storage().data_ptr()
    for i, value in enumerate(values):
        if (
            not isinstance(value, torch.Tensor)
            or value.untyped_storage().data_ptr() != storage
            or value.storage_offset() != first.storage_offset() + i * step
            or value.shape != first.shape
            or value.stride() != first.stride()
            or value.dtype != first.dtype
        ):
            return None
    return first.as_strided((len(values), *first.shape), (step, *first.stride()), first.storage_offset())


@dataclass(kw_only=True)
class DiagonalProgram:
    """The compiled program and what it is made of."""

    module: torch.fx.GraphModule
    """Same inputs and outputs as the captured graph."""
    groups: list[StepGroup]
    """Batched calls, in execution order."""
    num_steps: int
    """Steps of the schedule."""
    runner: StepRunner
    stacks: WeightStacks
    member_args: list[int] | None = None
    """Argument index of each weight-stack member, when every member is an argument: the
    stacks are then built outside ``module`` and passed after the arguments (``None``: the
    module builds them itself)."""
    graphs: ProgramGraphs | None = None
    """Whole-program CUDA graphs (``cudagraph_program``); needs ``member_args``."""
    last_graph: str = "off"
    """How the last call used them (:meth:`ProgramGraphs.__call__`)."""

    def __call__(self, *args: Any) -> Any:
        if self.member_args is None:
            return self.module(*args)
        # Outside any graph: new weights restack here, and a replay then captures again.
        stacks = self.stacks(*[args[i] for i in self.member_args])
        if self.graphs is None:
            return self.module(*args, *stacks)
        outputs, _, self.last_graph = self.graphs(lambda *a: (self.module(*a), None), [*args, *stacks])
        return outputs


def _copy_attr(source: torch.nn.Module, target: torch.nn.Module, dotted: str) -> None:
    *path, name = dotted.split(".")
    for part in path:
        source = getattr(source, part)
        if not hasattr(target, part):
            target.add_module(part, torch.nn.Module())
        target = getattr(target, part)
    value = getattr(source, name)
    if isinstance(value, torch.nn.Module):
        target.add_module(name, value)
    else:
        setattr(target, name, value)


def step_in_dims(slot_kinds: list[str]) -> list[int | None]:
    """vmap's in_dims for a template's slots: stacked slots along dim 0, the others unbatched."""
    return [0 if kind in ("per_cell", "by_layer") else None for kind in slot_kinds]


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


def carried_slot(
    template: torch.fx.GraphModule,
    slot_kinds: list[str],
    cells: list[Cell],
    bindings: dict[Cell, Any],
    cell_of: dict[torch.fx.Node, Cell],
    config: DiagbatchConfig,
) -> tuple[int, int] | None:
    """``(slot, output)`` such that output ``output`` of layer l is slot ``slot`` of layer l+1
    (the same captured node) in every segment of the variant, and layer 0 reads that slot from
    outside the cells; ``None`` where there is none, or ``carry_lanes`` / ``lane_views`` are
    off, or the template writes in place. Only a hint for speed: a carried step is exact
    whatever it carries (:func:`diagpass.lower.with_carry`)."""
    if not (config.carry_lanes and config.lane_views) or placement.has_mutation(list(template.graph.nodes), {}):
        return None
    mine = set(cells)
    firsts = [c for c in cells if (c[0] - 1, c[1]) not in mine]
    pairs = [c for c in cells if (c[0] - 1, c[1]) in mine]
    if not pairs or not firsts:
        return None
    for slot, kind in enumerate(slot_kinds):
        if kind != "per_cell" or any(bindings[c].inputs[slot] in cell_of for c in firsts):
            continue
        for output in range(len(bindings[cells[0]].outputs)):
            if all(bindings[c].inputs[slot] is bindings[(c[0] - 1, c[1])].outputs[output] for c in pairs):
                return slot, output
    return None


def carried_heads(
    groups: list[StepGroup],
    groups_of_step: list[list[int]],
    plans: list[_VariantPlan],
    bindings: dict[Cell, Any],
    cell_of: dict[torch.fx.Node, Cell],
    time_of: dict[torch.fx.Node, int],
) -> dict[int, torch.fx.Node]:
    """Group id -> the node it writes one lane up (``head``), for each group whose lanes are its
    variant's first layers, unpadded, where the next step has a group of the same variant
    starting at that layer: the head is that group's lane-0 input of the carried slot. The head
    and what computes it move to run before the step (they read no cell: checked here)."""
    heads: dict[int, torch.fx.Node] = {}
    for step, ids in enumerate(groups_of_step[:-1]):
        starts = {(groups[g].variant, groups[g].lanes[0]): g for g in groups_of_step[step + 1]}
        for group_id in ids:
            group = groups[group_id]
            plan = plans[group.variant]
            if plan.carry is None or group.lanes[0] != 0 or len(group.cells) != len(group.lanes) or not group.contiguous:
                continue
            following = starts.get((group.variant, 0))
            if following is None:
                continue
            head = bindings[groups[following].cells[0]].inputs[plan.carry[0]]
            upstream = _outside_ancestors(head, cell_of)
            if upstream is None:
                continue  # computed from a cell's output: it cannot run a step early
            for node in upstream:
                time_of[node] = min(time_of[node], 2 * step)
            heads[group_id] = head
    return heads


def _outside_ancestors(node: torch.fx.Node, cell_of: dict[torch.fx.Node, Cell]) -> list[torch.fx.Node] | None:
    """``node`` and the nodes outside the cells it is computed from; ``None`` if any is a cell's."""
    seen: dict[torch.fx.Node, None] = {}
    pending = [node]
    while pending:
        current = pending.pop()
        if current in seen or current.op == "placeholder":
            continue
        if current in cell_of:
            return None
        seen[current] = None
        pending.extend(current.all_input_nodes)
    return list(seen)


def build_program(
    *,
    gm: torch.fx.GraphModule,
    labels: CellLabels,
    templates: TemplateAnalysis,
    schedule: list[list[Cell]],
    config: DiagbatchConfig,
    compiler: StepCompiler,
) -> DiagonalProgram:
    """Rewrite ``gm`` into the step program. Linear in graph size."""
    start = time.perf_counter()
    bindings = templates.bindings
    step_of = {cell: i for i, step in enumerate(schedule) for cell in step}

    # Per variant: its template module, slot kinds and the layer stacks its by_layer slots read.
    stack_members: list[list[torch.fx.Node]] = []
    stack_index: dict[tuple[torch.fx.Node, ...], int] = {}
    plans: list[_VariantPlan] = []
    unread: list[torch.fx.Node] = []  # captured nodes bound to slots no template reads
    for template in templates.templates:
        layers = sorted({layer for layer, _ in template.cells})
        stack_ids: dict[int, int] = {}
        for slot, kind in enumerate(template.slot_kinds):
            if kind != "by_layer":
                continue
            first_cell = {}
            for cell in template.cells:
                first_cell.setdefault(cell[0], cell)
            members = tuple(bindings[first_cell[layer]].inputs[slot] for layer in layers)
            if members not in stack_index:
                stack_index[members] = len(stack_members)
                stack_members.append(list(members))
            stack_ids[slot] = stack_index[members]
        module = build_template_module(template, bindings, gm)
        suffix = prepare_attention(
            module, lambda slot, cells=template.cells: [bindings[c].inputs[slot] for c in cells], gqa=config.gqa_attention
        )
        slot_kinds = placement.unused_slots(module, template.slot_kinds) if placement.DROP_UNUSED else template.slot_kinds
        for slot, kind in enumerate(slot_kinds):
            if kind == "unused":
                unread.extend(bindings[c].inputs[slot] for c in template.cells)
        plans.append(
            _VariantPlan(
                template=module,
                key=template.key + suffix,
                slot_kinds=list(slot_kinds),  # type: ignore[arg-type]
                in_dims=step_in_dims(slot_kinds),
                layers=layers,
                stack_ids=stack_ids,
                carry=carried_slot(module, list(slot_kinds), template.cells, bindings, labels.cell_of, config),
            )
        )

    # Groups: per step, the cells of each variant, in layer order.
    groups: list[StepGroup] = []
    groups_of_step: list[list[int]] = []
    for step_index, step in enumerate(schedule):
        by_variant: dict[int, list[Cell]] = {}
        for cell in sorted(step):
            by_variant.setdefault(bindings[cell].variant, []).append(cell)
        ids = []
        for variant, cells in sorted(by_variant.items()):
            plan = plans[variant]
            position = {layer: i for i, layer in enumerate(plan.layers)}
            positions = [position[c[0]] for c in cells]
            contiguous = positions == list(range(positions[0], positions[0] + len(positions)))
            if contiguous:
                # A diagonal never holds more than min(L, S) cells: pad no further.
                made = contiguous_groups(
                    step=step_index,
                    variant=variant,
                    cells=cells,
                    positions=positions,
                    num_layers=len(plan.layers),
                    limit=min(len(plan.layers), labels.num_segments),
                    mode=config.pad,
                    floor=config.min_lanes,
                )
            else:
                group = StepGroup(step=step_index, variant=variant, cells=cells, contiguous=False)
                group.lanes = positions
                group.cell_lane = list(range(len(cells)))
                made = [group]
            for group in made:
                ids.append(len(groups))
                groups.append(group)
        groups_of_step.append(ids)

    # Time of each node: a step d runs at 2d+1; other nodes at the even time after their inputs.
    cell_of = labels.cell_of
    time_of: dict[torch.fx.Node, int] = {}
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        cell = cell_of.get(node)
        if cell is not None:
            time_of[node] = 2 * step_of[cell] + 1
            continue
        t = max((time_of.get(i, 0) for i in node.all_input_nodes), default=0)
        time_of[node] = t + (t % 2)
    if placement.LATE:  # the prologue of a segment just before its first step (diagpass.placement)
        counters["diagpass"]["placed_late"] += placement.place_late(nodes, cell_of, time_of)
    # A step that carries needs the next segment's input before it: that input moves earlier,
    # which is only safe where nothing outside the cells writes in place.
    heads = {} if placement.has_mutation(nodes, cell_of) else carried_heads(groups, groups_of_step, plans, bindings, cell_of, time_of)
    for variant, plan in enumerate(plans):  # a template no step carries for does not pay the head's copy
        if plan.carry is not None and not any(groups[g].variant == variant for g in heads):
            plan.carry = None
    for node in nodes:  # the theorem, once more, on the actual node times
        cell = cell_of.get(node)
        if cell is not None:
            for i in node.all_input_nodes:
                if i not in cell_of and time_of.get(i, 0) > time_of[node]:
                    raise AssertionError(f"node {i.name} runs after the step of {cell} that reads it")
    outside = [n for n in nodes if n.op not in ("placeholder", "output") and n not in cell_of]
    outside.sort(key=lambda n: time_of[n])  # stable: graph order within a time

    # The stacks' members, each graph input once; a stack's layout indexes into them.
    member_nodes: list[torch.fx.Node] = []
    member_pos: dict[torch.fx.Node, int] = {}
    layouts: list[list[int]] = []
    for members in stack_members:
        for m in members:
            if m not in member_pos:
                member_pos[m] = len(member_nodes)
                member_nodes.append(m)
        layouts.append([member_pos[m] for m in members])

    stacks = WeightStacks(layouts)
    runner = StepRunner(groups, plans, compiler, config)
    root = torch.nn.Module()
    root.add_module("stacks", stacks)
    root.add_module("steps", runner)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [node for node in nodes if node.op == "placeholder"]
    for node in placeholders:
        env[node] = graph.node_copy(node, lambda n: env[n])
    member_args: list[int] | None = None
    if all(m.op == "placeholder" for m in member_nodes):
        # The stacks arrive as arguments after the graph's own: DiagonalProgram builds them
        # outside the module, and so outside a CUDA graph of it.
        index = {node: i for i, node in enumerate(placeholders)}  # linear in graph size
        member_args = [index[m] for m in member_nodes]
        stacks_node: Any = [graph.placeholder(f"weight_stack_{i}") for i in range(len(layouts))]
    else:
        stacks_node = graph.call_module("stacks", tuple(env[m] for m in member_nodes))

    def emit_step(step_index: int) -> None:
        for group_id in groups_of_step[step_index]:
            group = groups[group_id]
            plan = plans[group.variant]
            args: list[torch.fx.Node] = []
            for slot, kind in enumerate(plan.slot_kinds):
                if kind == "shared":
                    args.append(env[bindings[group.cells[0]].inputs[slot]])
                elif kind == "per_cell":
                    args.extend(env[bindings[c].inputs[slot]] for c in group.cells)
            head = heads.get(group_id)
            kwargs = {"head": env[head]} if head is not None else {}
            call = graph.call_module("steps", (group_id, stacks_node, *args), kwargs)
            call.meta["diagpass_group"] = group_id
            index = 0
            for cell in group.cells:
                for out in bindings[cell].outputs:
                    item = graph.call_function(operator.getitem, (call, index))
                    item.meta = dict(out.meta)
                    env[out] = item
                    index += 1
            if head is not None:  # the same values, now lane 0 of the buffer the next step reads in place
                item = graph.call_function(operator.getitem, (call, index))
                item.meta = dict(head.meta)
                env[head] = item

    emitted_steps = 0
    for node in outside:
        while emitted_steps < len(schedule) and 2 * emitted_steps + 1 < time_of[node]:
            emit_step(emitted_steps)
            emitted_steps += 1
        env[node] = graph.node_copy(node, lambda n: env[n])
    while emitted_steps < len(schedule):
        emit_step(emitted_steps)
        emitted_steps += 1
    output = next(n for n in nodes if n.op == "output")
    graph.node_copy(output, lambda n: env[n])
    counters["diagpass"]["unread_nodes_erased"] += placement.erase_unread(graph, [env[n] for n in unread if n in env])
    graph.lint()
    for node in outside:  # attributes and submodules the copied nodes read
        if node.op in ("get_attr", "call_module"):
            _copy_attr(gm, root, str(node.target))
    module = torch.fx.GraphModule(root, graph, class_name="DiagonalProgram")
    counters["diagpass"]["programs"] += 1
    counters["diagpass"]["groups"] += len(groups)
    log.debug("built a program of %d steps, %d groups in %.3fs", len(schedule), len(groups), time.perf_counter() - start)
    return DiagonalProgram(
        module=module,
        groups=groups,
        num_steps=len(schedule),
        runner=runner,
        stacks=stacks,
        member_args=member_args,
        graphs=program_graphs(config, name="diagbatch program") if member_args is not None else None,
    )
