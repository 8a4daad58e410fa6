"""Capture a model's forward as Dynamo FX graphs, the same capture the backend sees."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo
import torch.fx

log = logging.getLogger("diagpass.capture")

__all__ = ["Capture", "capture", "capture_whole", "forget", "trace_clock"]


@dataclass(kw_only=True)
class Capture:
    """What Dynamo produced for one call of a model."""

    graphs: list[tuple[torch.fx.GraphModule, list[Any]]] = field(default_factory=list)
    """Every graph of the call with its example inputs (more than one: graph breaks)."""
    break_reasons: list[str] = field(default_factory=list)
    """Dynamo's reasons for each graph break."""
    trace_s: float = 0.0
    """Seconds Dynamo spent tracing (backend time excluded)."""
    skipped_frames: int = 0
    """Frames Dynamo gave up on and ran eagerly (e.g. a graph break inside a loop skips the
    whole frame: then only nested calls are captured, or nothing)."""
    codes: list[Any] = field(default_factory=list)
    """Code objects Dynamo saw for the first time during this capture (see :func:`forget`)."""
    returned: Any = None
    """What the forward returned (through Dynamo's bytecode)."""
    outputs: list[tuple[Any, ...]] = field(default_factory=list)
    """Per call of a graph, the tuple it returned: the forward's results and the state Dynamo
    wrote back are these very objects, which is how :mod:`diagpass.anylength` maps them."""

    @property
    def has_breaks(self) -> bool:
        """Whether the forward was not captured as one whole graph."""
        return len(self.graphs) > 1 or bool(self.break_reasons) or self.skipped_frames > 0

    @property
    def graph_module(self) -> torch.fx.GraphModule | None:
        """The largest graph: the one that holds the segment loop."""
        if not self.graphs:
            return None
        return max(self.graphs, key=lambda g: len(g[0].graph.nodes))[0]

    @property
    def example_inputs(self) -> list[Any]:
        gm = self.graph_module
        return next(ex for g, ex in self.graphs if g is gm)


class _TraceClock:
    """Times Dynamo's tracing: from the start of a frame compile to the backend call."""

    def __init__(self) -> None:
        self.started: float | None = None
        self._registered = False

    def install(self) -> None:
        if self._registered:
            return
        try:
            from torch._dynamo.callback import callback_handler

            callback_handler.register_start_callback(self._on_start)
            self._registered = True
        except Exception:  # pragma: no cover - API missing in this torch
            log.debug("no Dynamo compile-start callback; capture time is not recorded")

    def _on_start(self, *args: Any) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float | None:
        """Seconds since the current compile started, or None if unknown.

        Reads Dynamo's metrics context (survives ``torch._dynamo.reset()``, which drops
        the callbacks), else the compile-start callback.
        """
        try:
            context = torch._dynamo.utils.get_metrics_context()
            start_ns = getattr(context, "_start_time_ns", 0)
            if context.in_progress() and start_ns:
                return (time.time_ns() - start_ns) / 1e9
        except Exception:  # pragma: no cover - private API moved
            pass
        return None if self.started is None else time.perf_counter() - self.started


trace_clock = _TraceClock()


def capture(model: torch.nn.Module | Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Capture:
    """Run ``model(*args, **kwargs)`` once under Dynamo and record its graphs.

    Static shapes, a raised recompile limit (so that a model class analysed many times
    is still traced), and graph breaks allowed (they are reported, not raised).
    """
    result = Capture()
    trace_clock.install()

    def recorder(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Any:
        elapsed = trace_clock.elapsed()
        if elapsed is not None:
            result.trace_s += elapsed
        result.graphs.append((gm, list(example_inputs)))

        def run(*args: Any) -> Any:
            out = gm.forward(*args)
            result.outputs.append(tuple(out) if isinstance(out, (tuple, list)) else (out,))
            return out

        return run

    counters = torch._dynamo.utils.counters
    breaks_before = dict(counters["graph_break"])
    unsupported_before = dict(counters["unimplemented"])
    failed_before = counters["frames"]["total"] - counters["frames"]["ok"]
    codes_before = len(_seen_codes())
    compiled = torch.compile(model, backend=recorder, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=10_000, automatic_dynamic_shapes=False):
        start = time.perf_counter()
        try:
            result.returned = compiled(*args, **kwargs)
        finally:
            result.codes = [code for code in (ref() for ref in _seen_codes()[codes_before:]) if code is not None]
        total = time.perf_counter() - start
    if result.trace_s == 0.0:
        result.trace_s = total
    for reason, count in counters["graph_break"].items():
        if count > breaks_before.get(reason, 0):
            result.break_reasons.append(str(reason))
    result.skipped_frames = max(0, counters["frames"]["total"] - counters["frames"]["ok"] - failed_before)
    if not result.break_reasons and (result.skipped_frames or len(result.graphs) > 1):
        # A graph break inside a loop skips the whole frame: Dynamo counts it as
        # "unimplemented", not as a graph break.
        for reason, count in counters["unimplemented"].items():
            if count > unsupported_before.get(reason, 0):
                result.break_reasons.append(str(reason))
    return result


def capture_whole(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, before_each: Callable[[], None] | None = None
) -> Capture:
    """:func:`capture`, traced once more if the first trace has graph breaks.

    Lazy initialisation breaks only the first trace (transformers 5.x installs its
    output-capturing hooks on first use), but a break in the segment loop marks the frame
    "skip" for good: the marks are cleared before the second trace, and cleared again when
    that one breaks too, so they do not leak into later captures. ``before_each`` runs
    before every trace (to snapshot state, say). Call it under ``torch.no_grad()``.
    """
    if before_each is not None:
        before_each()
    first = capture(model, args, kwargs)
    if not first.has_breaks:
        return first
    log.info("graph breaks on the first trace; tracing once more")
    forget(model, first)
    if before_each is not None:
        before_each()
    second = capture(model, args, kwargs)
    if second.has_breaks:
        forget(model, first)
        forget(model, second)
    return second


def _seen_codes() -> list[Any]:
    """Weak references to every code object Dynamo has tried to compile (append-only)."""
    try:
        from torch._dynamo import convert_frame

        return convert_frame.input_codes.seen
    except Exception:  # pragma: no cover - private API moved
        return []


def forget(model: Any, result: Capture) -> None:
    """Drop Dynamo's cache entries and skip marks for the code a capture compiled.

    A graph break inside a loop marks the frame "skip" for good, so a second capture would
    not even try it. Only the code objects first seen by ``result`` (whose cache entries are
    the capture's own) and the model's ``forward`` are reset; other compiled code is untouched.
    """
    try:
        from torch._C._dynamo.eval_frame import reset_code
    except Exception:  # pragma: no cover - private API moved
        return
    codes = list(result.codes)
    forward = getattr(getattr(type(model), "forward", None), "__code__", None) or getattr(model, "__code__", None)
    if forward is not None:
        codes.append(forward)
    for code in codes:
        try:
            reset_code(code)
        except Exception:  # pragma: no cover
            log.debug("could not reset Dynamo's cache for %s", code)
