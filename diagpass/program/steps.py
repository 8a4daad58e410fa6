"""Batched steps: one call runs the cells of one diagonal that share a template variant.

* :class:`VariantPlan`: a template variant ready to batch (its module, slot kinds, weight stacks);
* :class:`StepGroup`: the cells of one step that one batched call runs, and their lanes;
* :class:`WeightStacks`: the per-layer inputs stacked once as ``[L, ...]``;
* :class:`StepRunner`: gathers a group's inputs (lane views where they already lie in
  place), calls the compiled step from the :class:`~diagpass.lower.StepCompiler` cache, and
  hands each cell its outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

from diagpass import placement
from diagpass.config import DiagbatchConfig
from diagpass.lower import StepCompiler, training_step
from diagpass.passes import Cell
from diagpass.passes.template import SlotKind

__all__ = ["StepGroup", "VariantPlan", "WeightStacks", "TrainableStack", "StepRunner", "lane_view", "stack_lanes", "step_in_dims"]


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
class VariantPlan:
    """A template variant ready to batch."""

    name: str
    """What it runs: ``steady``, ``first segment``, ``last segment``, ``short tail (n=...)``..."""
    template: torch.fx.GraphModule
    """One cell: a placeholder per slot, a tuple of outputs (attention rewrites applied)."""
    key: str
    """Compile-cache key: equal keys mean interchangeable compiled steps."""
    slot_kinds: list[SlotKind]
    """Per slot: ``shared``, ``by_layer``, ``per_cell`` or ``unused`` (no longer read)."""
    in_dims: list[int | None]
    layers: list[int]
    """Sorted layers of the variant's cells; a by_layer stack is indexed by position here."""
    stack_ids: dict[int, int]
    """by_layer slot -> index into the program's weight stacks."""
    config: DiagbatchConfig | None = None
    """Overrides the program's config for this variant's steps (e.g. an eager short tail)."""
    single_lane: bool = False
    """At most one cell per step (the first segment's variant): never padded to ``min_lanes``."""
    carry: tuple[int, int] | None = None
    """``(slot, output)``: output ``output`` of lane l is slot ``slot`` of lane l+1 at the next
    step (the hidden states). Every step of the variant then writes that output one lane up,
    after a ``head`` (:func:`diagpass.lower.with_carry`). ``None``: no such pair was found."""
    length: int | None = None
    """A short tail's length ``n`` where the template takes it as a trailing int input
    (``short_tail="dynamic"``: one compiled step, dynamic in ``n``, for every short length)."""


_IN_PLACE = ("members live in the stack",)


class WeightStacks(torch.nn.Module):
    """Per-layer inputs (weights, buffers) stacked once as ``[L, ...]``.

    Restacked only when an input changed: another tensor, or an in-place update
    (``Tensor._version``), so a stale copy is never used. The stacks cost one extra
    copy of the per-layer weights; ``extra_bytes`` reports it. With ``in_place``
    (``weights_in_stack``), the members are moved into their stack instead (each becomes a view
    of its lane, ``tensor.data = stack[l]``): no extra copy, and in-place updates (an optimizer
    step) write the stack itself, so nothing is restacked.
    """

    def __init__(self, layouts: list[list[int]], *, in_place: bool = False) -> None:
        super().__init__()
        self.layouts = layouts  # per stack: positions of its members in forward's args
        self.in_place = in_place
        self._stamps: list[tuple[Any, ...] | None] = [None] * len(layouts)  # _IN_PLACE: members live in the stack
        self._stacks: list[torch.Tensor | None] = [None] * len(layouts)

    @property
    def extra_bytes(self) -> int:
        """Bytes the stacks hold beyond the members' own storage (0 for stacks the members live in)."""
        return sum(
            stack.numel() * stack.element_size()
            for stack, stamp in zip(self._stacks, self._stamps)
            if stack is not None and stamp != _IN_PLACE
        )

    def _refresh(self, i: int, tensors: list[torch.Tensor]) -> None:
        """Stack ``tensors`` unless stack ``i`` is up to date (or they live in it)."""
        stack = self._stacks[i]
        if self._stamps[i] == _IN_PLACE and stack is not None and _lanes_of(stack, tensors):
            return  # the members are views of the stack's lanes: it is current by construction
        stamp = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors)
        if stamp == self._stamps[i]:
            return
        with torch.no_grad():
            stack = torch.stack([t.detach() for t in tensors])  # [L, ...]
        self._stacks[i] = stack
        self._stamps[i] = stamp
        counters["diagpass"]["weight_restacks"] += 1
        if self.in_place and all(t.is_leaf and t._base is None for t in tensors):
            for lane, tensor in enumerate(tensors):
                tensor.data = stack[lane]  # the member now lives in the stack (its values unchanged)
            self._stamps[i] = _IN_PLACE
            counters["diagpass"]["weights_moved_into_stacks"] += len(tensors)

    def forward(self, *members: torch.Tensor) -> list[torch.Tensor | TrainableStack]:
        """The stacks; with autograd on, a stack whose members require grad comes as a
        :class:`TrainableStack`, whose lanes send their gradients to those members."""
        for i, layout in enumerate(self.layouts):
            self._refresh(i, [members[j] for j in layout])
        stacks: list[torch.Tensor | TrainableStack] = list(self._stacks)  # type: ignore[arg-type]
        if torch.is_grad_enabled():
            for i, layout in enumerate(self.layouts):
                tensors = [members[j] for j in layout]
                if any(t.requires_grad for t in tensors):
                    stacks[i] = TrainableStack(self._stacks[i], tensors)  # type: ignore[arg-type]
        return stacks


def _lanes_of(stack: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` are exactly the lanes of ``stack`` (same storage, offsets, shapes)."""
    if len(tensors) != stack.shape[0]:
        return False
    storage = stack.untyped_storage().data_ptr()
    return all(
        t.untyped_storage().data_ptr() == storage
        and t.storage_offset() == stack.storage_offset() + lane * stack.stride(0)
        and t.shape == stack.shape[1:]
        and t.stride() == stack.stride()[1:]
        and t.dtype == stack.dtype
        for lane, t in enumerate(tensors)
    )


class _StackLanes(torch.autograd.Function):
    """Lanes of a weight stack (a detached copy of per-layer tensors), differentiable with respect
    to those tensors: backward hands each layer its lane's gradient directly. Slicing a stack
    built in the autograd graph instead would, at every step, materialise a zero gradient the
    size of the whole stack (``slice_backward``) and add it up: a copy of all the weights in
    memory and its traffic per step."""

    @staticmethod
    def forward(ctx: Any, stack: torch.Tensor, lanes: tuple[int, ...], contiguous: bool, *members: torch.Tensor) -> torch.Tensor:
        ctx.lanes, ctx.count = lanes, len(members)
        if contiguous:
            return stack[lanes[0] : lanes[0] + len(lanes)]  # [G, ...], a view: nothing saved per step
        return stack.index_select(0, torch.tensor(lanes, device=stack.device))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads: list[torch.Tensor | None] = [None] * ctx.count
        for lane, layer in enumerate(ctx.lanes):  # padded lanes repeat a layer: add their (zero) share
            grads[layer] = grad[lane] if grads[layer] is None else grads[layer] + grad[lane]
        return (None, None, None, *grads)


@dataclass
class TrainableStack:
    """A weight stack whose per-layer members require grad (:class:`WeightStacks` under autograd)."""

    stack: torch.Tensor
    """The stacked copy, ``[L, ...]``, refreshed when a member changes (an optimizer step)."""
    members: list[torch.Tensor]
    """The per-layer tensors, in stack order: they receive the gradients."""

    def lanes(self, lanes: Sequence[int], contiguous: bool) -> torch.Tensor:
        """``stack[lanes]`` (``[G, ...]``) in the autograd graph of the members."""
        return _StackLanes.apply(self.stack, tuple(lanes), contiguous, *self.members)


def stack_lanes(stack: torch.Tensor | TrainableStack, lanes: Sequence[int], contiguous: bool) -> torch.Tensor:
    """The lanes of a by-layer stack one step reads, ``[G, ...]``: a view when contiguous."""
    if isinstance(stack, TrainableStack):
        return stack.lanes(lanes, contiguous)
    if contiguous:
        return stack[lanes[0] : lanes[0] + len(lanes)]  # no copy
    return stack.index_select(0, torch.tensor(list(lanes), device=stack.device))


class StepRunner(torch.nn.Module):
    """Runs one :class:`StepGroup`: gather inputs, call the compiled step, scatter outputs."""

    def __init__(
        self, groups: list[StepGroup], plans: list[VariantPlan], compiler: StepCompiler, config: DiagbatchConfig
    ) -> None:
        super().__init__()
        self.groups = groups
        self.plans = plans
        self.compiler = compiler
        self.config = config
        self.compile_s = 0.0
        self.batched_gemms = 0
        self.used_steps: dict[int, Any] = {}  # id -> CompiledStep this program ran
        self._resolved: dict[tuple[Any, ...], Any] = {}  # (group id, carry, grads) -> its CompiledStep
        self._readonly: dict[int, bool] = {}  # id(plan) -> its template writes no tensor in place

    def _lane_view(self, plan: VariantPlan, values: Sequence[Any]) -> torch.Tensor | None:
        """``values`` as one ``[G, ...]`` view when they already lie as consecutive lanes of
        one tensor (``config.lane_views``, templates that write nothing in place)."""
        if not self.config.lane_views:
            return None
        readonly = self._readonly.get(id(plan))
        if readonly is None:
            readonly = self._readonly[id(plan)] = not placement.has_mutation(list(plan.template.graph.nodes), {})
        return lane_view(values) if readonly else None

    def forward(
        self, group_id: int, stacks: list[torch.Tensor | TrainableStack], *inputs: Any, head: torch.Tensor | None = None
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
                args.append(stack_lanes(stacks[plan.stack_ids[slot]], group.lanes, group.contiguous))  # [G, ...]
        carry = None
        if plan.carry is not None:
            # Every step of a carrying template carries, so a template compiles once per
            # lane count. Without a next segment to start, lane 0 of the step's own input for
            # that slot fills the head's lane (one lane copied, never read).
            carry = plan.carry[1]
            args.append(head if head is not None else args[plan.carry[0]][0])
        else:
            assert head is None, "a head for a template without a proven carry"
        if plan.length is not None:
            args.append(plan.length)
        resolved_key = (group_id, carry, training_step(args))  # autograd's needs change the compiled step
        step = self._resolved.get(resolved_key)
        if step is None:  # a group's argument layouts never change: look its step up once
            step, fresh = self.compiler.get(
                key=plan.key,
                template=plan.template,
                in_dims=plan.in_dims,
                args=args,
                batch=num_lanes,
                config=plan.config or self.config,
                static=[kind == "by_layer" for kind in plan.slot_kinds] + [False] * (plan.length is not None),
                carry=carry,
                dynamic=plan.length is not None,
            )
            self._resolved[resolved_key] = step
            if id(step) not in self.used_steps:
                self.used_steps[id(step)] = step
                self.batched_gemms += step.batched_gemms
            if fresh:
                self.compile_s += step.compile_s
        if self.config.checkpoint_steps and torch.is_grad_enabled() and _requires_grad(args):
            # Keep only the step's inputs; backward runs the step again (random state restored).
            outputs = checkpoint(step.fn, *args, use_reentrant=False)
            counters["diagpass"]["checkpointed_steps"] += 1
        else:
            outputs = step.fn(*args)
        if step.late_compile_s:
            self.compile_s += step.late_compile_s
            step.late_compile_s = 0.0
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


def _requires_grad(args: Sequence[Any]) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


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


def step_in_dims(slot_kinds: list[str]) -> list[int | None]:
    """vmap's in_dims for a template's slots: stacked slots along dim 0, the others unbatched."""
    return [0 if kind in ("per_cell", "by_layer") else None for kind in slot_kinds]
