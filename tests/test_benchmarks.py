"""The benchmark harness runs end to end on the CPU (the smoke test issue 5 asks for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prefill_tiny_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "prefill.py"), "--tiny", "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prefill latency" in proc.stdout and "diag/seq*" in proc.stdout
    data = json.loads(out.read_text())
    assert [row["tokens"] for row in data["rows"]] == [48, 96]
    for row in data["rows"]:
        assert row["diagbatch"]["applied"] is True
        assert row["diagbatch"]["steps"] == data["env"]["layers"] + row["tokens"] // data["env"]["segment"] - 1
        assert {"full", "eager", "layers", "model", "ablation"} <= set(row)
