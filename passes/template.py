"""Cell templates and bindings: the central data structure of diagpass (DESIGN.md §6).

Every cell is an instance of a *template*: the same ops on the same shapes and dtypes,
differing only in the values it reads from outside (its *inputs*: a layer's weights, the
state of the previous segment, the hidden states of the layer below). A
:class:`CellTemplate` is one such op sequence with numbered input and output slots; a
:class:`CellBinding` says, for one cell, which graph node fills each slot.

Cells with the same canonical form share a template (a *variant*). The first segment
(another code path) and a short last segment (other shapes) are variants, not failures.

Each input slot of a template has a *kind*, read off the bindings of all its cells:

* ``shared``: every cell reads the same node (a global such as an attention mask);
* ``by_layer``: a graph input (weight, buffer) that depends on the layer only, so a
  diagonal can read a contiguous slice of the inputs stacked once as ``[L, ...]``;
* ``per_cell``: anything else (activations, state), stacked per step.

This pass is pure: it reads a graph and the cell labels and returns plain data.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F

from .cells import Cell, CellLabels
from .dependencies import source_line

__all__ = [
    "SlotKind",
    "CellTemplate",
    "CellBinding",
    "TemplateAnalysis",
    "extract_templates",
    "build_template_module",
    "LengthExpr",
    "node_value",
    "draws_random",
    "writes_in_place",
]

SlotKind = Literal["shared", "by_layer", "per_cell"]


def node_value(node: torch.fx.Node) -> Any:
    """The fake value Dynamo (``example_value``) or AOT (``val``) recorded for ``node``."""
    meta = node.meta
    return meta["val"] if "val" in meta else meta.get("example_value")


def _value_signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # No strides: a step sees its inputs stacked (contiguous), so layouts need not match.
        return ("T", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_value_signature(v) for v in value)
    if isinstance(value, (int, float, bool, str, type(None))):
        return ("V", type(value).__name__)
    return ("?", type(value).__name__)


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return f"{node.op}:{target}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{node.op}:{module}.{name}"


@dataclass(kw_only=True)
class CellTemplate:
    """One variant of the cell: an op sequence with numbered input and output slots."""

    variant: int
    """Index of this variant in :attr:`TemplateAnalysis.templates`."""
    exemplar: Cell
    """The cell whose nodes are the template's body."""
    nodes: list[torch.fx.Node]
    """The exemplar's nodes, in graph order."""
    key: str
    """Canonical form as text: equal keys mean interchangeable compiled steps."""
    num_inputs: int
    """Number of input slots."""
    output_locals: list[int]
    """Output slots, as indices into :attr:`nodes` (union over the variant's cells)."""
    slot_kinds: list[SlotKind] = field(default_factory=list)
    """Kind of each input slot."""
    cells: list[Cell] = field(default_factory=list)
    """Every cell of this variant."""
    role: str = "steady"
    """``steady`` (the main variant), ``first segment``, ``last segment`` or ``other``."""


@dataclass(kw_only=True)
class CellBinding:
    """Which graph nodes fill one cell's slots."""

    cell: Cell
    """``(layer, segment)``."""
    variant: int
    """Index of the cell's template."""
    inputs: list[torch.fx.Node]
    """Graph node read by each input slot."""
    outputs: list[torch.fx.Node] = field(default_factory=list)
    """Graph node (inside the cell) that fills each output slot."""


@dataclass(kw_only=True)
class TemplateAnalysis:
    """Templates, bindings and the uniformity verdict."""

    templates: list[CellTemplate]
    """One per variant, the main (steady) variant first."""
    bindings: dict[Cell, CellBinding]
    """Per cell."""
    uniform: bool
    """Whether every cell is the main template, its first-segment or its last-segment variant."""
    difference: str | None = None
    """For non-uniform models: the first cell and op that differ from the main template."""
    unbatchable: str | None = None
    """Why the cells cannot be batched even though they are uniform (e.g. input mutation)."""
    detached: dict[Cell, frozenset[int]] = field(default_factory=dict)
    """Per cell, the input slots it reads detached (truncated BPTT, :mod:`diagpass.passes.detach`)."""
    random: str | None = None
    """Where a cell draws random numbers (dropout in ``train()`` mode), or ``None``. Only the
    training program batches such cells (same distribution, not the same draws as the sequential
    model: the diagonal draws them in another order); inference refuses them (call ``eval()``)."""


def _canonical(nodes: list[torch.fx.Node]) -> tuple[tuple[Any, ...], list[torch.fx.Node], list[tuple[Any, ...]]]:
    """Canonical form of a cell, its external inputs (first-use order) and per-op texts."""
    local = {node: i for i, node in enumerate(nodes)}
    inputs: dict[torch.fx.Node, int] = {}

    def canon(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            if arg in local:
                return ("L", local[arg])
            if arg not in inputs:
                inputs[arg] = len(inputs)
            return ("I", inputs[arg], _value_signature(node_value(arg)))
        if isinstance(arg, (tuple, list)):
            return (type(arg).__name__, tuple(canon(a) for a in arg))
        if isinstance(arg, dict):
            return ("dict", tuple((k, canon(v)) for k, v in arg.items()))
        if isinstance(arg, slice):
            return ("slice", canon(arg.start), canon(arg.stop), canon(arg.step))
        if isinstance(arg, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return repr(arg)
        if isinstance(arg, (int, float, bool, str, type(None), type(Ellipsis))):
            return (type(arg).__name__, arg)
        return ("obj", repr(arg))

    ops: list[tuple[Any, ...]] = []
    for node in nodes:
        op = (_target_name(node), canon(node.args), canon(node.kwargs), _value_signature(node_value(node)))
        ops.append(op)
    return tuple(ops), list(inputs), ops


_MUTATING = {operator.setitem, operator.delitem}
_OPERATOR_INPLACE = {
    "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow",
    "iand", "ior", "ixor", "ilshift", "irshift", "iconcat", "setitem", "delitem",
}


def writes_in_place(node: torch.fx.Node) -> bool:
    """Whether ``node`` may write a tensor in place: ``x.add_()``, ``x += y``, ``x[i] = v``,
    an op whose schema is mutable. ``operator.and_`` is not in place; ``operator.iand`` is."""
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if target in _MUTATING:
        return True
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return name in _OPERATOR_INPLACE  # operator.and_ is not in place, operator.iand is
    if name in ("__setitem__", "__delitem__") or (name.startswith("__i") and name.endswith("__")):
        return True  # x[i] = v, x += v
    if name.endswith("_") and not name.endswith("__"):  # x.add_(...), torch.relu_(...)
        return True
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and getattr(schema, "is_mutable", False))


_DROPOUTS = {
    F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2, F.feature_alpha_dropout: 2,
}
"""Dropout functions, with the position of their ``training`` argument (default True)."""
_RANDOM_NAMES = frozenset(
    "rand randn randint rand_like randn_like randint_like randperm bernoulli bernoulli_ multinomial normal normal_ "
    "poisson exponential_ uniform_ cauchy_ log_normal_ geometric_ native_dropout".split()
)


def _arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def draws_random(node: torch.fx.Node) -> bool:
    """Whether ``node`` draws random numbers: dropout in training mode with ``p > 0``, attention
    with ``dropout_p > 0``, or a sampling op (``rand*``, ``bernoulli``, ``normal``...)."""
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if target in _DROPOUTS or target is torch.dropout:
        training = _arg(node, 2, "training" if target is not torch.dropout else "train", True)
        p = _arg(node, 1, "p", 0.5)
        return bool(training) and not (isinstance(p, (int, float)) and p == 0)
    if target is F.scaled_dot_product_attention:
        p = _arg(node, 4, "dropout_p", 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name in _RANDOM_NAMES


def _mutates_input(node: torch.fx.Node, local: set[torch.fx.Node]) -> bool:
    """Whether ``node`` writes into a tensor that lives outside its cell."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node) or node.args[0] in local:
        return False
    return writes_in_place(node)


def extract_templates(graph: torch.fx.Graph, labels: CellLabels) -> TemplateAnalysis:
    """Group cells into variants, bind their slots and classify the slots.

    Linear in the number of nodes: each cell is canonicalised once and compared by hash.
    """
    cells = sorted(labels.cells, key=lambda c: (c[1], c[0]))  # segment-major: s=0 first
    forms: dict[tuple[Any, ...], int] = {}
    templates: list[CellTemplate] = []
    bindings: dict[Cell, CellBinding] = {}
    texts_of: dict[int, list[tuple[Any, ...]]] = {}
    unbatchable: str | None = None
    random: str | None = None
    for cell in cells:
        nodes = labels.cells[cell]
        form, inputs, texts = _canonical(nodes)
        variant = forms.get(form)
        if variant is None:
            variant = forms[form] = len(templates)
            templates.append(
                CellTemplate(
                    variant=variant,
                    exemplar=cell,
                    nodes=nodes,
                    key=repr(form),
                    num_inputs=len(inputs),
                    output_locals=[],
                )
            )
            texts_of[variant] = texts
        templates[variant].cells.append(cell)
        bindings[cell] = CellBinding(cell=cell, variant=variant, inputs=inputs)
        if unbatchable is None:
            members = set(nodes)
            for node in nodes:
                if _mutates_input(node, members):
                    where, _ = source_line(node)
                    unbatchable = f"cell {cell} writes in place into a value from outside the cell ({node.name} at {where})"
                    break
                if random is None and draws_random(node):
                    where, _ = source_line(node)
                    random = (
                        f"cell {cell} draws random numbers ({_target_name(node).split('.')[-1]} at {where}): is the model "
                        "in train() mode with dropout? Call model.eval() for inference; a batched diagonal would draw "
                        "them in another order than the sequential model"
                    )

    # Output slots: every local that some cell of the variant lets escape.
    escaping: dict[int, set[int]] = {t.variant: set() for t in templates}
    for cell in cells:
        nodes = labels.cells[cell]
        members = set(nodes)
        variant = bindings[cell].variant
        for i, node in enumerate(nodes):
            if any(user not in members for user in node.users):
                escaping[variant].add(i)
    for template in templates:
        template.output_locals = sorted(escaping[template.variant])
        for i in template.output_locals:
            value = node_value(template.nodes[i])
            if not isinstance(value, torch.Tensor) and unbatchable is None:
                node = template.nodes[i]
                unbatchable = (
                    f"cell {template.exemplar} passes a non-tensor value ({node.name}: "
                    f"{type(value).__name__}) out of the layer call at {source_line(node)[0]}"
                )
    for cell, binding in bindings.items():
        nodes = labels.cells[cell]
        binding.outputs = [nodes[i] for i in templates[binding.variant].output_locals]

    _classify_slots(templates, bindings)
    _name_roles(templates, labels.num_segments)
    uniform, difference = _uniformity(templates, labels, texts_of)
    # Main (steady) variant first; renumber consistently.
    order = sorted(range(len(templates)), key=lambda v: (templates[v].role != "steady", v))
    renumber = {old: new for new, old in enumerate(order)}
    templates = [templates[v] for v in order]
    for template in templates:
        template.variant = renumber[template.variant]
    for binding in bindings.values():
        binding.variant = renumber[binding.variant]
    return TemplateAnalysis(
        templates=templates, bindings=bindings, uniform=uniform, difference=difference, unbatchable=unbatchable,
        random=random,
    )


def _classify_slots(templates: list[CellTemplate], bindings: dict[Cell, CellBinding]) -> None:
    for template in templates:
        kinds: list[SlotKind] = []
        for slot in range(template.num_inputs):
            bound = [bindings[c].inputs[slot] for c in template.cells]
            # One cell proves nothing shared of a computed value: treat it as per cell. A graph
            # input (a weight) read by every cell of a variant of one layer is shared, whether
            # one cell or many: the same kernels as that layer's other variants at other lengths.
            single_layer = len({c[0] for c in template.cells}) == 1
            if all(b is bound[0] for b in bound) and (len(bound) > 1 or (single_layer and bound[0].op == "placeholder")):
                kinds.append("shared")
                continue
            by_layer: dict[int, torch.fx.Node] = {}
            is_by_layer = all(b.op == "placeholder" for b in bound)
            for cell, node in zip(template.cells, bound):
                if by_layer.setdefault(cell[0], node) is not node:
                    is_by_layer = False
                    break
            kinds.append("by_layer" if is_by_layer else "per_cell")
        template.slot_kinds = kinds


def _name_roles(templates: list[CellTemplate], num_segments: int) -> None:
    # The steady template runs the middle segments; with S <= 2 take the later segment.
    def rank(t: CellTemplate) -> tuple[bool, bool, int]:
        segments = {s for _, s in t.cells}
        middle = any(0 < s < num_segments - 1 for s in segments)
        return (middle, segments != {0}, len(t.cells))

    main = max(templates, key=rank)
    for template in templates:
        segments = {s for _, s in template.cells}
        if template is main:
            template.role = "steady"
        elif segments == {0}:
            template.role = "first segment"
        elif segments == {num_segments - 1}:
            template.role = "last segment"
        else:
            template.role = "other"


def _uniformity(
    templates: list[CellTemplate], labels: CellLabels, texts_of: dict[int, list[tuple[Any, ...]]]
) -> tuple[bool, str | None]:
    main = next(t for t in templates if t.role == "steady")
    others = [t for t in templates if t.role == "other"]
    if not others:
        return True, None
    odd = min(others, key=lambda t: (t.exemplar[1], t.exemplar[0]))
    mine, theirs = texts_of[odd.variant], texts_of[main.variant]
    index = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    if index < min(len(mine), len(theirs)):
        node = odd.nodes[index]
        where, _ = source_line(node)
        name, other = mine[index][0].split(":", 1)[1], theirs[index][0].split(":", 1)[1]
        if name != other:
            what = f"{name} where cell {main.exemplar} has {other}"
        elif mine[index][3] != theirs[index][3]:
            what = f"{name} with output {mine[index][3]} where cell {main.exemplar} has {theirs[index][3]}"
        else:
            what = f"{name} with other arguments or input shapes than in cell {main.exemplar}"
        op = f"op {index} ({node.name}: {what}) at {where}"
    else:
        op = f"it has {len(mine)} ops where cell {main.exemplar} has {len(theirs)}"
    return False, f"cell {odd.exemplar} differs from the template of cell {main.exemplar}: {op}"


@dataclass(frozen=True)
class LengthExpr:
    """``offset + scale * n``: an int literal of a template that serves every short length ``n``,
    read from its trailing ``length`` placeholder (``build_template_module(length_input=True)``)."""

    offset: int
    scale: int


def build_template_module(
    template: CellTemplate,
    bindings: dict[Cell, CellBinding],
    owner: torch.nn.Module,
    *,
    rewrite: Callable[[torch.fx.Node], tuple[Any, Any]] | None = None,
    class_name: str | None = None,
    length_input: bool = False,
) -> torch.fx.GraphModule:
    """A standalone ``GraphModule``: one placeholder per input slot, a tuple of outputs.

    The body is a copy of the exemplar cell's nodes, with their ``meta`` kept. ``owner``
    is the captured module, which holds whatever ``get_attr`` nodes the body reads.
    ``rewrite(node)``, when given, returns the ``(args, kwargs)`` to use for ``node`` (still
    naming the exemplar's nodes); the reroll pass uses it to put other int literals in.
    ``length_input``: one more placeholder, ``length`` (an int), after the slots; a
    :class:`LengthExpr` in what ``rewrite`` returns becomes ``offset + scale * length``.
    """
    binding = bindings[template.exemplar]
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for slot, node in enumerate(binding.inputs):
        placeholder = graph.placeholder(f"slot{slot}_{node.name}")
        placeholder.meta = dict(node.meta)
        env[node] = placeholder
    length = graph.placeholder("length") if length_input else None

    def materialise(value: Any) -> Any:
        if not isinstance(value, LengthExpr):
            return value
        assert length is not None, "a LengthExpr needs length_input=True"
        scaled = length if value.scale == 1 else graph.call_function(operator.mul, (length, value.scale))
        expr = scaled if value.offset == 0 else graph.call_function(operator.add, (scaled, value.offset))
        env[expr] = expr
        return expr

    for node in template.nodes:
        if rewrite is None:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        args, kwargs = rewrite(node)
        if length is not None:
            args, kwargs = torch.fx.node.map_aggregate(args, materialise), torch.fx.node.map_aggregate(kwargs, materialise)
        new = graph.create_node(
            node.op, node.target, torch.fx.map_arg(args, env.__getitem__), torch.fx.map_arg(kwargs, env.__getitem__), name=node.name
        )
        new.meta = dict(node.meta)
        env[node] = new
    graph.output(tuple(env[template.nodes[i]] for i in template.output_locals))
    return torch.fx.GraphModule(owner, graph, class_name=class_name or f"CellTemplate{template.variant}")
