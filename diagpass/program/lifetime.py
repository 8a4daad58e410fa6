"""Value lifetime in a unit: at which phase each value is computed, read for the last time,
and freed.

Phases are those of :mod:`diagpass.program.schedule`: the cell of layer ``l`` at ``2l + 1``,
every other node at the even phase right after its last input. A value dies after its last
reader: a node of its own unit (at that node's phase), a cell of its own unit (through the
slots its template still reads), or a cell of the next unit (the recurrent state, read at the
next unit's phase ``2l + 1``: on the diagonal schedule two later than in this unit's frame). Dropping each value there
keeps at most ``L + 2`` units alive, whatever the number of segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from diagpass.passes.reroll import UnitForm

__all__ = ["phases", "last_reads", "frees_by_phase"]

Ref = tuple[Any, ...]


def phases(form: UnitForm) -> list[int]:
    """The phase of each position of ``form``."""
    phase: list[int] = []
    for pos, refs in enumerate(form.refs):
        layer = form.form[pos][4]
        if layer is not None:
            phase.append(2 * layer + 1)
            continue
        p = max((phase[r[1]] for r in refs if r[0] == "L"), default=0)
        phase.append(p + (p % 2))
    return phase


def last_reads(
    form: UnitForm,
    phase: Sequence[int],
    cell_inputs: Sequence[Sequence[Ref]],
    cell_kinds: Sequence[Sequence[str]],
    next_reads: Iterable[tuple[int, int]],
    next_offset: int,
) -> dict[int, int]:
    """Position -> the phase (in this unit's frame) of its last reader.

    ``cell_inputs[l]`` and ``cell_kinds[l]``: the refs and slot kinds of layer ``l``'s cell;
    ``next_reads``: ``(position, layer)`` of every value the next unit's cells read;
    ``next_offset``: how many phases the next unit runs after this one (2 on the diagonal
    schedule, ``2L + 1`` on the sequential one). A last read past this unit's phases keeps
    the value until the unit is dropped whole.
    """
    last: dict[int, int] = {}

    def read(pos: int, when: int) -> None:
        last[pos] = max(last.get(pos, -1), when)

    for pos, refs in enumerate(form.refs):
        if form.form[pos][4] is None:
            for ref in refs:
                if ref[0] == "L":
                    read(ref[1], phase[pos])
    for layer, (refs, kinds) in enumerate(zip(cell_inputs, cell_kinds)):
        for ref, kind in zip(refs, kinds):
            if ref[0] == "L" and kind != "unused":
                read(ref[1], 2 * layer + 1)
    for pos, layer in next_reads:
        read(pos, 2 * layer + 1 + next_offset)
    return last


def frees_by_phase(stored: Iterable[int], last: dict[int, int], phase: Sequence[int]) -> dict[int, list[int]]:
    """Phase -> the stored positions to drop once it ran (never before they are computed)."""
    frees: dict[int, list[int]] = {}
    for pos in sorted(stored):
        frees.setdefault(max(last.get(pos, -1), phase[pos]), []).append(pos)
    return frees
