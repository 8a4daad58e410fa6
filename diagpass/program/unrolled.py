"""The unrolled program: the captured graph with its cells replaced by batched steps.

The backend's path for a graph that :func:`~diagpass.program.plan.plan_program` cannot
express yet (for example in-place writes outside the layers, or segments that are not one
repeated form). It has exactly the inputs and outputs of the graph Dynamo captured:

* the nodes outside every cell run as captured, each placed right after the last step it
  reads and as late as its readers allow (:mod:`diagpass.placement`);
* one ``steps`` call per (step, template variant), through the same
  :class:`~diagpass.program.steps.StepRunner` and compiled-step cache as the diagonal program.

FX codegen frees each value after its last use; only the steps go to Inductor, so compile
cost does not grow with the number of segments.
"""

from __future__ import annotations

import logging
import operator
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

from diagpass import placement
from diagpass.config import DiagbatchConfig
from diagpass.graphs import ProgramGraphs, program_graphs
from diagpass.lower import StepCompiler, prepare_attention
from diagpass.passes import Cell, CellLabels, TemplateAnalysis, build_template_module
from diagpass.program.plan import carried_slot
from diagpass.program.schedule import step_groups
from diagpass.program.steps import StepGroup, StepRunner, VariantPlan, WeightStacks, step_in_dims

log = logging.getLogger("diagpass.program")

__all__ = ["UnrolledProgram", "build_unrolled"]


@dataclass(kw_only=True)
class UnrolledProgram:
    """The captured graph with its cells replaced by batched steps, for graphs the
    :class:`~diagpass.program.runtime.DiagonalProgram` cannot express yet."""

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
        outputs, _, self.last_graph = self.graphs(
            lambda *a: (self.module(*a), None), [*args, *stacks], owned=len(stacks)
        )
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


def carried_heads(
    groups: list[StepGroup],
    groups_of_step: list[list[int]],
    plans: list[VariantPlan],
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


def build_unrolled(
    *,
    gm: torch.fx.GraphModule,
    labels: CellLabels,
    templates: TemplateAnalysis,
    schedule: list[list[Cell]],
    config: DiagbatchConfig,
    compiler: StepCompiler,
) -> UnrolledProgram:
    """Rewrite ``gm`` into the step program. Linear in graph size."""
    start = time.perf_counter()
    bindings, cell_of = templates.bindings, labels.cell_of
    plans, stack_members, unread = _variant_plans(gm, labels, templates, config)

    # Groups: per step, the cells of each variant, in layer order.
    groups: list[StepGroup] = []
    groups_of_step: list[list[int]] = []
    for step_index, step in enumerate(schedule):
        made = step_groups(step_index, step, lambda c: bindings[c].variant, plans, labels.num_segments, config)
        groups_of_step.append(list(range(len(groups), len(groups) + len(made))))
        groups.extend(made)

    nodes = list(gm.graph.nodes)
    time_of = _node_times(nodes, cell_of, schedule)
    # A step that carries needs the next segment's input before it: that input moves earlier,
    # which is only safe where nothing outside the cells writes in place.
    heads = {} if placement.has_mutation(nodes, cell_of) else carried_heads(groups, groups_of_step, plans, bindings, cell_of, time_of)
    for variant, plan in enumerate(plans):  # a template no step carries for does not pay the head's copy
        if plan.carry is not None and not any(groups[g].variant == variant for g in heads):
            plan.carry = None
    _check_step_times(nodes, cell_of, time_of)
    outside = [n for n in nodes if n.op not in ("placeholder", "output") and n not in cell_of]
    outside.sort(key=lambda n: time_of[n])  # stable: graph order within a time

    member_nodes, layouts = _stack_layouts(stack_members)
    stacks = WeightStacks(layouts, in_place=config.weights_in_stack)
    runner = StepRunner(groups, plans, compiler, config)
    root = torch.nn.Module()
    root.add_module("stacks", stacks)
    root.add_module("steps", runner)
    emitter = _StepEmitter(groups, groups_of_step, plans, templates, heads)
    member_args = emitter.begin(nodes, member_nodes, len(layouts))
    for node in outside:
        emitter.emit_steps_before(time_of[node])
        emitter.copy(node)
    emitter.emit_steps_before(2 * len(schedule) + 1)
    emitter.copy(next(n for n in nodes if n.op == "output"))
    graph = emitter.graph
    counters["diagpass"]["unread_nodes_erased"] += placement.erase_unread(graph, [emitter.env[n] for n in unread if n in emitter.env])
    graph.lint()
    for node in outside:  # attributes and submodules the copied nodes read
        if node.op in ("get_attr", "call_module"):
            _copy_attr(gm, root, str(node.target))
    module = torch.fx.GraphModule(root, graph, class_name="DiagonalProgram")
    counters["diagpass"]["programs"] += 1
    counters["diagpass"]["groups"] += len(groups)
    log.debug("built a program of %d steps, %d groups in %.3fs", len(schedule), len(groups), time.perf_counter() - start)
    return UnrolledProgram(
        module=module,
        groups=groups,
        num_steps=len(schedule),
        runner=runner,
        stacks=stacks,
        member_args=member_args,
        graphs=program_graphs(config, name="diagbatch program") if member_args is not None else None,
    )


def _variant_plans(
    gm: torch.fx.GraphModule, labels: CellLabels, templates: TemplateAnalysis, config: DiagbatchConfig
) -> tuple[list[VariantPlan], list[list[torch.fx.Node]], list[torch.fx.Node]]:
    """Per variant: its template module, slot kinds and the layer stacks its ``by_layer`` slots
    read. Also the stacks' members (captured nodes, one list per stack) and the captured nodes
    bound to slots no template reads."""
    bindings = templates.bindings
    stack_members: list[list[torch.fx.Node]] = []
    stack_index: dict[tuple[torch.fx.Node, ...], int] = {}
    plans: list[VariantPlan] = []
    unread: list[torch.fx.Node] = []
    for template in templates.templates:
        layers = sorted({layer for layer, _ in template.cells})
        first_cell: dict[int, Cell] = {}
        for cell in template.cells:
            first_cell.setdefault(cell[0], cell)
        stack_ids: dict[int, int] = {}
        for slot, kind in enumerate(template.slot_kinds):
            if kind != "by_layer":
                continue
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
            VariantPlan(
                name=template.role,
                template=module,
                key=template.key + suffix,
                slot_kinds=list(slot_kinds),  # type: ignore[arg-type]
                in_dims=step_in_dims(slot_kinds),
                layers=layers,
                stack_ids=stack_ids,
                carry=carried_slot(module, list(slot_kinds), template.cells, bindings, labels.cell_of, config),
            )
        )
    return plans, stack_members, unread


def _node_times(nodes: list[torch.fx.Node], cell_of: dict[torch.fx.Node, Cell], schedule: list[list[Cell]]) -> dict[torch.fx.Node, int]:
    """Time of each node: a step d runs at 2d+1; other nodes at the even time after their inputs
    (or, under :data:`placement.LATE`, just before the first step that reads them)."""
    step_of = {cell: i for i, step in enumerate(schedule) for cell in step}
    time_of: dict[torch.fx.Node, int] = {}
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
    return time_of


def _check_step_times(nodes: list[torch.fx.Node], cell_of: dict[torch.fx.Node, Cell], time_of: dict[torch.fx.Node, int]) -> None:
    """The theorem, once more, on the actual node times: no step reads a node that runs after it."""
    for node in nodes:
        cell = cell_of.get(node)
        if cell is not None:
            for i in node.all_input_nodes:
                if i not in cell_of and time_of.get(i, 0) > time_of[node]:
                    raise AssertionError(f"node {i.name} runs after the step of {cell} that reads it")


def _stack_layouts(stack_members: list[list[torch.fx.Node]]) -> tuple[list[torch.fx.Node], list[list[int]]]:
    """The stacks' members, each captured node once, and each stack's layout as indices into them."""
    member_nodes: list[torch.fx.Node] = []
    member_pos: dict[torch.fx.Node, int] = {}
    layouts: list[list[int]] = []
    for members in stack_members:
        for m in members:
            if m not in member_pos:
                member_pos[m] = len(member_nodes)
                member_nodes.append(m)
        layouts.append([member_pos[m] for m in members])
    return member_nodes, layouts


class _StepEmitter:
    """Writes the program's graph: the captured nodes copied in time order, with one ``steps``
    call per group emitted before the first node that runs after its step."""

    def __init__(
        self,
        groups: list[StepGroup],
        groups_of_step: list[list[int]],
        plans: list[VariantPlan],
        templates: TemplateAnalysis,
        heads: dict[int, torch.fx.Node],
    ) -> None:
        self.groups, self.groups_of_step, self.plans, self.heads = groups, groups_of_step, plans, heads
        self.bindings, self.detached = templates.bindings, templates.detached
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.stacks_node: Any = None
        self.emitted_steps = 0

    def copy(self, node: torch.fx.Node) -> None:
        self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])

    def begin(self, nodes: list[torch.fx.Node], member_nodes: list[torch.fx.Node], num_stacks: int) -> list[int] | None:
        """The placeholders and the weight stacks; returns each stack member's argument index
        when every member is an argument (``None``: the module stacks them itself)."""
        placeholders = [node for node in nodes if node.op == "placeholder"]
        for node in placeholders:
            self.copy(node)
        if not all(m.op == "placeholder" for m in member_nodes):
            self.stacks_node = self.graph.call_module("stacks", tuple(self.env[m] for m in member_nodes))
            return None
        # The stacks arrive as arguments after the graph's own: DiagonalProgram builds them
        # outside the module, and so outside a CUDA graph of it.
        index = {node: i for i, node in enumerate(placeholders)}  # linear in graph size
        self.stacks_node = [self.graph.placeholder(f"weight_stack_{i}") for i in range(num_stacks)]
        return [index[m] for m in member_nodes]

    def emit_steps_before(self, time: int) -> None:
        """Every step not yet emitted that runs before ``time`` (step d runs at 2d+1)."""
        while self.emitted_steps < len(self.groups_of_step) and 2 * self.emitted_steps + 1 < time:
            for group_id in self.groups_of_step[self.emitted_steps]:
                self._emit_group(group_id)
            self.emitted_steps += 1

    def _emit_group(self, group_id: int) -> None:
        group, graph, env = self.groups[group_id], self.graph, self.env
        plan = self.plans[group.variant]
        args: list[torch.fx.Node] = []
        for slot, kind in enumerate(plan.slot_kinds):
            if kind == "shared":
                args.append(env[self.bindings[group.cells[0]].inputs[slot]])
            elif kind == "per_cell":
                for c in group.cells:
                    value = env[self.bindings[c].inputs[slot]]
                    if slot in self.detached.get(c, ()):  # truncated BPTT: the model's detach
                        value = graph.call_method("detach", (value,))
                    args.append(value)
        head = self.heads.get(group_id)
        kwargs = {"head": env[head]} if head is not None else {}
        call = graph.call_module("steps", (group_id, self.stacks_node, *args), kwargs)
        call.meta["diagpass_group"] = group_id
        index = 0
        for cell in group.cells:
            for out in self.bindings[cell].outputs:
                item = graph.call_function(operator.getitem, (call, index))
                item.meta = dict(out.meta)
                env[out] = item
                index += 1
        if head is not None:  # the same values, now lane 0 of the buffer the next step reads in place
            item = graph.call_function(operator.getitem, (call, index))
            item.meta = dict(head.meta)
            env[head] = item
