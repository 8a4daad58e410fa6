"""Which module attributes model code rebinds while a watch is on, at the cost of the writes only.

``fast.generate`` collects a model's segment calls and runs them later as one program, so every
call must see the state the first one saw. Comparing every module's attributes at every call
costs a Python pass over all of them (about 6,000 on a 16-layer Llama: 0.2 ms a call, 30 ms over
a 131K-token prompt, most of the collect phase). Model code writes state through
``nn.Module.__setattr__``/``__delattr__`` (``self.x = v``, ``setattr``, ``del self.x``, also into
``_parameters``/``_buffers``/``_modules``), so :class:`WriteWatch` wraps those two for the watched
modules and keeps each written attribute's value from before its first write: a call then compares
only what was written since the watch began (usually nothing).

A write that bypasses them (``module.__dict__[name] = v``, ``object.__setattr__``) is not seen as it
happens: the caller compares a snapshot from the start with the end, and refuses a change there that
:meth:`WriteWatch.seen` does not explain, rather than guess when it happened. Only a bypassing write
that is undone again before the end goes unseen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

__all__ = ["MISSING", "WriteWatch", "attribute_of"]

MISSING: Any = object()
"""The value of an attribute that does not exist."""

_TABLES = ("_parameters", "_buffers", "_modules")


def attribute_of(module: nn.Module, name: str) -> Any:
    """``module.name`` as ``nn.Module.__getattr__`` resolves it, without running properties:
    the instance dict, then the parameter, buffer and submodule tables; ``MISSING`` if none."""
    own = module.__dict__
    if name in own:
        return own[name]
    for table in _TABLES:
        entries = own.get(table)
        if entries is not None and name in entries:
            return entries[name]
    return MISSING


class WriteWatch:
    """Records writes to the attributes of ``modules`` made through ``nn.Module``'s own setters,
    between :meth:`install` and the undo it returns (one watch at a time per process)."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._ids = {id(m) for m in modules}
        self.before: dict[tuple[int, str], tuple[nn.Module, Any]] = {}
        """``(id(module), name)`` -> the module and the attribute's value before its first write."""

    def install(self) -> Callable[[], None]:
        """Wrap ``nn.Module.__setattr__`` and ``__delattr__``; returns the undo."""
        set_attr, del_attr = nn.Module.__setattr__, nn.Module.__delattr__
        ids, note = self._ids, self._note

        def watched_setattr(module: nn.Module, name: str, value: Any) -> None:
            if id(module) in ids:
                note(module, name)
            set_attr(module, name, value)

        def watched_delattr(module: nn.Module, name: str) -> None:
            if id(module) in ids:
                note(module, name)
            del_attr(module, name)

        nn.Module.__setattr__ = watched_setattr  # type: ignore[method-assign]
        nn.Module.__delattr__ = watched_delattr  # type: ignore[method-assign]

        def undo() -> None:
            nn.Module.__setattr__ = set_attr  # type: ignore[method-assign]
            nn.Module.__delattr__ = del_attr  # type: ignore[method-assign]

        return undo

    def _note(self, module: nn.Module, name: str) -> None:
        key = (id(module), name)
        if key not in self.before:
            self.before[key] = (module, attribute_of(module, name))

    def first_change(self, same: Callable[[Any, Any], bool]) -> str | None:
        """The name of a written attribute whose value now differs from before the watch
        (``same`` decides: equal scalars may count as the same), else ``None``."""
        for (_, name), (module, before) in self.before.items():
            if not same(attribute_of(module, name), before):
                return name
        return None

    def seen(self, module: nn.Module, name: str) -> bool:
        """Whether ``module.name`` was written through the setters since the watch began."""
        return (id(module), name) in self.before
