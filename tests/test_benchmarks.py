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
        # One length: each peer traces once (the CI budget); the tiny default runs 48 and 96.
        [sys.executable, str(REPO / "benchmarks" / "prefill.py"), "--tiny", "--device", "cpu", "--lengths", "80", "--peers", "full,eager,diagbatch,ablation", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prefill latency" in proc.stdout and "diag/seq*" in proc.stdout
    data = json.loads(out.read_text())
    assert [row["tokens"] for row in data["rows"]] == [80]
    for row in data["rows"]:
        assert row["diagbatch"]["applied"] is True
        assert row["diagbatch"]["steps"] == data["env"]["layers"] + row["tokens"] // data["env"]["segment"] - 1
        # The compiled sequential peers (layers, model) are two more Inductor compiles: run on the GPU only.
        assert {"full", "eager", "ablation"} <= set(row)


@pytest.mark.slow
def test_train_step_tiny_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    command = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--tiny", "--device", "cpu"]
    command += ["--segments", "3", "--peers", "eager,diagpass", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eager/diagpass" in proc.stdout and "WARNING" not in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["diagpass"]["path"] == "diagonal" and row["diagpass"]["autograd"] is True
    assert abs(row["diagpass"]["first_loss"] - row["eager"]["first_loss"]) <= 1e-5 * abs(row["eager"]["first_loss"])


@pytest.mark.slow
def test_generate_tiny_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "generate.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "generate.py"), "--tiny", "--device", "cpu", "--quick", "--lengths", "80", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generation after a long prompt" in proc.stdout
    data = json.loads(out.read_text())
    assert [row["tokens"] for row in data["rows"]] == [80]
    for row in data["rows"]:
        assert row["tokens_identical"] is True
        assert row["diagpass"]["path"] == "diagonal" and row["diagpass"]["prefill_segments"] == row["segments"] - 1
        assert {"own", "full"} <= set(row)
        assert all(row[p]["ttft_s"] > 0 and row[p]["total_s"] > 0 for p in ("diagpass", "own", "full"))
        # Timed token by token through HF's streamer hook: a number for every peer (4 new tokens).
        assert all(row[p]["decode_ms_per_token"] > 0 for p in ("diagpass", "own", "full")), row


def test_timeline_charges_each_idle_gap_to_the_time_that_launched_the_next_kernel(tmp_path: Path) -> None:
    """benchmarks/timeline.py on a made-up trace: 2 layers, 3 segments (diagonals 0-3)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from timeline import analyse
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def region(t: int, start: float, end: float) -> dict:
        return {"cat": "user_annotation", "name": f"diagpass.t{t}", "ts": start, "dur": end - start}

    def launch(corr: int, ts: float) -> dict:
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "args": {"correlation": corr}}

    def kernel(corr: int, start: float, end: float) -> dict:
        return {"cat": "kernel", "name": f"k{corr}", "ts": start, "dur": end - start, "args": {"correlation": corr}}

    events = [
        region(1, 0, 100), launch(1, 10), kernel(1, 20, 50),  # ramp-up: diagonal 0 (1 cell)
        region(3, 100, 200), launch(2, 150), kernel(2, 160, 170),  # diagonal 1 (2 cells): idle 50-160
        region(4, 200, 300), launch(3, 210), kernel(3, 215, 400),  # prepares diagonal 2: idle 170-215
        region(5, 300, 350), launch(4, 310), kernel(4, 400, 900),  # queued behind k3: no idle
        region(7, 350, 360), launch(5, 355), kernel(5, 950, 960),  # ramp-down, diagonal 3: idle 900-950
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    result = analyse(str(trace), segments=3, layers=2)
    phases = result["phases"]
    assert phases["ramp_up"]["idle_ms"] == 0.0 and phases["ramp_up"]["busy_ms"] == 0.03
    assert phases["steady"]["idle_ms"] == 0.155 and phases["steady"]["kernels"] == 3
    assert phases["steady"]["busy_ms"] == 0.695
    assert phases["ramp_down"]["idle_ms"] == 0.05
    assert result["idle_ms"] == 0.205 and result["device_span_ms"] == 0.94
    assert result["per_time"]["5"]["idle_ms"] == 0.0  # the device was busy when k4's turn came


def test_generate_phases_tiny_cpu_smoke(tmp_path: Path) -> None:
    """benchmarks/generate_phases.py: the prefill program and HF generate are each timed once, in order."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import generate_phases
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "phases.json"
    generate_phases.main(["--tiny", "--device", "cpu", "--lengths", "48", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    labels = [label for label, _, _ in row["phases"]]
    assert labels.count("diagonal prefill program") == 1 and labels.count("HF generate on the last segment") == 1
    assert labels.index("diagonal prefill program") < labels.index("HF generate on the last segment")
    assert "generate: diagonal" in row["record"] and row["ttft_s"] > 0


def test_generate_prefill_bound_goes_on_when_the_logits_for_every_token_do_not_fit() -> None:
    """At 131K tokens on an 80 GB card the forward with the LM head (31 GiB of logits) runs out of
    memory: the bound (on the headless prefill) is still measured, the other is recorded as skipped."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from generate import prefill_bound
        from prefill import Timer
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    headless_calls: list[int] = []

    def headless(head: torch.Tensor) -> None:
        headless_calls.append(head.shape[1])

    def with_head(head: torch.Tensor) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 31.07 GiB.")

    ids = torch.zeros(1, 50, dtype=torch.long)
    bound = prefill_bound(with_head, headless, ids, 16, Timer(torch.device("cpu")), 0, 2)
    assert headless_calls == [48, 48, 48]  # the compile call, then 2 repeats, of the 3 full segments
    assert bound["full_segments"] == 3 and bound["prefill_with_lm_head_s"] is None
    assert bound["prefill_with_lm_head_skipped"].startswith("out of memory")
    assert bound["bound_s"] == 1.1 * bound["prefill_s"] > 0

    def headless_oom(head: torch.Tensor) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(torch.OutOfMemoryError):  # the bound itself cannot be skipped
        prefill_bound(with_head, headless_oom, ids, 16, Timer(torch.device("cpu")), 0, 2)
