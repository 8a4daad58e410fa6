"""Lower a cell template to a batched step: the template over G cells at once.

The batched step is ``torch.func.vmap`` of the template over a leading cell dimension.
vmap's batching rules turn every linear layer whose weight differs per cell into a
batched GEMM (``aten.bmm`` against the stacked weights ``[G, K, N]``) and fold the cell
dimension into the batch dimension of attention. ``make_fx`` then records the batched
program as an ATen graph, which Inductor compiles to Triton (GPU) or C++ (CPU) kernels.

Compiled steps are cached by (template key, batch size, slot kinds): a new input length,
a recompile or another model with the same cell shapes reuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from diagpass.config import DiagbatchConfig
from diagpass.fuse import FusedWeight, fuse_horizontal_gemms
from diagpass.ops import SDPA_TARGETS, batched_sdpa, sdpa_supported

log = logging.getLogger("diagpass.lower")

__all__ = ["StepCompiler", "CompiledStep", "batched_template", "count_batched_gemms"]

_BATCHED_GEMMS = ("aten.bmm", "aten._grouped_mm", "aten.baddbmm")

FUSE_GEMMS = True
"""Fuse the batched GEMMs that share their input (:mod:`diagpass.fuse`) in Inductor steps."""


def use_batched_attention(template: torch.fx.GraphModule) -> int:
    """Point the template's SDPA calls at :func:`~diagpass.ops.batched_sdpa`.

    Returns how many calls were rewritten (``counters["diagpass"]["sdpa_batched"]``).
    """
    rewritten = 0
    for node in template.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS and sdpa_supported(*node.args, **node.kwargs):
            node.target = batched_sdpa
            rewritten += 1
    if rewritten:
        template.recompile()
        counters["diagpass"]["sdpa_batched"] += rewritten
    return rewritten


def batched_template(template: torch.fx.GraphModule, in_dims: Sequence[int | None]) -> Callable[..., Any]:
    """The batched step: vmap of the template over dim 0 (cells)."""
    return torch.func.vmap(template, in_dims=tuple(in_dims), out_dims=0)


def count_batched_gemms(gm: torch.fx.GraphModule) -> int:
    """Batched/grouped GEMM nodes in an ATen graph."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith(_BATCHED_GEMMS))


@dataclass(kw_only=True)
class CompiledStep:
    """One compiled batched step."""

    fn: Callable[..., Any]
    """Takes the slot values (stacked or shared), returns a tuple of ``[G, ...]`` outputs."""
    batch: int
    """G: cells per call."""
    batched_gemms: int
    """bmm / grouped-mm nodes in the step graph (0 for the eager compiler)."""
    compile_s: float
    """Seconds spent tracing and compiling."""
    aten_graph: torch.fx.GraphModule | None = None
    """The batched ATen graph handed to Inductor."""


_graph_pool: Any = None


class GraphedStep:
    """Replays a compiled step from CUDA graphs.

    One graph per set of *static* inputs (the weight slices, identified by address: a
    diagonal window of the stacked weights is always the same view). The other inputs
    are copied into the graph's own buffers before each replay, and the outputs are
    copied out after it, because the next replay reuses them. All graphs share one
    memory pool: steps run one after another on one stream.
    """

    def __init__(self, fn: Callable[..., Any], static: Sequence[bool]) -> None:
        self.fn = fn
        self.static = tuple(static)
        self.graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}

    def _capture(self, args: Sequence[Any]) -> tuple[Any, list[Any], Any]:
        global _graph_pool
        if _graph_pool is None:
            _graph_pool = torch.cuda.graph_pool_handle()
        inputs = [a if keep or not isinstance(a, torch.Tensor) else a.clone() for a, keep in zip(args, self.static)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: autotuning, lazy init, allocator
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_graph_pool):
            outputs = self.fn(*inputs)
        counters["diagpass"]["cuda_graphs"] += 1
        return graph, inputs, outputs

    def __call__(self, *args: Any) -> Any:
        key = tuple(a.data_ptr() if keep and isinstance(a, torch.Tensor) else None for a, keep in zip(args, self.static))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(args)
        graph, inputs, outputs = entry
        for buffer, value, keep in zip(inputs, args, self.static):
            if not keep and isinstance(buffer, torch.Tensor):
                buffer.copy_(value)
        graph.replay()
        counters["diagpass"]["cuda_graph_replays"] += 1
        return tuple(out.clone() for out in outputs)


class StepCompiler:
    """Compiles batched steps, once per distinct (template, batch size, slot kinds)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], CompiledStep] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def get(
        self,
        *,
        key: str,
        template: torch.fx.GraphModule,
        in_dims: Sequence[int | None],
        args: Sequence[Any],
        batch: int,
        config: DiagbatchConfig,
        static: Sequence[bool] = (),
    ) -> tuple[CompiledStep, bool]:
        """The compiled step for these inputs, and whether it was compiled just now."""
        devices = tuple(sorted({a.device.type for a in args if isinstance(a, torch.Tensor)}))
        cache_key = (
            key,
            batch,
            tuple(in_dims),
            tuple(static),
            # Inductor specialises on the layouts it saw: key on every argument's.
            tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args),
            devices,
            config.compiler,
            config.cudagraphs,
            FUSE_GEMMS,
            tuple(sorted(config.inductor.items())),
        )
        step = self._cache.get(cache_key)
        if step is not None:
            counters["diagpass"]["step_cache_hits"] += 1
            return step, False
        start = time.perf_counter()
        batched = batched_template(template, in_dims)
        if config.compiler == "eager":
            step = CompiledStep(fn=batched, batch=batch, batched_gemms=0, compile_s=time.perf_counter() - start)
        else:
            step = self._inductor(batched, args, batch, config, start, static)
        if config.cudagraphs and devices == ("cuda",):
            step.fn = GraphedStep(step.fn, static or [False] * len(args))
        counters["diagpass"]["step_compiles"] += 1
        log.info(
            "compiled a step of %d cells (%s) in %.2fs, %d batched GEMMs",
            batch,
            config.compiler,
            step.compile_s,
            step.batched_gemms,
        )
        self._cache[cache_key] = step
        return step, True

    @staticmethod
    def _inductor(
        batched: Callable[..., Any],
        args: Sequence[Any],
        batch: int,
        config: DiagbatchConfig,
        start: float,
        static: Sequence[bool] = (),
    ) -> CompiledStep:
        from torch._inductor.compile_fx import compile_fx

        with torch.no_grad():
            aten = make_fx(batched, tracing_mode="fake")(*args)
        makers: list[FusedWeight] = []
        if FUSE_GEMMS and static:
            aten, makers = fuse_horizontal_gemms(aten, static)
        gemms = count_batched_gemms(aten)
        counters["diagpass"]["batched_gemms"] += gemms
        patches = dict(config.inductor)
        example = [*args, *(make(args) for make in makers)]
        with torch.no_grad():
            compiled = compile_fx(aten, example, config_patches=patches)

        if makers:

            def run(*step_args: Any) -> Any:
                return compiled(*step_args, *(make(step_args) for make in makers))

        else:

            def run(*step_args: Any) -> Any:
                return compiled(*step_args)

        return CompiledStep(
            fn=run, batch=batch, batched_gemms=gemms, compile_s=time.perf_counter() - start, aten_graph=aten
        )
