"""Backend options, validated into a typed config (``torch.compile(..., options=...)``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from diagpass.errors import ConfigError

__all__ = ["DiagbatchConfig", "parse_options", "MODES"]

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``mode=`` values ``torch.compile`` (and HF's ``CompileConfig``) may send."""

StepCompiler = Literal["inductor", "eager"]
Schedule = Literal["diagonal", "sequential"]
Padding = Literal["none", "pow2", "max", "split"]
ShortTail = Literal["inductor", "eager", "dynamic", "none"]


@dataclass(frozen=True, kw_only=True)
class DiagbatchConfig:
    """Options of the ``diagbatch`` backend. Pass them as ``options={...}``."""

    strict: bool = False
    """Raise :class:`~diagpass.StructureError` instead of falling back to plain Inductor
    when the diagonal structure cannot be proven. The error names the violating edge."""

    min_segments: int = 2
    """Below this many segments use plain Inductor: there is nothing to batch across."""

    cudagraphs: bool = False
    """Capture each compiled step in its own CUDA graph (CUDA only). Replaces the default
    whole-program graph (``cudagraph_program``), with input copies at every step."""

    cudagraph_program: bool = True
    """Replay the whole diagonal program from one CUDA graph per input length (CUDA only):
    the first call at a length runs it as is, the second captures it, later calls replay
    it, and the host launches nothing per step. Worth it on the schedule's ramps, where a
    step holds few cells and is bound by its launches. Costs one capture per length (at
    most 2 lengths kept) and keeps one run's activations in the graph's memory pool;
    outputs are copied out of it. Off when ``cudagraphs`` or ``cudagraph_lanes`` capture
    the steps one by one instead (:mod:`diagpass.graphs`)."""

    cudagraph_lanes: int = 0
    """Replay the compiled steps of at most this many cells from CUDA graphs, whatever
    ``cudagraphs`` says (0: none). The ramps at the start and end of the diagonal schedule
    are small steps bound by the host's launch time; full steps are not, and graphs would only
    add their input copies there."""

    gqa_attention: bool = True
    """Hand attention the keys and values before Hugging Face's ``repeat_kv`` (with
    ``enable_gqa=True``) where the mask is proven causal and the device is CUDA: cuDNN reads
    the grouped heads itself, so the 4x copies of K and V (Llama-3.2-1B) are never written.
    Exact (same kernel, same outputs)."""

    lane_views: bool = True
    """Let a step read its cells' inputs in place, as a view instead of a stacked copy, where
    they already lie as consecutive lanes of an earlier step's output (ARMT's memory: lane l
    of one diagonal is layer l's state for the next) or are one tensor for every cell (the
    hoisted rotary tables). Off: every per-cell input is stacked (one copy per step). Only
    for templates that write no tensor in place."""

    carry_lanes: bool = True
    """With ``lane_views``: a step whose lane l feeds lane l+1 of the next step (the hidden
    states, layer l to layer l+1) writes that output one lane up, into a buffer whose lane 0
    is the next segment's input (its prologue runs one step earlier), so the next step reads
    its hidden states in place too. Exact: the same values in other memory. Off: the shifted
    hidden states are stacked (one copy per step)."""

    compiler: StepCompiler = "inductor"
    """How step graphs (and the fallback) are compiled: ``"inductor"``, or ``"eager"`` to
    run the rewritten program without Inductor (debugging, fast CPU tests)."""

    schedule: Schedule = "diagonal"
    """``"diagonal"`` batches the cells of each diagonal. ``"sequential"`` runs one cell
    per step with the same kernels: the ablation that isolates the gain of batching."""

    pad: Padding = "split"
    """How a diagonal's cells become batched calls, to bound the number of compiled step
    shapes: ``"split"`` (power-of-two calls, 13 cells = 8 + 4 + 1: no wasted work, at most
    log2(L)+1 shapes), ``"none"`` (one call, one compile per distinct count), ``"pow2"`` (one
    call padded to the next power of two) or ``"max"`` (always min(L, S) lanes: one compile,
    most wasted work on the ramps)."""

    min_lanes: int = 1
    """The smallest call: fewer cells are padded up to it (at most min(L, S)). With 16 layers
    and ``pad="split"``, ``min_lanes=4`` compiles 3 step shapes per template instead of 5,
    for at most 3 wasted cells per ramp diagonal. ``diagpass.compile`` defaults it to 4, since
    it compiles every ramp size on its first call; the backend to 1 (no wasted cells: about
    15 ms faster at 131K tokens, for two more step compiles, benchmarks/RESULTS.md)."""

    short_tail: ShortTail = "eager"
    """``diagpass.compile`` only: how the layers of a last segment shorter than the
    segment length run. ``"eager"`` runs the cell template eagerly (a new length costs no
    compile; the tail's L cells run unfused). ``"inductor"`` compiles one step per new
    short length (seconds, once per length, then cached): for inputs whose lengths recur.
    ``"dynamic"`` compiles the tail's steps for every short length at once: the template reads
    the length as an input, and ``torch.compile``'s automatic dynamic shapes compile it at the
    first short length and once more, symbolic in the length, at the second; later lengths
    compile nothing (Dynamo's guards check that the kernels hold). The tail's cells run
    compiled, each in a call of its own (not batched with the full cells of its diagonal).
    Needs ``compiler="inductor"`` (with ``"eager"`` steps the tail runs eagerly). ``"none"`` proves whole segments only (one cut probe traced instead of two: a shorter
    compile); an input with a short last segment then runs the model itself, the reason in
    ``report.runs``. ``fast.generate``'s prefill loop uses it: its calls are whole segments."""

    checkpoint_steps: bool = False
    """Training program only (autograd on): run each batched step under activation checkpointing
    (``torch.utils.checkpoint``, non-reentrant), so a step keeps only its inputs for backward and
    runs again there: less activation memory for one more forward of every step. Exact: the
    random state is restored for the recomputation (dropout draws the same masks), so loss and
    gradients equal the run without it. Inference is unaffected."""

    weights_in_stack: bool = False
    """Move each per-layer weight into its stack (``param.data`` becomes a view of its lane of
    the ``[L, ...]`` stack the batched GEMMs read) instead of keeping a stacked copy beside the
    model: the copy costs as much memory as the stacked weights (1.9 GiB for Llama-3.2-1B's
    layers, about 14 GiB at 8B). Values, ``requires_grad`` and gradients are unchanged, and an
    optimizer's in-place step writes the stack itself. Off by default because the parameters
    then share one storage: ``safetensors`` (``save_pretrained``) refuses tensors that share
    memory, so clone the state dict to save it (``{k: v.clone() for k, v in sd.items()}``)."""

    pipeline: bool = False
    """``diagpass.compile`` only: run the program as a pipeline over the ranks of the default
    ``torch.distributed`` process group (``torchrun --nproc-per-node P``), one stage of
    contiguous layers per rank. Every rank calls the compiled module with the same input; each
    runs the diagonal schedule for its own layers' cells, and the boundary hidden states travel
    by ``isend``/``irecv`` (NCCL on GPUs, gloo on CPUs), overlapped with compute. Outputs and
    the final state end up on every rank, as the single-process program leaves them
    (:mod:`diagpass.distributed`). Inference only; needs an initialised process group with no
    more ranks than layers (:class:`~diagpass.ConfigError` otherwise)."""

    inductor: dict[str, Any] = field(default_factory=dict)
    """Inductor config overrides for the step graphs and the fallback, e.g.
    ``{"max_autotune": True}``. Any key of ``torch._inductor.config`` given at the top
    level of ``options`` lands here too."""

    mode: str | None = None
    """The ``mode=`` of ``torch.compile``, kept for the record."""


_FIELDS = {f.name: f for f in dataclasses.fields(DiagbatchConfig)}


def _inductor_key(key: str) -> bool:
    """Whether ``key`` (dotted) names an option of ``torch._inductor.config``."""
    from torch._inductor import config as inductor_config

    try:
        return key in inductor_config.get_config_copy()
    except Exception:  # pragma: no cover - older config objects
        return hasattr(inductor_config, key)


def _check_type(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    if name == "inductor":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"diagbatch option 'inductor' must be a dict of str keys, got {value!r}")
        bad = [k for k in value if not _inductor_key(k)]
        if bad:
            raise ConfigError(f"diagbatch option 'inductor' has unknown Inductor config keys: {bad}")
        return dict(value)
    if name in ("min_segments", "min_lanes", "cudagraph_lanes"):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "cudagraph_lanes" else 1):
            low = 0 if name == "cudagraph_lanes" else 1
            raise ConfigError(f"diagbatch option {name!r} must be an int >= {low}, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"diagbatch option {name!r} must be a bool, got {type(value).__name__} {value!r}")
        return value
    literal = {"compiler": StepCompiler, "schedule": Schedule, "pad": Padding, "short_tail": ShortTail}.get(name)
    if literal is not None and value not in get_args(literal):
        raise ConfigError(f"diagbatch option {name!r} must be one of {get_args(literal)}, got {value!r}")
    return value


def parse_options(options: dict[str, Any] | None = None, *, mode: str | None = None) -> DiagbatchConfig:
    """Validate ``options`` and ``mode`` into a :class:`DiagbatchConfig`.

    Unknown keys and wrong types raise :class:`~diagpass.ConfigError` naming the key.
    Keys of ``torch._inductor.config`` pass through to Inductor.
    """
    if mode not in MODES:
        raise ConfigError(f"diagbatch: unknown mode {mode!r}; expected one of {MODES}")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"diagbatch options must be a dict, got {type(options).__name__}")
    values: dict[str, Any] = {"mode": mode}
    inductor: dict[str, Any] = {}
    # "reduce-overhead" and "max-autotune" keep the default whole-program CUDA graphs.
    if mode == "max-autotune":
        inductor["max_autotune"] = True
    elif mode == "max-autotune-no-cudagraphs":
        inductor["max_autotune"] = True
        values["cudagraph_program"] = False
    for key, value in (options or {}).items():
        if key in _FIELDS and key != "mode":
            if key == "inductor":
                inductor.update(_check_type(key, value))
            else:
                values[key] = _check_type(key, value)
        elif isinstance(key, str) and _inductor_key(key):
            inductor[key] = value
        else:
            known = sorted(k for k in _FIELDS if k != "mode")
            raise ConfigError(
                f"diagbatch: unknown option {key!r}. diagbatch options are {known}; "
                "keys of torch._inductor.config are passed to Inductor"
            )
    values["inductor"] = inductor
    return DiagbatchConfig(**values)


def training_config(config: DiagbatchConfig) -> DiagbatchConfig:
    """The config of a diagonal program that runs with autograd on. Carried lanes and lane views
    write and read activations in place in shared buffers, which autograd cannot follow (tried:
    wrong gradients, not an error), so they are off, as are CUDA graphs. Steps keep the step
    compiler: with Inductor, each step is compiled forward and backward through AOTAutograd
    (:meth:`diagpass.lower.StepCompiler.get`), so backward runs batched on the reverse diagonals;
    with ``"eager"``, ``vmap`` of the cell template, whose backward is batched the same way."""
    return dataclasses.replace(
        config, lane_views=False, carry_lanes=False, cudagraph_program=False, cudagraphs=False,
        cudagraph_lanes=0,
    )
