"""Exceptions raised by diagpass. All derive from :class:`DiagpassError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diagpass.passes import Violation

__all__ = ["DiagpassError", "ConfigError", "StructureError", "InputError", "GeneralisationError", "through_dynamo"]


class DiagpassError(RuntimeError):
    """Base class of every error diagpass raises on purpose."""


class ConfigError(DiagpassError, ValueError):
    """An option passed to the backend is unknown or has the wrong type or value."""


class InputError(DiagpassError, ValueError):
    """An input the program cannot run on (wrong dtype, empty, unexpected shape)."""


class GeneralisationError(DiagpassError):
    """``diagpass.compile``: the probe does not prove that the forward generalises to other lengths."""


class StructureError(DiagpassError):
    """The diagonal structure could not be proven (raised with ``strict=True``).

    ``violations`` holds the offending edges, each naming its source line.
    """

    def __init__(self, message: str, violations: list["Violation"] | None = None) -> None:
        super().__init__(message)
        self.violations: list["Violation"] = list(violations or [])


_THROUGH_DYNAMO: dict[type, type] = {}


def through_dynamo(error: DiagpassError) -> DiagpassError:
    """``error``, as an instance of a subclass of its class that Dynamo re-raises unchanged.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed``, except its own
    ``ShortenTraceback`` family, so ``except diagpass.ConfigError`` around a
    ``torch.compile``'d call would never match. The subclass also derives from
    ``ShortenTraceback`` (with no frame to cut to), so the user catches the documented class.
    """
    from torch._dynamo.exc import ShortenTraceback

    cls = type(error)
    if isinstance(error, ShortenTraceback):
        return error
    surfacing = _THROUGH_DYNAMO.get(cls)
    if surfacing is None:
        surfacing = type(cls.__name__, (cls, ShortenTraceback), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _THROUGH_DYNAMO[cls] = surfacing
    copy = surfacing.__new__(surfacing, *error.args)
    copy.args = error.args
    copy.__dict__.update(vars(error))
    copy.first_useful_frame = None
    copy.__cause__ = error.__cause__
    return copy
