"""The examples run from a shell and say what they should (subprocesses, as a user runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run_example(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DIAGPASS_LOG"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} {args}: exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_check_variant():
    out = run_example("check_variant.py", "--compile").stdout
    assert "=== XLMemoryLM" in out and "=== FeedbackMemoryLM" in out
    assert "diagpass dependency report: PROVEN" in out
    assert "diagpass dependency report: NOT PROVEN" in out
    assert "(2, 0) -> (0, 1)" in out  # the violating edge is named
    assert "check_variant.py:" in out  # ... with its source line
    assert "-> diagonal-safe: 6 steps instead of 12" in out
    assert "torch.compile(backend='diagbatch'): diagonal rewrite applied" in out
    assert "torch.compile(backend='diagbatch'): fell back" in out
    assert out.rstrip().endswith("All verdicts as expected.")


def _check_demo_output(out: str, layers: int, segments: int) -> None:
    assert f"ARMT: L={layers} layers, S={segments} segments" in out
    assert "logits:       max relative error" in out and "-> OK" in out
    assert "memory state: max relative error" in out
    assert "diagbatch: diagonal rewrite APPLIED" in out  # last_compile().summary()
    assert "diagpass dependency report: PROVEN" in out  # record.report
    assert f"RESULT: diagonal rewrite applied: {layers + segments - 1} batched steps" in out
    assert out.rstrip().endswith("CHECK PASSED: compiled output and memory state match eager.")


def test_armt_llama_eager_steps():
    out = run_example("armt_llama.py", "--compiler", "eager").stdout
    _check_demo_output(out, layers=4, segments=4)


def test_armt_llama_eager_steps_batch2():
    out = run_example("armt_llama.py", "--compiler", "eager", "--layers", "2", "--segments", "3", "--batch", "2").stdout
    _check_demo_output(out, layers=2, segments=3)


@pytest.mark.slow
def test_armt_llama_default_inductor():
    """The README demo exactly as documented (Inductor compiles the step graphs: ~30-60 s on CPU)."""
    out = run_example("armt_llama.py", timeout=1200).stdout
    _check_demo_output(out, layers=4, segments=4)
    assert "batched GEMMs in them" in out


def _check_any_length_output(out: str) -> None:
    assert "diagpass.compile: PROVEN for any length" in out
    assert "528 tokens = 33 segments (last 16): diagonal" in out
    assert "100 tokens =  7 segments (last  4): diagonal" in out
    assert "16 tokens =  1 segments (last 16): eager" in out
    assert out.rstrip().endswith("with no new trace.")


def test_any_length_eager_steps():
    _check_any_length_output(run_example("any_length.py", "--compiler", "eager").stdout)


@pytest.mark.slow
def test_any_length_inductor():
    _check_any_length_output(run_example("any_length.py", timeout=1200).stdout)
