"""Plan a diagonal program from the proof: what each unit runs, with which template variant,
and what a step may carry.

The input is a :class:`~diagpass.passes.reroll.RerollPlan`, from either front end:
``prove_reroll`` on the probes of ``diagpass.compile`` (any number of segments) or
``prove_fixed`` on the graph the backend receives (its one number of segments). The output
is a :class:`ProgramPlan`, plain data that :class:`~diagpass.program.runtime.DiagonalProgram`
runs:

* :class:`VariantPlan` per template variant a unit uses, with its weight stacks;
* :class:`UnitPlan` per unit form (``first``, ``steady``, and ``tail`` where the last
  segment's cells have their own variants): its chunks by phase, its cell of every layer,
  and when its values die (:mod:`diagpass.program.lifetime`);
* ``pre`` and ``post`` modules, and the carried-lanes decision with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from diagpass import placement
from diagpass.config import DiagbatchConfig
from diagpass.lower import prepare_attention, use_batched_attention
from diagpass.passes import Cell, CellLabels, TemplateAnalysis, build_template_module
from diagpass.passes.detach import DetachRule, FixedDetaches
from diagpass.passes.reroll import Fit, RerollError, RerollPlan, UnitForm, walk_arg
from diagpass.passes.template import CellTemplate, LengthExpr
from diagpass.program import lifetime
from diagpass.program.chunks import Chunk, Ref, build_chunk, build_outer
from diagpass.program.steps import VariantPlan, step_in_dims

log = logging.getLogger("diagpass.program")

__all__ = ["UnitPlan", "ProgramPlan", "ShortTails", "plan_program", "carried_slot"]


@dataclass(kw_only=True)
class UnitPlan:
    """One unit form: its chunks by phase, its cells by layer, when its values die."""

    name: str
    """``first``, ``steady`` or ``tail``."""
    chunks: dict[int, Chunk]
    """Even phase -> the nodes outside the layers that run then."""
    variants: list[int]
    """Per layer, its cell's variant (an index into :attr:`ProgramPlan.variants`)."""
    cell_inputs: list[list[Ref]]
    """Per layer, the ref of each template input slot."""
    cell_outputs: list[list[int]]
    """Per layer, the unit positions of the template outputs."""
    frees: dict[int, list[int]]
    """Phase -> positions whose last reader ran at that phase."""
    collect: dict[int, list[int]]
    """Position -> indices of the per-segment lists (``ALL`` refs) it goes into."""


@dataclass(kw_only=True)
class ProgramPlan:
    """Everything :class:`~diagpass.program.runtime.DiagonalProgram` runs. See the module doc."""

    num_layers: int
    segment_size: int
    """``T``: the length of every segment but maybe the last (0 where no input is sliced)."""
    num_segments: int | None
    """The one number of segments the plan runs (the backend's graph); ``None``: any."""
    short_tail: bool
    """A last segment shorter than ``T`` is proven (any-length) or present (fixed)."""
    variants: list[VariantPlan]
    units: dict[str, UnitPlan]
    pre: tuple[torch.fx.GraphModule, list[Ref]]
    post: tuple[torch.fx.GraphModule, list[Ref]]
    exports: dict[str, list[int]]
    """``first``/``steady``: position in the previous unit of each ``("P", r)`` read."""
    collect_refs: list[tuple[int, int]]
    """``(p0, p)`` of each per-segment list post reads."""
    post_last: set[int]
    """Positions of the last unit that post reads."""
    post_units: dict[int, set[int]]
    """Segment -> its positions that post reads (a fixed number of segments only)."""
    stack_keys: list[list[Hashable]]
    """Per weight stack, the input key of each layer's member."""
    input_keys: list[Hashable]
    """The key of every graph input, in the graph's order: what :meth:`run` takes."""
    carry: tuple[int, int] | None = None
    """``(slot, output)`` of the steady variant's carried lanes, or ``None``."""
    carry_position: int | None = None
    """The unit position of layer 0's input for the carried slot (the head)."""
    carry_reason: str = ""
    """Why lanes are carried, or why not."""
    tails: ShortTails | None = None
    """Any-length only: the short last segment's variants, per length."""
    decisions: list[str] = field(default_factory=list)
    """What the planner decided, each with its reason (``print(program)``)."""
    detach: DetachRule | None = None
    """Truncated BPTT: which cells read which recurrent inputs detached (the detaches stripped
    from the graph, :mod:`diagpass.passes.detach`); ``None``: none. ``diagpass.compile`` sets
    the rule it fitted over its probes."""

    def unit_of(self, s: int, segments: int, last: int) -> UnitPlan:
        if s == 0:
            return self.units["first"]
        if s == segments - 1 and "tail" in self.units and last != self.segment_size:
            return self.units["tail"]
        return self.units["steady"]


class ShortTails:
    """The steady variants with their int literals at a short length ``n`` (any-length only):
    a short last segment runs its cells through these, one variant per steady one."""

    def __init__(self, planner: _Planner, steady: list[int]) -> None:
        self._planner = planner
        self._steady = sorted(set(steady))
        self._cache: dict[int, dict[int, VariantPlan]] = {}

    def __call__(self, n: int) -> dict[int, VariantPlan]:
        """Steady variant index -> its variant at length ``n``."""
        if n not in self._cache:
            self._cache[n] = {v: self._planner.tail_variant(v, n) for v in self._steady}
        return self._cache[n]


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


class _Planner:
    """Builds a :class:`ProgramPlan` (one use: :func:`plan_program`)."""

    def __init__(
        self,
        *,
        proof: RerollPlan,
        gm: torch.fx.GraphModule,
        labels: CellLabels,
        templates: TemplateAnalysis,
        keys: dict[torch.fx.Node, Hashable],
        config: DiagbatchConfig,
    ) -> None:
        self.proof, self.gm, self.labels, self.keys, self.config = proof, gm, labels, keys, config
        self.templates, self.bindings = templates.templates, templates.bindings
        self.variants: list[VariantPlan] = []
        self._variant_index: dict[int, int] = {}  # template variant -> index into self.variants
        self.stack_keys: list[list[Hashable]] = []

    # -- variants -------------------------------------------------------------------------------

    def variant(self, template_variant: int) -> int:
        """The plan index of a template variant, planned on first use."""
        if template_variant in self._variant_index:
            return self._variant_index[template_variant]
        template = self.templates[template_variant]
        module = build_template_module(template, self.bindings, self.gm)
        # A mask proven causal for every cell becomes is_causal (lower.py): the template stops
        # reading it, and the chunks stop computing it.
        suffix = prepare_attention(
            module,
            lambda slot, cells=template.cells: [self.bindings[c].inputs[slot] for c in cells],
            gqa=self.config.gqa_attention,
        )
        kinds = placement.unused_slots(module, template.slot_kinds) if placement.DROP_UNUSED else template.slot_kinds
        plan = self._variant_plan(template.role, template.key + suffix, module, list(kinds), template)
        self._variant_index[template_variant] = len(self.variants)
        self.variants.append(plan)
        return self._variant_index[template_variant]

    def template_of(self, index: int) -> CellTemplate:
        """The template variant that plan ``index`` was made from."""
        return self.templates[next(v for v, i in self._variant_index.items() if i == index)]

    def _variant_plan(
        self, name: str, key: str, module: torch.fx.GraphModule, kinds: list[Any], template: CellTemplate
    ) -> VariantPlan:
        layers = sorted({layer for layer, _ in template.cells})
        first_of_layer: dict[int, Cell] = {}
        for cell in template.cells:
            first_of_layer.setdefault(cell[0], cell)
        stack_ids: dict[int, int] = {}
        for slot, kind in enumerate(kinds):
            if kind != "by_layer":
                continue
            members = [self.keys[self.bindings[first_of_layer[l]].inputs[slot]] for l in layers]
            if members not in self.stack_keys:
                self.stack_keys.append(members)
            stack_ids[slot] = self.stack_keys.index(members)
        return VariantPlan(
            name=name,
            template=module,
            key=key,
            slot_kinds=kinds,
            in_dims=step_in_dims(kinds),
            layers=layers,
            stack_ids=stack_ids,
            single_lane={s for _, s in template.cells} == {0},
        )

    def tail_variant(self, index: int, n: int) -> VariantPlan:
        """Steady variant ``index`` with its int literals at segment length ``n``.

        With ``short_tail="dynamic"`` the literals that depend on the length read it from the
        template's trailing ``length`` input instead (every ``n`` gets the same template code
        and compile key), so one compiled step serves every short length."""
        base = self.variants[index]
        template = self.template_of(index)
        # The exemplar must be a steady unit's cell: the literal slots are read off that unit.
        cell = next(c for c in sorted(template.cells, key=lambda c: (c[1], c[0])) if c[1] == 1)
        exemplar = dataclasses.replace(template, exemplar=cell, nodes=self.labels.cells[cell])
        split, proof = self.proof.split, self.proof
        dynamic = self.config.short_tail == "dynamic" and self.config.compiler == "inductor"

        def literal(slot: int) -> Any:
            fit = proof.fits[slot]
            if dynamic and isinstance(fit, Fit) and fit.c != 0:
                return LengthExpr(offset=fit.a + fit.b, scale=fit.c)  # fit(1, n) = a + b + c*n
            return fit(1, n)

        def at_length(node: torch.fx.Node) -> tuple[Any, Any]:
            slots = iter(proof.steady.slots_of[split.position[node]])  # args, then kwargs: the proof's order
            args = walk_arg(node.args, lambda a: a, lambda _: literal(next(slots)))
            return args, walk_arg(node.kwargs, lambda a: a, lambda _: literal(next(slots)))

        module = build_template_module(
            exemplar, self.bindings, self.gm, rewrite=at_length, class_name="CellTemplateShortTail", length_input=dynamic
        )
        use_batched_attention(module)  # the mask is not proven causal at n: every slot is read
        in_dims = step_in_dims(template.slot_kinds)
        if dynamic:  # one compiled step for every n: the length is its last argument
            config, in_dims = dataclasses.replace(self.config, compiler="inductor"), [*in_dims, None]
        elif self.config.compiler == "inductor":
            config = dataclasses.replace(self.config, compiler=self.config.short_tail)
        else:
            config = None
        return dataclasses.replace(
            base,
            name=f"short tail (n={n}{', any length' if dynamic else ''})",
            template=module,
            key=f"{template.key}|n={'any' if dynamic else n}",
            slot_kinds=list(template.slot_kinds),
            in_dims=in_dims,
            config=config,
            carry=None,
            length=n if dynamic else None,
            single_lane=True,  # one tail cell per diagonal: never padded to min_lanes
        )

    # -- units ----------------------------------------------------------------------------------

    def layer_variants(self, segment: int) -> list[int]:
        return [self.variant(self.bindings[(layer, segment)].variant) for layer in range(self.proof.num_layers)]

    def to_ref(self, node: torch.fx.Node, segment: int) -> Ref:
        """Where cell input ``node`` comes from, seen from unit ``segment``."""
        split = self.proof.split
        if node.op == "placeholder":
            return ("G", self.keys[node])
        if node in split.pre_index:
            return ("PRE", split.pre_index[node])
        unit = split.unit_of.get(node)
        if unit == segment:
            return ("L", split.position[node])
        exports = self.proof.exports["first" if segment == 1 else "steady"]
        if unit == segment - 1 and split.position[node] in exports:
            return ("P", exports.index(split.position[node]))
        raise RerollError(f"cell input {node.name} comes from neither its segment, the one before, nor the inputs")

    def unit(
        self,
        name: str,
        form: UnitForm,
        segment: int,
        variants: list[int],
        *,
        kinds: list[list[str]],
        next_reads: list[tuple[int, int]],
        collect_refs: list[tuple[int, int]],
        post_positions: set[int],
    ) -> UnitPlan:
        split = self.proof.split
        phase = lifetime.phases(form)
        cell_inputs: list[list[Ref]] = []
        cell_outputs: list[list[int]] = []
        for layer in range(self.proof.num_layers):
            binding = self.bindings[(layer, segment)]
            refs = [self.to_ref(n, segment) for n in binding.inputs]
            for ref in refs:
                if ref[0] == "L" and phase[ref[1]] >= 2 * layer + 1:
                    node = split.units[segment][ref[1]]
                    raise RerollError(f"layer {layer} of segment {segment} reads {node.name}, which needs a later layer")
            cell_inputs.append(refs)
            cell_outputs.append([split.position[n] for n in binding.outputs])
        offset = 2 if self.config.schedule == "diagonal" else 2 * self.proof.num_layers + 1
        last_read = lifetime.last_reads(form, phase, cell_inputs, kinds, next_reads, offset)
        collect: dict[int, list[int]] = {}
        for index, (p0, p) in enumerate(collect_refs):
            collect.setdefault(p0 if name == "first" else p, []).append(index)
        by_phase: dict[int, list[int]] = {}
        for pos, op in enumerate(form.form):
            if op[4] is None:
                by_phase.setdefault(phase[pos], []).append(pos)
        read_later = {pos for pos, when in last_read.items() if when > phase[pos]}  # not only in its own chunk
        needed_outside = read_later | set(collect) | post_positions
        nodes = split.units[segment]
        literals = form.literals if name == "first" else None
        holes = None if name == "first" else self.proof.fits
        chunks = {
            ph: build_chunk(self.gm, nodes, form, positions, needed_outside, literals=literals, holes=holes)
            for ph, positions in by_phase.items()
        }
        # Free only what is ever stored (chunk and cell outputs), after its last reader.
        stored = {p for chunk in chunks.values() for p in chunk.outputs} | {p for out in cell_outputs for p in out}
        return UnitPlan(
            name=name,
            chunks=chunks,
            variants=variants,
            cell_inputs=cell_inputs,
            cell_outputs=cell_outputs,
            frees=lifetime.frees_by_phase(stored, last_read, phase),
            collect=collect,
        )

    def find_carry(self, steady: UnitPlan) -> tuple[tuple[int, int] | None, int | None, str]:
        """Carried lanes for the steady variant: ``(carry, head position, reason)``.

        The pairing (output k of layer l is the slot's input at layer l+1) is
        :func:`carried_slot`'s, on the variant's cells. In addition, layer 0's input must come
        from the unit's first chunk reading only the graph's inputs and ``pre`` values, so that
        it can run one step early, while the step before writes that buffer.
        """
        if self.config.schedule != "diagonal":
            return None, None, "off: the sequential schedule has no next diagonal to carry into"
        if not (self.config.carry_lanes and self.config.lane_views):
            return None, None, "off: carry_lanes and lane_views must both be on"
        if len(set(steady.variants)) != 1:
            return None, None, "not proven: the layers of a steady segment use more than one variant"
        plan = self.variants[steady.variants[0]]
        cells = self.template_of(steady.variants[0]).cells
        carry = carried_slot(plan.template, plan.slot_kinds, cells, self.bindings, self.labels.cell_of, self.config)
        if carry is None:
            return None, None, "not proven: no output of layer l is the same input of layer l+1 (or the template writes in place)"
        prologue = steady.chunks.get(0)
        head = steady.cell_inputs[0][carry[0]]
        if prologue is None or head[0] != "L" or head[1] not in prologue.outputs:
            return None, None, "not proven: layer 0's input is not computed by the segment's first chunk"
        if any(ref[0] not in ("G", "PRE") for ref in prologue.ext):
            return None, None, "not proven: the segment's first chunk reads more than the inputs"
        plan.carry = carry
        return carry, head[1], f"output {carry[1]} of layer l is slot {carry[0]} of layer l+1: written one lane up, read in place"


def plan_program(
    *,
    proof: RerollPlan,
    gm: torch.fx.GraphModule,
    labels: CellLabels,
    templates: TemplateAnalysis,
    keys: dict[torch.fx.Node, Hashable],
    config: DiagbatchConfig,
) -> ProgramPlan:
    """The :class:`ProgramPlan` of a proven graph (see the module docstring).

    Raises :class:`~diagpass.passes.reroll.RerollError` where the graph is not one the
    program can express (the message says why).
    """
    planner = _Planner(proof=proof, gm=gm, labels=labels, templates=templates, keys=keys, config=config)
    L, fixed = proof.num_layers, proof.num_segments
    decisions: list[str] = []
    steady_variants = planner.layer_variants(1)  # the steady variant first, as in the templates
    first_variants = planner.layer_variants(0)
    tail_variants: list[int] | None = None
    if fixed is not None:
        for s in range(2, fixed):
            mine = planner.layer_variants(s)
            if mine == steady_variants:
                continue
            if s != fixed - 1:
                raise RerollError(f"the layers of segment {s} use other cell variants than those of segment 1")
            tail_variants = mine
    # ("P", r) reads of a unit after the first, as (position in the previous unit, reading layer).
    next_reads: list[tuple[int, int]] = []
    for layer in range(L):
        for node in planner.bindings[(layer, 1)].inputs:
            ref = planner.to_ref(node, 1)
            if ref[0] == "P":
                next_reads.append((ref[1], layer))
    collect_refs: list[tuple[int, int]] = []
    post_last: set[int] = set()
    post_units: dict[int, set[int]] = {}
    for refs in proof.post_refs + [proof.output_refs]:
        for ref in refs:
            if ref[0] == "ALL" and (ref[1], ref[2]) not in collect_refs:
                collect_refs.append((ref[1], ref[2]))
            elif ref[0] == "LAST":
                post_last.add(ref[1])
            elif ref[0] == "UNIT":
                post_units.setdefault(ref[1], set()).add(ref[2])

    def kinds_of(variants: list[int]) -> list[list[str]]:
        return [list(planner.variants[v].slot_kinds) for v in variants]

    def exports_next(name: str) -> list[tuple[int, int]]:
        exports = proof.exports[name]
        return [(exports[r], layer) for r, layer in next_reads]

    last_segment = (fixed or 0) - 1
    units: dict[str, UnitPlan] = {}
    units["first"] = planner.unit(
        "first", proof.first, 0, first_variants, kinds=kinds_of(first_variants), next_reads=exports_next("first"),
        collect_refs=collect_refs, post_positions=post_units.get(0, set()) | (post_last if last_segment == 0 else set()),
    )
    steady_post = set().union(*(post_units.get(s, set()) for s in range(1, max(last_segment, 1))))
    if tail_variants is None:  # the last unit runs the steady form
        steady_post |= post_last | post_units.get(last_segment, set())
    tails: ShortTails | None = None
    if fixed is None:
        # Any length: a short last segment runs the steady template at its length, every slot read.
        all_slots = [list(planner.templates[planner.bindings[(l, 1)].variant].slot_kinds) for l in range(L)]
        units["tail"] = planner.unit(
            "tail", proof.steady, 1, steady_variants, kinds=all_slots, next_reads=exports_next("steady"),
            collect_refs=collect_refs, post_positions=post_last,
        )
        steady_post = post_last
        tails = ShortTails(planner, steady_variants)
        decisions.append("short last segment: the steady template at its length, every slot read (short_tail option)")
    elif tail_variants is not None:
        units["tail"] = planner.unit(
            "tail", proof.steady, last_segment, tail_variants, kinds=kinds_of(tail_variants),
            next_reads=exports_next("steady"), collect_refs=collect_refs,
            post_positions=post_last | post_units.get(last_segment, set()),
        )
        decisions.append(f"segment {last_segment} (the last, shorter) runs its own cell variants")
    units["steady"] = planner.unit(
        "steady", proof.steady, 1, steady_variants, kinds=kinds_of(steady_variants),
        next_reads=exports_next("steady"), collect_refs=collect_refs, post_positions=steady_post,
    )
    carry, carry_position, carry_reason = planner.find_carry(units["steady"])
    detach = FixedDetaches(templates.detached) if fixed is not None and templates.detached else None
    if detach is not None:
        decisions.append(detach.describe() + ": detached before stacking, with autograd on")
    return ProgramPlan(
        num_layers=L,
        segment_size=proof.segment_size,
        num_segments=fixed,
        short_tail=proof.short_tail,
        variants=planner.variants,
        units=units,
        pre=build_outer(gm, proof.split, keys, "pre"),
        post=build_outer(gm, proof.split, keys, "post"),
        exports=proof.exports,
        collect_refs=collect_refs,
        post_last=post_last,
        post_units=post_units,
        stack_keys=planner.stack_keys,
        input_keys=[keys[n] for n in gm.graph.find_nodes(op="placeholder")],
        carry=carry,
        carry_position=carry_position,
        carry_reason=carry_reason,
        tails=tails,
        decisions=decisions,
        detach=detach,
    )
