"""The rerolled program: one proven segment template, run for any number of segments.

Built once from the exemplar probe and a :class:`~diagpass.passes.reroll.RerollPlan`:

* ``pre``: a ``GraphModule`` for what runs before the loop;
* per unit form (the first segment, every later one): the nodes outside the layers as
  small ``GraphModule`` *chunks*, one per phase (before layer 0, between layers l and l+1,
  after the last layer), whose int literals are computed from ``s`` and ``n``; and the
  cells, whose slots read the unit, the previous unit's state or the inputs;
* ``post``: a ``GraphModule`` for what reads several segments (the ``cat`` of logits).

:meth:`RerolledProgram.run` loops over the diagonals: at even times the chunks, at odd
times one batched step per template variant (first segment, steady, short last segment)
through the same :class:`~diagpass.runtime.StepRunner` and compiled-step cache as the
``diagbatch`` backend. Values are dropped after their last reader, so nothing grows with
the number of segments but the outputs.

Carried lanes (``carry_lanes``): lane l of a steady diagonal feeds lane l+1 of the next (the
hidden states, layer l to layer l+1), and lane 0 of the next is the new segment's input.
Where that is proven on the template's refs (:meth:`RerolledProgram._find_carry`), the new
segment's first chunk runs one step early and the step writes its hidden states one lane up
after it (:func:`diagpass.lower.with_carry`): the next step reads all its hidden states in
place, as a lane view, instead of stacking a copy.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

from diagpass.config import DiagbatchConfig
from diagpass import placement
from diagpass.graphs import program_graphs
from diagpass.hoist import HoistedChunk, split_invariant
from diagpass.lower import StepCompiler, compile_chunk, prepare_attention, use_batched_attention
from diagpass.passes import CellLabels, TemplateAnalysis, build_template_module
from diagpass.passes.reroll import Fit, RerollError, RerollPlan, UnitForm, per_segment_list, walk_arg
from diagpass.runtime import (
    StepGroup,
    StepRunner,
    WeightStacks,
    _VariantPlan,
    carried_slot,
    contiguous_groups,
    step_in_dims,
)

log = logging.getLogger("diagpass.reroll")

COMPILE_CHUNK_DEVICES: tuple[str, ...] = ("cuda",)
"""Devices on which the segment chunks that do not read ``s`` run as Inductor kernels
(``compiler="inductor"``). CPU runs them eagerly: its C++ compile costs more than it saves."""

HOIST_INVARIANT = True
"""Run the part of each segment chunk that is the same for every segment once per run
(:mod:`diagpass.hoist`): 11 of the 13 kernels of a Llama segment's prologue (the rotary
tables)."""

__all__ = ["RerolledProgram", "RunStats"]

Ref = tuple[Any, ...]
_LAYOUT_CACHE = 16


@dataclass(kw_only=True)
class _Chunk:
    module: torch.fx.GraphModule
    ext: list[Ref]
    """Refs of the module's inputs after ``s`` and ``n``."""
    outputs: list[int]
    """Unit positions the module returns."""
    s_free: bool = False
    """Whether what runs (``hoisted.variant`` or ``module``) ignores ``s``: then it can be
    compiled once for every segment."""
    hoisted: HoistedChunk | None = None
    """The module split into what is the same for every segment (run once per run and
    length) and the rest (:mod:`diagpass.hoist`); ``None``: run ``module`` as is."""


@dataclass(kw_only=True)
class _Form:
    """One unit form: its chunks by phase, its cells by layer, when its values die."""

    name: str
    chunks: dict[int, _Chunk]
    cell_inputs: list[list[Ref]]
    """Per layer, the ref of each template input slot."""
    cell_outputs: list[list[int]]
    """Per layer, the unit positions of the template outputs."""
    frees: dict[int, list[int]]
    """Phase -> positions whose last reader ran at that phase."""
    collect: dict[int, list[int]]
    """Position -> indices of the per-segment lists (``ALL`` refs) it goes into."""


@dataclass(kw_only=True)
class RunStats:
    """One run of the rerolled program."""

    segments: int
    last_length: int
    steps: int
    batched_calls: int
    compile_s: float
    """Inductor time spent in this run (new step shapes only)."""
    peak_live_segments: int = 0
    """Most segments whose values were alive at once (bounded by L+2, whatever S is)."""
    carried_steps: int = 0
    """Steps that wrote their hidden states one lane up, for the next step to read in place
    (``carry_lanes``)."""
    graph: str = "off"
    """How the run used a CUDA graph of the whole program (:class:`~diagpass.graphs.ProgramGraphs`):
    ``"off"``, ``"warm-up"`` (first call at this length), ``"captured"``, ``"replayed"`` or
    ``"uncaptured: <reason>"``."""


@dataclass(kw_only=True)
class _Layout:
    groups: list[StepGroup]
    by_step: list[list[int]]
    runner: StepRunner


class RerolledProgram:
    """Runs the proven template for any ``(S, n)``. See the module docstring."""

    def __init__(
        self,
        *,
        plan: RerollPlan,
        gm: torch.fx.GraphModule,
        labels: CellLabels,
        templates: TemplateAnalysis,
        keys: dict[torch.fx.Node, Hashable],
        config: DiagbatchConfig,
        compiler: StepCompiler,
    ) -> None:
        self.plan = plan
        self.gm = gm
        self.config = config
        self.compiler = compiler
        self.num_layers = plan.num_layers
        self.segment_size = plan.segment_size
        split = plan.split
        self._keys = keys
        self._collect_refs: list[tuple[int, int]] = []  # (p0, p) per ALL list
        for refs in plan.post_refs + [plan.output_refs]:
            for ref in refs:
                if ref[0] == "ALL" and (ref[1], ref[2]) not in self._collect_refs:
                    self._collect_refs.append((ref[1], ref[2]))
        self._last_needed = {r[1] for refs in plan.post_refs + [plan.output_refs] for r in refs if r[0] == "LAST"}

        # Variants: the steady template (every unit after the first), the first segment's.
        steady_t = next(t for t in templates.templates if t.role == "steady")
        first_cells = [(layer, 0) for layer in range(self.num_layers)]
        first_t = templates.templates[templates.bindings[first_cells[0]].variant]
        if any(templates.bindings[c].variant != first_t.variant for c in first_cells):
            raise RerollError("the layers of the first segment do not share one template")
        if any(templates.bindings[(layer, 1)].variant != steady_t.variant for layer in range(self.num_layers)):
            raise RerollError("the layers of the second segment do not share the steady template")
        self._steady_template = steady_t
        self._bindings = templates.bindings

        # Weight stacks: one per by_layer slot, members keyed by graph input.
        self._stack_members: list[list[Hashable]] = []
        self._plans: dict[str, _VariantPlan] = {}
        for name, template in (("steady", steady_t), ("first", first_t)):
            module = build_template_module(template, templates.bindings, gm)
            # A mask proven causal for every cell of the probe becomes is_causal (lower.py): the
            # template stops reading it, and the chunks stop computing it (_build_form).
            cells = template.cells
            suffix = prepare_attention(
                module, lambda slot, cells=cells: [templates.bindings[c].inputs[slot] for c in cells], gqa=config.gqa_attention
            )
            kinds = placement.unused_slots(module, template.slot_kinds) if placement.DROP_UNUSED else template.slot_kinds
            key = template.key + suffix
            self._plans[name] = self._variant_plan(key, module, list(kinds), template.cells)
        self._member_keys = [k for members in self._stack_members for k in members]
        offset = 0
        layouts = []
        for members in self._stack_members:
            layouts.append(list(range(offset, offset + len(members))))
            offset += len(members)
        self.stacks = WeightStacks(layouts)

        # ("P", r) reads of a unit after the first, as (r, layer of the reading cell).
        self._next_reads = [
            (ref[1], layer)
            for layer in range(self.num_layers)
            for node in templates.bindings[(layer, 1)].inputs
            for ref in [self._to_ref(node, 1, plan.steady)]
            if ref[0] == "P"
        ]
        self._forms = {
            "first": self._build_form("first", plan.first, 0, first_cells, literals=plan.first.literals),
            "steady": self._build_form(
                "steady", plan.steady, 1, [(layer, 1) for layer in range(self.num_layers)], fits=plan.fits
            ),
        }
        # A short last segment runs the template as captured (its mask is not proven causal at
        # other lengths), so its unit computes every slot: the steady nodes, all slots read.
        self._forms["tail"] = self._build_form(
            "tail", plan.steady, 1, [(layer, 1) for layer in range(self.num_layers)], fits=plan.fits, all_slots=True
        )
        self._carry_position = self._find_carry(labels.cell_of)
        self.carry = self._plans["steady"].carry
        """``(slot, output)`` of the steady template's carried lanes, or ``None``."""
        self._pre = self._build_outer("pre")
        self._post = self._build_outer("post")
        self._layouts: OrderedDict[tuple[int, int], _Layout] = OrderedDict()
        self._chunk_cache: dict[tuple[Any, ...], Callable[..., Any] | None] = {}  # see _chunk_kernels
        self._tail_plans: dict[int, _VariantPlan] = {}
        self._key_order: dict[frozenset[Hashable], list[Hashable]] = {}
        self.graphs = program_graphs(config, name="diagpass.compile program")

    # -- construction -------------------------------------------------------------------------

    def _find_carry(self, cell_of: dict[torch.fx.Node, Any]) -> int | None:
        """Set the steady template's ``plan.carry`` and return the unit position of layer 0's
        input for that slot (``None``: no carry).

        The pairing (output k of layer l is the slot's input at layer l+1) is
        :func:`~diagpass.runtime.carried_slot`'s, on the probe's cells. Here, in addition, layer
        0's input must come from the unit's first chunk reading only the graph's inputs and
        ``pre`` values, so that it can run one step early, while the step before writes that
        buffer.
        """
        plan, form = self._plans["steady"], self._forms["steady"]
        carry = carried_slot(
            plan.template, plan.slot_kinds, self._steady_template.cells, self._bindings, cell_of, self.config
        )
        if carry is None:
            return None
        prologue = form.chunks.get(0)
        head = form.cell_inputs[0][carry[0]]
        if prologue is None or head[0] != "L" or head[1] not in prologue.outputs:
            return None
        if any(ref[0] not in ("G", "PRE") for ref in prologue.ext):
            return None
        plan.carry = carry
        log.debug("steady template: output %d carries into slot %d of the next layer", carry[1], carry[0])
        return head[1]

    def _variant_plan(
        self, key: str, module: torch.fx.GraphModule, slot_kinds: list[Any], cells: list[tuple[int, int]]
    ) -> _VariantPlan:
        stack_ids: dict[int, int] = {}
        first_of_layer: dict[int, tuple[int, int]] = {}
        for cell in cells:
            first_of_layer.setdefault(cell[0], cell)
        for slot, kind in enumerate(slot_kinds):
            if kind != "by_layer":
                continue
            members = [self._keys[self._bindings[first_of_layer[l]].inputs[slot]] for l in range(self.num_layers)]
            if members not in self._stack_members:
                self._stack_members.append(members)
            stack_ids[slot] = self._stack_members.index(members)
        return _VariantPlan(
            template=module,
            key=key,
            slot_kinds=list(slot_kinds),
            in_dims=step_in_dims(slot_kinds),
            layers=list(range(self.num_layers)),
            stack_ids=stack_ids,
        )

    def _to_ref(self, node: torch.fx.Node, segment: int, form: UnitForm) -> Ref:
        split = self.plan.split
        if node.op == "placeholder":
            return ("G", self._keys[node])
        if node in split.pre_index:
            return ("PRE", split.pre_index[node])
        unit = split.unit_of.get(node)
        if unit == segment:
            return ("L", split.position[node])
        if unit == segment - 1 and node in form.prev_reads:
            return ("P", form.prev_reads.index(node))
        raise RerollError(f"cell input {node.name} comes from neither its segment, the one before, nor the inputs")

    def _build_form(
        self,
        name: str,
        form: UnitForm,
        segment: int,
        cells: list[tuple[int, int]],
        *,
        literals: list[int] | None = None,
        fits: list[Fit] | None = None,
        all_slots: bool = False,
    ) -> _Form:
        split = self.plan.split
        kinds = self._steady_template.slot_kinds if all_slots else self._plans["first" if name == "first" else "steady"].slot_kinds
        nodes = split.units[segment]
        cell_layer: list[int | None] = [op[4] for op in form.form]
        # Phase of each position: a cell of layer l at 2l+1, other nodes at the even time after their inputs.
        phase: list[int] = []
        for pos, refs in enumerate(form.refs):
            layer = cell_layer[pos]
            if layer is not None:
                phase.append(2 * layer + 1)
                continue
            p = max((phase[r[1]] for r in refs if r[0] == "L"), default=0)
            phase.append(p + (p % 2))
        cell_inputs: list[list[Ref]] = []
        cell_outputs: list[list[int]] = []
        for layer, cell in enumerate(cells):
            binding = self._bindings[cell]
            refs = [self._to_ref(n, segment, form) for n in binding.inputs]
            for ref in refs:
                if ref[0] == "L" and phase[ref[1]] >= 2 * layer + 1:
                    raise RerollError(
                        f"layer {layer} of segment {segment} reads {nodes[ref[1]].name}, which needs a later layer"
                    )
            cell_inputs.append(refs)
            cell_outputs.append([split.position[n] for n in binding.outputs])

        # Readers of each position: own unit (at their phase; cells through the slots their
        # template still reads), the next unit's cells (the state), post.
        last_read: dict[int, int] = {}
        for pos, refs in enumerate(form.refs):
            if cell_layer[pos] is None:
                for ref in refs:
                    if ref[0] == "L":
                        last_read[ref[1]] = max(last_read.get(ref[1], -1), phase[pos])
        for layer, refs in enumerate(cell_inputs):
            for ref, kind in zip(refs, kinds):
                if ref[0] == "L" and kind != "unused":
                    last_read[ref[1]] = max(last_read.get(ref[1], -1), 2 * layer + 1)
        exports = self.plan.exports["first" if name == "first" else "steady"]
        for rank, layer in self._next_reads:  # the next unit's cells read this unit's state
            last_read[exports[rank]] = max(last_read.get(exports[rank], -1), 2 * layer + 3)
        collect: dict[int, list[int]] = {}
        for index, (p0, p) in enumerate(self._collect_refs):
            collect.setdefault(p0 if name == "first" else p, []).append(index)
        # Chunks: the nodes outside the layers, grouped by phase.
        by_phase: dict[int, list[int]] = {}
        for pos, layer in enumerate(cell_layer):
            if layer is None:
                by_phase.setdefault(phase[pos], []).append(pos)
        read_later = {pos for pos, when in last_read.items() if when > phase[pos]}  # not only in its own chunk
        needed_outside = read_later | set(collect) | (self._last_needed if name != "first" else set())
        chunks = {
            ph: self._build_chunk(nodes, form, positions, phase, needed_outside, literals=literals, fits=fits)
            for ph, positions in by_phase.items()
        }
        # Free only what is ever stored (chunk and cell outputs), after its last reader.
        stored = {p for chunk in chunks.values() for p in chunk.outputs} | {p for out in cell_outputs for p in out}
        frees: dict[int, list[int]] = {}
        for pos in sorted(stored):
            frees.setdefault(max(last_read.get(pos, -1), phase[pos]), []).append(pos)
        return _Form(
            name=name, chunks=chunks, cell_inputs=cell_inputs, cell_outputs=cell_outputs, frees=frees, collect=collect
        )

    def _build_chunk(
        self,
        nodes: list[torch.fx.Node],
        form: UnitForm,
        positions: list[int],
        phase: list[int],
        needed_outside: set[int],
        *,
        literals: list[int] | None,
        fits: list[Fit] | None,
    ) -> _Chunk:
        graph = torch.fx.Graph()
        s_node, n_node = graph.placeholder("s"), graph.placeholder("n")
        ext: list[Ref] = []
        ext_nodes: dict[Ref, torch.fx.Node] = {}
        env: dict[int, torch.fx.Node] = {}
        exprs: dict[int, Any] = {}
        mine = set(positions)

        def hole(slot: int) -> Any:
            if literals is not None:
                return literals[slot]
            assert fits is not None
            fit = fits[slot]
            if fit.constant:
                return fit.a
            if slot not in exprs:
                value: Any = fit.a
                if fit.b:
                    term = graph.call_function(operator.mul, (s_node, fit.b))
                    value = graph.call_function(operator.add, (value, term)) if value else term
                if fit.c:
                    term = graph.call_function(operator.mul, (n_node, fit.c))
                    value = graph.call_function(operator.add, (value, term)) if not isinstance(value, int) or value else term
                exprs[slot] = value
            return exprs[slot]

        for pos in positions:
            node = nodes[pos]
            refs = iter(form.refs[pos])
            slots = iter(form.slots_of[pos])

            def on_node(arg: torch.fx.Node, refs: Any = refs) -> torch.fx.Node:
                ref = next(refs)
                if ref[0] == "L" and ref[1] in mine:
                    return env[ref[1]]
                if ref not in ext_nodes:
                    ext_nodes[ref] = graph.placeholder(f"in{len(ext)}_{arg.name}")
                    ext.append(ref)
                return ext_nodes[ref]

            def on_int(_: int, slots: Any = slots) -> Any:
                return hole(next(slots))

            args = walk_arg(node.args, on_node, on_int)
            kwargs = walk_arg(node.kwargs, on_node, on_int)
            new = graph.create_node(node.op, node.target, args, kwargs, name=node.name)
            new.meta = dict(node.meta)
            env[pos] = new
        outputs = [p for p in positions if p in needed_outside]
        graph.output(tuple(env[p] for p in outputs))
        graph.eliminate_dead_code()  # e.g. a mask no template reads any more
        module = torch.fx.GraphModule(self.gm, graph, class_name="SegmentChunk")
        hoisted = None
        if HOIST_INVARIANT:
            same_every_segment = [i for i, ref in enumerate(ext) if ref[0] in ("G", "PRE")]
            hoisted = split_invariant(module, global_inputs=same_every_segment, owner=self.gm)
            if hoisted is not None:
                counters["diagpass"]["chunk_nodes_hoisted"] += hoisted.moved
        runs = hoisted.variant if hoisted is not None else module
        s_free = not next(n for n in runs.graph.nodes if n.op == "placeholder").users
        return _Chunk(module=module, ext=ext, outputs=outputs, hoisted=hoisted, s_free=s_free)

    def _chunk_kernels(
        self, chunk: _Chunk, fn: torch.fx.GraphModule, n: int, args: list[Any]
    ) -> Callable[..., Any] | None:
        """Inductor's kernels for a chunk that does not read ``s``, compiled once per length
        and argument layouts; ``None`` (run it eagerly) off ``COMPILE_CHUNK_DEVICES`` or
        without the Inductor step compiler."""
        if self.config.compiler != "inductor":
            return None
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or torch.is_grad_enabled() or any(t.device.type not in COMPILE_CHUNK_DEVICES for t in tensors):
            return None
        key = (id(chunk), n, tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else repr(a) for a in args))
        if key not in self._chunk_cache:
            try:
                self._chunk_cache[key] = compile_chunk(fn, 0, n, args, self.config)
            except Exception as exc:  # noqa: BLE001 - the eager chunk is always there
                log.warning("segment chunk not compiled, runs eagerly: %s: %s", type(exc).__name__, exc)
                self._chunk_cache[key] = None
        return self._chunk_cache[key]

    def _build_outer(self, which: str) -> tuple[torch.fx.GraphModule, list[Ref]]:
        """``pre`` (inputs -> every pre value) or ``post`` (refs -> the graph's outputs)."""
        split = self.plan.split
        graph = torch.fx.Graph()
        ext: list[Ref] = []
        ext_nodes: dict[Ref, torch.fx.Node] = {}
        env: dict[torch.fx.Node, torch.fx.Node] = {}

        def external(ref: Ref, name: str) -> torch.fx.Node:
            if ref not in ext_nodes:
                ext_nodes[ref] = graph.placeholder(f"in{len(ext)}_{name}")
                ext.append(ref)
            return ext_nodes[ref]

        def on_node(arg: torch.fx.Node) -> torch.fx.Node:
            if arg in env:
                return env[arg]
            if arg.op == "placeholder":
                return external(("G", self._keys[arg]), arg.name)
            if arg in split.pre_index:
                return external(("PRE", split.pre_index[arg]), arg.name)
            if arg in split.unit_of:
                return external(("LAST", split.position[arg]), arg.name)
            raise RerollError(f"{arg.name} is read where it is not computed yet")

        def post_arg(arg: Any) -> Any:
            every = per_segment_list(arg, split)
            if every is not None:
                return external(("ALL", *every), arg[1].name + "_all")
            if isinstance(arg, torch.fx.Node):
                return on_node(arg)
            if isinstance(arg, (list, tuple)) and not isinstance(arg, torch.Size):
                items = [post_arg(a) for a in arg]
                return items if isinstance(arg, list) else tuple(items)
            if isinstance(arg, dict):
                return {k: post_arg(v) for k, v in arg.items()}
            if isinstance(arg, slice):
                return slice(post_arg(arg.start), post_arg(arg.stop), post_arg(arg.step))
            return arg

        for node in split.pre if which == "pre" else split.post:
            new = graph.create_node(node.op, node.target, post_arg(node.args), post_arg(node.kwargs), name=node.name)
            new.meta = dict(node.meta)
            env[node] = new
        if which == "pre":
            graph.output(tuple(env[n] for n in split.pre))
        else:
            assert split.output is not None
            graph.output(post_arg(split.output.args[0]))
        return torch.fx.GraphModule(self.gm, graph, class_name=f"Rerolled{which.title()}"), ext

    def _tail_plan(self, n: int) -> _VariantPlan:
        """The steady template with its int literals at segment length ``n``."""
        plan = self._tail_plans.get(n)
        if plan is not None:
            return plan
        template = self._steady_template
        if template.exemplar[1] != 1:
            raise RerollError("the steady template's exemplar is not in segment 1")
        position, slots_of, fits = self.plan.split.position, self.plan.steady.slots_of, self.plan.fits

        def at_length(node: torch.fx.Node) -> tuple[Any, Any]:
            slots = iter(slots_of[position[node]])  # args, then kwargs: the order the proof read them
            args = walk_arg(node.args, lambda a: a, lambda _: fits[next(slots)](1, n))
            return args, walk_arg(node.kwargs, lambda a: a, lambda _: fits[next(slots)](1, n))

        module = build_template_module(
            template, self._bindings, self.gm, rewrite=at_length, class_name="CellTemplateShortTail"
        )
        use_batched_attention(module)
        base = self._plans["steady"]
        plan = _VariantPlan(
            template=module,
            key=f"{template.key}|n={n}",
            slot_kinds=list(template.slot_kinds),  # every slot read: the mask is not proven causal at n
            in_dims=step_in_dims(template.slot_kinds),
            layers=base.layers,
            stack_ids=base.stack_ids,
            config=dataclasses.replace(self.config, compiler=self.config.short_tail)
            if self.config.compiler == "inductor"
            else None,
        )
        self._tail_plans[n] = plan
        return plan

    def _layout(self, segments: int, last: int) -> _Layout:
        key = (segments, last)
        layout = self._layouts.get(key)
        if layout is not None:
            self._layouts.move_to_end(key)
            return layout
        short = last != self.segment_size
        plans = [self._plans["steady"], self._plans["first"]] + ([self._tail_plan(last)] if short else [])
        groups: list[StepGroup] = []
        by_step: list[list[int]] = []
        L = self.num_layers
        for d in range(segments + L - 1):
            by_variant: dict[int, list[tuple[int, int]]] = {}
            for layer in range(max(0, d - segments + 1), min(L - 1, d) + 1):
                s = d - layer
                variant = 1 if s == 0 else (2 if short and s == segments - 1 else 0)
                by_variant.setdefault(variant, []).append((layer, s))
            ids = []
            for variant, cells in sorted(by_variant.items()):
                made = contiguous_groups(
                    step=d,
                    variant=variant,
                    cells=cells,
                    positions=[layer for layer, _ in cells],
                    num_layers=L,
                    limit=min(L, segments),
                    mode=self.config.pad,
                    floor=self.config.min_lanes if variant != 1 else 1,  # one first-segment cell per diagonal: never pad
                )
                for group in made:
                    ids.append(len(groups))
                    groups.append(group)
            by_step.append(ids)
        layout = _Layout(groups=groups, by_step=by_step, runner=StepRunner(groups, plans, self.compiler, self.config))
        self._layouts[key] = layout
        while len(self._layouts) > _LAYOUT_CACHE:
            self._layouts.popitem(last=False)
        return layout

    # -- running ------------------------------------------------------------------------------

    def run(self, inputs: dict[Hashable, Any], segments: int, last: int) -> tuple[tuple[Any, ...], RunStats]:
        """The graph's outputs for ``segments`` segments, the last of length ``last``.

        With ``cudagraph_program`` on (the default) and CUDA inputs, the second call with
        the same ``(segments, last)`` and input layouts captures the whole run in a CUDA
        graph and later calls replay it (:mod:`diagpass.graphs`); ``RunStats.graph`` says which.
        """
        if segments < 2:
            raise RerollError("the rerolled program needs at least 2 segments")
        if last != self.segment_size and not self.plan.short_tail:
            raise RerollError("a short last segment was not proven for this model")
        # Outside any graph: restacking (new weights) happens here, and a replay sees the new
        # stack as a moved argument and captures again instead of reading a stale copy.
        stacks = self.stacks(*[inputs[k] for k in self._member_keys])
        if self.graphs is None:
            outputs, stats = self._run(inputs, stacks, segments, last)
            return outputs, dataclasses.replace(stats, graph="off")
        keys = self._input_order(inputs)
        values = [inputs[k] for k in keys] + list(stacks)

        def program(*args: Any) -> tuple[tuple[Any, ...], RunStats]:
            return self._run(dict(zip(keys, args)), list(args[len(keys) :]), segments, last)

        outputs, stats, how = self.graphs(program, values, key=(segments, last, tuple(keys)))
        fresh = how not in ("replayed", "captured")  # a graph's stats are its capture run's
        return outputs, dataclasses.replace(stats, graph=how, compile_s=stats.compile_s if fresh else 0.0)

    def _input_order(self, inputs: dict[Hashable, Any]) -> list[Hashable]:
        keys = self._key_order.get(frozenset(inputs))
        if keys is None:
            keys = self._key_order[frozenset(inputs)] = sorted(inputs, key=repr)
        return keys

    def _run(
        self, inputs: dict[Hashable, Any], stacks: list[torch.Tensor], segments: int, last: int
    ) -> tuple[tuple[Any, ...], RunStats]:
        layout = self._layout(segments, last)
        runner = layout.runner
        compile_before = runner.compile_s
        pre_module, pre_ext = self._pre
        pre_values = pre_module(*[inputs[r[1]] for r in pre_ext])
        envs: dict[int, dict[int, Any]] = {}
        hoisted: dict[tuple[int, int], Any] = {}  # (id(chunk), n) -> its invariant values
        collected: list[list[Any]] = [[None] * segments for _ in self._collect_refs]
        L = self.num_layers
        T = self.segment_size

        short = last != T

        def form_of(s: int) -> _Form:
            if s == 0:
                return self._forms["first"]
            return self._forms["tail" if short and s == segments - 1 else "steady"]

        def resolve(ref: Ref, s: int) -> Any:
            kind = ref[0]
            if kind == "L":
                return envs[s][ref[1]]
            if kind == "G":
                return inputs[ref[1]]
            if kind == "PRE":
                return pre_values[ref[1]]
            if kind == "P":
                prev = "first" if s == 1 else "steady"
                return envs[s - 1][self.plan.exports[prev][ref[1]]]
            raise RerollError(f"unexpected ref {ref}")

        def store(s: int, form: _Form, pos: int, value: Any) -> None:
            envs[s][pos] = value
            for index in form.collect.get(pos, ()):
                collected[index][s] = value

        def free(s: int, phase: int) -> None:
            form = form_of(s)
            env = envs.get(s)
            if env is None:
                return
            keep = self._last_needed if s == segments - 1 else ()
            for pos in form.frees.get(phase, ()):
                if pos not in keep:
                    env.pop(pos, None)

        def run_chunk(s: int, form: _Form, chunk: _Chunk) -> None:
            n = last if s == segments - 1 else T
            ext_values = [resolve(r, s) for r in chunk.ext]
            split = chunk.hoisted
            if split is None:
                fn, chunk_args = chunk.module, ext_values
            else:
                invariant = hoisted.get((id(chunk), n))
                if invariant is None:  # once per run and length: e.g. the rotary tables
                    invariant = split.invariant(n, *[ext_values[i] for i in split.invariant_inputs])
                    hoisted[(id(chunk), n)] = invariant
                fn, chunk_args = split.variant, [*ext_values, *invariant]
            # A chunk that does not read s (the last norm) runs as Inductor kernels.
            kernels = self._chunk_kernels(chunk, fn, n, chunk_args) if chunk.s_free and form.name != "tail" else None
            values = kernels(*chunk_args) if kernels is not None else fn(s, n, *chunk_args)
            for pos, value in zip(chunk.outputs, values):
                store(s, form, pos, value)

        steady_plan = self._plans["steady"]
        carry_position = self._carry_position
        early: set[int] = set()  # segments whose first chunk ran a step early, for the carry

        def head_for(d: int, group: StepGroup) -> torch.Tensor | None:
            """The carried slot's input of the next step's lane 0, when this group's lanes are
            layers 0..G-1 (no padding) and the next step starts a steady segment."""
            if carry_position is None or runner.plans[group.variant] is not steady_plan:
                return None
            if group.cells[0][0] != 0 or len(group.cells) != len(group.lanes):
                return None
            s = d + 1
            if s >= segments or form_of(s).name != "steady":
                return None
            if s not in early:
                envs.setdefault(s, {})
                run_chunk(s, form_of(s), form_of(s).chunks[0])
                early.add(s)
            return envs[s][carry_position]

        last_time = 2 * (segments - 1) + 2 * L
        peak_live = 0
        carried_steps = 0
        # Under torch.profiler each time gets a range ("diagpass.t<t>"): benchmarks/timeline.py
        # attributes the device's idle gaps to them. Off the profiler this costs one check a run.
        profiling = torch.autograd.profiler._is_profiler_enabled
        for t in range(last_time + 1):
            region = torch.profiler.record_function(f"diagpass.t{t}") if profiling else None
            if region is not None:
                region.__enter__()
            lo, hi = max(0, (t - 2 * L + 1) // 2), min(segments - 1, t // 2)
            if t % 2 == 0:
                for s in range(lo, hi + 1):
                    envs.setdefault(s, {})
                    form = form_of(s)
                    chunk = form.chunks.get(t - 2 * s)
                    if chunk is None or (t == 2 * s and s in early):
                        continue
                    run_chunk(s, form, chunk)
            else:
                d = (t - 1) // 2
                for group_id in layout.by_step[d]:
                    group = layout.groups[group_id]
                    plan = runner.plans[group.variant]
                    args: list[Any] = []
                    for slot, kind in enumerate(plan.slot_kinds):
                        if kind == "shared":
                            layer, s = group.cells[0]
                            args.append(resolve(form_of(s).cell_inputs[layer][slot], s))
                        elif kind == "per_cell":
                            args.extend(resolve(form_of(s).cell_inputs[layer][slot], s) for layer, s in group.cells)
                    head = head_for(d, group)
                    outputs = runner(group_id, stacks, *args, head=head)
                    if head is not None:  # lane 0 of the buffer the next step reads in place
                        *outputs, carried = outputs
                        carried_steps += 1
                        store(d + 1, form_of(d + 1), carry_position, carried)  # type: ignore[arg-type]
                    index = 0
                    for layer, s in group.cells:
                        form = form_of(s)
                        for pos in form.cell_outputs[layer]:
                            store(s, form, pos, outputs[index])
                            index += 1
            for s in range(lo, hi + 1):
                free(s, t - 2 * s)
            peak_live = max(peak_live, len(envs))
            for s in [s for s in envs if s < lo and s != segments - 1]:
                del envs[s]  # every reader of this unit has run
            if region is not None:
                region.__exit__(None, None, None)
        post_module, post_ext = self._post
        post_inputs = []
        for ref in post_ext:
            if ref[0] == "ALL":
                post_inputs.append(collected[self._collect_refs.index((ref[1], ref[2]))])
            elif ref[0] == "LAST":
                post_inputs.append(envs[segments - 1][ref[1]])
            else:
                post_inputs.append(resolve(ref, segments - 1))
        outputs = post_module(*post_inputs)
        stats = RunStats(
            segments=segments,
            last_length=last,
            steps=segments + L - 1,
            batched_calls=len(layout.groups),
            compile_s=runner.compile_s - compile_before,
            peak_live_segments=peak_live,
            carried_steps=carried_steps,
        )
        return tuple(outputs), stats
