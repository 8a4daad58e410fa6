"""Logging switch for diagpass.

diagpass logs through the standard ``logging`` module under the ``"diagpass"`` logger
(``diagpass.backend``, ``diagpass.analyze``, ...). As a library it adds no handler by
default: warnings (a fallback, say) propagate to the root logger as usual.

To see what the backend does, set the environment variable before Python starts::

    DIAGPASS_LOG=info python examples/armt_llama.py     # or debug, warning, error

or call :func:`set_log_level` from code::

    import diagpass
    diagpass.set_log_level("debug")

Either attaches one handler to ``logging.getLogger("diagpass")`` that writes
``[diagpass LEVEL] logger.name: message`` lines to stderr. Calling either again changes the
level; it never adds a second handler.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["ENV_VAR", "LOG_FORMAT", "configure_from_env", "set_log_level"]

ENV_VAR = "DIAGPASS_LOG"
"""The environment variable read on ``import diagpass``."""

LOG_FORMAT = "[diagpass %(levelname)s] %(name)s: %(message)s"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_OFF = {"", "0", "off", "none", "false", "no"}

_LOGGER_NAME = "diagpass"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever ``sys.stderr`` is at the time of the record
    (so redirection and pytest's capture keep working after the handler was attached)."""

    _diagpass_handler = True  # marks the handler as ours: idempotence survives module reloads

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - property
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


def _our_handler(logger: logging.Logger) -> logging.Handler | None:
    for handler in logger.handlers:
        if getattr(handler, "_diagpass_handler", False):
            return handler
    return None


def _parse_level(level: str | int) -> int:
    if isinstance(level, bool):
        raise ValueError(f"diagpass log level must be a name or an int, got {level!r}")
    if isinstance(level, int):
        return level
    if isinstance(level, str):
        key = level.strip().lower()
        if key in _LEVELS:
            return _LEVELS[key]
        if key.isdigit():
            return int(key)
    raise ValueError(f"unknown diagpass log level {level!r}; use one of {sorted(set(_LEVELS) - {'warn'})}")


def set_log_level(level: str | int | None) -> logging.Logger:
    """Show diagpass's log records at ``level`` (``"debug"``, ``"info"``, ``"warning"``,
    ``"error"`` or a ``logging`` int) on stderr.

    Attaches diagpass's single stderr handler to the ``"diagpass"`` logger if it is not
    there yet, and sets the level of both. ``None`` removes the handler and restores the
    library default (no handler, level NOTSET: warnings propagate to the root logger).
    Returns the ``"diagpass"`` logger.
    """
    logger = logging.getLogger(_LOGGER_NAME)
    handler = _our_handler(logger)
    if level is None:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        return logger
    value = _parse_level(level)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    handler.setLevel(value)
    logger.setLevel(value)
    return logger


def configure_from_env(environ: dict[str, str] | None = None) -> logging.Logger | None:
    """Apply ``DIAGPASS_LOG`` (called on ``import diagpass``).

    Unset, empty or ``off``: nothing is added. A level name: same as :func:`set_log_level`.
    An unknown value is ignored with a warning. Returns the logger when a level was applied.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR)
    if value is None or value.strip().lower() in _OFF:
        return None
    try:
        return set_log_level(value)
    except ValueError as error:
        warnings.warn(f"{ENV_VAR}={value!r} ignored: {error}", stacklevel=2)
        return None
