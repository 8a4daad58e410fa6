"""Test configuration: a fresh Dynamo cache per test (Dynamo keys its cache and its
recompile limit on the forward's code object, shared by every model of a class)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import Phase, settings

# CI: fixed examples, no shrinking (a shrink of a compile test can take many minutes).
settings.register_profile(
    "ci", deadline=None, print_blob=True, derandomize=True, phases=(Phase.explicit, Phase.reuse, Phase.generate)
)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    import diagpass

    # A test reads the records of its own compiles by position: the history keeps only the last 64.
    diagpass.clear_compile_history()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()

