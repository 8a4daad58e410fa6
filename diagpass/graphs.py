"""Replay a whole diagonal program from one CUDA graph per input layout.

A diagonal program issues S+L-1 batched steps and the small ops between them from
Python. On the ramps at the start and the end of the schedule a step holds few cells,
and the host takes longer to launch it than the device takes to run it: the device
waits (about 40 ms of a 0.64 s forward at 131K tokens on an H100,
``benchmarks/timeline.py``). Capturing the whole forward once and replaying it takes
the host out of the loop.

:class:`ProgramGraphs` keys graphs by the layout of the program's arguments (shapes,
strides, dtypes, the non-tensor values) plus the caller's key (e.g. the segment count):

* the first call with a key runs the program as is (it compiles new steps, warms up);
* the second (a third, where the first compiled steps) captures it in a CUDA graph and
  replays it. Parameters and the program's own weight stacks are read in place, and a replay
  checks that they did not move (else it captures again); every other tensor argument (the
  inputs, state from the last call) is read from a buffer of the graph's own, refilled
  before each replay;
* later calls replay. Outputs are copied out of the graph's memory pool, so a result
  never changes under the caller's hands at the next replay.

A capture that fails (an op that synchronises, say) is logged, its reason kept in
:attr:`ProgramGraphs.failures`, and that key runs uncaptured from then on.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters

from diagpass.config import DiagbatchConfig

log = logging.getLogger("diagpass.graphs")

__all__ = ["ProgramGraphs", "program_graphs"]

Program = Callable[..., tuple[Any, Any]]
"""``program(*args) -> (outputs, info)``: ``outputs`` a pytree of tensors, ``info`` host-side."""


@dataclass(kw_only=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    args: list[Any]
    """What the captured program reads: a graph-owned buffer or the caller's tensor."""
    refill: list[bool]
    """Per argument: copied into ``args[i]`` before each replay."""
    addresses: list[int | None]
    """Per argument read in place: its address at capture."""
    outputs: Any
    info: Any


def _layout(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device, value.storage_offset())
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("V", value)
    return ("O", type(value).__name__, id(value))


def _address(value: Any) -> int | None:
    return value.data_ptr() if isinstance(value, torch.Tensor) else None


_SMALL_BYTES = 1 << 20
"""An owned tensor (a weight stack) up to this size is copied in, not read in place: a replay
then follows new weights (restacked elsewhere) without a capture again, for under a microsecond."""


def _refill_arg(value: Any, seen_address: int | None, *, owned: bool = False) -> bool:
    """Whether a replay copies ``value`` into a buffer of the graph's own, else reads it in place.

    Read in place: parameters and the program's own large tensors (``owned``: its weight stacks),
    where they did not move between the two calls before the capture; a replay checks that they
    still have not moved, else it captures again. Copied: small stacks (a restack after a weight
    update then costs a copy, not a capture), and everything else, the inputs and state above
    all, large or small. Where such a tensor sits is the caching allocator's choice: a 0.5 GB input
    built anew each call (the concatenated segments of ``fast.generate``'s prefill) kept its address
    for the two calls before the capture and then moved, so every few calls the program was
    captured again (a warm-up and a capture in place of two replays, about +0.17 s at 131K tokens).
    A copy costs a pass over memory: under 1 ms for 0.5 GB on an H200.
    """
    if not isinstance(value, torch.Tensor):
        return False
    if value.data_ptr() != seen_address:
        return True
    if isinstance(value, torch.nn.Parameter):
        return False
    return not owned or value.numel() * value.element_size() <= _SMALL_BYTES


def _copy_out(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


class ProgramGraphs:
    """CUDA graphs of one program, by argument layout. See the module docstring."""

    def __init__(self, *, name: str, max_graphs: int = 2) -> None:
        self.name = name
        self.max_graphs = max_graphs
        """Graphs kept (least recently used dropped): each holds its activations' memory."""
        self.captures = 0
        self.replays = 0
        self.failures: dict[Hashable, str] = {}
        """Keys whose capture failed, and why."""
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._seen: dict[Hashable, list[int | None]] = {}  # key -> argument addresses of its last uncaptured call
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(
        self, program: Program, args: Sequence[Any], *, key: Hashable = (), owned: int = 0
    ) -> tuple[Any, Any, str]:
        """``program(*args)``, through a graph where possible.

        ``owned``: the last ``owned`` arguments are the program's own tensors (weight stacks),
        read in place like parameters; the others that are not parameters are copied in.

        Returns ``(outputs, info, how)``, ``how`` one of ``"replayed"``, ``"captured"``
        (captured now, then replayed), ``"warm-up"`` (first call with this layout) or
        ``"uncaptured: <reason>"``.
        """
        full_key = (key, tuple(_layout(a) for a in args))
        entry = self._graphs.get(full_key)
        if entry is not None:
            if self._refill(entry, args):
                self._graphs.move_to_end(full_key)
                self.replays += 1
                counters["diagpass"]["program_graph_replays"] += 1
                return self._play(entry, "replayed")
            log.info("%s: a tensor read in place moved (new weights?): capturing again", self.name)
            self._drop(full_key)
            return self._warm_up(program, args, full_key)
        reason = self.failures.get(full_key) or self._not_capturable(args)
        if reason is None:
            seen = self._seen.get(full_key)
            if seen is None:
                return self._warm_up(program, args, full_key)
            entry = self._capture(program, args, seen, full_key, owned)
            if entry is not None:
                return self._play(entry, "captured")
            reason = self.failures[full_key]
        outputs, info = program(*args)
        return outputs, info, f"uncaptured: {reason}"

    @staticmethod
    def _play(entry: _Graph, how: str) -> tuple[Any, Any, str]:
        """Replay ``entry`` (its buffers already filled) and copy its outputs out of the pool."""
        entry.graph.replay()
        return pytree.tree_map(_copy_out, entry.outputs), entry.info, how

    def _warm_up(self, program: Program, args: Sequence[Any], key: Hashable) -> tuple[Any, Any, str]:
        """Run uncaptured, watching for host syncs: a capture that fails leaves the CUDA RNG
        in capture mode, so a program that synchronises is never captured at all."""
        compiles = counters["diagpass"]["step_compiles"]
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                outputs, info = program(*args)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        for w in caught:
            if w not in syncs:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if counters["diagpass"]["step_compiles"] != compiles:
            return outputs, info, "warm-up"  # compiling syncs: watch the next call instead
        if syncs:
            where = f"{syncs[0].filename}:{syncs[0].lineno}"
            self.failures[key] = f"the program synchronises with the host ({where})"
            counters["diagpass"]["program_graph_refusals"] += 1
            log.warning("%s: not captured: %s", self.name, self.failures[key])
            return outputs, info, f"uncaptured: {self.failures[key]}"
        self._seen[key] = [_address(a) for a in args]
        return outputs, info, "warm-up"

    @staticmethod
    def _not_capturable(args: Sequence[Any]) -> str | None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or any(t.device.type != "cuda" for t in tensors):
            return "not every tensor argument is on a CUDA device"
        if torch.cuda.is_current_stream_capturing():
            return "called inside another CUDA graph capture"
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return "autograd is on"
        return None

    def _refill(self, entry: _Graph, args: Sequence[Any]) -> bool:
        """Copy the changing arguments into the graph's buffers; False if an in-place one moved."""
        for value, address, refill in zip(args, entry.addresses, entry.refill):
            if not refill and address is not None and value.data_ptr() != address:
                return False
        for buffer, value, refill in zip(entry.args, args, entry.refill):
            if refill and buffer is not value:
                buffer.copy_(value)
        return True

    def _capture(
        self, program: Program, args: Sequence[Any], seen: list[int | None], key: Hashable, owned: int
    ) -> _Graph | None:
        first_owned = len(args) - owned
        refill = [_refill_arg(a, old, owned=i >= first_owned) for i, (a, old) in enumerate(zip(args, seen))]
        static = [
            torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a) if r else a
            for a, r in zip(args, refill)
        ]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs, info = program(*static)
        except Exception as error:  # e.g. an op the warm-up's sync check did not see
            torch.cuda.synchronize()
            _end_rng_capture()
            if not self._graphs:
                self._pool = None  # the failed capture's pool: a new one for the next layout
            self.failures[key] = f"CUDA graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            counters["diagpass"]["program_graph_failures"] += 1
            log.warning("%s: %s; running without a graph for this input layout", self.name, self.failures[key])
            return None
        entry = _Graph(
            graph=graph,
            args=static,
            refill=refill,
            addresses=[None if r else _address(a) for a, r in zip(args, refill)],
            outputs=outputs,
            info=info,
        )
        self._graphs[key] = entry
        self._seen.pop(key, None)
        self.captures += 1
        counters["diagpass"]["program_graph_captures"] += 1
        log.info(
            "%s: captured a CUDA graph (%d of %d arguments refilled per call)", self.name, sum(refill), len(args)
        )
        while len(self._graphs) > self.max_graphs:
            self._drop(next(iter(self._graphs)))
        return entry

    def _drop(self, key: Hashable) -> None:
        """Forget one graph. When none is left, forget the memory pool too: the allocator releases
        a pool whose graphs are all gone only once its last block is freed, and a capture into it
        before then fails ("it->second->use_count > 0 INTERNAL ASSERT FAILED")."""
        del self._graphs[key]
        if not self._graphs:
            self._pool = None


def _end_rng_capture() -> None:
    """Take the CUDA RNG out of capture mode after a failed capture.

    ``CUDAGraph.capture_end`` raises before it ends the generators' capture when the
    stream capture was invalidated, and every later random op then fails ("Offset
    increment outside graph capture"). An empty capture begins and ends it again.
    """
    try:
        empty = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "The CUDA Graph is empty": it is meant to be
            with torch.cuda.graph(empty):
                pass
        del empty
    except Exception as error:  # pragma: no cover - logged, nothing more to do
        log.warning("could not reset the CUDA RNG after a failed capture: %s", error)


def program_graphs(config: DiagbatchConfig, *, name: str) -> ProgramGraphs | None:
    """The program's graphs, or ``None`` where ``config`` turns them off or there is no CUDA."""
    if not config.cudagraph_program or config.cudagraphs or config.cudagraph_lanes:
        return None  # per-step graphs (their own option) cannot be captured inside a program graph
    if not torch.cuda.is_available():
        return None
    return ProgramGraphs(name=name)
