"""``diagpass.compile``: compile once on a short probe, run any input length.

    fast = diagpass.compile(model, probe_ids)     # probe: 3-4 segments
    out = fast(input_ids)                         # any length, no new trace

Dynamo traces about 0.2 s per cell, so tracing the unrolled forward of a long input takes
minutes, again for every new length (DESIGN.md §4). Instead:

1. trace the probe, and two short probes derived from it by cutting its inputs along the
   segmented axis (two segments, the last one short), with the model's state written back
   as usual;
2. prove that all three are one loop over one segment template, whose int literals are
   affine in the segment index and length (:mod:`diagpass.passes.reroll`);
3. map the graph's inputs to the model's parameters and the call's arguments, and its
   outputs to the return value and the module attributes Dynamo wrote, by identity;
4. plan a :class:`~diagpass.DiagonalProgram` from the proof: the same program the
   ``diagbatch`` backend builds from the graph it receives, run here for any number of
   segments, with the backend's compiled-step cache.

Where something cannot be proven, :func:`compile` raises :class:`GeneralisationError`
(or :class:`~diagpass.StructureError` when the diagonal structure itself is refuted),
naming the node and source line.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from diagpass.capture import Capture, capture_whole
from diagpass.config import DiagbatchConfig, parse_options, training_config
from diagpass.errors import ConfigError, DiagpassError, GeneralisationError, InputError, StructureError
from diagpass.passes.detach import DetachRule, fit_detach_windows, redetach_outputs
from diagpass.passes.reroll import Probe, RerollError, find_length_axes, prove_reroll, split_units
from diagpass.passes.segment_outputs import OutputGroups, group_segment_outputs
from diagpass.report import GraphAnalysis, analyze_graph
from diagpass.returns import ReturnRecipe
from diagpass.program import DiagonalProgram, RunStats, plan_program
from diagpass.program.plan import ProgramPlan

if TYPE_CHECKING:
    from diagpass.generate import GenerateRecord

log = logging.getLogger("diagpass.anylength")

__all__ = ["compile", "AnyLengthModel", "RerollReport", "RunRecord", "GeneralisationError", "ProbeError"]

_SCALARS = (bool, int, float, str, type(None))
_RUN_HISTORY = 32
# Module internals, and the mark torch.compile leaves on what it compiled (not a forward's write).
_NOT_STATE = frozenset({"_parameters", "_buffers", "_modules", "_is_torch_compile"})


class ProbeError(InputError, GeneralisationError):
    """The probe cannot prove anything: empty, or shorter than 3 segments. Catchable as
    :class:`~diagpass.InputError` (bad input) and as :class:`GeneralisationError`."""


_PROBE_HINT = (
    "pass one call's arguments 3 or 4 segments long, e.g. diagpass.compile(model, input_ids[:, : 3 * segment_size])"
)


@dataclass(kw_only=True)
class RunRecord:
    """One call of an :class:`AnyLengthModel`."""

    tokens: int
    """Length of the input along the segmented axis."""
    segments: int
    last_length: int
    path: str
    """``"diagonal"`` (the rerolled program) or ``"eager"`` (the model itself)."""
    reason: str | None = None
    """Why the eager path ran."""
    stats: RunStats | None = None
    autograd: bool = False
    """The diagonal program ran with autograd on (its training program: see :func:`compile`)."""
    wall_s: float = 0.0
    """Host time of the call (GPU work may still be running)."""


@dataclass(kw_only=True)
class RerollReport:
    """What :func:`compile` proved, and the calls since. ``print(model.report)``."""

    num_layers: int = 0
    segment_size: int = 0
    """``T``, read off the slices of the inputs."""
    length_inputs: dict[str, int] = field(default_factory=dict)
    """The inputs cut into segments, and their segmented dim."""
    probes: list[tuple[int, int]] = field(default_factory=list)
    """``(segments, last segment length)`` of every probe traced."""
    trace_s: list[float] = field(default_factory=list)
    """Dynamo's trace time per probe."""
    prove_s: float = 0.0
    """Analysis, the reroll proof and building the program."""
    short_tail: bool = False
    """A last segment shorter than ``T`` is proven."""
    holes_checked: int = 0
    """Int literals that change with ``s`` or ``n``, fitted and checked on other probes."""
    unit_nodes: tuple[int, int] = (0, 0)
    """Nodes of the first and of the steady segment template."""
    state_writes: list[str] = field(default_factory=list)
    """Module attributes the forward writes, as ``path.name``."""
    carry: tuple[int, int] | None = None
    """``(slot, output)``: the steady template's output that the next step reads one lane up,
    in place (``carry_lanes``: the hidden states); ``None`` when off or not proven."""
    runs: list[RunRecord] = field(default_factory=list)
    generations: list[GenerateRecord] = field(default_factory=list)
    """The ``generate`` calls (:mod:`diagpass.generate`)."""
    pipeline: str | None = None
    """``options={"pipeline": True}``: the stages, e.g. ``2 stages: rank 0 layers 0-1, rank 1
    layers 2-3`` (:mod:`diagpass.distributed`); each run's ``stats`` says what this rank did."""

    def __str__(self) -> str:
        probes = ", ".join(f"{s} segments (last {n})" for s, n in self.probes)
        lines = [
            "diagpass.compile: PROVEN for any length"
            + ("" if self.short_tail else " (full last segments only: no short last segment proven)"),
            f"  L={self.num_layers} T={self.segment_size}; segmented inputs {self.length_inputs}",
            f"  probes: {probes}; trace {sum(self.trace_s):.2f}s, proof and build {self.prove_s:.2f}s",
            f"  templates: first segment {self.unit_nodes[0]} nodes, steady segment {self.unit_nodes[1]} nodes; "
            f"{self.holes_checked} int literals affine in (s, n), checked",
            f"  state written back: {_summarise_writes(self.state_writes)}",
            "  carried lanes: "
            + (f"output {self.carry[1]} -> slot {self.carry[0]} of the next layer, read in place" if self.carry else "none"),
        ]
        if self.pipeline:
            lines.append(f"  pipelined over {self.pipeline}")
        for run in self.runs[-5:]:
            extra = f" ({run.reason})" if run.reason else ""
            lines.append(
                f"  run: {run.tokens} tokens = {run.segments} segments (last {run.last_length}): {run.path}{extra}, "
                f"{run.wall_s:.3f}s" + (f", compiled {run.stats.compile_s:.2f}s" if run.stats and run.stats.compile_s else "")
                + (f", CUDA graph: {run.stats.graph}" if run.stats and run.stats.graph != "off" else "")
            )
        lines.extend(f"  {record}" for record in self.generations[-5:])
        return "\n".join(lines)


def _modes(model: torch.nn.Module) -> tuple[bool, ...]:
    """``training`` of every submodule, in order."""
    return tuple(module.training for module in model.modules())


def _summarise_writes(writes: list[str]) -> str:
    """``W_mem, first_seg, z on 16 modules (model.model.layers.0 ...)`` rather than 48 paths."""
    if not writes:
        return "none"
    names = sorted({w.rsplit(".", 1)[-1] for w in writes})
    owners = sorted({w.rsplit(".", 1)[0] if "." in w else "<model>" for w in writes})
    where = owners[0] if len(owners) == 1 else f"{len(owners)} modules ({owners[0]} ...)"
    return f"{len(writes)} attributes: {', '.join(names)} on {where}"


# -- input and output mapping ---------------------------------------------------------------------


def _tensor_owners(model: torch.nn.Module) -> dict[int, Hashable]:
    """id -> key of every parameter, buffer and plain tensor attribute of the model."""
    owners: dict[int, Hashable] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), ("param", name))
    for name, b in model.named_buffers(remove_duplicate=False):
        owners.setdefault(id(b), ("buffer", name))
    for path, module in model.named_modules(remove_duplicate=False):
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                owners.setdefault(id(value), ("attr", path, name))
    return owners


def _module_state(model: torch.nn.Module) -> dict[tuple[str, str], Any]:
    """Every plain attribute of every submodule (what Dynamo may write back)."""
    state: dict[tuple[str, str], Any] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, value in vars(module).items():
            if name in _NOT_STATE or name.startswith(("__", "_torchdynamo")):
                continue
            state[(path, name)] = value
    return state


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, _SCALARS) and isinstance(b, _SCALARS):
        return type(a) is type(b) and a == b
    return False


@dataclass(kw_only=True)
class _Mapping:
    keys: dict[Any, Hashable]
    """placeholder -> key."""
    returned: tuple[list[Hashable], Any]
    """Per leaf of the return value, its source; and the tree spec."""
    changed: set[tuple[str, str]]
    """Attributes this call changed: Dynamo writes the values back after the graph runs."""
    writes_of: Any
    """``attributes -> {(module path, attribute): source of its value after the call}``."""
    writes: dict[tuple[str, str], Hashable] = field(default_factory=dict)
    """The attributes every call writes (changed by any probe), with their sources."""
    source_of: Any = None
    """``(value, what) -> source``: where a value of this probe's call came from."""
    groups: OutputGroups | None = None
    """Outputs that repeat once per segment, grouped into lists (None: no such outputs)."""
    recipe: ReturnRecipe | None = None
    """How to build the return value when its structure follows the number of segments."""

    def regroup(self, outputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """This probe's flat graph outputs, grouped the way the program returns them."""
        if self.groups is None:
            return outputs
        grouped: list[Any] = [[] if i in self.groups.lists else None for i in range(len(outputs))]
        for value, (i, s) in zip(outputs, self.groups.where):
            if s is None:
                grouped[i] = value
            else:
                grouped[i].append(value)
        return tuple(grouped[: max(i for i, _ in self.groups.where) + 1])

    def translate(self, source: Hashable) -> Hashable:
        """A source over the flat outputs -> over the grouped ones (``("each", list, segment)``)."""
        if self.groups is None or source[0] != "out":  # type: ignore[index]
            return source
        i, s = self.groups.where[source[1]]  # type: ignore[index]
        return ("out", i) if s is None else ("each", i, s)


def _source(value: Any, outputs: tuple[Any, ...], inputs: dict[int, Hashable], what: str) -> Hashable:
    if isinstance(value, torch.Tensor):
        for i, out in enumerate(outputs):
            if out is value:
                return ("out", i)
        if id(value) in inputs:
            return ("in", inputs[id(value)])
        raise GeneralisationError(f"{what} is a tensor the captured graph neither takes nor returns")
    if isinstance(value, _SCALARS) or isinstance(value, (torch.dtype, torch.device)):
        return ("const", value)
    raise GeneralisationError(f"{what} is a {type(value).__name__}, which diagpass.compile cannot reproduce")


def _map_probe(
    model: torch.nn.Module, captured: Capture, arg_leaves: list[Any], before: dict[tuple[str, str], Any]
) -> _Mapping:
    gm = captured.graph_module
    assert gm is not None
    owners = _tensor_owners(model)
    for i, leaf in enumerate(arg_leaves):
        if isinstance(leaf, torch.Tensor):
            owners[id(leaf)] = ("arg", i)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keys: dict[Any, Hashable] = {}
    for node, example in zip(placeholders, captured.example_inputs):
        key = owners.get(id(example))
        if key is None:
            raise GeneralisationError(
                f"graph input {node.name} ({type(example).__name__}) is neither an argument, a parameter, "
                "a buffer nor a tensor attribute of the model"
            )
        keys[node] = key
    outputs = captured.outputs[-1]
    inputs = {id(ex): keys[n] for n, ex in zip(placeholders, captured.example_inputs)}
    leaves, spec = pytree.tree_flatten(captured.returned)
    returned = [_source(leaf, outputs, inputs, f"return value leaf {i}") for i, leaf in enumerate(leaves)]
    after = _module_state(model)
    changed = {where for where, value in after.items() if where not in before or not _same(before[where], value)}

    def writes_of(attributes: set[tuple[str, str]]) -> dict[tuple[str, str], Hashable]:
        """The source of each attribute's value after the call."""
        return {
            where: _source(after.get(where), outputs, inputs, f"attribute {'.'.join(filter(None, where))}")
            for where in sorted(attributes)
        }

    def source_of(value: Any, what: str) -> Hashable:
        return _source(value, outputs, inputs, what)

    return _Mapping(keys=keys, returned=(returned, spec), changed=changed, writes_of=writes_of, source_of=source_of)


# -- probes ---------------------------------------------------------------------------------------


def _capture_once(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Capture, dict[tuple[str, str], Any]]:
    snapshot: dict[str, dict[tuple[str, str], Any]] = {}

    def take_snapshot() -> None:
        snapshot["before"] = _module_state(model)

    with torch.no_grad():
        captured = capture_whole(model, args, kwargs, before_each=take_snapshot)
    before = snapshot["before"]
    if captured.has_breaks or captured.graph_module is None:
        reasons = "; ".join(captured.break_reasons[:3]) or "no graph captured"
        raise GeneralisationError(f"the forward does not trace as one graph: {reasons}")
    if len(captured.outputs) != 1:
        raise GeneralisationError("the captured graph ran more than once in one forward")
    return captured, before


def _cut(value: Any, dim: int, length: int) -> Any:
    return value.narrow(dim, 0, length)


def _short_lengths(segment: int, avoid: set[int]) -> list[int]:
    """Two distinct short last-segment lengths (for the fit in n), not in ``avoid``."""
    picks: list[int] = []
    for n in (segment // 2 + 1, segment - 1, segment // 3 + 1, 1, 2):
        if 0 < n < segment and n not in avoid and n not in picks:
            picks.append(n)
    return picks[:2]


class _NoShortTail(GeneralisationError):
    """The forward cuts a short last segment into other segments than ``T`` (or not at all)."""


class AnyLengthModel(torch.nn.Module):
    """The module :func:`compile` returns: ``forward`` takes inputs of any length.

    It holds the user's model (``.model``) and calls it unchanged where the rerolled
    program does not apply (a single segment, autograd on). ``report`` says what was
    proven and how each call ran.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        program: DiagonalProgram,
        mapping: _Mapping,
        arg_spec: Any,
        arg_examples: list[Any],
        length_dims: dict[int, int],
        config: DiagbatchConfig,
        report: RerollReport,
        options: dict[str, Any] | None = None,
        training: DiagonalProgram | None = None,
        random: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.program = program
        self.training_program = training
        """The same plan for runs with autograd on (:func:`diagpass.config.training_config`); None: those run eagerly."""
        self.random = random
        """Where the traced cells draw random numbers (dropout in ``train()`` mode), or None. Only the
        training program runs them: the same distribution as the model, not the same draws."""
        self._modes = _modes(model)
        """``train()``/``eval()`` of every submodule when traced: dropout and ``if self.training`` are
        traced as they were, so another mode needs its own program (:attr:`_by_mode`)."""
        self._by_mode: dict[tuple[bool, ...], AnyLengthModel | str] = {}
        """Programs compiled from the same probe in other modes, or why that failed."""
        self.diagbatch_config = config
        """The validated options (:class:`~diagpass.DiagbatchConfig`). ``config`` is the model's own
        (Hugging Face convention: ``Trainer`` and ``generate`` read and write ``model.config``)."""
        self.options = dict(options or {})
        """The options :func:`compile` was given (the prefill programs of ``generate`` use them too)."""
        self.report = report
        self._prefill_programs: dict[Hashable, Any] = {}
        """``generate``'s compiled segment loops (or why one is not proven), by what they specialise on."""
        self._mapping = mapping
        self._arg_spec = arg_spec
        self._arg_examples = arg_examples
        self._length_dims = length_dims
        self._modules_by_path = dict(model.named_modules(remove_duplicate=False))
        # Where each graph input lives, resolved once: Module.get_parameter walks the dotted path
        # at every call (about 28 us each, 6.5 ms for a 16-layer model's 230 inputs on a CPU
        # host). The module tree is the compile-time one, as for the state written back; a
        # parameter or buffer replaced on its module is still read afresh at every call.
        self._input_keys = list(dict.fromkeys(mapping.keys.values()))
        self._input_slots = [self._slot_of(key) for key in self._input_keys]

    def _segments(self, leaves: list[Any]) -> tuple[int, int, int]:
        T = self.program.segment_size
        tokens = None
        for i, example in enumerate(self._arg_examples):
            leaf = leaves[i]
            if isinstance(example, torch.Tensor):
                if not isinstance(leaf, torch.Tensor):
                    raise InputError(f"argument {i} must be a tensor like the probe's, got {type(leaf).__name__}")
                if leaf.dtype != example.dtype:
                    raise InputError(f"argument {i} has dtype {leaf.dtype}; the probe had {example.dtype}")
                if leaf.device != example.device:
                    raise InputError(f"argument {i} is on {leaf.device}; the probe was on {example.device}")
                if leaf.dim() != example.dim():
                    raise InputError(f"argument {i} has {leaf.dim()} dims; the probe had {example.dim()}")
                dim = self._length_dims.get(i)
                for j, (a, b) in enumerate(zip(leaf.shape, example.shape)):
                    if j != dim and a != b:
                        raise InputError(
                            f"argument {i} has shape {tuple(leaf.shape)}; only dim {dim} may differ from the "
                            f"probe's {tuple(example.shape)} (compile again with a probe of this shape)"
                        )
                if dim is not None:
                    if tokens is None:
                        tokens = leaf.shape[dim]
                    elif leaf.shape[dim] != tokens:
                        raise InputError(f"argument {i} has {leaf.shape[dim]} positions along dim {dim}, others {tokens}")
            elif not _same(leaf, example) and not (isinstance(leaf, _SCALARS) and leaf == example):
                raise InputError(f"argument {i} is {leaf!r}; the probe had {example!r} (only lengths may change)")
        assert tokens is not None
        if tokens == 0:
            raise InputError("the input is empty (0 tokens along the segmented dim)")
        segments = math.ceil(tokens / T)
        return tokens, segments, tokens - (segments - 1) * T

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the model's forward takes ``**kwargs`` (HF ``Trainer`` then passes
        ``num_items_in_batch``). The wrapper's own ``forward(*args, **kwargs)`` says nothing about it."""
        model = self.model
        if hasattr(model, "accepts_loss_kwargs"):
            return bool(model.accepts_loss_kwargs)
        parameters = inspect.signature(model.forward).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the wrapped model, as ``torch.compile``'s
        ``OptimizedModule`` does: ``fast.config`` (the model's config), ``fast.can_generate()``,
        ``fast.get_input_embeddings()``... so code written for the model (HF ``Trainer``) takes it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._arg_spec:
            raise InputError(f"the call's arguments are structured as {spec}; the probe's were {self._arg_spec}")
        tokens, segments, last = self._segments(leaves)
        modes = _modes(self.model)
        if modes != self._modes:
            return self._in_other_mode(modes, (tokens, segments, last), start, args, kwargs)
        record = RunRecord(tokens=tokens, segments=segments, last_length=last, path="diagonal")
        autograd = self._autograd_on()
        if autograd and self.diagbatch_config.pipeline:
            raise ConfigError(
                "diagpass.compile(options={'pipeline': True}) runs inference only: call it under torch.no_grad() "
                "(training is not pipelined yet)"
            )
        reason = None
        if segments < 2:
            reason = "a single segment: nothing to batch across"
        elif self.training_program is None and autograd:
            reason = "autograd is on and no training program was built"
        elif last != self.program.segment_size and not self.program.plan.short_tail:
            reason = "a short last segment was not proven for this model"
        elif self.random is not None and not autograd:
            reason = f"inference in train() mode: {self.random}"
        if reason is not None:
            record.path, record.reason = "eager", reason
            log.info("diagpass.compile: running the model eagerly: %s", reason)
            result = self.model(*args, **kwargs)
        else:
            inputs = {key: self._input(slot, leaves) for key, slot in zip(self._input_keys, self._input_slots)}
            if autograd:  # backward runs through the same batched steps, reversed
                assert self.training_program is not None
                record.autograd = True
                outputs, record.stats = self.training_program.run(inputs, segments, last)
            else:
                with torch.no_grad():
                    outputs, record.stats = self.program.run(inputs, segments, last)
            result = self._write_back(outputs, inputs, segments)
        record.wall_s = time.perf_counter() - start
        self.report.runs.append(record)
        del self.report.runs[:-_RUN_HISTORY]
        return result

    def _in_other_mode(
        self, modes: tuple[bool, ...], length: tuple[int, int, int], start: float, args: Any, kwargs: Any
    ) -> Any:
        """A call after ``train()``/``eval()`` changed the model's mode since the trace: run the
        program compiled from the same probe in this mode (compiled on the first such call), or
        the model itself when that cannot be proven."""
        other = self._by_mode.get(modes)
        if other is None:
            probe_args, probe_kwargs = pytree.tree_unflatten(self._arg_examples, self._arg_spec)
            log.info("diagpass.compile: the model's train()/eval() mode changed: compiling the probe in this mode")
            try:
                other = compile(self.model, *probe_args, options=self.options, **probe_kwargs)
            except DiagpassError as error:
                other = f"not proven in this train()/eval() mode: {error}"
            self._by_mode[modes] = other
        if isinstance(other, AnyLengthModel):
            result = other(*args, **kwargs)
            record = other.report.runs[-1]
            record.reason = record.reason or "the program traced in this train()/eval() mode"
        else:
            result = self.model(*args, **kwargs)
            tokens, segments, last = length
            record = RunRecord(tokens=tokens, segments=segments, last_length=last, path="eager", reason=other)
        record.wall_s = time.perf_counter() - start
        self.report.runs.append(record)
        del self.report.runs[:-_RUN_HISTORY]
        return result

    def _autograd_on(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own ``generate(*args, **kwargs)``, same arguments and same result, with the
        prompt's segments before the last run on a diagonal program (:mod:`diagpass.generate`).
        Where that does not apply, the model's own ``generate`` runs and ``report`` says why."""
        from diagpass.generate import generate

        return generate(self, *args, **kwargs)

    def _slot_of(self, key: Hashable) -> tuple[str, Any, Any]:
        """``("arg", index, None)``, or ``(kind, module, name)`` for a parameter, buffer or attribute."""
        kind = key[0]  # type: ignore[index]
        if kind == "arg":
            return ("arg", key[1], None)  # type: ignore[index]
        if kind in ("param", "buffer"):
            path, _, name = key[1].rpartition(".")  # type: ignore[index]
            return (kind, self.model.get_submodule(path), name)
        return ("attr", self._modules_by_path[key[1]], key[2])  # type: ignore[index]

    @staticmethod
    def _input(slot: tuple[str, Any, Any], leaves: list[Any]) -> Any:
        kind, where, name = slot
        if kind == "arg":
            return leaves[where]
        table = where._parameters if kind == "param" else where._buffers if kind == "buffer" else None
        if table is not None and table.get(name) is not None:
            return table[name]
        return getattr(where, name)  # an attribute, or a parameter that is no longer one: its own error

    def _write_back(self, outputs: tuple[Any, ...], inputs: dict[Hashable, Any], segments: int) -> Any:
        _apply_writes(self._modules_by_path, self._mapping.writes, outputs, inputs, segments)
        if self._mapping.recipe is not None:
            return self._mapping.recipe.build(segments, lambda source: _value_of(source, outputs, inputs))
        sources, spec = self._mapping.returned
        return pytree.tree_unflatten([_value_of(s, outputs, inputs) for s in sources], spec)


def compile(  # noqa: A001 - the public name the issue asks for
    model: torch.nn.Module, /, *probe_args: Any, options: dict[str, Any] | None = None, **probe_kwargs: Any
) -> AnyLengthModel:
    """Prove on a short probe that ``model`` repeats one segment template; return a module
    that runs any input length on the diagonal schedule, without tracing again.

    ``probe_args`` / ``probe_kwargs`` are one call's arguments, 3 or 4 segments long.
    ``options`` are the ``diagbatch`` backend's (``compiler``, ``pad``, ``cudagraphs``,
    ``inductor``...). The model's state after each call is what eager would leave.

    Raises :class:`~diagpass.StructureError` when the diagonal structure is refuted (the
    error names the violating edge) and :class:`GeneralisationError` when the probe does
    not prove that other lengths repeat the same template.
    """
    from diagpass.backend import step_compiler

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"diagpass.compile takes an nn.Module, got {type(model).__name__}")
    # Every ramp size is compiled on the first call: fewer, larger step shapes by default, to
    # keep compile + first call at 131K under a minute (min_lanes 1 or 2 run about 15 ms
    # faster there, for 61 s of it from cold caches: benchmarks/RESULTS.md).
    config = parse_options({"min_lanes": 4, **(options or {})})
    if config.pipeline:  # fail before tracing: the stages need the default process group
        from diagpass.distributed import check_process_group

        check_process_group()
    report = RerollReport()
    started = time.perf_counter()

    arg_leaves, arg_spec = pytree.tree_flatten((probe_args, probe_kwargs))
    _check_probe(arg_leaves)
    captured, before = _capture_once(model, probe_args, probe_kwargs)
    report.trace_s.append(captured.trace_s)
    gm = captured.graph_module
    assert gm is not None
    analysis = analyze_graph(gm)
    verdict = analysis.report
    random = _check_structure(model, analysis)
    mapping = _map_probe(model, captured, arg_leaves, before)
    try:
        split = split_units(gm.graph, analysis.labels)
        segment, axes = find_length_axes(split, mapping.keys)
    except RerollError as error:
        raise GeneralisationError(f"diagpass.compile: {error}") from error
    groups = group_segment_outputs(gm.graph, split)
    if groups.lists:  # the return value has one part per segment (the reference's logits_{i})
        mapping.groups = groups
        mapping.recipe = ReturnRecipe.from_probe(
            captured.returned,
            analysis.labels.num_segments,
            lambda value, what: mapping.translate(mapping.source_of(value, what)),
        )
    num_segments = analysis.labels.num_segments
    length_dims, n_tokens = _segmented_inputs(arg_leaves, axes, segment, num_segments)

    last = n_tokens - (num_segments - 1) * segment
    probes = [
        Probe(
            graph=gm.graph,
            labels=analysis.labels,
            keys=mapping.keys,
            segment_lengths=[segment] * (num_segments - 1) + [last],
        )
    ]
    report.probes.append((num_segments, last))
    extra_maps: list[_Mapping] = []
    keep_alive: list[Any] = [captured]
    prober = _CutProber(
        model=model, arg_leaves=arg_leaves, arg_spec=arg_spec, length_dims=length_dims, segment=segment,
        mapping=mapping, report=report, keep_alive=keep_alive,
    )
    cut_probes = prober.all(last, short=config.short_tail != "none")
    for probe, extra_map, _, _ in cut_probes:
        extra_maps.append(extra_map)
        probes.append(probe)
        report.probes.append((2, probe.segment_lengths[-1]))
    _check_state_writes(mapping, extra_maps, report, num_segments)

    prove_start = time.perf_counter()
    plan, program, training = _programs(
        probes, gm=gm, analysis=analysis, mapping=mapping, config=config, random=random,
        truncation_probes=[(num_segments, analysis, mapping)] + [(2, extra_analysis, m) for _, m, _, extra_analysis in cut_probes],
    )
    report.prove_s = time.perf_counter() - prove_start + verdict.analysis_s
    _describe_plan(report, plan, mapping, segment=segment, length_dims=length_dims, carry=program.carry)
    if config.pipeline:  # one stage of contiguous layers per rank (diagpass.distributed)
        from diagpass.distributed import stages_for
        from diagpass.program.pipeline import PipelineProgram

        stages = stages_for(plan.num_layers)
        program = PipelineProgram(program.plan, config=config, compiler=step_compiler, name="diagpass.compile pipeline", stages=stages)
        report.pipeline = stages.describe()
    # Restore the state the user's probe call left (the cut probes ran after it).
    _replay_writes(model, mapping, captured, num_segments)
    log.info("diagpass.compile: proven in %.2fs:\n%s", time.perf_counter() - started, report)
    _release_probes(keep_alive, [mapping, *extra_maps])
    return AnyLengthModel(
        model=model,
        program=program,
        mapping=mapping,
        arg_spec=arg_spec,
        arg_examples=list(arg_leaves),
        length_dims=length_dims,
        config=config,
        report=report,
        options=options,
        training=training,
        random=random,
    )


def _check_probe(arg_leaves: list[Any]) -> None:
    """A probe has a tensor argument, and no empty one."""
    if not any(isinstance(leaf, torch.Tensor) for leaf in arg_leaves):
        raise ProbeError(f"diagpass.compile: the probe has no tensor argument; {_PROBE_HINT}")
    for i, leaf in enumerate(arg_leaves):
        if isinstance(leaf, torch.Tensor) and leaf.numel() == 0:
            raise ProbeError(f"diagpass.compile: the probe is empty (argument {i} has shape {tuple(leaf.shape)}); {_PROBE_HINT}")


def _check_structure(model: torch.nn.Module, analysis: GraphAnalysis) -> str | None:
    """Raise unless the probe's graph is proven diagonal-safe, with cells that batch; returns the
    cells' random ops (dropout in ``train()`` mode: only the training program batches them)."""
    verdict = analysis.report
    if 0 < verdict.num_segments < 3:
        raise ProbeError(
            f"diagpass.compile: the probe runs {verdict.num_segments} segment(s); diagpass.compile needs a probe of at "
            f"least 3 segments (the first one, and two that show the steady state): {_PROBE_HINT}"
        )
    if not verdict.ok or analysis.templates is None:
        raise StructureError(f"diagpass.compile: diagonal structure not proven: {verdict.reason}", verdict.violations)
    if analysis.templates.unbatchable:
        raise StructureError(f"diagpass.compile: cells cannot be batched: {analysis.templates.unbatchable}")
    random = analysis.templates.random
    if random and not any(p.requires_grad for p in model.parameters()):
        raise StructureError(f"diagpass.compile: cells cannot be batched (no parameter requires grad): {random}")
    return random


def _describe_plan(
    report: RerollReport, plan: ProgramPlan, mapping: _Mapping, *, segment: int, length_dims: dict[int, int], carry: Any
) -> None:
    """What the proof found, in the report users read (``fast.report``)."""
    report.num_layers = plan.num_layers
    report.segment_size = segment
    report.length_inputs = {f"argument {i}": d for i, d in sorted(length_dims.items())}
    report.short_tail = plan.short_tail
    report.holes_checked = plan.holes_checked
    report.unit_nodes = (len(plan.first.form), len(plan.steady.form))
    report.state_writes = [".".join(filter(None, where)) for where in mapping.writes]
    report.carry = carry


def _release_probes(keep_alive: list[Any], mappings: list[_Mapping]) -> None:
    """Drop what the probe calls returned: Dynamo's cache keeps their recorders alive, and the
    mappings' closures hold the probes' outputs."""
    for kept in keep_alive:
        kept.outputs.clear()
        kept.returned = None
    for probe_map in mappings:
        probe_map.writes_of = probe_map.source_of = None
    keep_alive.clear()


def _segmented_inputs(
    arg_leaves: list[Any], axes: dict[Hashable, int], segment: int, num_segments: int
) -> tuple[dict[int, int], int]:
    """The probe's arguments cut into segments (argument index -> its length dim) and the length:
    the arguments the proof found cut, and any other tensor argument with the same length on
    the same dim (cut along with them)."""
    length_dims = {key[1]: dim for key, dim in axes.items() if key[0] == "arg"}  # type: ignore[index]
    if not length_dims:
        raise GeneralisationError("diagpass.compile: the segmented input is not an argument of the call")
    tokens = {arg_leaves[i].shape[d] for i, d in length_dims.items()}
    if len(tokens) != 1:
        raise GeneralisationError(f"diagpass.compile: the segmented inputs disagree on the length: {tokens}")
    n_tokens = tokens.pop()
    if math.ceil(n_tokens / segment) != num_segments:
        raise GeneralisationError(
            f"diagpass.compile: {n_tokens} tokens in segments of {segment} should make "
            f"{math.ceil(n_tokens / segment)} segments, but the forward ran {num_segments}"
        )
    for i, leaf in enumerate(arg_leaves):
        if i not in length_dims and isinstance(leaf, torch.Tensor):
            dim = next(iter(length_dims.values()))
            if leaf.dim() > dim and leaf.shape[dim] == n_tokens:
                length_dims[i] = dim
    return length_dims, n_tokens


def _check_state_writes(mapping: _Mapping, extra_maps: list[_Mapping], report: RerollReport, num_segments: int) -> None:
    """The state every probe writes back, as sources that hold for any number of segments:
    raises :class:`GeneralisationError` when it (or the return structure) depends on the length."""
    written = set(mapping.changed).union(*(m.changed for m in extra_maps))
    for probe_map in [mapping, *extra_maps]:
        probe_map.writes = {where: probe_map.translate(src) for where, src in probe_map.writes_of(written).items()}
        early = [".".join(filter(None, where)) for where, src in probe_map.writes.items() if src[0] == "each"]  # type: ignore[index]
        if early:
            raise GeneralisationError(
                f"diagpass.compile: the forward leaves one segment's output (not the last's) in `{early[0]}`: "
                "the value would depend on which segments exist"
            )
    _find_segment_counters(mapping, extra_maps, num_segments)
    for i, other in enumerate(extra_maps, start=1):
        if mapping.recipe is None and (other.returned[1] != mapping.returned[1] or other.returned[0] != mapping.returned[0]):
            raise GeneralisationError(
                f"diagpass.compile: probe {i} returns another structure than the probe: the return value depends "
                "on the number of segments"
            )
        if other.writes != mapping.writes:
            raise GeneralisationError(
                "diagpass.compile: the state the forward writes back depends on the input length: "
                + _describe_write_difference(mapping.writes, other.writes, report.probes[0], report.probes[i])
            )


def _programs(
    probes: list[Probe],
    *,
    gm: torch.fx.GraphModule,
    analysis: Any,
    mapping: _Mapping,
    config: DiagbatchConfig,
    random: str | None,
    truncation_probes: list[tuple[int, Any, _Mapping]],
) -> tuple[Any, DiagonalProgram, DiagonalProgram]:
    """Prove the reroll over ``probes``; plan the inference program and the training program
    (:func:`~diagpass.config.training_config`, sharing the weight stacks) on the proof."""
    from diagpass.backend import step_compiler

    try:
        plan = prove_reroll(probes)
        program_plan = plan_program(
            proof=plan, gm=gm, labels=analysis.labels, templates=analysis.templates, keys=mapping.keys, config=config
        )
        program = DiagonalProgram(program_plan, config=config, compiler=step_compiler, name="diagpass.compile program")
        train_config = training_config(config)
        if random and train_config.compiler != "eager":  # as the backend: Inductor steps gave NaN with dropout
            train_config = replace(train_config, compiler="eager")
        train_plan = plan_program(
            proof=plan, gm=gm, labels=analysis.labels, templates=analysis.templates, keys=mapping.keys, config=train_config
        )
        detach, returned_detached = _truncation(truncation_probes)
        for each_plan in (program_plan, train_plan):
            each_plan.detach = detach
            redetach_outputs(each_plan.post[0], returned_detached)
            if detach is not None:
                each_plan.decisions.append(detach.describe() + ": detached before stacking, with autograd on")
        training = DiagonalProgram(
            train_plan, config=train_config, compiler=step_compiler, name="diagpass.compile training program",
            share_stacks=program,
        )
    except RerollError as error:
        raise GeneralisationError(f"diagpass.compile: {error}") from error
    return plan, program, training


class _CutProber:
    """Traces the forward again on 2 segments (the cut probes), the last of each short length
    :func:`_short_lengths` picks, or of full length only when the model cuts no short tail."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        arg_leaves: list[Any],
        arg_spec: Any,
        length_dims: dict[int, int],
        segment: int,
        mapping: _Mapping,
        report: RerollReport,
        keep_alive: list[Any],
    ) -> None:
        self.model, self.arg_leaves, self.arg_spec = model, arg_leaves, arg_spec
        self.length_dims, self.segment, self.mapping = length_dims, segment, mapping
        self.report, self.keep_alive = report, keep_alive

    def all(self, last: int, *, short: bool = True) -> list[tuple[Probe, _Mapping, Capture, Any]]:
        """The cut probes for a user probe whose last segment has ``last`` tokens; with
        ``short=False`` (``short_tail="none"``, a probe of whole segments) one of whole segments."""
        segment = self.segment
        if not short:
            if last != segment:
                raise ProbeError(
                    f"diagpass.compile: short_tail='none' proves whole segments only, but the probe's last segment has "
                    f"{last} of {segment} tokens: probe with whole segments"
                )
            log.info("diagpass.compile: short_tail='none': proving full segments only")
            return [self.trace(segment)]
        try:
            return [self.trace(short) for short in _short_lengths(segment, {last})]
        except (_NoShortTail, GeneralisationError, StructureError) as error:
            if last != segment:
                raise
            # The model cuts no short last segment of T (a view into (S, T), or torch.chunk): prove full
            # segments only; other lengths run the model itself, with the reason in the report.
            no_short_tail = f"{error}" if isinstance(error, _NoShortTail) else f"a short last segment is not proven: {error}"
            log.info("diagpass.compile: %s; proving full segments only", no_short_tail)
        except Exception as error:  # noqa: BLE001 - the model's own forward raised on a short last segment
            if last != segment or isinstance(error, DiagpassError):
                raise
            log.info("diagpass.compile: the forward raises on a short last segment (%s); proving full segments only", error)
        self.keep_alive[1:] = []
        self.report.trace_s[1:] = []
        return [self.trace(segment)]

    def trace(self, last_length: int) -> tuple[Probe, _Mapping, Capture, Any]:
        """Trace the forward on 2 segments, the last of ``last_length``."""
        segment, mapping, length_dims = self.segment, self.mapping, self.length_dims
        # One cut per distinct tensor: `model(ids, labels=ids)` must trace with one input again.
        cuts: dict[int, Any] = {}
        cut = [
            cuts.setdefault(id(leaf), _cut(leaf, length_dims[i], segment + last_length)) if i in length_dims else leaf
            for i, leaf in enumerate(self.arg_leaves)
        ]
        cut_args, cut_kwargs = pytree.tree_unflatten(cut, self.arg_spec)
        extra, extra_before = _capture_once(self.model, tuple(cut_args), dict(cut_kwargs))
        self.keep_alive.append(extra)
        self.report.trace_s.append(extra.trace_s)
        extra_gm = extra.graph_module
        assert extra_gm is not None
        extra_analysis = analyze_graph(extra_gm)
        if not extra_analysis.report.ok:
            raise GeneralisationError(
                f"diagpass.compile: with 2 segments (the last of {last_length}) the structure is not proven: "
                f"{extra_analysis.report.reason}"
            )
        extra_map = _map_probe(self.model, extra, cut, extra_before)
        extra_split = split_units(extra_gm.graph, extra_analysis.labels)
        try:
            cut_size = find_length_axes(extra_split, extra_map.keys)[0]
        except RerollError as error:
            raise _NoShortTail(str(error)) from error
        if cut_size != segment:  # torch.chunk into ceil(n / T) parts: parts of T only when T divides n
            raise _NoShortTail(f"{segment + last_length} tokens are cut into segments of {cut_size}, not {segment}")
        if mapping.groups is not None:
            extra_map.groups = group_segment_outputs(extra_gm.graph, extra_split)
            mapping.recipe.check(  # type: ignore[union-attr]
                extra.returned,
                2,
                lambda value, what, m=extra_map: m.translate(m.source_of(value, what)),
                f"the cut probe of 2 segments (the last of {last_length})",
            )
        probe = Probe(graph=extra_gm.graph, labels=extra_analysis.labels, keys=extra_map.keys, segment_lengths=[segment, last_length])
        return probe, extra_map, extra, extra_analysis


def _truncation(probes: list[tuple[int, Any, _Mapping]]) -> tuple[DetachRule | None, list[int]]:
    """Truncated BPTT over the probes (``(segments, analysis, mapping)``, the user's probe first):
    the rule of which cells read their recurrent inputs detached, fitted on every probe, and the
    post outputs the model returned detached (the same in every probe). Raises
    :class:`~diagpass.passes.reroll.RerollError` where no rule fits."""
    observations = [(segments, analysis.templates.detached) for segments, analysis, _ in probes]
    try:
        rule = fit_detach_windows(observations) if any(table for _, table in observations) else None
    except ValueError as error:
        raise RerollError(f"truncated BPTT not proven for other lengths: {error}") from error
    returned: list[set[Hashable]] = []
    for _, analysis, probe_map in probes:
        returned.append({probe_map.translate(("out", p)) for p in analysis.detaches.output_positions})
    if any(other != returned[0] for other in returned[1:]):
        raise RerollError("the outputs the forward returns detached depend on the number of segments")
    positions = sorted(source[1] for source in returned[0])  # type: ignore[index]
    if any(source[0] != "out" for source in returned[0]):  # type: ignore[index]
        raise RerollError("the forward returns one segment's output detached (not the last's)")
    return rule, positions


def _find_segment_counters(mapping: _Mapping, extra_maps: list[_Mapping], num_segments: int) -> None:
    """Int attributes that count the segments (the reference's ``seg_num``, when it is not reset):
    ``segments + offset`` after every probe. Their sources become ``("count", offset)``."""
    if not extra_maps:
        return
    for where, source in list(mapping.writes.items()):
        if source[0] != "const" or type(source[1]) is not int:  # type: ignore[index]
            continue
        offset = source[1] - num_segments  # type: ignore[index]
        if all(m.writes.get(where) == ("const", 2 + offset) for m in extra_maps):
            for probe_map in [mapping, *extra_maps]:
                probe_map.writes[where] = ("count", offset)


def _describe_write_difference(
    mine: dict[tuple[str, str], Hashable],
    theirs: dict[tuple[str, str], Hashable],
    my_probe: tuple[int, int],
    their_probe: tuple[int, int],
) -> str:
    """The first attribute written differently by two probes, as the user names it."""
    for where in sorted(set(mine) | set(theirs)):
        if mine.get(where) != theirs.get(where):
            path, name = where
            attribute = f"{path}.{name}" if path else name
            hint = (
                " (a Python counter of segments? keep it out of forward, or derive it from the input length)"
                if all(isinstance(v, tuple) and v[0] == "const" for v in (mine.get(where), theirs.get(where)))
                else ""
            )
            return (
                f"attribute `{attribute}` of the model is {_describe_source(mine.get(where))} after {my_probe[0]} "
                f"segments and {_describe_source(theirs.get(where))} after {their_probe[0]}{hint}"
            )
    return "unknown attribute"


def _describe_source(source: Any) -> str:
    if source is None:
        return "not written"
    kind, what = source
    if kind == "const":
        return repr(what)
    return "an output of the graph" if kind == "out" else "an input of the graph"


def _value_of(
    source: Hashable, outputs: tuple[Any, ...], inputs: dict[Hashable, Any], segments: int | None = None
) -> Any:
    """The value a mapped source names: a graph output, one segment's entry of a per-segment
    output, a graph input (by key), a constant, or a count of the ``segments``."""
    kind, what = source[:2]  # type: ignore[index]
    if kind == "count":
        assert segments is not None
        return segments + what
    if kind == "each":
        return outputs[what][source[2]]  # type: ignore[index]
    if kind == "out":
        return outputs[what]
    if kind == "in":
        return inputs[what]
    return what


def _apply_writes(
    modules: dict[str, torch.nn.Module],
    writes: dict[tuple[str, str], Hashable],
    outputs: tuple[Any, ...],
    inputs: dict[Hashable, Any],
    segments: int,
) -> None:
    """Set the module attributes Dynamo's bytecode would have written after the graph ran."""
    for (path, name), source in writes.items():
        setattr(modules[path], name, _value_of(source, outputs, inputs, segments))


def _replay_writes(model: torch.nn.Module, mapping: _Mapping, captured: Capture, segments: int) -> None:
    """Leave the state of the user's probe call (the cut probes ran after it)."""
    gm = captured.graph_module
    assert gm is not None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {mapping.keys[n]: example for n, example in zip(placeholders, captured.example_inputs)}
    outputs = mapping.regroup(captured.outputs[-1])
    _apply_writes(dict(model.named_modules(remove_duplicate=False)), mapping.writes, outputs, inputs, segments)
