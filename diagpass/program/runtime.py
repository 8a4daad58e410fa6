"""The diagonal program: run a :class:`~diagpass.program.plan.ProgramPlan` on the schedule.

One class serves both front ends: the ``diagbatch`` backend (the plan of the graph it
received, for its one number of segments) and ``diagpass.compile`` (the plan proven on the
probes, for any number). :meth:`DiagonalProgram.run` walks the times of the
:class:`~diagpass.program.schedule.Layout`: at each, the chunks of the phases that run then,
and the step's batched calls (:class:`~diagpass.program.steps.StepRunner`). Values are
dropped after their last reader (:mod:`diagpass.program.lifetime`), so nothing grows with
the number of segments but the outputs.

Carried lanes (``carry_lanes``): where the plan proved that lane l of a steady step feeds lane
l+1 of the next (the hidden states), the next segment's first chunk runs one step early and
the step writes its hidden states one lane up after it (:func:`diagpass.lower.with_carry`):
the next step reads all of them in place, as a lane view, instead of stacking a copy.

With ``cudagraph_program`` on CUDA, the second call with the same ``(segments, last)`` and
input layouts captures the whole run in a CUDA graph and later calls replay it
(:mod:`diagpass.graphs`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters

from diagpass.config import DiagbatchConfig
from diagpass.graphs import ProgramGraphs, program_graphs
from diagpass.lower import StepCompiler
from diagpass.passes import Cell
from diagpass.program.chunks import Chunk, ChunkKernels, Ref
from diagpass.program.plan import ProgramPlan, UnitPlan
from diagpass.program.schedule import Layout, build_layout
from diagpass.program.steps import StepGroup, StepRunner, WeightStacks

__all__ = ["DiagonalProgram", "RunStats"]

_LAYOUT_CACHE = 16


@dataclass(kw_only=True)
class RunStats:
    """One run of the program."""

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
    cells_per_call: tuple[int, ...] = ()
    """Real cells of each batched call, in order (padding excluded)."""

    @classmethod
    def of_layout(cls, layout: Layout, *, segments: int, last: int, **counts: Any) -> Any:
        """The stats of one run of ``layout`` (``counts``: what the run itself counted)."""
        return cls(
            segments=segments,
            last_length=last,
            steps=len(layout.by_step),
            batched_calls=len(layout.groups),
            cells_per_call=tuple(len(g.cells) for g in layout.groups),
            **counts,
        )


class DiagonalProgram:
    """A proven segment loop, run on the diagonal schedule. ``print(program)`` describes it."""

    def __init__(
        self,
        plan: ProgramPlan,
        *,
        config: DiagbatchConfig,
        compiler: StepCompiler,
        name: str,
        share_stacks: DiagonalProgram | None = None,
    ) -> None:
        """``share_stacks``: another program of the same model (the inference program, for the
        training one) whose weight stacks this one reuses when they stack the same members, so the
        model's weights are stacked once, not once per program."""
        self.plan = plan
        self.config = config
        self.compiler = compiler
        self.name = name
        offset, layouts = 0, []
        for members in plan.stack_keys:
            layouts.append(list(range(offset, offset + len(members))))
            offset += len(members)
        if share_stacks is not None and share_stacks.stacks.layouts == layouts and share_stacks.plan.stack_keys == plan.stack_keys:
            self.stacks = share_stacks.stacks
        else:
            self.stacks = WeightStacks(layouts, in_place=config.weights_in_stack)
        self._member_keys = [k for members in plan.stack_keys for k in members]
        self.graphs: ProgramGraphs | None = program_graphs(config, name=name)
        self.chunk_kernels = ChunkKernels(config)
        self._layouts: OrderedDict[tuple[int, int], Layout] = OrderedDict()
        self._key_order: dict[frozenset[Hashable], list[Hashable]] = {}
        self.last_layout: Layout | None = None
        self.last_stats: RunStats | None = None
        self.fixed_length: tuple[int, int] | None = None
        """``(segments, last length)`` of a program that runs one length only (the backend's)."""

    # -- inspection -----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.plan.num_layers

    @property
    def segment_size(self) -> int:
        return self.plan.segment_size

    @property
    def carry(self) -> tuple[int, int] | None:
        """``(slot, output)`` of the steady variant's carried lanes, or ``None``."""
        return self.plan.carry

    @property
    def groups(self) -> list[StepGroup]:
        """The batched calls of the last run (of the only run, for the backend's program)."""
        return self.layout(*self._default()).groups

    @property
    def runner(self) -> StepRunner:
        runner = self.layout(*self._default()).runner
        assert runner is not None
        return runner

    @property
    def num_steps(self) -> int:
        return len(self.layout(*self._default()).by_step)

    @property
    def last_graph(self) -> str:
        """How the last call used the whole-program CUDA graph."""
        return "off" if self.last_stats is None else self.last_stats.graph

    def _default(self) -> tuple[int, int]:
        if self.last_layout is not None:
            return self.last_layout.segments, self.last_layout.last
        if self.fixed_length is not None:
            return self.fixed_length
        raise ValueError("the program has not run yet: call layout(segments, last) for a length")

    def __str__(self) -> str:
        from diagpass.program.describe import describe

        return describe(self)

    # -- the schedule ---------------------------------------------------------------------------

    def layout(self, segments: int, last: int) -> Layout:
        """The schedule of ``segments`` segments, the last of length ``last`` (cached)."""
        key = (segments, last)
        layout = self._layouts.get(key)
        if layout is not None:
            self._layouts.move_to_end(key)
            return layout
        plan = self.plan
        plans = list(plan.variants)
        tail_index: dict[int, int] = {}
        if plan.tails is not None and last != plan.segment_size:
            for steady, variant in plan.tails(last).items():
                tail_index[steady] = len(plans)
                plans.append(variant)

        def variant_of(cell: Cell) -> int:
            layer, s = cell
            unit = self.unit_of(s, segments, last)
            variant = unit.variants[layer]
            return tail_index.get(variant, variant) if unit.name == "tail" else variant

        layout = self._build_layout(
            segments=segments,
            last=last,
            num_layers=plan.num_layers,
            plans=plans,
            variant_of=variant_of,
            config=self.config,
            compiler=self.compiler,
        )
        self._layouts[key] = layout
        while len(self._layouts) > _LAYOUT_CACHE:
            self._layouts.popitem(last=False)
        return layout

    def _build_layout(self, **kwargs: Any) -> Layout:
        """:func:`~diagpass.program.schedule.build_layout` (a pipeline stage builds its own)."""
        return build_layout(**kwargs)

    def unit_of(self, s: int, segments: int, last: int) -> UnitPlan:
        """The unit form segment ``s`` runs."""
        units = self.plan.units
        if s == 0:
            return units["first"]
        if s == segments - 1 and "tail" in units and (self.plan.num_segments is not None or last != self.segment_size):
            return units["tail"]
        return units["steady"]

    # -- running --------------------------------------------------------------------------------

    def run(self, inputs: dict[Hashable, Any], segments: int, last: int) -> tuple[tuple[Any, ...], RunStats]:
        """The graph's outputs for ``segments`` segments, the last of length ``last``.

        ``inputs``: every graph input, by the key the plan names it with.
        """
        # Outside any graph: restacking (new weights) happens here, and a replay sees the new
        # stack as a moved argument and captures again instead of reading a stale copy.
        stacks = self.stacks(*[inputs[k] for k in self._member_keys])
        if self.graphs is None:
            outputs, stats = _Run(self, inputs, stacks, segments, last).outputs()
            stats = dataclasses.replace(stats, graph="off")
        else:
            keys = self._input_order(inputs)

            def program(*args: Any) -> tuple[tuple[Any, ...], RunStats]:
                return _Run(self, dict(zip(keys, args)), list(args[len(keys) :]), segments, last).outputs()

            values = [inputs[k] for k in keys] + list(stacks)
            outputs, stats, how = self.graphs(program, values, key=(segments, last, tuple(keys)), owned=len(stacks))
            fresh = how not in ("replayed", "captured")  # a graph's stats are its capture run's
            stats = dataclasses.replace(stats, graph=how, compile_s=stats.compile_s if fresh else 0.0)
        self.last_stats = stats
        return outputs, stats

    def _input_order(self, inputs: dict[Hashable, Any]) -> list[Hashable]:
        keys = self._key_order.get(frozenset(inputs))
        if keys is None:
            keys = self._key_order[frozenset(inputs)] = sorted(inputs, key=repr)
        return keys


class _Run:
    """One run's values: per segment, its unit's values by position; and the loop over times."""

    def __init__(
        self, program: DiagonalProgram, inputs: dict[Hashable, Any], stacks: list[torch.Tensor], segments: int, last: int
    ) -> None:
        self.program, self.plan = program, program.plan
        self.inputs, self.stacks = inputs, stacks
        self.segments, self.last = segments, last
        self.layout = program.layout(segments, last)
        program.last_layout = self.layout
        self.envs: dict[int, dict[int, Any]] = {}
        self.kept: dict[int, dict[int, Any]] = {}  # values post reads from units already dropped
        self.hoisted: dict[tuple[int, int], Any] = {}  # (id(chunk), n) -> its invariant values
        self.collected: list[list[Any]] = [[None] * segments for _ in self.plan.collect_refs]
        self.early: set[int] = set()  # segments whose first chunk ran a step early, for the carry
        # Truncated BPTT: cut the gradient where eager's detach did (only autograd can tell).
        self.detach = self.plan.detach if torch.is_grad_enabled() else None
        pre_module, pre_ext = self.plan.pre
        self.pre_values = pre_module(*[inputs[r[1]] for r in pre_ext])

    def unit(self, s: int) -> UnitPlan:
        return self.program.unit_of(s, self.segments, self.last)

    def keep(self, s: int) -> set[int]:
        """Positions of segment ``s`` that post reads."""
        kept = self.plan.post_units.get(s, set())
        return kept | self.plan.post_last if s == self.segments - 1 else kept

    def resolve(self, ref: Ref, s: int) -> Any:
        kind = ref[0]
        if kind == "L":
            return self.envs[s][ref[1]]
        if kind == "G":
            return self.inputs[ref[1]]
        if kind == "PRE":
            return self.pre_values[ref[1]]
        if kind == "P":
            return self.envs[s - 1][self.plan.exports["first" if s == 1 else "steady"][ref[1]]]
        raise AssertionError(f"unexpected ref {ref}")

    def store(self, s: int, unit: UnitPlan, pos: int, value: Any) -> None:
        self.envs[s][pos] = value
        for index in unit.collect.get(pos, ()):
            self.collected[index][s] = value

    def run_chunk(self, s: int, unit: UnitPlan, chunk: Chunk) -> None:
        n = self.last if s == self.segments - 1 else self.plan.segment_size
        ext_values = [self.resolve(r, s) for r in chunk.ext]
        split = chunk.hoisted
        if split is None:
            fn, args = chunk.module, ext_values
        else:
            invariant = self.hoisted.get((id(chunk), n))
            if invariant is None:  # once per run and length: e.g. the rotary tables
                invariant = split.invariant(n, *[ext_values[i] for i in split.invariant_inputs])
                self.hoisted[(id(chunk), n)] = invariant
            fn, args = split.variant, [*ext_values, *invariant]
        # A chunk that does not read s (the last norm) runs as Inductor kernels.
        kernels = self.program.chunk_kernels.get(chunk, fn, n, args) if unit.name != "tail" else None
        values = kernels(*args) if kernels is not None else fn(s, n, *args)
        for pos, value in zip(chunk.outputs, values):
            self.store(s, unit, pos, value)

    def cell_input(self, layer: int, s: int, slot: int) -> Any:
        """Cell ``(layer, s)``'s value for ``slot``, detached where the model detached it."""
        value = self.resolve(self.unit(s).cell_inputs[layer][slot], s)
        if self.detach is not None and slot in self.detach.slots(layer, s, self.segments):
            counters["diagpass"]["detached_inputs"] += 1
            return value.detach()
        return value

    def head_for(self, group: StepGroup) -> torch.Tensor | None:
        """The carried slot's input of the next step's lane 0, when this group's lanes are
        layers 0..G-1 (no padding) and the next step starts a steady segment."""
        position = self.plan.carry_position
        plan = self.layout.plans[group.variant]
        if position is None or plan.carry is None or group.cells[0][0] != 0 or len(group.cells) != len(group.lanes):
            return None
        s = group.cells[0][1] + 1
        unit = self.unit(s) if s < self.segments else None
        if unit is None or unit.name != "steady" or self.layout.plans[unit.variants[0]] is not plan:
            return None
        if s not in self.early:
            self.envs.setdefault(s, {})
            self.run_chunk(s, unit, unit.chunks[0])
            self.early.add(s)
        return self.envs[s][position]

    def run_step(self, step: int) -> int:
        """The step's batched calls; returns how many carried."""
        layout, runner = self.layout, self.layout.runner
        assert runner is not None
        carried = 0
        for group_id in layout.by_step[step]:
            group = layout.groups[group_id]
            plan = layout.plans[group.variant]
            args: list[Any] = []
            for slot, kind in enumerate(plan.slot_kinds):
                if kind == "shared":
                    layer, s = group.cells[0]
                    args.append(self.resolve(self.unit(s).cell_inputs[layer][slot], s))
                elif kind == "per_cell":
                    args.extend(self.cell_input(layer, s, slot) for layer, s in group.cells)
            head = self.head_for(group)
            outputs = runner(group_id, self.stacks, *args, head=head)
            if head is not None:  # lane 0 of the buffer the next step reads in place
                *outputs, head_value = outputs
                carried += 1
                s = group.cells[0][1] + 1
                self.store(s, self.unit(s), self.plan.carry_position, head_value)  # type: ignore[arg-type]
            index = 0
            for layer, s in group.cells:
                unit = self.unit(s)
                for pos in unit.cell_outputs[layer]:
                    self.store(s, unit, pos, outputs[index])
                    index += 1
        return carried

    def outputs(self) -> tuple[tuple[Any, ...], RunStats]:
        layout = self.layout
        runner = layout.runner
        assert runner is not None
        compile_before = runner.compile_s
        peak_live = carried = 0
        # Under torch.profiler each time gets a range ("diagpass.t<t>"): benchmarks/timeline.py
        # attributes the device's idle gaps to them. Off the profiler this costs one check a run.
        profiling = torch.autograd.profiler._is_profiler_enabled
        for t, phases in enumerate(layout.phases_at):
            region = torch.profiler.record_function(f"diagpass.t{t}") if profiling else None
            if region is not None:
                region.__enter__()
            for s, phase in phases:
                self.envs.setdefault(s, {})
                unit = self.unit(s)
                chunk = unit.chunks.get(phase) if phase % 2 == 0 else None
                if chunk is not None and not (phase == 0 and s in self.early):
                    self.run_chunk(s, unit, chunk)
            if layout.step_at[t] is not None:
                carried += self.run_step(layout.step_at[t])
            for s, phase in phases:
                env, keep = self.envs[s], self.keep(s)
                for pos in self.unit(s).frees.get(phase, ()):
                    if pos not in keep:
                        env.pop(pos, None)
            peak_live = max(peak_live, len(self.envs))
            for s in layout.dead_at[t]:  # every reader of this unit has run
                env = self.envs.pop(s)
                if self.plan.post_units.get(s):
                    self.kept[s] = {p: env[p] for p in self.plan.post_units[s]}
            if region is not None:
                region.__exit__(None, None, None)
        return self._post(), RunStats.of_layout(
            layout,
            segments=self.segments,
            last=self.last,
            compile_s=runner.compile_s - compile_before,
            peak_live_segments=peak_live,
            carried_steps=carried,
        )

    def _post(self) -> tuple[Any, ...]:
        post_module, post_ext = self.plan.post
        last = self.segments - 1
        values = []
        for ref in post_ext:
            if ref[0] == "ALL":
                values.append(self.collected[self.plan.collect_refs.index((ref[1], ref[2]))])
            elif ref[0] == "LAST":
                values.append(self.envs[last][ref[1]])
            elif ref[0] == "UNIT":
                values.append(self.envs[ref[1]][ref[2]] if ref[1] in self.envs else self.kept[ref[1]][ref[2]])
            else:
                values.append(self.resolve(ref, last))
        return tuple(post_module(*values))
