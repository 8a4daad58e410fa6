"""Exceptions raised by diagpass. All derive from :class:`DiagpassError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diagpass.passes import Violation

__all__ = ["DiagpassError", "ConfigError", "StructureError", "InputError"]


class DiagpassError(RuntimeError):
    """Base class of every error diagpass raises on purpose."""


class ConfigError(DiagpassError, ValueError):
    """An option passed to the backend is unknown or has the wrong type or value."""


class InputError(DiagpassError, ValueError):
    """An input the program cannot run on (wrong dtype, empty, unexpected shape)."""


class StructureError(DiagpassError):
    """The diagonal structure could not be proven (raised with ``strict=True``).

    ``violations`` holds the offending edges, each naming its source line.
    """

    def __init__(self, message: str, violations: list["Violation"] | None = None) -> None:
        super().__init__(message)
        self.violations: list["Violation"] = list(violations or [])
