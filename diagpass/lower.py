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
import operator
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from diagpass.config import DiagbatchConfig
from diagpass.fuse import FusedWeight, fuse_horizontal_gemms
from diagpass.ops import SDPA_TARGETS, batched_sdpa, sdpa_supported

log = logging.getLogger("diagpass.lower")

__all__ = [
    "StepCompiler",
    "CompiledStep",
    "batched_template",
    "count_batched_gemms",
    "prepare_attention",
    "use_causal_attention",
    "use_gqa_attention",
]

_BATCHED_GEMMS = ("aten.bmm", "aten._grouped_mm", "aten.baddbmm")

FUSE_GEMMS = False
"""Fuse the batched GEMMs that share their input (:mod:`diagpass.fuse`) in Inductor steps.

Off: on the H100 (Llama-3.2-1B shapes) it gained nothing measurable (cuBLAS already runs
the separate q/k/v GEMMs near its peak; 16K end to end 110.6 ms fused against 108.9 ms not,
benchmarks/RESULTS.md) and it keeps a second copy of the fused weights."""

CAUSAL_ATTENTION = True
"""Let :func:`use_causal_attention` replace masks proven causal by ``is_causal=True``."""


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


def _mask_arg(node: torch.fx.Node) -> tuple[Any, bool]:
    """(attn_mask, is_causal) of a ``batched_sdpa`` call."""
    args, kwargs = node.args, node.kwargs
    mask = kwargs["attn_mask"] if "attn_mask" in kwargs else (args[3] if len(args) > 3 else None)
    causal = kwargs["is_causal"] if "is_causal" in kwargs else (args[5] if len(args) > 5 else False)
    return mask, bool(causal)


def _subgraph_fn(
    target: torch.fx.Node, roots: Sequence[torch.fx.Node], order: dict[torch.fx.Node, int] | None = None
) -> torch.fx.GraphModule | None:
    """A module computing ``target`` from ``roots`` (in order) by the nodes between them.

    ``None`` when ``target`` also reads a placeholder, attribute or module that is not a
    root, or an op that may write in place: then it is not a function of the roots alone.
    """
    from diagpass.passes.template import writes_in_place

    needed: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    pending = [target]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in roots:
            continue
        if node.op not in ("call_function", "call_method") or writes_in_place(node):
            return None
        needed.append(node)
        pending.extend(node.all_input_nodes)
    if order is None:
        order = {n: i for i, n in enumerate(target.graph.nodes)}
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {root: graph.placeholder(f"root{i}") for i, root in enumerate(roots)}
    for node in sorted(needed, key=order.__getitem__):
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[target])
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _is_causal_mask(mask: Any, rows: int, cols: int) -> bool:
    """Whether ``mask`` is SDPA's ``is_causal`` mask (lower-triangular, square) in every batch/head."""
    if not isinstance(mask, torch.Tensor) or rows != cols or mask.dim() < 2 or tuple(mask.shape[-2:]) != (rows, cols):
        return False
    tril = torch.ones(rows, cols, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, tril.expand_as(mask)))
    if mask.is_floating_point():
        keep = torch.where(tril, mask == 0, mask == float("-inf"))
        return bool(keep.all())
    return False


def use_causal_attention(
    template: torch.fx.GraphModule, sources: Callable[[int], Sequence[torch.fx.Node]]
) -> int:
    """Give ``is_causal=True`` instead of the mask to the template's attention calls whose
    mask is proven causal for every cell. Run after :func:`use_batched_attention`.

    ``sources(slot)`` are the nodes of the captured graph bound to the template's input
    ``slot``, one per cell. The proof: each is computed from no graph input at all (only
    from constants, e.g. HF's mask from ``arange``), so it is evaluated once here; the
    template's mask expression applied to it gives the lower-triangular mask of a square
    attention. SDPA then computes the same function with the causal kernel, which skips
    the masked half instead of reading a mask (DESIGN: attention was 20% of a step).
    Returns how many calls were rewritten (``counters["diagpass"]["sdpa_causal"]``).
    """
    if not CAUSAL_ATTENTION:
        return 0
    placeholders = [n for n in template.graph.nodes if n.op == "placeholder"]
    rewritten = 0
    for node in template.graph.nodes:
        if node.op != "call_function" or node.target is not batched_sdpa:
            continue
        mask, causal = _mask_arg(node)
        if causal or not isinstance(mask, torch.fx.Node):
            continue
        q, k = (node.args[0], node.args[1])
        q_val, k_val = (n.meta.get("val", n.meta.get("example_value")) for n in (q, k))
        if not isinstance(q_val, torch.Tensor) or not isinstance(k_val, torch.Tensor):
            continue
        rows, cols = q_val.shape[-2], k_val.shape[-2]
        roots = [p for p in placeholders if _depends_on(mask, p)]
        if len(roots) != 1 or rows != cols:
            continue
        expression = _subgraph_fn(mask, roots)
        bound = list(dict.fromkeys(sources(placeholders.index(roots[0]))))  # distinct, in order
        if expression is None or not bound:
            continue
        proven = True
        order = {n: i for i, n in enumerate(bound[0].graph.nodes)}
        for source in bound:
            make = _subgraph_fn(source, [], order)
            if make is None:
                proven = False
                break
            with torch.no_grad():
                if not _is_causal_mask(expression(make()), rows, cols):
                    proven = False
                    break
        if not proven:
            continue
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if len(args) > 3:
            args[3] = None
        kwargs["attn_mask"] = None
        if len(args) > 5:
            args[5] = True
        else:
            kwargs["is_causal"] = True
        node.args, node.kwargs = tuple(args), kwargs
        rewritten += 1
    if rewritten:
        template.recompile()
        counters["diagpass"]["sdpa_causal"] += rewritten
    return rewritten


GQA_DEVICES: tuple[str, ...] = ("cuda",)
"""Devices on which :func:`use_gqa_attention` rewrites: CUDA, where cuDNN reads grouped heads
natively. (On CPU SDPA would take its slower math path; tests add ``"cpu"`` to check the
rewrite's exactness there.)"""

_RESHAPE_METHODS = ("reshape", "view")
_RESHAPE_FUNCTIONS = (torch.reshape, torch.Tensor.reshape, torch.Tensor.view)
_EXPAND = ("expand",)


def _example(node: Any) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _is_call(node: Any, methods: tuple[str, ...], functions: tuple[Any, ...] = ()) -> bool:
    if not isinstance(node, torch.fx.Node) or not node.args:
        return False
    return (node.op == "call_method" and node.target in methods) or (
        node.op == "call_function" and node.target in functions
    )


def _unsqueezed_at_2(node: Any) -> torch.fx.Node | None:
    """``x`` when ``node`` is ``x[:, :, None]`` (any trailing full slices) or ``x.unsqueeze(2)``."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        full = slice(None, None, None)
        if isinstance(index, tuple) and len(index) >= 3 and index[:3] == (full, full, None):
            if all(i == full for i in index[3:]):
                return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
        return None
    if _is_call(node, ("unsqueeze",), (torch.unsqueeze,)):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0] if dim == 2 and isinstance(node.args[0], torch.fx.Node) else None
    return None


def _repeat_kv_source(node: Any) -> tuple[torch.fx.Node, int] | None:
    """``(x, n_rep)`` when ``node`` is Hugging Face's ``repeat_kv(x, n_rep)``:
    ``x[:, :, None].expand(B, H_kv, n_rep, T, D).reshape(B, H_kv * n_rep, T, D)``."""
    if not _is_call(node, _RESHAPE_METHODS, _RESHAPE_FUNCTIONS):
        return None
    expanded = node.args[0]
    if not _is_call(expanded, _EXPAND, (torch.Tensor.expand,)):
        return None
    source = _unsqueezed_at_2(expanded.args[0])
    out, wide, kv = _example(node), _example(expanded), _example(source)
    if source is None or out is None or wide is None or kv is None or kv.dim() != 4 or wide.dim() != 5:
        return None
    batch, heads, length, dim = kv.shape
    n_rep = wide.shape[2]
    if tuple(wide.shape) != (batch, heads, n_rep, length, dim):
        return None
    if tuple(out.shape) != (batch, heads * n_rep, length, dim):
        return None
    return source, int(n_rep)


def _erase_unused_chain(graph: torch.fx.Graph, node: Any, stop: set[Any]) -> None:
    """Erase ``node`` and then its first input, while each has no reader left (up to ``stop``)."""
    while isinstance(node, torch.fx.Node) and node not in stop and not node.users and node.op != "placeholder":
        source = node.args[0] if node.args else None
        graph.erase_node(node)
        node = source


def use_gqa_attention(template: torch.fx.GraphModule, *, enabled: bool = True) -> int:
    """Hand the template's unmasked attention calls the keys and values before Hugging
    Face's ``repeat_kv``, with ``enable_gqa=True``. Run after :func:`use_causal_attention`.

    Exact: SDPA's grouped-query attention reads key/value head ``h // n_rep`` for query
    head ``h``, which is what ``repeat_kv`` materialises (cuDNN gives bit-identical
    outputs on the H100). It saves writing (and re-reading) ``n_rep`` copies of K and V
    each step: 4x for Llama-3.2-1B. Calls with a mask are left alone (not every SDPA
    kernel that takes a mask takes grouped heads). Returns how many calls were rewritten
    (``counters["diagpass"]["sdpa_gqa"]``).
    """
    if not enabled:
        return 0
    rewritten = 0
    for node in template.graph.nodes:
        if node.op != "call_function" or node.target is not batched_sdpa:
            continue
        mask, _ = _mask_arg(node)
        args, kwargs = list(node.args), dict(node.kwargs)
        gqa = kwargs["enable_gqa"] if "enable_gqa" in kwargs else (args[7] if len(args) > 7 else False)
        if mask is not None or gqa or len(args) < 3:
            continue
        query = _example(args[0])
        if query is None or query.dim() != 4:
            continue
        if query.device.type not in GQA_DEVICES:
            continue
        key, value = _repeat_kv_source(args[1]), _repeat_kv_source(args[2])
        if key is None or value is None or key[1] != value[1] or key[1] < 2:
            continue
        kv = _example(key[0])
        if kv is None or query.shape[1] != kv.shape[1] * key[1]:
            continue
        dropped = [args[1], args[2]]
        args[1], args[2] = key[0], value[0]
        if len(args) > 7:
            args[7] = True
        else:
            kwargs["enable_gqa"] = True
        node.args, node.kwargs = tuple(args), kwargs
        for head in dropped:  # the repeat_kv chains (reshape <- expand <- unsqueeze), now unread
            _erase_unused_chain(template.graph, head, stop=set(args[1:3]))
        rewritten += 1
    if rewritten:
        template.recompile()
        counters["diagpass"]["sdpa_gqa"] += rewritten
    return rewritten


def prepare_attention(
    template: torch.fx.GraphModule, sources: Callable[[int], Sequence[torch.fx.Node]], *, gqa: bool
) -> str:
    """The attention rewrites of a proven cell template, in order: batched SDPA, causal masks
    (:func:`use_causal_attention`), grouped K/V (:func:`use_gqa_attention`, when ``gqa``).
    Returns the suffix of the template's compile-cache key that says which fired."""
    use_batched_attention(template)
    causal = use_causal_attention(template, sources)
    grouped = use_gqa_attention(template, enabled=gqa)
    return (":causal" if causal else "") + (":gqa" if grouped else "")


def _depends_on(node: torch.fx.Node, root: torch.fx.Node) -> bool:
    pending, seen = [node], set()
    while pending:
        n = pending.pop()
        if n is root:
            return True
        if n in seen:
            continue
        seen.add(n)
        pending.extend(n.all_input_nodes)
    return False


def batched_template(template: torch.fx.GraphModule, in_dims: Sequence[int | None]) -> Callable[..., Any]:
    """The batched step: vmap of the template over dim 0 (cells)."""
    return torch.func.vmap(template, in_dims=tuple(in_dims), out_dims=0, randomness="different")  # dropout: a mask per cell


def single_cell(template: torch.fx.GraphModule, in_dims: Sequence[int | None]) -> Callable[..., Any]:
    """The batched step for one cell, without vmap: unbatch, call, re-add the cell dim."""

    def step(*args: Any) -> tuple[torch.Tensor, ...]:
        inputs = [a if dim is None else a.select(dim, 0) for a, dim in zip(args, in_dims)]
        return tuple(out.unsqueeze(0) for out in template(*inputs))

    return step


def with_carry(step: Callable[..., Any], carry: int) -> Callable[..., Any]:
    """``step`` with one more argument, ``head`` (last), and its output ``carry`` written one
    lane up: ``cat([head[None], out])`` [G+1, ...], so that lanes ``0..G-1`` of the result are
    the next step's input for that slot (``head`` is the next segment's), read in place.

    Inductor lays the producer of ``out`` (the residual add) out inside the cat's buffer, so
    the hidden states are still written once; only ``head`` (one lane) is copied.
    """

    def carried(*args: Any) -> tuple[torch.Tensor, ...]:
        *slots, head = args
        outputs = tuple(step(*slots))
        shifted = torch.cat([head.unsqueeze(0), outputs[carry]])  # [G+1, ...]
        return (*outputs[:carry], shifted, *outputs[carry + 1 :])

    return carried


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
    late_compile_s: float = 0.0
    """Compile seconds spent inside calls since the caller last took them (a dynamic short tail
    compiles on its calls: :meth:`StepCompiler._dynamic`)."""


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


def compile_fx_cached(aten: torch.fx.GraphModule, example: Sequence[Any], patches: dict[str, Any]) -> Callable[..., Any]:
    """``compile_fx`` of a static-shape ATen graph, inside a tracing context whose fake mode has a
    (static) shape env: Inductor's FX graph cache refuses a graph with none ("No shape env"), so
    without it every step would be generated and compiled again in every process."""
    from torch._inductor.compile_fx import compile_fx

    if torch._guards.TracingContext.try_get() is not None:  # inside Dynamo: its context is the right one
        return compile_fx(aten, list(example), config_patches=patches)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        return compile_fx(aten, list(example), config_patches=patches)


def compile_chunk(
    module: torch.fx.GraphModule, s: int, n: int, args: Sequence[Any], config: DiagbatchConfig
) -> Callable[..., Any]:
    """Inductor's kernels for ``module(s, n, *args)`` at these ints and argument layouts.

    For a segment chunk that does not read ``s`` (``diagpass.program.chunks``): e.g. the final
    RMSNorm of each segment, eight eager kernels with float32 intermediates, becomes one.
    """

    def chunk(*tensors: Any) -> Any:
        return module(s, n, *tensors)

    start = time.perf_counter()
    with torch.no_grad():
        aten = make_fx(chunk, tracing_mode="fake")(*args)
        compiled = compile_fx_cached(aten, args, dict(config.inductor))
    counters["diagpass"]["chunk_compiles"] += 1
    log.info("compiled a segment chunk (%d nodes) in %.2fs", len(aten.graph.nodes), time.perf_counter() - start)
    return compiled


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
        carry: int | None = None,
        dynamic: bool = False,
    ) -> tuple[CompiledStep, bool]:
        """The compiled step for these inputs, and whether it was compiled just now.

        ``carry``: the step takes one more argument after the slots, ``head``, and returns
        output ``carry`` one lane up after it (:func:`with_carry`).
        ``dynamic``: the template's last argument is a length ``n`` (a short tail's) and the
        step serves every ``n`` (:meth:`_dynamic`): the cache key holds no sizes and no ints.
        """
        if carry is not None and static:
            static = [*static, False]  # head: a new value at every call
        devices = tuple(sorted({a.device.type for a in args if isinstance(a, torch.Tensor)}))
        # A step that autograd must follow compiles forward and backward (AOTAutograd), and
        # only for inputs that require grad in the same places.
        grads = training_step(args)
        dynamic = dynamic and grads is None and config.compiler == "inductor"  # else one static compile per n
        cache_key = (
            key,
            batch,
            tuple(in_dims),
            tuple(static),
            # Inductor specialises on the layouts it saw: key on every argument's.
            tuple(_dynamic_layout(a) if dynamic else _layout(a) for a in args),
            devices,
            config.compiler,
            config.cudagraphs,
            config.cudagraph_lanes,
            FUSE_GEMMS,
            tuple(sorted(config.inductor.items())),
            carry,
            grads,
        )
        step = self._cache.get(cache_key)
        if step is not None:
            counters["diagpass"]["step_cache_hits"] += 1
            return step, False
        start = time.perf_counter()
        batched = batched_template(template, in_dims)
        if config.compiler == "eager" and batch == 1:
            # One cell: run the template itself; vmap's per-op dispatch would cost more than the ops.
            batched = single_cell(template, in_dims)
        if carry is not None:
            batched = with_carry(batched, carry)
        if config.compiler == "eager":
            step = CompiledStep(fn=batched, batch=batch, batched_gemms=0, compile_s=time.perf_counter() - start)
        elif dynamic:
            step = self._dynamic(single_cell(template, in_dims) if batch == 1 else batched, config, batch, start)
        elif grads is not None:
            step = self._inductor_training(batched, args, batch, config, start)
        else:
            step = self._inductor(batched, args, batch, config, start, static)
        if grads is None and not dynamic and (config.cudagraphs or batch <= config.cudagraph_lanes) and devices == ("cuda",):
            step.fn = GraphedStep(step.fn, static or [False] * len(args))
        counters["diagpass"]["step_compiles"] += 1
        if carry is not None:
            counters["diagpass"]["carried_step_compiles"] += 1
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
    def _dynamic(step: Callable[..., Any], config: DiagbatchConfig, batch: int, start: float) -> CompiledStep:
        """``torch.compile`` of ``step``, whose last argument is the tail length ``n``: Dynamo's
        automatic dynamic shapes compile the first ``n`` static and, at the first other ``n``,
        once more with ``n`` and the sizes that follow it symbolic; its guards then serve every
        later ``n`` (and recompile, rather than run a wrong kernel, where one does not hold).
        Compiled lazily, on the first call: each Dynamo compile is counted as a step compile, so
        a program graph warm-up that compiled is never taken for one that synchronises."""
        options = dict(config.inductor) or None
        compiled = torch.compile(step, backend="inductor", options=options, dynamic=None)
        stats = counters["stats"]

        def run(*step_args: Any) -> Any:
            before, started = stats["unique_graphs"], time.perf_counter()
            outputs = compiled(*(_without_base(a) for a in step_args))
            if stats["unique_graphs"] != before:
                seconds = time.perf_counter() - started
                result.late_compile_s += seconds
                counters["diagpass"]["step_compiles"] += 1
                counters["diagpass"]["dynamic_tail_compiles"] += 1
                log.info("compiled the short tail's step at n=%s in %.2fs (Dynamo, automatic dynamic shapes)", step_args[-1], seconds)
            return outputs

        result = CompiledStep(fn=run, batch=batch, batched_gemms=0, compile_s=time.perf_counter() - start)
        return result

    @staticmethod
    def _inductor(
        batched: Callable[..., Any],
        args: Sequence[Any],
        batch: int,
        config: DiagbatchConfig,
        start: float,
        static: Sequence[bool] = (),
    ) -> CompiledStep:

        # Inputs the step does not read arrive as None (runtime: "unused" slots); trace without them.
        present = [i for i, a in enumerate(args) if a is not None]
        pruned = len(present) < len(args)
        if pruned:
            full, total = batched, len(args)

            def batched(*given: Any) -> Any:
                values: list[Any] = [None] * total
                for i, value in zip(present, given):
                    values[i] = value
                return full(*values)

            args = [args[i] for i in present]
            static = [static[i] for i in present] if static else static
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
            compiled = compile_fx_cached(aten, example, patches)

        if pruned:

            def run(*step_args: Any) -> Any:
                given = [step_args[i] for i in present]
                return compiled(*given, *(make(given) for make in makers))

        elif makers:

            def run(*step_args: Any) -> Any:
                return compiled(*step_args, *(make(step_args) for make in makers))

        else:

            def run(*step_args: Any) -> Any:
                return compiled(*step_args)

        return CompiledStep(
            fn=run, batch=batch, batched_gemms=gemms, compile_s=time.perf_counter() - start, aten_graph=aten
        )

    @staticmethod
    def _inductor_training(
        batched: Callable[..., Any], args: Sequence[Any], batch: int, config: DiagbatchConfig, start: float
    ) -> CompiledStep:
        """A step autograd follows: the batched ATen graph, compiled forward and backward by
        Inductor through AOTAutograd (``compile_fx`` partitions the joint graph, so backward runs
        as one compiled, batched step too: the reverse diagonal). No fused GEMM weights (their
        concatenation would sit outside the graph) and no CUDA graphs."""

        present = [i for i, a in enumerate(args) if a is not None]
        given = [args[i] for i in present]
        total = len(args)

        def traced(*values: Any) -> Any:
            full: list[Any] = [None] * total
            for i, value in zip(present, values):
                full[i] = value
            return tuple(batched(*full))

        # make_fx traces below autograd: the graph is the forward only; AOTAutograd derives backward.
        aten = make_fx(traced, tracing_mode="fake")(*given)
        gemms = count_batched_gemms(aten)
        counters["diagpass"]["batched_gemms"] += gemms
        counters["diagpass"]["training_step_compiles"] += 1
        compiled = compile_fx_cached(aten, given, dict(config.inductor))

        def run(*step_args: Any) -> Any:
            return compiled(*[step_args[i] for i in present])

        return CompiledStep(
            fn=run, batch=batch, batched_gemms=gemms, compile_s=time.perf_counter() - start, aten_graph=aten
        )


def _layout(value: Any) -> Hashable:
    return (tuple(value.shape), value.stride(), value.dtype) if isinstance(value, torch.Tensor) else repr(value)


def _without_base(value: Any) -> Any:
    """A view as a tensor of its own on the same memory, not a view: Dynamo guards on the sizes
    of a view's base, and the bases of the program's lane views grow with the number of segments,
    so a base with a dimension of 1 (one full segment) compiled the dynamic tail's step again,
    twice, under 0/1 specialisation. Only for steps without gradients (``set_`` has none)."""
    if not isinstance(value, torch.Tensor) or not value._is_view():
        return value
    alias = torch.empty((0,), dtype=value.dtype, device=value.device)
    return alias.set_(value.untyped_storage(), value.storage_offset(), value.size(), value.stride())


def _dynamic_layout(value: Any) -> Hashable:
    """What a step dynamic in the tail length keys on: no sizes, no int values."""
    if isinstance(value, torch.Tensor):
        return (value.dim(), value.dtype)
    return type(value).__name__ if isinstance(value, int) else repr(value)


def training_step(args: Sequence[Any]) -> tuple[bool, ...] | None:
    """Which arguments require grad, when autograd is on and any does; None otherwise (the
    inference step)."""
    if not torch.is_grad_enabled():
        return None
    grads = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return grads if any(grads) else None
