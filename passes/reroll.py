"""Reroll the unrolled segment loop: prove, on short probes, that every segment repeats one
template, and describe that template so that a program for any number of segments can be
built without tracing again (issue "Compile once, run any length").

A captured forward is cut into *units*, one per segment: the segment's cells plus the nodes
outside the layers that belong to it alone (slicing the input, embedding, masks, the final
norm and head of that segment). What is left is *pre* (depends on the inputs only and feeds
more than one segment, or none) and *post* (reads several segments: the ``cat`` of the
per-segment logits, a loss).

Every unit is put in a canonical form in which each integer literal is a hole. The proof:

* every unit after the first has the same form (the *steady* form), in every probe;
* each hole of the steady form is an affine function ``a + b*s + c*n`` of the segment index
  ``s`` and the segment's length ``n``, with integer coefficients, fitted on some probes'
  units and checked on the others (more points than unknowns, or it is not proven);
* the first unit, the pre and the post nodes are the same in every probe (post reads the
  units only through lists with one entry per segment, or through the last unit);
* a unit reads from the previous one only as cell ``(l, s)`` reading cell ``(l, s-1)``:
  the recurrent state.

This pass is pure: graphs and labels in, plain data out. It never runs a model.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.fx

from .cells import CellLabels
from .dependencies import source_line
from .template import _target_name, draws_random, node_value, writes_in_place

__all__ = [
    "RerollError",
    "UnitSplit",
    "UnitForm",
    "Fit",
    "Table",
    "Hole",
    "Probe",
    "RerollPlan",
    "prove_reroll",
    "prove_fixed",
    "split_units",
    "unit_form",
    "fit_affine",
    "walk_arg",
    "find_length_axes",
    "per_segment_list",
]


class RerollError(Exception):
    """Generalisation to other lengths could not be proven; the message says where."""


Ref = tuple[Any, ...]
"""Where a value comes from: ``("G", key)`` a graph input, ``("PRE", i)`` a pre node,
``("L", p)`` position ``p`` of the same unit, ``("P", r)`` the ``r``-th value read from the
previous unit, ``("POST", i)``, ``("LAST", p)`` position ``p`` of the last unit, or
``("ALL", p0, p)`` the list of every unit's value (position ``p0`` in the first unit, ``p``
in the others), or ``("UNIT", s, p)`` position ``p`` of unit ``s`` (a fixed number of
segments only: :func:`prove_fixed`)."""


@dataclass(kw_only=True)
class UnitSplit:
    """One probe's graph cut into pre, units and post."""

    pre: list[torch.fx.Node]
    units: list[list[torch.fx.Node]]
    """Per segment, the unit's nodes (cells and others) in graph order."""
    post: list[torch.fx.Node]
    unit_of: dict[torch.fx.Node, int] = field(default_factory=dict)
    position: dict[torch.fx.Node, int] = field(default_factory=dict)
    """Index of a unit node within its unit."""
    pre_index: dict[torch.fx.Node, int] = field(default_factory=dict)
    post_index: dict[torch.fx.Node, int] = field(default_factory=dict)
    placeholders: list[torch.fx.Node] = field(default_factory=list)
    output: torch.fx.Node | None = None


def _pure_key(node: torch.fx.Node, split: UnitSplit) -> Any:
    """A key equal for two pre nodes that compute the same value (same op on the same inputs),
    or ``None`` where the node may not be merged: not a pure call, or its value is written in
    place."""
    if node.op not in ("call_function", "call_method") or writes_in_place(node) or draws_random(node):
        return None
    if any(writes_in_place(user) for user in node.users):
        return None

    def on_node(arg: torch.fx.Node) -> Any:
        return ("PRE", split.pre_index[arg]) if arg in split.pre_index else ("N", id(arg))

    literals: list[int] = []
    try:
        key = (_target_name(node), _structure(node.args, on_node, literals), _structure(node.kwargs, on_node, literals))
        hash(key)
    except TypeError:
        return None
    return key, tuple(literals)


def _same_value_key(node: torch.fx.Node, canon: dict[torch.fx.Node, Any]) -> Any:
    """Equal for two nodes that compute the same value from the same inputs (inputs compared
    through ``canon``); None for a node that may not be merged."""
    if node.op not in ("call_function", "call_method") or writes_in_place(node) or draws_random(node):
        return None
    literals: list[int] = []
    try:
        key = (
            _target_name(node),
            _structure(node.args, lambda a: canon.get(a, a), literals),
            _structure(node.kwargs, lambda a: canon.get(a, a), literals),
            tuple(literals),
        )
        hash(key)
    except TypeError:
        return None
    return key


def user_code(node: torch.fx.Node) -> str:
    """``node`` as the user wrote it: ``"`code` (file:line)"``, for error messages (the FX
    node's name when no source line is known)."""
    where, code = source_line(node)
    return f"`{code}` ({where})" if code else f"{node.name} ({where})"


def split_units(graph: torch.fx.Graph, labels: CellLabels) -> UnitSplit:
    """Cut ``graph`` into pre, one unit per segment, and post (linear in graph size)."""
    nodes = list(graph.nodes)
    cell_of = labels.cell_of
    output = next(n for n in nodes if n.op == "output")
    live: set[torch.fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    # The one segment a node outside the cells reads (through other such nodes), -1 for several:
    # the per-segment loss after the layers, `ce_loss_fn(logits_s, labels_s)`, belongs to segment s.
    # A computation that reads no unit and repeats identically per segment (Gemma's `1 + weight`)
    # for several segments stays before the loop, where its copies merge: `repeated` marks it.
    reads: dict[torch.fx.Node, int] = {}
    canon: dict[torch.fx.Node, Any] = {}
    copies: dict[Any, int] = {}
    for node in nodes:
        if node in cell_of:
            reads[node] = cell_of[node][1]
        elif node.op not in ("placeholder", "output"):
            seen = {reads[i] for i in node.all_input_nodes if i in reads}
            if seen:
                reads[node] = seen.pop() if len(seen) == 1 else -1
            else:
                key = _same_value_key(node, canon)
                canon[node] = key if key is not None else node
                copies[canon[node]] = copies.get(canon[node], 0) + 1
    # Earliest and latest segment whose cells a node feeds, for nodes that read no unit; and the
    # same counting one segment's nodes after its cells too: the labels of segment s, cut before
    # the loop, go with its loss. Repeated computations count the cells only (merged before the loop).
    fed_cells: dict[torch.fx.Node, tuple[int, int]] = {}
    fed_any: dict[torch.fx.Node, tuple[int, int]] = {}
    for node in reversed(nodes):
        if node in cell_of:
            seg = cell_of[node][1]
            fed_cells[node] = fed_any[node] = (seg, seg)
            continue
        if reads.get(node, -1) >= 0:
            fed_any[node] = (reads[node], reads[node])
            continue
        for fed_map in (fed_cells, fed_any):
            spans = [fed_map[u] for u in node.users if u in fed_map]
            if spans:
                fed_map[node] = (min(a for a, _ in spans), max(b for _, b in spans))
    segments_of: dict[Any, set[int]] = {}
    for node, key in canon.items():
        if copies[key] > 1 and node in fed_any:
            segments_of.setdefault(key, set()).update(range(fed_any[node][0], fed_any[node][1] + 1))
    repeated = {node for node, key in canon.items() if len(segments_of.get(key, ())) > 1}
    fed = {node: (fed_cells if node in repeated else fed_any).get(node) for node in nodes}
    fed = {node: span for node, span in fed.items() if span is not None}

    split = UnitSplit(pre=[], units=[[] for _ in range(labels.num_segments)], post=[], output=output)
    post_set: set[torch.fx.Node] = set()
    pre_by_key: dict[Any, torch.fx.Node] = {}
    for node in nodes:
        if node.op == "placeholder":
            split.placeholders.append(node)
            continue
        if node.op == "output":
            continue
        if node in cell_of:
            seg = cell_of[node][1]
        else:
            if node not in live:
                if writes_in_place(node):
                    raise RerollError(f"{user_code(node)} writes in place outside the layers")
                continue
            read = {split.unit_of[i] for i in node.all_input_nodes if i in split.unit_of}
            if len(read) > 1 or any(i in post_set for i in node.all_input_nodes):
                seg = -1
            elif read:
                seg = read.pop()
            elif node in fed and fed[node][0] == fed[node][1]:
                seg = fed[node][0]
            else:
                key = _pure_key(node, split)
                same = pre_by_key.get(key) if key is not None else None
                if same is not None:  # computed again (Gemma's `1 + weight` per segment): one value
                    split.pre_index[node] = split.pre_index[same]
                    continue
                if key is not None:
                    pre_by_key[key] = node
                split.pre_index[node] = len(split.pre)
                split.pre.append(node)
                continue
            if seg < 0:
                split.post_index[node] = len(split.post)
                split.post.append(node)
                post_set.add(node)
                continue
        split.unit_of[node] = seg
        split.position[node] = len(split.units[seg])
        split.units[seg].append(node)
    return split


def walk_arg(arg: Any, on_node: Callable[[torch.fx.Node], Any], on_int: Callable[[int], Any]) -> Any:
    """Rebuild ``arg`` with every node and every int literal (bools excluded) replaced."""
    if isinstance(arg, torch.fx.Node):
        return on_node(arg)
    if isinstance(arg, bool):
        return arg
    if isinstance(arg, int):
        return on_int(arg)
    if isinstance(arg, tuple):
        items = tuple(walk_arg(a, on_node, on_int) for a in arg)
        return type(arg)(*items) if hasattr(arg, "_fields") else (torch.Size(items) if isinstance(arg, torch.Size) else items)
    if isinstance(arg, list):
        return [walk_arg(a, on_node, on_int) for a in arg]
    if isinstance(arg, dict):
        return {k: walk_arg(v, on_node, on_int) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(
            walk_arg(arg.start, on_node, on_int), walk_arg(arg.stop, on_node, on_int), walk_arg(arg.step, on_node, on_int)
        )
    return arg


def _const(arg: Any) -> Any:
    if isinstance(arg, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return repr(arg)
    if isinstance(arg, (float, str, bool, type(None), type(Ellipsis))):
        return (type(arg).__name__, arg)
    return ("obj", repr(arg))


def _structure(arg: Any, on_node: Callable[[torch.fx.Node], Any], literals: list[int]) -> Any:
    """Canonical, hashable form of ``arg``: nodes through ``on_node``, ints as holes."""
    if isinstance(arg, torch.fx.Node):
        return on_node(arg)
    if isinstance(arg, bool):
        return _const(arg)
    if isinstance(arg, int):
        literals.append(int(arg))
        return "#"
    if isinstance(arg, (tuple, list)):
        return (type(arg).__name__, tuple(_structure(a, on_node, literals) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, _structure(v, on_node, literals)) for k, v in arg.items()))
    if isinstance(arg, slice):
        return (
            "slice",
            _structure(arg.start, on_node, literals),
            _structure(arg.stop, on_node, literals),
            _structure(arg.step, on_node, literals),
        )
    return _const(arg)


def _dtype_signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", value.dtype, value.dim(), value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_dtype_signature(v) for v in value)
    return type(value).__name__


@dataclass(kw_only=True)
class UnitForm:
    """A unit in canonical form."""

    segment: int
    form: tuple[Any, ...]
    """Per node: op, canonical args/kwargs, dtype signature, layer (cells) or None."""
    literals: list[int]
    """Values of the int holes, in node then argument order."""
    slots_of: list[list[int]]
    """Per node, the indices of its holes in :attr:`literals`."""
    refs: list[list[Ref]]
    """Per node, the refs of its node arguments, in argument order."""
    prev_reads: list[torch.fx.Node]
    """Nodes of the previous unit this unit reads, in first-read order (``("P", r)``)."""


def unit_form(
    split: UnitSplit, segment: int, keys: dict[torch.fx.Node, Hashable], labels: CellLabels, *, cell_detail: bool = True
) -> UnitForm:
    """The canonical form of unit ``segment``. Raises :class:`RerollError` on a read the
    generalised program could not reproduce (a value from an older unit, or post).

    ``cell_detail=False`` puts a cell's node in the form by its op and its reads from outside
    its cell only, with no holes: for a caller that runs each cell through its template
    variant and checks those variants itself (:func:`prove_fixed`). The cells are most of a
    unit, and their templates already compare them op by op."""
    nodes = split.units[segment]
    prev: dict[torch.fx.Node, int] = {}
    literals: list[int] = []
    ops: list[Any] = []
    slots_of: list[list[int]] = []
    all_refs: list[list[Ref]] = []
    for node in nodes:
        refs: list[Ref] = []

        def ref(arg: torch.fx.Node, node: torch.fx.Node = node, refs: list[Ref] = refs) -> Any:
            r = _unit_ref(arg, node, segment, split, keys, labels, prev)
            refs.append(r)
            return r

        first = len(literals)
        cell = labels.cell_of.get(node)
        if cell is not None and not cell_detail:
            outside = tuple(ref(a) for a in node.all_input_nodes if labels.cell_of.get(a) != cell)
            ops.append((_target_name(node), "cell", outside, None, cell[0]))  # the layer at [4], as below
            slots_of.append([])
            all_refs.append(refs)
            continue
        form = (
            _target_name(node),
            _structure(node.args, ref, literals),
            _structure(node.kwargs, ref, literals),
            _dtype_signature(node_value(node)),
            labels.cell_of[node][0] if node in labels.cell_of else None,
        )
        ops.append(form)
        slots_of.append(list(range(first, len(literals))))
        all_refs.append(refs)
    return UnitForm(
        segment=segment, form=tuple(ops), literals=literals, slots_of=slots_of, refs=all_refs, prev_reads=list(prev)
    )


def _unit_ref(
    arg: torch.fx.Node,
    node: torch.fx.Node,
    segment: int,
    split: UnitSplit,
    keys: dict[torch.fx.Node, Hashable],
    labels: CellLabels,
    prev: dict[torch.fx.Node, int],
) -> Ref:
    if arg.op == "placeholder":
        return ("G", keys[arg])
    if arg in split.pre_index:
        return ("PRE", split.pre_index[arg])
    unit = split.unit_of.get(arg)
    if unit == segment:
        return ("L", split.position[arg])
    if unit == segment - 1:
        if node in labels.cell_of and arg in labels.cell_of:
            if arg not in prev:
                prev[arg] = len(prev)
            return ("P", prev[arg])
        raise RerollError(
            f"segment {segment} reads {user_code(arg)} of segment {unit} outside the layers' state "
            f"(in {user_code(node)}); only a layer may read its own previous segment's values"
        )
    if unit is not None:
        raise RerollError(
            f"segment {segment} reads {user_code(arg)} of segment {unit} (in {user_code(node)}); "
            f"a segment may read only the one before it"
        )
    raise RerollError(
        f"segment {segment} reads {user_code(arg)}, a value computed from several segments (in {user_code(node)})"
    )


@dataclass(frozen=True)
class Fit:
    """``value = a + b*s + c*n``."""

    a: int
    b: int
    c: int

    def __call__(self, s: int, n: int) -> int:
        return self.a + self.b * s + self.c * n

    @property
    def constant(self) -> bool:
        return self.b == 0 and self.c == 0


@dataclass(frozen=True)
class Table:
    """``value = values[s]``: a hole read per unit, for a graph of a fixed number of
    segments (the backend's) where no affine function of ``(s, n)`` is proven for it."""

    values: tuple[int, ...]
    """Per segment index (entry 0, the first unit's, is never read)."""

    def __call__(self, s: int, n: int) -> int:
        return self.values[s]

    @property
    def constant(self) -> bool:
        return False


Hole = Fit | Table
"""How an int literal of the steady unit form is computed for unit ``s`` of length ``n``."""


def _solve(rows: list[tuple[int, ...]], values: list[int]) -> list[Fraction] | None:
    """Exact least-structure solve: the unique solution of a full-rank square subsystem."""
    width = len(rows[0])
    # Gaussian elimination on the first rows that are independent.
    chosen: list[int] = []
    basis: list[list[Fraction]] = []
    for i, row in enumerate(rows):
        vec = [Fraction(x) for x in row]
        for b in basis:
            pivot = next(j for j, x in enumerate(b) if x != 0)
            if vec[pivot] != 0:
                factor = vec[pivot] / b[pivot]
                vec = [x - factor * y for x, y in zip(vec, b)]
        if any(x != 0 for x in vec):
            basis.append(vec)
            chosen.append(i)
        if len(chosen) == width:
            break
    if len(chosen) < width:
        return None
    # Solve the square system rows[chosen] * coef = values[chosen] by Gauss-Jordan.
    matrix = [[Fraction(x) for x in rows[i]] + [Fraction(values[i])] for i in chosen]
    for col in range(width):
        pivot = next(r for r in range(col, width) if matrix[r][col] != 0)
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        head = matrix[col][col]
        matrix[col] = [x / head for x in matrix[col]]
        for r in range(width):
            if r != col and matrix[r][col] != 0:
                factor = matrix[r][col]
                matrix[r] = [x - factor * y for x, y in zip(matrix[r], matrix[col])]
    return [matrix[r][width] for r in range(width)]


def fit_affine(points: Sequence[tuple[int, int]], values: Sequence[Sequence[int]], *, use_n: bool) -> list[Fit | None]:
    """Per hole, the affine fit of its values over the points ``(s, n)``.

    ``values[i][h]`` is hole ``h`` at point ``i``. A hole gets ``None`` when no affine
    function with integer coefficients fits every point, or when the points do not
    over-determine it (no point is left to check the fit on).
    """
    rows = [(1, s, n) if use_n else (1, s) for s, n in points]
    width = len(rows[0])
    fits: list[Fit | None] = []
    for h in range(len(values[0]) if values else 0):
        column = [v[h] for v in values]
        if all(x == column[0] for x in column):
            fits.append(Fit(column[0], 0, 0))  # constant over every point: proven as such
            continue
        if len(rows) <= width:
            fits.append(None)
            continue
        coef = _solve(rows, column)
        if coef is None or any(c.denominator != 1 for c in coef):
            fits.append(None)
            continue
        a, b = int(coef[0]), int(coef[1])
        c = int(coef[2]) if use_n else 0
        fit = Fit(a, b, c)
        fits.append(fit if all(fit(s, n) == x for (s, n), x in zip(points, column)) else None)
    return fits


def _split_of_input(node: Any) -> tuple[torch.fx.Node, int, int] | None:
    """``(input, size, dim)`` when ``node`` is ``input.split(size, dim)`` of a graph input with
    an int ``size`` (``torch.split`` or ``Tensor.split``); ``None`` otherwise."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    is_split = (node.op == "call_method" and node.target == "split") or (
        node.op == "call_function" and node.target in (torch.split, torch.Tensor.split)
    )
    source = node.args[0]
    if not is_split or not isinstance(source, torch.fx.Node) or source.op != "placeholder":
        return None
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or not isinstance(dim, int):
        return None
    value = node_value(source)
    if dim < 0 and isinstance(value, torch.Tensor):
        dim += value.dim()
    return source, size, dim


def find_length_axes(split: UnitSplit, keys: dict[torch.fx.Node, Hashable]) -> tuple[int, dict[Hashable, int]]:
    """The segment length ``T`` and, per graph input the units slice, the sliced dim.

    Looks for ``input[..., s*T : ...]`` in every unit: a getitem on a graph input whose
    index holds a slice starting at ``s*T`` in unit ``s``; or chunk ``s`` of
    ``input.split(T, dim)`` (``torch.split`` or ``Tensor.split`` with an int size).
    """
    starts: dict[tuple[Hashable, int], dict[int, set[int]]] = {}
    for seg, nodes in enumerate(split.units):
        for node in nodes:
            if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
                continue
            base, index = node.args
            chunked = _split_of_input(base)
            if chunked is not None and isinstance(index, int) and not isinstance(index, bool):
                source, size, dim = chunked  # chunk `index` of input.split(size, dim) starts at index*size
                starts.setdefault((keys[source], dim), {}).setdefault(seg, set()).add(index * size)
                continue
            if not isinstance(base, torch.fx.Node) or base.op != "placeholder":
                continue
            index = index if isinstance(index, tuple) else (index,)
            if any(i is None or i is Ellipsis for i in index):
                continue
            for dim, item in enumerate(index):
                if isinstance(item, slice) and isinstance(item.start, int) and not isinstance(item.start, bool):
                    starts.setdefault((keys[base], dim), {}).setdefault(seg, set()).add(item.start)
    found: dict[Hashable, int] = {}
    segment_size = 0
    for (key, dim), by_seg in starts.items():
        if sorted(by_seg) != list(range(len(split.units))) or any(len(v) != 1 for v in by_seg.values()):
            continue
        seq = [next(iter(by_seg[s])) for s in range(len(split.units))]
        step = seq[1] - seq[0] if len(seq) > 1 else 0
        if step > 0 and all(x == s * step for s, x in enumerate(seq)):
            if segment_size and step != segment_size:
                raise RerollError(f"inputs are sliced with two segment lengths ({segment_size} and {step})")
            segment_size = step
            found[key] = dim
    if not found:
        raise RerollError(
            "could not find how the input is split into segments: no segment slices a graph input as "
            "input[..., s*T : ...] or chunk s of input.split(T, dim) (diagpass.compile needs the forward to slice "
            "or split its inputs per segment; torch.chunk and unbind are not supported yet)"
        )
    return segment_size, found


@dataclass(kw_only=True)
class Probe:
    """One captured probe, as the proof reads it."""

    graph: torch.fx.Graph
    labels: CellLabels
    keys: dict[torch.fx.Node, Hashable]
    """Stable key of each placeholder (the same input gets the same key in every probe)."""
    segment_lengths: list[int]
    """Length ``n`` of each segment (all ``T`` but maybe the last)."""


@dataclass(kw_only=True)
class RerollPlan:
    """What the proof established, read by the any-length runtime."""

    num_layers: int
    segment_size: int
    """``T``."""
    split: UnitSplit
    """The exemplar probe's cut (the first probe)."""
    first: UnitForm
    """Unit 0 of the exemplar probe (literals are its values)."""
    steady: UnitForm
    """Unit 1 of the exemplar probe: the template of every later unit."""
    fits: list[Hole]
    """Per hole of :attr:`steady`, its value as a function of ``(s, n)``."""
    exports: dict[str, list[int]]
    """``"first"``/``"steady"``: position in the previous unit of each ``("P", r)`` read."""
    pre_refs: list[list[Ref]]
    post_refs: list[list[Ref]]
    """Per post node, its canonical node arguments, in argument order (lists as ``ALL``)."""
    output_refs: list[Ref]
    """Refs of the graph outputs (flattened in argument order)."""
    short_tail: bool
    """A last segment shorter than ``T`` is proven (the fits cover ``n``)."""
    points: list[tuple[int, int]]
    """The ``(s, n)`` of every unit the steady fits were checked on."""
    holes_checked: int
    """Holes that vary and were fitted and verified (constant holes excluded)."""
    num_segments: int | None = None
    """The one number of segments the plan holds for (:func:`prove_fixed`); ``None``: any."""


def _simple_refs(split: UnitSplit, keys: dict[torch.fx.Node, Hashable]) -> Callable[[torch.fx.Node], Ref]:
    def ref(arg: torch.fx.Node) -> Ref:
        if arg.op == "placeholder":
            return ("G", keys[arg])
        if arg in split.pre_index:
            return ("PRE", split.pre_index[arg])
        if arg in split.post_index:
            return ("POST", split.post_index[arg])
        raise RerollError(f"{arg.name} is read before the segment loop but computed inside it")

    return ref


def per_segment_list(arg: Any, split: UnitSplit) -> tuple[int, int] | None:
    """``(p0, p)`` when ``arg`` lists one value per segment, in order: position ``p0`` of the
    first unit, then position ``p`` of every other (``torch.cat(all_logits)``); else None."""
    if not isinstance(arg, (list, tuple)) or not arg:
        return None
    if not all(isinstance(a, torch.fx.Node) and a in split.unit_of for a in arg):
        return None
    positions = [split.position[a] for a in arg]
    if [split.unit_of[a] for a in arg] != list(range(len(split.units))) or len(set(positions[1:])) != 1:
        return None
    return positions[0], positions[1]


def _post_structure(
    arg: Any,
    split: UnitSplit,
    keys: dict[torch.fx.Node, Hashable],
    literals: list[int],
    where: str,
    first_form: list[int],
    fixed: bool = False,
) -> Any:
    """Canonical form of a post argument: per-segment lists become ``ALL``, the last unit
    ``LAST``; with ``fixed`` (one number of segments), any other unit's value ``UNIT``."""
    last = len(split.units) - 1
    simple = _simple_refs(split, keys)
    every = per_segment_list(arg, split)
    if every is not None:
        first_form.append(every[0])
        return ("ALL", *every)
    if isinstance(arg, torch.fx.Node):
        if arg in split.unit_of:
            if split.unit_of[arg] != last and fixed:
                return ("UNIT", split.unit_of[arg], split.position[arg])
            if split.unit_of[arg] != last:
                raise RerollError(
                    f"{where} reads {user_code(arg)} of segment {split.unit_of[arg]} alone: the result "
                    "would depend on which segments exist (only per-segment lists or the last segment "
                    "can be read after the loop)"
                )
            return ("LAST", split.position[arg])
        return simple(arg)
    if isinstance(arg, bool) or not isinstance(arg, (int, tuple, list, dict, slice)):
        return _const(arg)
    if isinstance(arg, int):
        literals.append(int(arg))
        return ("int", int(arg))  # post literals must not change with the length
    def inner(a: Any) -> Any:
        return _post_structure(a, split, keys, literals, where, first_form, fixed)

    if isinstance(arg, (tuple, list)):
        return (type(arg).__name__, tuple(inner(a) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, inner(v)) for k, v in arg.items()))
    return ("slice", inner(arg.start), inner(arg.stop), inner(arg.step))


def _flat_refs(structure: Any) -> list[Ref]:
    """The refs of a canonical structure, in order."""
    out: list[Ref] = []

    def visit(x: Any) -> None:
        if isinstance(x, tuple) and x and x[0] in ("G", "PRE", "POST", "LAST", "ALL", "UNIT", "L", "P"):
            out.append(x)
        elif isinstance(x, tuple):
            for y in x:
                visit(y)

    visit(structure)
    return out


def _outer_forms(
    split: UnitSplit, keys: dict[torch.fx.Node, Hashable], fixed: bool = False
) -> tuple[Any, list[list[Ref]], list[list[Ref]], list[Ref]]:
    """Canonical pre, post and output, plus their refs (``fixed``: see :func:`_post_structure`)."""
    simple = _simple_refs(split, keys)
    pre_form: list[Any] = []
    pre_refs: list[list[Ref]] = []
    for node in split.pre:
        lits: list[int] = []
        refs: list[Ref] = []

        def on_node(arg: torch.fx.Node, refs: list[Ref] = refs) -> Ref:
            r = simple(arg)
            refs.append(r)
            return r

        shape = (_target_name(node), _structure(node.args, on_node, lits), _structure(node.kwargs, on_node, lits))
        pre_form.append((shape, tuple(lits)))
        pre_refs.append(refs)
    post_form: list[Any] = []
    post_refs: list[list[Ref]] = []
    for node in split.post:
        lits = []
        first_form: list[int] = []
        where = user_code(node)
        shape = (
            _target_name(node),
            _post_structure(node.args, split, keys, lits, where, first_form, fixed),
            _post_structure(node.kwargs, split, keys, lits, where, first_form, fixed),
        )
        post_form.append((shape, tuple(lits)))
        post_refs.append(_flat_refs(shape[1]) + _flat_refs(shape[2]))
    assert split.output is not None
    out_structure = _post_structure(split.output.args[0], split, keys, [], "the graph output", [], fixed)
    return (tuple(pre_form), tuple(post_form), out_structure), pre_refs, post_refs, _flat_refs(out_structure)


def _exports(splits: Sequence[UnitSplit], forms: Sequence[Sequence[UnitForm]]) -> dict[str, list[int]]:
    """Which earlier-unit nodes the ``"P"`` reads name: the same in every probe."""
    exports: dict[str, list[int]] = {}
    for sp, probe_forms in zip(splits, forms):
        for form in probe_forms[1:]:
            kind = "first" if form.segment == 1 else "steady"
            positions = [sp.position[n] for n in form.prev_reads]
            if exports.setdefault(kind, positions) != positions:
                raise RerollError(
                    f"segment {form.segment} reads other state of the segment before it than segment "
                    f"{1 if kind == 'first' else 2} does"
                )
    if "steady" not in exports:
        exports["steady"] = exports["first"]
    return exports


def prove_fixed(probe: Probe, *, split: UnitSplit | None = None) -> RerollPlan:
    """The plan of one graph of a fixed number of segments (what the backend receives).

    The same cut and unit forms as :func:`prove_reroll`: every unit after the first must have
    the steady unit's form. With the number of segments fixed, an int literal that changes
    between units needs no proof of a rule: it is an affine :class:`Fit` where one fits every
    unit, else a :class:`Table` read per unit. Post may read any unit (``UNIT`` refs).
    """
    split = split if split is not None else split_units(probe.graph, probe.labels)
    count = len(split.units)
    if count < 2:
        raise RerollError(f"{count} segment(s): nothing to schedule across segments")
    forms = [unit_form(split, s, probe.keys, probe.labels, cell_detail=False) for s in range(count)]
    first, steady = forms[0], forms[1]
    for form in forms[2:]:
        if form.form != steady.form:
            detail = _first_difference(form, steady, split, split)
            raise RerollError(f"segment {form.segment} is not the form of segment 1: {detail}")
    exports = _exports([split], [forms])
    points = [(s, probe.segment_lengths[s]) for s in range(1, count)]
    values = [form.literals for form in forms[1:]]
    fits = fit_affine(points, values, use_n=len({n for _, n in points}) >= 2)
    holes: list[Hole] = [
        fit if fit is not None else Table((0, *(v[h] for v in values))) for h, fit in enumerate(fits)
    ]
    outer = _outer_forms(split, probe.keys, fixed=True)
    return RerollPlan(
        num_layers=probe.labels.num_layers,
        segment_size=probe.segment_lengths[0],
        split=split,
        first=first,
        steady=steady,
        fits=holes,
        exports=exports,
        pre_refs=outer[1],
        post_refs=outer[2],
        output_refs=outer[3],
        short_tail=probe.segment_lengths[-1] != probe.segment_lengths[0],
        points=points,
        holes_checked=sum(1 for h in holes if not h.constant),
        num_segments=count,
    )


def prove_reroll(probes: Sequence[Probe]) -> RerollPlan:
    """Prove that every probe is the same loop and describe its template (see module doc).

    ``probes[0]`` (the user's probe) is the exemplar and needs at least 3 segments, so that
    its unit 1 (after the first unit) and unit 2 (after a steady unit) both exist.
    """
    main = probes[0]
    if main.labels.num_segments < 3:
        raise RerollError(
            f"the probe has {main.labels.num_segments} segment(s); diagpass.compile needs a probe of at "
            "least 3 segments (the first one, and two that show the steady state)"
        )
    splits = [split_units(p.graph, p.labels) for p in probes]
    forms = [[unit_form(sp, s, p.keys, p.labels) for s in range(len(sp.units))] for sp, p in zip(splits, probes)]
    outer = [_outer_forms(sp, p.keys) for sp, p in zip(splits, probes)]

    def probe_name(i: int) -> str:
        lengths = probes[i].segment_lengths
        name = "the probe" if i == 0 else f"cut probe {i}"
        return f"{name} ({len(lengths)} segments, the last of {lengths[-1]})"

    def differs(i: int, subject: str, against: str, detail: str) -> RerollError:
        return RerollError(
            f"{subject} of {probe_name(i)} differs from {against}: {detail}; the forward does not repeat one segment template"
        )

    first, steady = forms[0][0], forms[0][1]
    for i, probe_forms in enumerate(forms):
        if probe_forms[0].form != first.form or probe_forms[0].literals != first.literals:
            detail = _first_difference(probe_forms[0], first, splits[i], splits[0])
            raise differs(i, "the first segment", "the probe's first segment", detail)
        for form in probe_forms[1:]:
            if form.form != steady.form:
                detail = _first_difference(form, steady, splits[i], splits[0])
                raise differs(i, f"segment {form.segment}", "segment 1 of the probe", detail)
        for part, name in ((0, "the computation before the loop"), (1, "the computation after the loop")):
            if outer[i][0][part] != outer[0][0][part]:
                raise differs(i, name, "the probe's", "its nodes or int literals differ (they may depend on the input length)")
        if outer[i][0][2] != outer[0][0][2]:
            raise differs(i, "the outputs", "the probe's", "they differ in number or in where they come from")

    exports = _exports(splits, forms)

    points: list[tuple[int, int]] = []
    values: list[list[int]] = []
    for probe, probe_forms in zip(probes, forms):
        for form in probe_forms[1:]:
            points.append((form.segment, probe.segment_lengths[form.segment]))
            values.append(form.literals)
    use_n = len({n for _, n in points}) >= 2
    fits = fit_affine(points, values, use_n=use_n)
    nodes = splits[0].units[1]
    for hole_node, slots in zip(nodes, steady.slots_of):
        for slot in slots:
            fit = fits[slot]
            if fit is None:
                where, _ = source_line(hole_node)
                seen = sorted({(s, n, v[slot]) for (s, n), v in zip(points, values)})
                raise RerollError(
                    f"an int literal of {user_code(hole_node)} is not an affine function of the "
                    f"segment index s and length n (seen (s, n, value): {seen[:6]}); probe with more "
                    "segments, or the forward does not repeat one template"
                )
            if hole_node in main.labels.cell_of and fit.b != 0:
                where, _ = source_line(hole_node)
                raise RerollError(
                    f"{user_code(hole_node)}, inside layer {main.labels.cell_of[hole_node][0]}, uses an int "
                    f"that changes with the segment index ({fit.a} + {fit.b}*s): cells of one diagonal could not "
                    "share a kernel"
                )
    return RerollPlan(
        num_layers=main.labels.num_layers,
        segment_size=probes[0].segment_lengths[0],
        split=splits[0],
        first=first,
        steady=steady,
        fits=[f for f in fits if f is not None],  # every hole is fitted, or we raised above
        exports=exports,
        pre_refs=outer[0][1],
        post_refs=outer[0][2],
        output_refs=outer[0][3],
        short_tail=use_n,
        points=points,
        holes_checked=sum(1 for f in fits if f is not None and not f.constant),
    )


def _first_difference(mine: UnitForm, theirs: UnitForm, my_split: UnitSplit, their_split: UnitSplit) -> str:
    for i, (a, b) in enumerate(zip(mine.form, theirs.form)):
        if a != b:
            node = my_split.units[mine.segment][i]
            return f"op {i}, {user_code(node)}, differs"
    if len(mine.form) != len(theirs.form):
        return f"{len(mine.form)} ops against {len(theirs.form)}"
    for i, (a, b) in enumerate(zip(mine.literals, theirs.literals)):
        if a != b:
            return f"int literal {i} is {a} against {b}"
    return "unknown difference"
