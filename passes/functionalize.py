"""Functionalize in-place writes into values the graph itself made.

``mask.masked_fill_(cond, 0)`` on a mask built a line earlier (transformers 4.x builds its causal
mask that way), ``self.W_mem.add_(assoc)`` or ``self.z += k.sum(1)`` on state that an earlier
segment computed, ``W.index_copy_(...)``: each writes into a tensor that no one else can see. Such a
write is the out-of-place op followed by "every later reader reads the result", which is what this
pass rewrites it to. The cells and the unit split then see plain dataflow: the write belongs to the
cell that makes it, and the state it makes flows to the next segment as any other value does.

The rewrite is exact only when nothing else can observe the old storage after the write. So a write
is left alone (and later passes refuse it, with its line) when the written tensor

- is a graph input or a module attribute read with ``get_attr`` (the caller would see the write);
- shares its storage with another value (a view, ``.contiguous()`` returning itself...) that is
  still read after the write, or with a graph input;
- has no out-of-place twin (``copy_``, ``zero_``; ``x[i] = v`` becomes a write into a copy).

Pure: it edits the graph it is given and returns what it did; counters let tests assert it fired.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.multiprocessing.reductions import StorageWeakRef

from .template import node_value, writes_in_place

__all__ = ["FunctionalizeResult", "functionalize_local_writes", "setitem_out_of_place"]

_OPERATOR_TWINS: dict[Callable[..., Any], Callable[..., Any]] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod,
    operator.ipow: operator.pow,
    operator.imatmul: operator.matmul,
    operator.iand: operator.and_,
    operator.ior: operator.or_,
    operator.ixor: operator.xor,
}
_METHOD_TWINS = {"__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div"}


@dataclass(kw_only=True)
class FunctionalizeResult:
    """What :func:`functionalize_local_writes` did to a graph."""

    rewritten: list[str] = field(default_factory=list)
    """One ``"<op> at <file:line>"`` per write turned into its out-of-place twin."""
    kept: list[str] = field(default_factory=list)
    """One ``"<op> at <file:line>: <why>"`` per write left in place."""


def _where(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    return lines[-1] if lines else node.name


def _storage(value: Any) -> StorageWeakRef | None:
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):  # a tensor without storage (sparse, nested...)
        return None


def setitem_out_of_place(tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``tensor[index] = value`` on a copy: the out-of-place form of ``operator.setitem``."""
    out = tensor.clone()
    out[index] = value
    return out


def _twin(node: torch.fx.Node) -> tuple[str, Any] | None:
    """The out-of-place form of an in-place node: ``(op, target)``, or None."""
    target = node.target
    if node.op == "call_function" and target is operator.setitem:
        return "call_function", setitem_out_of_place
    if node.op == "call_function" and target in _OPERATOR_TWINS:
        return "call_function", _OPERATOR_TWINS[target]
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name in _METHOD_TWINS:
        return "call_method", _METHOD_TWINS[name]
    if not name.endswith("_") or name.endswith("__"):
        return None
    pure = name[:-1]
    if node.op == "call_method":
        return ("call_method", pure) if callable(getattr(torch.Tensor, pure, None)) else None
    if target is getattr(torch.Tensor, name, None) and callable(getattr(torch.Tensor, pure, None)):
        return "call_function", getattr(torch.Tensor, pure)
    if target is getattr(torch, name, None) and callable(getattr(torch, pure, None)):
        return "call_function", getattr(torch, pure)
    return None


def _fake_result(op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the twin on the fake values of its arguments (None when that is not possible)."""
    from torch._guards import detect_fake_mode

    def value(a: Any) -> Any:
        return node_value(a) if isinstance(a, torch.fx.Node) else a

    fake_args = torch.fx.node.map_aggregate(args, value)
    fake_kwargs = torch.fx.node.map_aggregate(kwargs, value)
    leaves = [v for v in torch.utils._pytree.tree_leaves((fake_args, fake_kwargs)) if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(leaves)
    if mode is None:
        return None
    try:
        with mode:
            if op == "call_method":
                return getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
            return target(*fake_args, **fake_kwargs)
    except Exception:  # noqa: BLE001 - e.g. values of two fake modes: the caller casts instead
        return None


def _why_unsafe(
    node: torch.fx.Node,
    written: torch.fx.Node,
    order: dict[torch.fx.Node, int],
    family: list[torch.fx.Node],
) -> str | None:
    """Why writing ``written`` in place at ``node`` could be seen by someone else; None if not."""
    if written.op in ("placeholder", "get_attr"):
        return "it writes into a graph input, which the caller would see"
    here = order[node]
    for other in family:
        if other is written or other is node or order[other] > here:
            continue
        if other.op in ("placeholder", "get_attr"):
            return f"the written tensor shares storage with the input {other.name}"
        if any(order[user] > here for user in other.users):
            return f"the written tensor is also seen as {other.name}, read after the write"
    return None


def _label(node: torch.fx.Node) -> str:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{name} at {_where(node)}"


def functionalize_local_writes(gm: torch.fx.GraphModule) -> FunctionalizeResult:
    """Rewrite every in-place write into a graph-local, unaliased tensor as its out-of-place twin."""
    graph = gm.graph
    result = FunctionalizeResult()
    if not any(writes_in_place(node) for node in graph.nodes):
        return result
    order = {node: i for i, node in enumerate(graph.nodes)}
    # Values that share a storage, as Dynamo recorded them. A rewritten write's result joins the
    # written value's family: later nodes' recorded values still point at the old storage.
    family_of: dict[torch.fx.Node, StorageWeakRef] = {}
    families: dict[StorageWeakRef, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        storage = _storage(node_value(node))
        if storage is not None:
            family_of[node] = storage
            families.setdefault(storage, []).append(node)
    for node in list(graph.nodes):
        if not writes_in_place(node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        written = node.args[0]
        label = _label(node)
        twin = _twin(node)
        key = family_of.get(written)
        if twin is None:
            result.kept.append(f"{label}: no out-of-place form")
            continue
        old = node_value(written)
        why = "the written value has no recorded tensor storage" if key is None or not isinstance(old, torch.Tensor) else None
        why = why or _why_unsafe(node, written, order, families[key])
        if why is not None:
            result.kept.append(f"{label}: {why}")
            continue
        # In place never changes the written tensor's shape (a broadcast into it raises) and keeps
        # its dtype: the twin computes in the promoted dtype, then the result is cast back.
        new_value = _fake_result(twin[0], twin[1], node.args, dict(node.kwargs))
        if not isinstance(new_value, torch.Tensor) or new_value.shape != old.shape:
            new_value = None
        with graph.inserting_before(node):
            pure = graph.create_node(twin[0], twin[1], node.args, dict(node.kwargs), name=f"{node.name}_functional")
            pure.meta.update(node.meta)
            pure.meta["example_value"] = new_value if new_value is not None else old
            made = [pure]
            if new_value is None or new_value.dtype != old.dtype:
                cast = graph.call_method("to", (pure, old.dtype))
                cast.meta.update(node.meta)
                cast.meta["example_value"] = old
                made.append(cast)
                pure = cast
        for new in made:
            if "val" in new.meta:
                new.meta["val"] = new.meta["example_value"]
            order[new] = order[node]
        for user in [u for u in written.users if order.get(u, -1) > order[node]]:
            user.replace_input_with(written, pure)
        node.replace_all_uses_with(pure)
        if node in families[key]:  # x[i] = v returns None: no value of its own
            families[key].remove(node)
        families[key].append(pure)
        family_of[pure] = key
        graph.erase_node(node)
        result.rewritten.append(label)
        counters["diagpass"]["functionalized_writes"] += 1
    gm.recompile()
    return result
