"""The ``diagbatch`` torch.compile backend.

    compiled = torch.compile(model, backend="diagbatch", options={...})

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it
works after ``pip install`` without importing diagpass. Two outcomes per graph:

* **proven**: the analyzer proves the wavefront structure; the graph is rewritten into
  a diagonal program whose batched steps Inductor compiles;
* **not proven**: plain Inductor on the unchanged graph. The reason is logged and kept
  in :func:`last_compile`. With ``options={"strict": True}`` it raises instead.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

from diagpass.capture import trace_clock
from diagpass.config import DiagbatchConfig, parse_options, training_config
from diagpass.errors import ConfigError, DiagpassError, StructureError, through_dynamo
from diagpass.generate import install_generate_hook
from diagpass.lower import StepCompiler
from diagpass.passes import CellLabels
from diagpass.passes.detach import STRIPPED_META, redetach_outputs, restore_detaches
from diagpass.passes.reroll import Probe, RerollError, find_length_axes, prove_fixed, split_units
from diagpass.program import DiagonalProgram, UnrolledProgram, build_unrolled, plan_program
from diagpass.report import DependencyReport, GraphAnalysis, analyze_graph

log = logging.getLogger("diagpass.backend")

__all__ = ["diagbatch", "CompileRecord", "CompileTimes", "last_compile", "compile_history", "clear_compile_history", "step_compiler"]

_HISTORY_LIMIT = 64


@dataclass(kw_only=True)
class CompileTimes:
    """Where compile time went, in seconds."""

    capture_s: float | None = None
    """Dynamo's trace of the forward (None when the clock was unavailable)."""
    analysis_s: float = 0.0
    """Cell labelling, dependency DAG, templates."""
    rewrite_s: float = 0.0
    """Building the diagonal program."""
    inductor_s: float = 0.0
    """Inductor: the fallback compile, or the step compiles (done at the first run)."""

    @property
    def backend_s(self) -> float:
        """diagpass's own work: analysis plus rewrite."""
        return self.analysis_s + self.rewrite_s


@dataclass(kw_only=True)
class CompileRecord:
    """What the backend did with one graph. See :func:`last_compile`."""

    applied: bool
    """The diagonal rewrite is in use."""
    reason: str | None
    """Why it is not (``None`` when applied)."""
    config: DiagbatchConfig
    """The validated options."""
    report: DependencyReport | None = None
    """The analyzer's report on the graph."""
    num_layers: int = 0
    num_segments: int = 0
    num_steps: int = 0
    """Steps of the program (S+L-1 for ARMT on the diagonal schedule)."""
    path: str = "fallback"
    """What runs: ``"diagonal program"`` (:class:`~diagpass.DiagonalProgram`), ``"unrolled
    program"`` (a graph the diagonal program cannot express yet: :attr:`path_reason` says
    why) or ``"fallback"`` (plain Inductor, :attr:`reason` says why)."""
    path_reason: str | None = None
    """Why the unrolled program runs instead of the diagonal program."""
    training: bool = False
    """Autograd was on: the training program (:func:`diagpass.config.training_config`) was built."""
    times: CompileTimes = field(default_factory=CompileTimes)
    program_ref: Callable[[], DiagonalProgram | UnrolledProgram | None] | None = None
    """Weak reference to the program: the record must not keep its weight stacks alive."""
    step_compiles: int = 0
    """Distinct batched step graphs the program has run (compiled now or found in the cache)."""
    batched_gemms: int = 0
    """Batched GEMM nodes (``aten.bmm`` ...) in those step graphs."""
    num_nodes: int = 0
    """Nodes in the captured graph."""

    @property
    def program(self) -> DiagonalProgram | UnrolledProgram | None:
        """The diagonal program while Dynamo still holds it (``None`` on fallback)."""
        return None if self.program_ref is None else self.program_ref()

    def summary(self) -> str:
        plain = "Inductor" if self.config.compiler == "inductor" else "eager"
        if self.applied:
            head = f"diagonal rewrite APPLIED ({self.path}" + (f": {self.path_reason})" if self.path_reason else ")")
            if self.training:
                head += f", training program (autograd on: {plain} forward and backward steps, carried lanes and lane views off)"
        else:
            head = f"FELL BACK to plain {plain}: {self.reason}"
        t = self.times
        steps = (
            f" steps={self.num_steps} (sequential would be {self.num_layers * self.num_segments})" if self.applied else ""
        )
        lines = [
            f"diagbatch: {head}",
            f"  L={self.num_layers} S={self.num_segments}{steps}; graph of {self.num_nodes} nodes",
            f"  time: capture {t.capture_s if t.capture_s is None else round(t.capture_s, 3)}s, "
            f"analysis {t.analysis_s:.3f}s, rewrite {t.rewrite_s:.3f}s, inductor {t.inductor_s:.3f}s",
        ]
        program = self.program
        if program is not None:
            cells = [len(g.cells) for g in program.groups]
            lines.append(
                f"  {len(cells)} batched calls of {min(cells)}-{max(cells)} cells; {self.step_compiles} step graphs "
                f"compiled, {self.batched_gemms} batched GEMMs in them"
            )
            if program.graphs is not None:
                graphs = program.graphs
                lines.append(
                    f"  whole-program CUDA graph: last call {program.last_graph}; "
                    f"{graphs.captures} captured, {graphs.replays} replays"
                )
        return "\n".join(lines)

    __str__ = summary


trace_clock.install()
_history: list[CompileRecord] = []
step_compiler = StepCompiler()
"""Process-wide cache of compiled steps, shared by every program."""


def last_compile() -> CompileRecord | None:
    """The record of the last graph the ``diagbatch`` backend compiled (None: none yet)."""
    return _history[-1] if _history else None


def compile_history() -> list[CompileRecord]:
    """Records of the recent graphs the backend compiled, oldest first."""
    return list(_history)


def clear_compile_history() -> None:
    """Forget the recorded compiles (``compile_history`` keeps the last 64; ``last_compile`` then
    returns None until the next one)."""
    _history.clear()


def _remember(record: CompileRecord) -> CompileRecord:
    _history.append(record)
    del _history[:-_HISTORY_LIMIT]
    return record


def _has_symbolic_shapes(example_inputs: list[Any]) -> bool:
    for value in example_inputs:
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return True
    return False


def _fallback(gm: torch.fx.GraphModule, example_inputs: list[Any], record: CompileRecord) -> Any:
    stripped = gm.meta.pop(STRIPPED_META, None)
    if stripped:  # the graph as captured: with the detaches the analysis took out for the proof
        restore_detaches(gm, stripped)
    counters["diagpass"]["fallbacks"] += 1
    log.warning("diagbatch: falling back to plain %s: %s", record.config.compiler, record.reason)
    start = time.perf_counter()
    if record.config.compiler == "eager":
        compiled = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=dict(record.config.inductor) or None)
    record.times.inductor_s = time.perf_counter() - start
    return compiled


def _internal_error(
    gm: torch.fx.GraphModule, example_inputs: list[Any], record: CompileRecord, stage: str, error: Exception
) -> Any:
    """Fall back (or raise, under strict) when diagpass itself fails at ``stage``."""
    record.applied = False
    record.reason = f"diagpass failed during the {stage}: {type(error).__name__}: {error}"
    counters["diagpass"]["internal_errors"] += 1
    log.error("diagbatch: %s", record.reason, exc_info=error)
    if record.config.strict:
        raise through_dynamo(DiagpassError(f"diagbatch (strict): {record.reason}")) from error
    return _fallback(gm, example_inputs, record)


def diagbatch(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """torch.compile backend: diagonal batching for segment-recurrent models."""
    try:
        config = parse_options(options, mode=mode)
    except DiagpassError as error:  # catchable as itself, not as Dynamo's BackendCompilerFailed
        raise through_dynamo(error) from None
    if config.pipeline:
        message = "diagbatch: option 'pipeline' is for diagpass.compile(model, probe, options=...) under torchrun"
        raise through_dynamo(ConfigError(message)) from None
    record = _remember(CompileRecord(applied=False, reason=None, config=config, num_nodes=len(gm.graph.nodes)))
    record.times.capture_s = trace_clock.elapsed()

    training = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    if training:  # the training program: the same schedule, steps autograd can follow
        config = training_config(config)
        record.config, record.training = config, True
    if _has_symbolic_shapes(example_inputs):
        record.reason = (
            "Dynamo produced a graph with dynamic shapes (after a length change); diagbatch needs "
            "static shapes: pass dynamic=False to torch.compile"
        )
        return _fallback(gm, example_inputs, record)

    try:
        analysis = analyze_graph(gm)
    except Exception as error:  # a bug of ours must not break the user's compile
        return _internal_error(gm, example_inputs, record, "analysis", error)
    report = analysis.report
    record.report = report
    record.times.analysis_s = report.analysis_s
    record.num_layers, record.num_segments = report.num_layers, report.num_segments
    templates = analysis.templates
    if not report.ok or templates is None:
        record.reason = report.reason or "no cells found"
        if config.strict:
            raise through_dynamo(
                StructureError(f"diagbatch (strict): diagonal structure not proven: {record.reason}", report.violations)
            )
        return _fallback(gm, example_inputs, record)
    # Random draws (dropout in train() mode) batch in the training program only: same distribution,
    # other draws than the sequential model (README, training). Inference in train() mode falls back.
    unbatchable = templates.unbatchable or (None if training else templates.random)
    if unbatchable:
        record.reason = unbatchable
        if config.strict:
            raise through_dynamo(StructureError(f"diagbatch (strict): cells cannot be batched: {record.reason}"))
        return _fallback(gm, example_inputs, record)
    if templates.random and config.compiler != "eager":
        # Inductor's training steps gave NaN with attention dropout in the zoo ARMT (torch 2.13 CPU;
        # not reproduced on a lone SDPA step): steps that draw random numbers run eagerly, batched.
        config = replace(config, compiler="eager")
        record.config = config
    if report.num_segments < config.min_segments:
        record.reason = f"{report.num_segments} segment(s) < min_segments={config.min_segments}"
        return _fallback(gm, example_inputs, record)

    start = time.perf_counter()
    try:
        program = _build(gm, example_inputs, analysis, config, record)
    except Exception as error:
        return _internal_error(gm, example_inputs, record, "rewrite", error)
    record.times.rewrite_s = time.perf_counter() - start
    record.program_ref = weakref.ref(program)
    record.applied = True
    record.num_steps = program.num_steps
    counters["diagpass"]["applied"] += 1
    counters["diagpass"]["steps"] += program.num_steps
    log.info(
        "diagbatch: applied (%s): L=%d S=%d, %d steps, %d batched calls (analysis %.3fs, rewrite %.3fs)",
        record.path,
        report.num_layers,
        report.num_segments,
        program.num_steps,
        len(program.groups),
        record.times.analysis_s,
        record.times.rewrite_s,
    )
    return _program_call(gm, example_inputs, program, record, training)


def _program_call(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    program: DiagonalProgram | UnrolledProgram,
    record: CompileRecord,
    training: bool,
) -> Callable[..., Any]:
    """What Dynamo calls in place of ``gm``: the program, with the step statistics recorded after
    each call; a failed first run (an op vmap cannot batch, say) falls back to the plain graph."""
    config, runner = record.config, program.runner
    if isinstance(program, DiagonalProgram):
        inputs_of = _input_keys(gm)
        segments, last = program.fixed_length  # type: ignore[misc]

        def call(*args: Any) -> Any:
            outputs, _ = program.run(dict(zip(inputs_of, args)), segments, last)
            return outputs

    else:
        call = program

    fallback: list[Any] = []  # set if the first run fails

    def run(*args: Any) -> Any:
        if fallback:
            return fallback[0](*args)
        before = runner.compile_s
        try:
            with torch.set_grad_enabled(training and torch.is_grad_enabled()):
                result = call(*args)
        except Exception as error:
            if record.step_compiles or config.strict:
                raise  # it ran before, or the user asked for errors: do not hide it
            # The program is functional (state is written back by Dynamo after it returns),
            # so a failed first run can be redone by the plain graph.
            fallback.append(_internal_error(gm, example_inputs, record, "first run of the steps", error))
            return fallback[0](*args)
        record.times.inductor_s += runner.compile_s - before
        record.step_compiles = len(runner.used_steps)
        record.batched_gemms = runner.batched_gemms
        return result

    return run


diagbatch._diagpass_backend = True  # type: ignore[attr-defined]  # how diagpass.generate's hook recognises its traces
install_generate_hook()  # HF generate: a graph break under diagbatch traces (README, generation)


def _input_keys(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """The key the plan gives each graph input: its position (placeholder names differ
    between torch versions, DESIGN.md §7)."""
    return [("input", i) for i, _ in enumerate(gm.graph.find_nodes(op="placeholder"))]


def _segment_lengths(split: Any, keys: dict[torch.fx.Node, Any], example_inputs: list[Any], count: int) -> list[int]:
    """Each segment's length where the inputs are sliced per segment (``input[..., s*T:]``),
    else zeros: the lengths only label which literals may depend on ``n``."""
    try:
        size, axes = find_length_axes(split, keys)
    except RerollError:
        return [0] * count
    key, dim = next(iter(axes.items()))
    example = example_inputs[key[1]]
    tokens = example.shape[dim] if isinstance(example, torch.Tensor) and example.dim() > dim else None
    if tokens is None or -(-tokens // size) != count:
        return [0] * count
    return [size] * (count - 1) + [tokens - (count - 1) * size]


def _build(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    analysis: GraphAnalysis,
    config: DiagbatchConfig,
    record: CompileRecord,
) -> DiagonalProgram | UnrolledProgram:
    """The diagonal program of ``gm``, or the unrolled one where the plan cannot express it."""
    labels: CellLabels = analysis.labels
    templates = analysis.templates
    assert templates is not None
    placeholders = gm.graph.find_nodes(op="placeholder")
    keys = dict(zip(placeholders, _input_keys(gm)))
    try:
        split = split_units(gm.graph, labels)
        lengths = _segment_lengths(split, keys, example_inputs, labels.num_segments)
        proof = prove_fixed(Probe(graph=gm.graph, labels=labels, keys=keys, segment_lengths=lengths), split=split)
        plan = plan_program(proof=proof, gm=gm, labels=labels, templates=templates, keys=keys, config=config)
    except RerollError as error:
        record.path, record.path_reason = "unrolled program", f"the diagonal program cannot express this graph yet: {error}"
        counters["diagpass"]["unrolled_programs"] += 1
        log.info("diagbatch: %s", record.path_reason)
        schedule = analysis.report.schedule
        if config.schedule == "sequential":
            schedule = sorted(([c] for step in schedule for c in step), key=lambda step: (step[0][1], step[0][0]))
        unrolled = build_unrolled(gm=gm, labels=labels, templates=templates, schedule=schedule, config=config, compiler=step_compiler)
        redetach_outputs(unrolled.module, analysis.detaches.output_positions)
        return unrolled
    record.path = "diagonal program"
    redetach_outputs(plan.post[0], analysis.detaches.output_positions)  # the state the model left detached
    program = DiagonalProgram(plan, config=config, compiler=step_compiler, name="diagbatch program")
    program.fixed_length = (labels.num_segments, lengths[-1])
    counters["diagpass"]["programs"] += 1
    return program
