"""Group the graph outputs that repeat once per segment into per-segment lists.

The reference ARMT returns ``logits_0 ... logits_{S-1}`` (and ``hidden_states_{i}``) beside the
concatenated logits, so the flat tuple Dynamo's graph returns grows with S:
``(logits, logits_0, logits_1, logits_2, ...)``. The any-length proof needs outputs whose structure
does not depend on S. This pass rewrites such a run, ``S`` blocks of ``P`` outputs where block ``s``
holds values of unit ``s`` (at the same positions for every unit after the first), into ``P`` lists
of ``S`` values: ``(logits, [logits_0, logits_1, logits_2])``. Each list is then a per-segment list
(an ``ALL`` ref) like ``torch.cat(all_logits)``'s argument, which the proof already generalises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from .reroll import UnitSplit

__all__ = ["OutputGroups", "group_segment_outputs"]


@dataclass(frozen=True)
class OutputGroups:
    """Where each output of the original flat tuple went."""

    where: tuple[tuple[int, int | None], ...]
    """Original output ``k`` -> ``(new index, segment)``; segment None for an output left alone."""
    lists: tuple[int, ...]
    """New indices that hold a per-segment list."""


def _block_at(outputs: list[object], i: int, split: UnitSplit) -> int:
    """The block size ``P`` of a per-segment run starting at ``outputs[i]``, or 0 for none."""
    S = len(split.units)

    def unit(k: int) -> int | None:
        value = outputs[k] if k < len(outputs) else None
        return split.unit_of.get(value) if isinstance(value, torch.fx.Node) else None

    if S < 2 or unit(i) != 0:
        return 0
    P = next((j - i for j in range(i + 1, len(outputs)) if unit(j) is not None and unit(j) != 0), 0)
    if P == 0 or i + S * P > len(outputs):
        return 0
    for s in range(S):
        for t in range(P):
            if unit(i + s * P + t) != s:
                return 0
            if s >= 2 and split.position[outputs[i + s * P + t]] != split.position[outputs[i + P + t]]:
                return 0
    return P


def group_segment_outputs(graph: torch.fx.Graph, split: UnitSplit) -> OutputGroups:
    """Rewrite ``graph``'s output tuple in place (see module doc) and say where each output went."""
    assert split.output is not None
    flat = split.output.args[0]
    if not isinstance(flat, (tuple, list)):
        return OutputGroups(where=((0, None),), lists=())
    outputs = list(flat)
    S = len(split.units)
    new: list[object] = []
    where: list[tuple[int, int | None]] = []
    lists: list[int] = []
    i = 0
    while i < len(outputs):
        P = _block_at(outputs, i, split)
        if P == 0:
            where.append((len(new), None))
            new.append(outputs[i])
            i += 1
            continue
        base = len(new)
        for t in range(P):
            lists.append(base + t)
            new.append([outputs[i + s * P + t] for s in range(S)])
        for s in range(S):
            for t in range(P):
                where.append((base + t, s))
        i += S * P
    if lists:
        split.output.args = (tuple(new),)
    return OutputGroups(where=tuple(where), lists=tuple(lists))
