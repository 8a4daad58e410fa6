"""The nodes outside the layers, as small modules: segment chunks, ``pre`` and ``post``.

* a *chunk* is what one unit runs at one even phase (before layer 0, between two layers,
  after the last one): a ``GraphModule`` ``chunk(s, n, *inputs)`` whose int literals are
  computed from the segment index ``s`` and length ``n`` (:class:`~diagpass.passes.reroll.Fit`)
  or read per unit (:class:`~diagpass.passes.reroll.Table`). Its part that is the same for
  every segment is hoisted (:mod:`diagpass.hoist`), and a chunk that does not read ``s``
  runs as Inductor kernels on CUDA (:class:`ChunkKernels`);
* ``pre`` computes what the units share from the inputs, once per run;
* ``post`` reads the units' values (per-segment lists, the last unit, for a fixed number of
  segments any unit) and returns the graph's outputs.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

from diagpass.config import DiagbatchConfig
from diagpass.hoist import HoistedChunk, split_invariant
from diagpass.lower import compile_chunk
from diagpass.passes.reroll import Hole, RerollError, Table, UnitForm, UnitSplit, per_segment_list, walk_arg

log = logging.getLogger("diagpass.program")

__all__ = ["Chunk", "Ref", "build_chunk", "build_outer", "ChunkKernels", "COMPILE_CHUNK_DEVICES", "HOIST_INVARIANT"]

COMPILE_CHUNK_DEVICES: tuple[str, ...] = ("cuda",)
"""Devices on which the segment chunks that do not read ``s`` run as Inductor kernels
(``compiler="inductor"``). CPU runs them eagerly: its C++ compile costs more than it saves."""

HOIST_INVARIANT = True
"""Run the part of each segment chunk that is the same for every segment once per run
(:mod:`diagpass.hoist`): 11 of the 13 kernels of a Llama segment's prologue (the rotary
tables)."""

Ref = tuple[Any, ...]


@dataclass(kw_only=True)
class Chunk:
    """What one unit runs at one even phase."""

    module: torch.fx.GraphModule
    """``module(s, n, *inputs)``."""
    ext: list[Ref]
    """Refs of the module's inputs after ``s`` and ``n``."""
    outputs: list[int]
    """Unit positions the module returns."""
    s_free: bool = False
    """Whether what runs (``hoisted.variant`` or ``module``) ignores ``s``: then it can be
    compiled once for every segment."""
    hoisted: HoistedChunk | None = None
    """The module split into what is the same for every segment (run once per run and
    length) and the rest (:mod:`diagpass.hoist`); ``None``: run ``module`` as is."""


def _hole_expression(graph: torch.fx.Graph, hole: Hole, s_node: torch.fx.Node, n_node: torch.fx.Node) -> Any:
    """``hole`` at the chunk's ``(s, n)``: a literal, or nodes computing it."""
    if isinstance(hole, Table):
        return graph.call_function(operator.getitem, (hole.values, s_node))
    if hole.constant:
        return hole.a
    value: Any = hole.a
    if hole.b:
        term = graph.call_function(operator.mul, (s_node, hole.b))
        value = graph.call_function(operator.add, (value, term)) if value else term
    if hole.c:
        term = graph.call_function(operator.mul, (n_node, hole.c))
        value = graph.call_function(operator.add, (value, term)) if not isinstance(value, int) or value else term
    return value


def build_chunk(
    owner: torch.fx.GraphModule,
    nodes: list[torch.fx.Node],
    form: UnitForm,
    positions: list[int],
    needed_outside: set[int],
    *,
    literals: list[int] | None,
    holes: list[Hole] | None,
) -> Chunk:
    """The chunk of the unit ``nodes`` at ``positions``: its int literals are ``literals``
    (the first unit's own) or computed by ``holes``; it returns what ``needed_outside`` names."""
    graph = torch.fx.Graph()
    s_node, n_node = graph.placeholder("s"), graph.placeholder("n")
    ext: list[Ref] = []
    ext_nodes: dict[Ref, torch.fx.Node] = {}
    env: dict[int, torch.fx.Node] = {}
    exprs: dict[int, Any] = {}
    mine = set(positions)

    def hole(slot: int) -> Any:
        if literals is not None:
            return literals[slot]
        assert holes is not None
        if slot not in exprs:
            exprs[slot] = _hole_expression(graph, holes[slot], s_node, n_node)
        return exprs[slot]

    for pos in positions:
        node = nodes[pos]
        refs = iter(form.refs[pos])
        slots = iter(form.slots_of[pos])

        def on_node(arg: torch.fx.Node, refs: Any = refs) -> torch.fx.Node:
            ref = next(refs)
            if ref[0] == "L" and ref[1] in mine:
                return env[ref[1]]
            if ref not in ext_nodes:
                ext_nodes[ref] = graph.placeholder(f"in{len(ext)}_{arg.name}")
                ext.append(ref)
            return ext_nodes[ref]

        def on_int(_: int, slots: Any = slots) -> Any:
            return hole(next(slots))

        new = graph.create_node(
            node.op, node.target, walk_arg(node.args, on_node, on_int), walk_arg(node.kwargs, on_node, on_int), name=node.name
        )
        new.meta = dict(node.meta)
        env[pos] = new
    outputs = [p for p in positions if p in needed_outside]
    graph.output(tuple(env[p] for p in outputs))
    before = len(graph.nodes)
    graph.eliminate_dead_code()  # e.g. a mask no template reads any more
    counters["diagpass"]["unread_nodes_erased"] += before - len(graph.nodes)
    module = torch.fx.GraphModule(owner, graph, class_name="SegmentChunk")
    hoisted = None
    if HOIST_INVARIANT:
        same_every_segment = [i for i, ref in enumerate(ext) if ref[0] in ("G", "PRE")]
        hoisted = split_invariant(module, global_inputs=same_every_segment, owner=owner)
        if hoisted is not None:
            counters["diagpass"]["chunk_nodes_hoisted"] += hoisted.moved
    runs = hoisted.variant if hoisted is not None else module
    s_free = not next(n for n in runs.graph.nodes if n.op == "placeholder").users
    return Chunk(module=module, ext=ext, outputs=outputs, hoisted=hoisted, s_free=s_free)


def build_outer(
    owner: torch.fx.GraphModule, split: UnitSplit, keys: dict[torch.fx.Node, Hashable], which: str
) -> tuple[torch.fx.GraphModule, list[Ref]]:
    """``pre`` (inputs -> every pre value) or ``post`` (refs -> the graph's outputs)."""
    graph = torch.fx.Graph()
    ext: list[Ref] = []
    ext_nodes: dict[Ref, torch.fx.Node] = {}
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    last = len(split.units) - 1

    def external(ref: Ref, name: str) -> torch.fx.Node:
        if ref not in ext_nodes:
            ext_nodes[ref] = graph.placeholder(f"in{len(ext)}_{name}")
            ext.append(ref)
        return ext_nodes[ref]

    def on_node(arg: torch.fx.Node) -> torch.fx.Node:
        if arg in env:
            return env[arg]
        if arg.op == "placeholder":
            return external(("G", keys[arg]), arg.name)
        if arg in split.pre_index:
            return external(("PRE", split.pre_index[arg]), arg.name)
        if arg in split.unit_of:
            unit = split.unit_of[arg]
            ref = ("LAST", split.position[arg]) if unit == last else ("UNIT", unit, split.position[arg])
            return external(ref, arg.name)
        raise RerollError(f"{arg.name} is read where it is not computed yet")

    def post_arg(arg: Any) -> Any:
        every = per_segment_list(arg, split)
        if every is not None:
            return external(("ALL", *every), arg[1].name + "_all")
        if isinstance(arg, torch.fx.Node):
            return on_node(arg)
        if isinstance(arg, (list, tuple)) and not isinstance(arg, torch.Size):
            items = [post_arg(a) for a in arg]
            return items if isinstance(arg, list) else tuple(items)
        if isinstance(arg, dict):
            return {k: post_arg(v) for k, v in arg.items()}
        if isinstance(arg, slice):
            return slice(post_arg(arg.start), post_arg(arg.stop), post_arg(arg.step))
        return arg

    for node in split.pre if which == "pre" else split.post:
        new = graph.create_node(node.op, node.target, post_arg(node.args), post_arg(node.kwargs), name=node.name)
        new.meta = dict(node.meta)
        env[node] = new
    if which == "pre":
        graph.output(tuple(env[n] for n in split.pre))
    else:
        assert split.output is not None
        graph.output(post_arg(split.output.args[0]))
    return torch.fx.GraphModule(owner, graph, class_name=f"Program{which.title()}"), ext


class ChunkKernels:
    """Inductor's kernels for the chunks that do not read ``s``, compiled once per chunk,
    length and argument layouts; ``None`` (run it eagerly) off :data:`COMPILE_CHUNK_DEVICES`
    or without the Inductor step compiler."""

    def __init__(self, config: DiagbatchConfig) -> None:
        self.config = config
        self._cache: dict[tuple[Any, ...], Callable[..., Any] | None] = {}

    def get(self, chunk: Chunk, fn: torch.fx.GraphModule, n: int, args: list[Any]) -> Callable[..., Any] | None:
        if self.config.compiler != "inductor" or not chunk.s_free:
            return None
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or torch.is_grad_enabled() or any(t.device.type not in COMPILE_CHUNK_DEVICES for t in tensors):
            return None
        layouts = tuple(
            (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else repr(a) for a in args
        )
        key = (id(chunk), n, layouts)
        if key not in self._cache:
            try:
                self._cache[key] = compile_chunk(fn, 0, n, args, self.config)
            except Exception as exc:  # noqa: BLE001 - the eager chunk is always there
                log.warning("segment chunk not compiled, runs eagerly: %s: %s", type(exc).__name__, exc)
                self._cache[key] = None
        return self._cache[key]
