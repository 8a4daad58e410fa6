"""diagpass: a torch.compile backend that runs recurrent-memory transformers (ARMT and
kin) with diagonal batching.

    compiled = torch.compile(model, backend="diagbatch")

``diagpass.compile(model, probe)`` proves the structure on a short probe and returns a
module that runs any input length without tracing again. See ``diagpass.analyze`` for the dependency check on its own, and
``diagpass.last_compile()`` for what the backend did.
"""

from diagpass.logs import configure_from_env as _configure_logging, set_log_level

_configure_logging()  # DIAGPASS_LOG=info|debug|warning: see diagpass/logs.py

from diagpass.analyze import analyze
from diagpass.anylength import AnyLengthModel, GeneralisationError, RerollReport, compile
from diagpass.backend import CompileRecord, clear_compile_history, compile_history, last_compile
from diagpass.config import DiagbatchConfig, parse_options
from diagpass.errors import ConfigError, DiagpassError, InputError, StructureError
from diagpass.program import DiagonalProgram
from diagpass.report import DependencyReport

__version__ = "0.1.0"

__all__ = [
    "analyze",
    "compile",
    "AnyLengthModel",
    "DiagonalProgram",
    "RerollReport",
    "GeneralisationError",
    "last_compile",
    "compile_history",
    "clear_compile_history",
    "CompileRecord",
    "DependencyReport",
    "DiagbatchConfig",
    "parse_options",
    "set_log_level",
    "DiagpassError",
    "ConfigError",
    "InputError",
    "StructureError",
    "__version__",
]
