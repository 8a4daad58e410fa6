"""Return values whose structure follows the number of segments.

The reference ARMT's forward returns, beside ``logits``, one key per segment: ``logits_0``, ...,
``logits_{S-1}`` (and ``hidden_states_{i}``, ``loss_{i}``). A probe of 3 segments returns 3 such
keys, a run of 7 segments must return 7. A :class:`ReturnRecipe` is read off the probe's return
value: keys whose value comes from one segment's outputs, and whose name carries that segment's
index, form a per-segment run ``name_{s}``; every other part is kept as the probe had it. The recipe
is checked against the cut probes (2 segments) before it is trusted.

Sources are the ones :mod:`diagpass.anylength` maps leaves to: ``("out", i)`` a program output,
``("each", i, s)`` segment ``s`` of the per-segment output list ``i``, ``("in", key)`` a graph input,
``("const", value)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diagpass.errors import GeneralisationError

__all__ = ["ReturnRecipe"]

_SEG = "<segment>"
"""Stands for the segment index in a per-segment part of a recipe."""
_LAST_NUMBER = re.compile(r"^(.*\D|)(\d+)(\D*)$")

Recipe = tuple[Any, ...]
"""``("leaf", source)``, ``("seq", type, children)``, ``("seqrun", type, child)`` (one child per
segment), ``("map", type, items)``, or ``("run", blocks)`` inside a map's items: ``blocks`` is
``[(prefix, suffix, child)]``, one per key of a segment. In ``seqrun`` and ``run`` children the
segment index of per-segment outputs is :data:`_SEG`."""


def _walk(value: Any, source_of: Callable[[Any, str], Hashable], what: str) -> Recipe:
    if isinstance(value, Mapping) and not isinstance(value, torch.Tensor):
        return ("map", type(value), tuple((k, _walk(v, source_of, f"{what}[{k!r}]")) for k, v in value.items()))
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return ("seq", type(value), tuple(_walk(v, source_of, f"{what}[{i}]") for i, v in enumerate(value)))
    return ("leaf", source_of(value, what))


def _segments_in(recipe: Recipe) -> set[int]:
    """The segments whose per-segment outputs ``recipe`` reads."""
    if recipe[0] == "leaf":
        source = recipe[1]
        return {source[2]} if source[0] == "each" else set()
    children = recipe[2] if recipe[0] == "seq" else [child for _, child in recipe[2]]
    return set().union(*(_segments_in(c) for c in children)) if children else set()


def _as_template(recipe: Recipe, segment: int) -> Recipe:
    """``recipe`` with segment ``segment`` of every per-segment output replaced by :data:`_SEG`."""
    if recipe[0] == "leaf":
        source = recipe[1]
        if source[0] == "each" and source[2] == segment:
            return ("leaf", ("each", source[1], _SEG))
        return recipe
    if recipe[0] == "seq":
        return ("seq", recipe[1], tuple(_as_template(c, segment) for c in recipe[2]))
    return ("map", recipe[1], tuple((k, _as_template(c, segment)) for k, c in recipe[2]))


def _generalise_map(items: tuple[tuple[Any, Recipe], ...], segments: int) -> list[Any]:
    """Items of a map, with the run of per-segment keys folded into one ``("run", blocks)``."""
    tagged: list[tuple[int, str, str] | None] = []
    for key, child in items:
        match = _LAST_NUMBER.match(key) if isinstance(key, str) else None
        used = _segments_in(child)
        if match and used == {int(match.group(2))}:
            tagged.append((int(match.group(2)), match.group(1), match.group(3)))
        else:
            tagged.append(None)
    out: list[Any] = []
    i = 0
    while i < len(items):
        if tagged[i] is None or tagged[i][0] != 0:  # type: ignore[index]
            if _segments_in(items[i][1]):
                raise GeneralisationError(
                    f"the return value's key {items[i][0]!r} holds a per-segment value that its name does not index "
                    "(expected keys like 'logits_0' ... 'logits_{S-1}', in segment order)"
                )
            out.append(items[i])
            i += 1
            continue
        period = 1
        while i + period < len(items) and tagged[i + period] is not None and tagged[i + period][0] == 0:  # type: ignore[index]
            period += 1
        blocks = [(tagged[i + t][1], tagged[i + t][2], _as_template(items[i + t][1], 0)) for t in range(period)]  # type: ignore[index]
        for s in range(segments):
            for t, (prefix, suffix, template) in enumerate(blocks):
                k = i + s * period + t
                ok = k < len(items) and tagged[k] == (s, prefix, suffix)
                if not ok or _as_template(items[k][1], s) != template:
                    found = repr(items[k][0]) if k < len(items) else "the end of the keys"
                    raise GeneralisationError(
                        f"the return value's per-segment keys do not repeat one pattern: expected "
                        f"'{prefix}{s}{suffix}' (or its value from segment {s}) at key position {k}, found {found}"
                    )
        out.append(("run", tuple(blocks)))
        i += segments * period
    return out


@dataclass(frozen=True)
class ReturnRecipe:
    """How to build the model's return value for any number of segments (see module doc)."""

    recipe: Recipe

    @classmethod
    def from_probe(cls, value: Any, segments: int, source_of: Callable[[Any, str], Hashable]) -> ReturnRecipe:
        """Read the recipe off a probe of ``segments`` segments; ``source_of(leaf, what)`` maps leaves."""
        return cls(cls._generalise(_walk(value, source_of, "the return value"), segments))

    @classmethod
    def _generalise(cls, recipe: Recipe, segments: int) -> Recipe:
        if recipe[0] == "leaf":
            if recipe[1][0] == "each":
                raise GeneralisationError(
                    "the return value holds one segment's output outside a per-segment key or list"
                )
            return recipe
        if recipe[0] == "seq":
            children = recipe[2]
            if len(children) == segments and all(_segments_in(c) == {s} for s, c in enumerate(children)):
                template = _as_template(children[0], 0)
                if all(_as_template(c, s) == template for s, c in enumerate(children)):
                    return ("seqrun", recipe[1], template)  # a list with one entry per segment
            return ("seq", recipe[1], tuple(cls._generalise(c, segments) for c in children))
        items = _generalise_map(recipe[2], segments)
        return ("map", recipe[1], tuple(
            item if item[0] == "run" else (item[0], cls._generalise(item[1], segments)) for item in items
        ))

    def check(self, value: Any, segments: int, source_of: Callable[[Any, str], Hashable], probe: str) -> None:
        """Raise unless the recipe, at ``segments`` segments, is what ``value`` (a cut probe's) is."""
        expected = self._expand(self.recipe, segments)
        seen = _walk(value, source_of, "the return value")
        if expected != seen:
            raise GeneralisationError(
                f"the return value of {probe} is not the probe's, repeated per segment: the return structure "
                "depends on the number of segments in a way diagpass.compile cannot reproduce"
            )

    def build(self, segments: int, value_of: Callable[[Hashable], Any]) -> Any:
        """The return value of a run of ``segments`` segments; ``value_of`` resolves sources."""
        return self._make(self._expand(self.recipe, segments), value_of)

    @classmethod
    def _expand(cls, recipe: Recipe, segments: int, segment: int | None = None) -> Recipe:
        kind = recipe[0]
        if kind == "leaf":
            source = recipe[1]
            if source[0] == "each" and source[2] == _SEG:
                return ("leaf", ("each", source[1], segment))
            return recipe
        if kind == "seq":
            return ("seq", recipe[1], tuple(cls._expand(c, segments, segment) for c in recipe[2]))
        if kind == "seqrun":
            return ("seq", recipe[1], tuple(cls._expand(recipe[2], segments, s) for s in range(segments)))
        items: list[Any] = []
        for item in recipe[2]:
            if item[0] == "run":
                for s in range(segments):
                    items.extend((f"{p}{s}{q}", cls._expand(t, segments, s)) for p, q, t in item[1])
            else:
                items.append((item[0], cls._expand(item[1], segments, segment)))
        return ("map", recipe[1], tuple(items))

    @classmethod
    def _make(cls, recipe: Recipe, value_of: Callable[[Hashable], Any]) -> Any:
        kind = recipe[0]
        if kind == "leaf":
            return value_of(recipe[1])
        if kind == "seq":
            return recipe[1](cls._make(c, value_of) for c in recipe[2])
        out = recipe[1]()  # as the reference builds it: an empty output, then one key at a time
        for key, child in recipe[2]:
            out[key] = cls._make(child, value_of)
        return out
