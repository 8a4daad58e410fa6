"""Horizontal GEMM fusion on the batched ATen step graph.

Linear layers that read the same input (q/k/v projections, gate/up of a gated MLP, the
ARMT memory writes ``W_mk``/``W_mv``) become, after vmap, batched GEMMs
``bmm(x, W_i^T)`` over stacked weights ``W_i`` [G, N_i, K] with one shared ``x``
[G, M, K]. This pass replaces each such group with one ``bmm(x, W^T)`` against the
concatenated weight ``W`` [G, sum N_i, K] and slices the result: fewer, bigger GEMMs.

The concatenated weight is a new graph input. :class:`FusedWeight` makes it from the
step's arguments, once per weight stack: the members are windows ``stack[a:a+G]`` of
the ``[L, N_i, K]`` stacks, so it concatenates the whole stacks once (cached while the
stacks live and are unchanged: identity, address and ``_version``) and hands out the
same window of the result. Only *static* inputs (the per-layer weights) are fused.

Exactness: each output element is still one dot product over K of the same operands.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

log = logging.getLogger("diagpass.fuse")

__all__ = ["FusedWeight", "fuse_horizontal_gemms"]

aten = torch.ops.aten

_RESHAPES = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.default,
}
_VIEWS = (aten.view.default, aten._unsafe_view.default)
MAX_FUSED_N = 8192
"""Fuse no further than this many output columns: past it the GEMMs are already large, and
one measured twice as large ran slower (gate/up of Llama-3.2-1B, N = 2 x 8192, H100:
659 TFLOP/s fused against 748 separate)."""
MIN_ALIGN = 8
"""Each member's N must be a multiple of this, so every slice of the fused output stays
16-byte aligned in bf16 (cuBLAS and Triton are slower on misaligned rows)."""


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _shape(node: Any) -> tuple[int, ...] | None:
    val = _val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _strip_reshapes(node: torch.fx.Node) -> torch.fx.Node:
    """Walk back through ops that only reshape (no data movement, no broadcast)."""
    while node.op == "call_function":
        if node.target in _RESHAPES:
            node = node.args[0]
        elif node.target is aten.expand.default and _shape(node) is not None and _shape(node) == _shape(node.args[0]):
            node = node.args[0]
        elif node.target is aten.clone.default and set(node.kwargs) <= {"memory_format"}:
            node = node.args[0]  # same values, another layout
        else:
            break
    return node


def _weight_placeholder(b: torch.fx.Node) -> torch.fx.Node | None:
    """``p`` if ``b`` is (a reshape of) ``p.transpose(1, 2)`` with ``p`` a [G, N, K] input."""
    shape = _shape(b)
    root = _strip_reshapes(b)
    if root.op != "call_function":
        return None
    if root.target is aten.transpose.int:
        p, d0, d1 = root.args[0], root.args[1], root.args[2]
        if not isinstance(p, torch.fx.Node) or sorted(int(d) % 3 for d in (d0, d1)) != [1, 2]:
            return None
    elif root.target is aten.permute.default:
        p, dims = root.args[0], root.args[1]
        if not isinstance(p, torch.fx.Node) or [int(d) % 3 for d in dims] != [0, 2, 1]:
            return None
    else:
        return None
    p_shape = _shape(p)
    if p.op != "placeholder" or p_shape is None or len(p_shape) != 3:
        return None
    if shape != (p_shape[0], p_shape[2], p_shape[1]):  # the reshapes must amount to the identity
        return None
    return p


@dataclass(frozen=True)
class _Member:
    bmm: torch.fx.Node
    weight: torch.fx.Node
    n: int


def _weak_by_id() -> Any:
    from torch.utils.weak import WeakIdKeyDictionary

    return WeakIdKeyDictionary()


_FUSED_STACKS: Any = _weak_by_id()
"""First member stack -> {ids of all member stacks: (their stamp, their concatenation)}. Shared by every
compiled step, so each set of stacks is concatenated once; an entry dies with its stack."""


class FusedWeight:
    """Makes one fused weight argument from the step's arguments.

    ``positions`` are the argument indices of the member weights, in concatenation
    order. When every member is the same window ``base[a:a+G]`` of its stack ``base``
    (the runtime's copy-free diagonal slice), the stacks are concatenated once into
    ``[L, sum N, K]`` and cached (for every step that reads the same stacks), and the
    call returns the window ``[a:a+G]`` of that:
    no copy per step. Otherwise (e.g. a gathered, non-contiguous set of layers) it
    concatenates the members themselves, which is correct but copies.
    """

    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = tuple(positions)

    @staticmethod
    def _window(member: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        base = member._base
        if base is None or base.dim() != member.dim() or base.shape[1:] != member.shape[1:]:
            return None
        if base.stride() != member.stride() or base.stride(0) == 0:
            return None
        if base.untyped_storage().data_ptr() != member.untyped_storage().data_ptr():
            return None
        offset = member.storage_offset() - base.storage_offset()
        if offset < 0 or offset % base.stride(0):
            return None
        start = offset // base.stride(0)
        if start + member.shape[0] > base.shape[0]:
            return None
        return base, start

    def __call__(self, args: Sequence[Any]) -> torch.Tensor:
        members = [args[i] for i in self.positions]
        windows = [self._window(m) for m in members]
        starts = {w[1] for w in windows if w is not None}
        if all(w is not None for w in windows) and len(starts) == 1:
            bases = [w[0] for w in windows]  # type: ignore[index]
            stamp = tuple((id(b), b.data_ptr(), b._version, tuple(b.shape), b.dtype) for b in bases)
            entries = _FUSED_STACKS.get(bases[0])
            if entries is None:
                entries = _FUSED_STACKS[bases[0]] = {}
            ids = tuple(id(b) for b in bases)
            entry = entries.get(ids)
            if entry is None or entry[0] != stamp:  # new stacks, or updated in place: (re)build
                entries.clear()  # a stale concatenation is never read again
                with torch.no_grad():
                    entry = entries[ids] = (stamp, torch.cat(bases, dim=1))  # [L, sum N, K]
                counters["diagpass"]["fused_weight_builds"] += 1
            fused = entry[1]
            start = starts.pop()
            return fused[start : start + members[0].shape[0]]
        counters["diagpass"]["fused_weight_copies"] += 1
        with torch.no_grad():
            return torch.cat(members, dim=1)


_ALIASES = _RESHAPES | {
    aten.expand.default,
    aten.transpose.int,
    aten.permute.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.t.default,
}


def _views_to_reshapes(node: torch.fx.Node) -> None:
    """A GEMM's output becomes a strided slice: turn the ``view``s on it (and on its
    aliases) into ``reshape``s, which copy where a view cannot apply."""
    pending = list(node.users)
    seen: set[torch.fx.Node] = set()
    while pending:
        user = pending.pop()
        if user in seen or user.op != "call_function":
            continue
        seen.add(user)
        if user.target in _VIEWS:
            user.target = aten.reshape.default
        if user.target in _ALIASES:
            pending.extend(user.users)


def _groups(gm: torch.fx.GraphModule, static: Sequence[bool]) -> list[list[_Member]]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    position = {p: i for i, p in enumerate(placeholders)}
    by_input: dict[tuple[Any, ...], list[_Member]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.bmm.default:
            continue
        a, b = node.args[0], node.args[1]
        a_shape, out = _shape(a), _val(node)
        if a_shape is None or out is None:
            continue
        weight = _weight_placeholder(b)
        if weight is None or not (position[weight] < len(static) and static[position[weight]]):
            continue
        w_val = _val(weight)
        n = w_val.shape[1]
        if n % MIN_ALIGN or w_val.dtype != out.dtype:
            continue
        key = (_strip_reshapes(a), a_shape, w_val.dtype, w_val.device, w_val.shape[0], w_val.shape[2])
        by_input.setdefault(key, []).append(_Member(bmm=node, weight=weight, n=n))
    groups = []
    for members in by_input.values():
        seen: set[torch.fx.Node] = set()
        unique = [m for m in members if not (m.weight in seen or seen.add(m.weight))]  # type: ignore[func-returns-value]
        if len(unique) >= 2 and sum(m.n for m in unique) <= MAX_FUSED_N:
            groups.append(unique)
    return groups


def fuse_horizontal_gemms(
    gm: torch.fx.GraphModule, static: Sequence[bool]
) -> tuple[torch.fx.GraphModule, list[FusedWeight]]:
    """Fuse the batched GEMMs of ``gm`` that share their input; see the module docstring.

    ``static[i]`` says whether input ``i`` is a per-layer weight (a window of a stack).
    Returns the graph, rewritten in place, with one extra trailing input per fused group,
    and the :class:`FusedWeight` that makes each of those inputs from the original ones.
    Counters: ``gemm_fusions`` (groups) and ``fused_gemms`` (GEMMs merged into them).
    """
    groups = _groups(gm, static)
    if not groups:
        return gm, []
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    position = {p: i for i, p in enumerate(placeholders)}
    makers: list[FusedWeight] = []
    fused_inputs: list[torch.fx.Node] = []
    last_placeholder = placeholders[-1]
    for index, members in enumerate(groups):
        first = members[0]  # members are in graph order
        with graph.inserting_after(last_placeholder):
            fused_w = graph.placeholder(f"fused_weight_{index}")
        last_placeholder = fused_w
        fused_inputs.append(fused_w)
        makers.append(FusedWeight([position[m.weight] for m in members]))
        parts = []
        with graph.inserting_before(first.bmm):
            w_t = graph.call_function(aten.transpose.int, (fused_w, 1, 2))
            fused = graph.call_function(aten.bmm.default, (first.bmm.args[0], w_t))
            start = 0
            for m in members:
                parts.append(graph.call_function(aten.slice.Tensor, (fused, 2, start, start + m.n)))
                start += m.n
        for m, part in zip(members, parts):
            _views_to_reshapes(m.bmm)
            m.bmm.replace_all_uses_with(part)
            graph.erase_node(m.bmm)
        counters["diagpass"]["gemm_fusions"] += 1
        counters["diagpass"]["fused_gemms"] += len(members)
        log.debug("fused %d batched GEMMs (N=%s) into one", len(members), [m.n for m in members])
    graph.eliminate_dead_code()
    _propagate_meta(gm, makers, fused_inputs)
    graph.lint()
    gm.recompile()
    return gm, makers


def _propagate_meta(gm: torch.fx.GraphModule, makers: list[FusedWeight], fused_inputs: list[torch.fx.Node]) -> None:
    """Recompute ``meta["val"]`` of every node with fake tensors (new inputs included)."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [_val(p) for p in placeholders if p not in fused_inputs]
    mode = detect_fake_mode(vals)
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        extra = [torch.cat([vals[i] for i in maker.positions], dim=1) for maker in makers]
    for p, val in zip(fused_inputs, extra):
        p.meta["val"] = val
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*(_val(p) for p in placeholders))
