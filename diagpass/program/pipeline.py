"""One pipeline stage of the diagonal program: the cells of this rank's layers, on the same schedule.

Every rank walks the single-process program's times (:mod:`~diagpass.program.schedule`) and runs
at each the phases it owns (:meth:`~diagpass.distributed.Stages.of_phase`): the work before the
layers on every rank, the cells of its layers (each step's batched calls split at the stage
boundary), the nodes between two of its layers, and (last rank) the work after the layers. What
one of its phases reads that another rank computed is a :class:`Transfer`, planned once per
``(segments, last length)`` from the unit plans' refs: received into a buffer by ``irecv``
posted at the start of the time the sender computes it, waited on only where it is first read;
sent by ``isend`` at the end of that time, never waited on before the end of the run. Values
only flow from lower to higher ranks (the wavefront theorem: a cell reads its own layer's and
lower layers' values); a plan needing anything else is refused with a ``ConfigError``.

Shapes are not known to a receiver before the sender has computed: the first run at a length
exchanges them (one ``all_gather_object`` per time where something travels) and caches them in
the :class:`StageLayout`; later runs only move tensors. Finally the values the post module reads
(outputs, final per-layer state) are broadcast from their owners, and every rank runs ``post``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from diagpass.config import DiagbatchConfig
from diagpass.distributed import PipelineRunStats, Stages, log
from diagpass.errors import ConfigError, InputError
from diagpass.lower import StepCompiler
from diagpass.passes import Cell
from diagpass.program.chunks import Ref
from diagpass.program.plan import ProgramPlan, UnitPlan
from diagpass.program.runtime import DiagonalProgram, _Run
from diagpass.program.schedule import Layout, step_groups
from diagpass.program.steps import StepGroup, StepRunner, VariantPlan

__all__ = ["PipelineProgram", "StageLayout", "Transfer", "build_stage_layout"]

_READ_KINDS = ("shared", "per_cell")  # the slots a batched call reads from the unit's values


@dataclass(frozen=True)
class Transfer:
    """A value of one segment's unit that rank ``src`` computes and rank ``dst`` reads."""

    segment: int
    position: int
    """The value's position in its unit."""
    src: int
    dst: int
    sent_at: int
    """The schedule time at whose end ``src`` has it (and sends it)."""
    needed_at: int
    """The first time ``dst`` reads it."""


@dataclass(kw_only=True)
class StageLayout(Layout):
    """A :class:`~diagpass.program.schedule.Layout` restricted to one stage, with its traffic."""

    stages: Stages
    recvs_at: dict[int, list[Transfer]] = field(default_factory=dict)
    """Time -> what this rank receives, sent at the end of that time (in the senders' order)."""
    sends_at: dict[int, list[Transfer]] = field(default_factory=dict)
    """Time -> what this rank sends at the end of that time."""
    traffic_times: set[int] = field(default_factory=set)
    """Times at which any rank sends (the first run exchanges shapes there)."""
    post_owners: list[Any] = field(default_factory=list)
    """Per ref the post module reads: the rank that owns it (``None``: every rank), a list per
    segment for a per-segment list."""
    cells: int = 0
    """Cells this rank runs."""
    meta: dict[Hashable, Any] | None = None
    """Shape and dtype of everything received or broadcast, by key; ``None`` until the first run."""


def producers(unit: UnitPlan) -> dict[int, int]:
    """Position -> the phase that computes it, in one unit form."""
    phases = {pos: phase for phase, chunk in unit.chunks.items() for pos in chunk.outputs}
    for layer, outputs in enumerate(unit.cell_outputs):
        phases.update({pos: 2 * layer + 1 for pos in outputs})
    return phases


def build_stage_layout(
    program: PipelineProgram,
    *,
    segments: int,
    last: int,
    num_layers: int,
    plans: list[VariantPlan],
    variant_of: Callable[[Cell], int],
    config: DiagbatchConfig,
    compiler: StepCompiler,
) -> StageLayout:
    """The diagonal schedule of ``segments`` segments, the cells restricted to this rank's layers
    (steps with none of them stay, empty, so that every rank keeps the same times)."""
    if config.schedule != "diagonal":
        raise ConfigError("diagpass pipeline: runs the diagonal schedule only")
    stages, L = program.stages, num_layers
    mine = stages.layers()
    steps = [
        [(l, d - l) for l in range(max(0, d - segments + 1), min(L - 1, d) + 1) if l in mine]
        for d in range(segments + L - 1)
    ]
    groups: list[StepGroup] = []
    by_step: list[list[int]] = []
    limit = min(len(mine), segments)  # a stage's diagonal never holds more cells
    for index, cells in enumerate(steps):
        made = step_groups(index, cells, variant_of, plans, limit, config) if cells else []
        by_step.append(list(range(len(groups), len(groups) + len(made))))
        groups.extend(made)
    total = 2 * (segments - 1) + 2 * L + 1
    layout = StageLayout(segments=segments, last=last, plans=plans, groups=groups, by_step=by_step, stages=stages)
    layout.phases_at = [[] for _ in range(total)]
    layout.step_at = [None] * total
    layout.dead_at = [[] for _ in range(total)]
    for s in range(segments):
        for phase in range(2 * L + 1):
            layout.phases_at[2 * s + phase].append((s, phase))
    for index, cells in enumerate(steps):
        if cells:
            layout.step_at[2 * index + 1] = index
    for s in range(segments - 1):  # as the single-process layout: the next segment's last layer reads last
        layout.dead_at[max(2 * s + 2 * L, 2 * (s + 1) + 2 * L - 1)].append(s)
    layout.cells = sum(len(cells) for cells in steps)
    layout.runner = StepRunner(groups, plans, compiler, config)
    transfers = plan_transfers(program, segments, last, plans, variant_of)
    for transfer in transfers:
        layout.traffic_times.add(transfer.sent_at)
        if transfer.dst == stages.rank:
            layout.recvs_at.setdefault(transfer.sent_at, []).append(transfer)
        if transfer.src == stages.rank:
            layout.sends_at.setdefault(transfer.sent_at, []).append(transfer)
    layout.post_owners = post_owners(program, segments, last)
    return layout


def plan_transfers(
    program: PipelineProgram, segments: int, last: int, plans: list[VariantPlan], variant_of: Callable[[Cell], int]
) -> list[Transfer]:
    """Every value one rank reads and another computes, for every pair of ranks, in one order
    that senders and receivers share: ``(sent_at, segment, position, src, dst)``."""
    stages, plan = program.stages, program.plan
    L = plan.num_layers
    found: dict[tuple[int, int, int, int], Transfer] = {}
    for s in range(segments):
        unit = program.unit_of(s, segments, last)
        reads: list[tuple[int, list[Ref]]] = [(phase, chunk.ext) for phase, chunk in unit.chunks.items()]
        for layer in range(L):
            kinds = plans[variant_of((layer, s))].slot_kinds
            slots = [unit.cell_inputs[layer][i] for i, kind in enumerate(kinds) if kind in _READ_KINDS]
            reads.append((2 * layer + 1, slots))
        for phase, refs in reads:
            reader = stages.of_phase(phase)
            readers = range(stages.world) if reader is None else (reader,)
            for ref in refs:
                if ref[0] == "L":
                    where, position = s, ref[1]
                elif ref[0] == "P":
                    where, position = s - 1, plan.exports["first" if s == 1 else "steady"][ref[1]]
                else:
                    continue  # graph inputs and pre values: every rank has them
                made = program.producers[program.unit_of(where, segments, last).name].get(position)
                if made is None:
                    raise ConfigError(f"diagpass pipeline: segment {where} position {position} is read but never computed")
                src = stages.of_phase(made)
                for dst in readers:
                    if src is None or src == dst:
                        continue
                    sent_at, needed_at = 2 * where + made, 2 * s + phase
                    if dst < src or needed_at <= sent_at:
                        raise ConfigError(
                            f"diagpass pipeline: this model is not supported: phase {phase} of segment {s} (rank {dst}) "
                            f"reads a value that phase {made} of segment {where} computes on rank {src}, which runs "
                            "later in the pipeline"
                        )
                    key = (where, position, src, dst)
                    if key not in found or found[key].needed_at > needed_at:
                        found[key] = Transfer(
                            segment=where, position=position, src=src, dst=dst, sent_at=sent_at, needed_at=needed_at
                        )
    return sorted(found.values(), key=lambda t: (t.sent_at, t.segment, t.position, t.src, t.dst))


def post_owners(program: PipelineProgram, segments: int, last: int) -> list[Any]:
    """Per ref the post module reads, the rank that computes it (see :attr:`StageLayout.post_owners`)."""
    plan, stages = program.plan, program.stages

    def owner(s: int, position: int) -> int | None:
        made = program.producers[program.unit_of(s, segments, last).name].get(position)
        return None if made is None else stages.of_phase(made)

    owners: list[Any] = []
    for ref in plan.post[1]:
        if ref[0] == "ALL":
            owners.append([owner(s, ref[1] if s == 0 else ref[2]) for s in range(segments)])
        elif ref[0] == "LAST":
            owners.append(owner(segments - 1, ref[1]))
        elif ref[0] == "UNIT":
            owners.append(owner(ref[1], ref[2]))
        else:
            owners.append(None)
    return owners


class PipelineProgram(DiagonalProgram):
    """The diagonal program of one stage (this rank's layers) of a pipeline over the ranks of the
    default process group. Whole-program CUDA graphs are off (the run communicates)."""

    def __init__(
        self, plan: ProgramPlan, *, config: DiagbatchConfig, compiler: StepCompiler, name: str, stages: Stages
    ) -> None:
        super().__init__(plan, config=config, compiler=compiler, name=name)
        self.graphs = None
        self.stages = stages
        self.producers = {unit_name: producers(unit) for unit_name, unit in plan.units.items()}
        self.timing = False
        """Time every run (compute, waits on receives, the final broadcast; CUDA events on GPUs,
        which costs a synchronisation at the end of the run): :class:`PipelineRunStats`."""

    def _build_layout(self, **kwargs: Any) -> Layout:
        return build_stage_layout(self, **kwargs)

    def run(self, inputs: dict[Hashable, Any], segments: int, last: int) -> tuple[tuple[Any, ...], PipelineRunStats]:
        """This stage's part of the run; the outputs (the same on every rank) and this rank's stats."""
        if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values()):
            raise ConfigError("diagpass pipeline: inference only; run under torch.no_grad() (training is not pipelined yet)")
        stacks = self.stacks(*[inputs[k] for k in self._member_keys])
        outputs, stats = _StageRun(self, inputs, stacks, segments, last).outputs()
        self.last_stats = stats
        return outputs, stats

    def __str__(self) -> str:
        return super().__str__() + f"\n  pipeline: {self.stages}"


class _Clock:
    """Durations by kind, from CUDA events on a CUDA device (read after one synchronisation at the
    end), else from the host clock; nothing when off."""

    def __init__(self, enabled: bool, cuda: bool) -> None:
        self.enabled, self.cuda = enabled, cuda
        self.spans: list[tuple[str, Any, Any]] = []

    def mark(self) -> Any:
        if not self.enabled:
            return None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def span(self, kind: str, start: Any) -> None:
        if self.enabled:
            self.spans.append((kind, start, self.mark()))

    def totals(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for kind, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            totals[kind] = totals.get(kind, 0.0) + seconds
        return totals


class _StageRun(_Run):
    """One run of one stage: :class:`~diagpass.program.runtime._Run` on this rank's phases, with
    the receives posted early, the sends at the end of each time, the final broadcast."""

    program: PipelineProgram
    layout: StageLayout

    def __init__(
        self, program: PipelineProgram, inputs: dict[Hashable, Any], stacks: list[torch.Tensor], segments: int, last: int
    ) -> None:
        super().__init__(program, inputs, stacks, segments, last)
        self.stages = program.stages
        self.pending: dict[tuple[int, int], Any] = {}  # (segment, position) -> its irecv, not yet waited on
        self.sending: list[tuple[Any, torch.Tensor]] = []  # isends in flight, with their tensors
        self.device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        self.clock = _Clock(program.timing, self.device.type == "cuda")
        self.exchange = self.layout.meta is None  # the first run at this length: shapes travel too
        self.meta: dict[Hashable, Any] = {} if self.layout.meta is None else self.layout.meta
        self.counts = {"sent": 0, "received": 0, "sent_bytes": 0, "received_bytes": 0, "broadcast_bytes": 0}

    # -- receiving ------------------------------------------------------------------------------

    def resolve(self, ref: Ref, s: int) -> Any:
        if self.pending and ref[0] in ("L", "P"):
            key = (s, ref[1]) if ref[0] == "L" else (s - 1, self.plan.exports["first" if s == 1 else "steady"][ref[1]])
            work = self.pending.pop(key, None)
            if work is not None:  # first read: wait here, not before
                start = self.clock.mark()
                work.wait()
                self.clock.span("recv_wait", start)
        return super().resolve(ref, s)

    def post_receives(self, t: int) -> None:
        """``irecv`` of what is sent at the end of time ``t``, into buffers in the segments' values."""
        for transfer in self.layout.recvs_at.get(t, ()):
            shape, dtype = self.meta[(transfer.segment, transfer.position)]
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            key = (transfer.segment, transfer.position)
            self.pending[key] = dist.irecv(buffer, src=transfer.src)
            self.envs.setdefault(transfer.segment, {})[transfer.position] = buffer
            self.counts["received"] += 1
            self.counts["received_bytes"] += buffer.numel() * buffer.element_size()

    # -- sending --------------------------------------------------------------------------------

    def outgoing(self, t: int) -> list[tuple[Transfer, torch.Tensor]]:
        sends = []
        for transfer in self.layout.sends_at.get(t, ()):
            value = self.envs[transfer.segment][transfer.position]
            if not isinstance(value, torch.Tensor):
                raise ConfigError(
                    f"diagpass pipeline: a value crossing stages is a {type(value).__name__}, not a tensor "
                    f"(segment {transfer.segment}, position {transfer.position})"
                )
            sends.append((transfer, value.contiguous()))
        return sends

    def send(self, sends: list[tuple[Transfer, torch.Tensor]]) -> None:
        for transfer, tensor in sends:
            self.sending.append((dist.isend(tensor, dst=transfer.dst), tensor))
            self.counts["sent"] += 1
            self.counts["sent_bytes"] += tensor.numel() * tensor.element_size()
        if len(self.sending) > 64:  # let go of the tensors of finished sends
            self.sending = [(work, tensor) for work, tensor in self.sending if not work.is_completed()]

    def exchange_shapes(self, t: int, sends: list[tuple[Transfer, torch.Tensor]]) -> None:
        """First run at a length: every rank learns the shapes of what is sent at time ``t``."""
        mine = {(tr.segment, tr.position): (tuple(x.shape), x.dtype) for tr, x in sends}
        gathered: list[Any] = [None] * self.stages.world
        dist.all_gather_object(gathered, mine)
        for theirs in gathered:
            self.meta.update(theirs)

    def check_same_length(self) -> None:
        lengths: list[Any] = [None] * self.stages.world
        dist.all_gather_object(lengths, (self.segments, self.last))
        if len(set(lengths)) != 1:
            raise InputError(
                f"diagpass pipeline: the ranks were called with different lengths (segments, last length): {lengths}; "
                "every rank must call the compiled module with the same input"
            )

    # -- the run --------------------------------------------------------------------------------

    def outputs(self) -> tuple[tuple[Any, ...], PipelineRunStats]:  # type: ignore[override]
        layout, stages = self.layout, self.stages
        runner = layout.runner
        assert runner is not None
        compile_before = runner.compile_s
        if self.exchange:
            self.check_same_length()
        started = self.clock.mark()
        peak_live = carried = 0
        for t, phases in enumerate(layout.phases_at):
            if not self.exchange:
                self.post_receives(t)  # posted before this time's compute, read two times later at the earliest
            start = self.clock.mark()
            for s, phase in phases:
                self.envs.setdefault(s, {})
                if phase % 2 or not stages.runs(phase):
                    continue
                unit = self.unit(s)
                chunk = unit.chunks.get(phase)
                if chunk is not None and not (phase == 0 and s in self.early):
                    self.run_chunk(s, unit, chunk)
            if layout.step_at[t] is not None:
                carried += self.run_step(layout.step_at[t])
            self.clock.span("compute", start)
            sends = self.outgoing(t)
            if self.exchange and t in layout.traffic_times:
                self.exchange_shapes(t, sends)
                self.post_receives(t)
            self.send(sends)
            for s, phase in phases:
                env, keep = self.envs[s], self.keep(s)
                for pos in self.unit(s).frees.get(phase, ()):
                    if pos not in keep:
                        env.pop(pos, None)
            peak_live = max(peak_live, len(self.envs))
            for s in layout.dead_at[t]:
                env = self.envs.pop(s)
                if self.plan.post_units.get(s):
                    self.kept[s] = {p: env[p] for p in self.plan.post_units[s] if p in env}
        for work in self.pending.values():  # received but never read (a shared slot's other cells)
            work.wait()
        start = self.clock.mark()
        outputs = self._post()
        self.clock.span("broadcast", start)
        for work, _ in self.sending:
            work.wait()
        self.sending.clear()
        self.clock.span("total", started)
        if self.exchange:
            layout.meta = self.meta
            log.debug("diagpass pipeline: rank %d exchanged the shapes of %d values", stages.rank, len(self.meta))
        times = self.clock.totals()
        return outputs, PipelineRunStats.of_layout(
            layout,
            segments=self.segments,
            last=self.last,
            compile_s=runner.compile_s - compile_before,
            peak_live_segments=peak_live,
            carried_steps=carried,
            stages=stages.describe(),
            rank=stages.rank,
            layers=tuple(stages.layers()),
            cells=layout.cells,
            metadata_exchanged=self.exchange,
            total_s=times.get("total", 0.0),
            compute_s=max(0.0, times.get("compute", 0.0) - times.get("recv_wait", 0.0)),
            recv_wait_s=times.get("recv_wait", 0.0),
            broadcast_s=times.get("broadcast", 0.0),
            **self.counts,
        )

    # -- the end: every rank gets the post module's inputs --------------------------------------

    def _post(self) -> tuple[Any, ...]:
        post_module, post_ext = self.plan.post
        last = self.segments - 1
        shared: list[tuple[Hashable, int, Any]] = []  # (key, owner, local value or None)

        def share(key: Hashable, owner: int | None, value: Any) -> Any:
            if owner is None:
                return value
            shared.append((key, owner, value if owner == self.stages.rank else None))
            return ("shared", len(shared) - 1)

        values: list[Any] = []
        for i, (ref, owner) in enumerate(zip(post_ext, self.layout.post_owners)):
            if ref[0] == "ALL":
                column = self.collected[self.plan.collect_refs.index((ref[1], ref[2]))]
                values.append([share(("post", i, s), o, column[s]) for s, o in enumerate(owner)])
            elif ref[0] == "LAST":
                values.append(share(("post", i), owner, self.envs.get(last, {}).get(ref[1])))
            elif ref[0] == "UNIT":
                env = self.envs.get(ref[1]) or self.kept.get(ref[1], {})
                values.append(share(("post", i), owner, env.get(ref[2])))
            else:
                values.append(self.resolve(ref, last))
        received = self.broadcast(shared)

        def fill(value: Any) -> Any:
            if isinstance(value, list):
                return [fill(v) for v in value]
            if isinstance(value, tuple) and len(value) == 2 and value[0] == "shared":
                return received[value[1]]
            return value

        return tuple(post_module(*[fill(v) for v in values]))

    def broadcast(self, shared: list[tuple[Hashable, int, Any]]) -> list[Any]:
        """Every shared value, on every rank, from its owner (shapes exchanged on the first run)."""
        if self.exchange:
            mine = {
                key: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None
                for key, owner, v in shared
                if owner == self.stages.rank
            }
            gathered: list[Any] = [None] * self.stages.world
            dist.all_gather_object(gathered, mine)
            for theirs in gathered:
                self.meta.update(theirs)
        results: list[Any] = []
        works = []
        for key, owner, value in shared:
            meta = self.meta[key]
            if meta is None:  # not a tensor: as an object, every run
                box = [value]
                dist.broadcast_object_list(box, src=owner)
                results.append(box[0])
                continue
            if owner == self.stages.rank:
                tensor = value.contiguous()
            else:
                tensor = torch.empty(meta[0], dtype=meta[1], device=self.device)
            works.append(dist.broadcast(tensor, src=owner, async_op=True))
            self.counts["broadcast_bytes"] += tensor.numel() * tensor.element_size()
            results.append(value if owner == self.stages.rank else tensor)
        for work in works:
            work.wait()
        return results
