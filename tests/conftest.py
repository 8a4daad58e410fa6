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

# One intra-op thread per xdist worker when the workers fill the cores: two workers of two threads on
# two cores ran tests/test_backend.py and test_step_inputs.py 10% slower than with one each.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("DIAGPASS_TEST_THREADS", max(1, min(2, (os.cpu_count() or 1) // _workers)))))
if _workers >= (os.cpu_count() or 1):
    # Inductor compiles in this process, not in a pool of its own beside the other workers (5% less
    # wall time on the same two files, cold caches).
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    import diagpass

    # A test reads the records of its own compiles by position: the history keeps only the last 64.
    diagpass.clear_compile_history()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()

