"""Whole-program CUDA graphs (diagpass.graphs): what CPU CI can check. Capture and replay
themselves are tested on the GPU (tests/test_gpu.py)."""

from __future__ import annotations

import torch

import diagpass
from diagpass.graphs import ProgramGraphs, program_graphs
from tests.reference_style import ReferenceStyleARMT


def test_program_graphs_are_off_without_cuda_or_when_asked() -> None:
    on = diagpass.parse_options({})
    assert on.cudagraph_program
    expect = torch.cuda.is_available()
    assert (program_graphs(on, name="x") is not None) == expect
    assert program_graphs(diagpass.parse_options({"cudagraph_program": False}), name="x") is None
    # Per-step graphs replace the program graph: one cannot be captured inside the other.
    assert program_graphs(diagpass.parse_options({"cudagraphs": True}), name="x") is None
    assert program_graphs(diagpass.parse_options({"cudagraph_lanes": 4}), name="x") is None


def test_cpu_arguments_run_uncaptured_with_the_reason() -> None:
    graphs = ProgramGraphs(name="test")
    x = torch.ones(3)
    for _ in range(3):
        (out,), info, how = graphs(lambda t: ((t + 1,), "info"), [x])
        assert torch.equal(out, x + 1) and info == "info"
        assert how == "uncaptured: not every tensor argument is on a CUDA device"
    assert graphs.captures == 0 and len(graphs) == 0


def test_runs_say_how_they_used_the_graph() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=4, num_mem_tokens=2)
    fast = diagpass.compile(model, torch.randint(0, 64, (1, 12)), options={"compiler": "eager"})
    with torch.no_grad():
        fast(torch.randint(0, 64, (1, 20)))
    # A CPU model: no graph ("off"), or, where CUDA exists, refused with the reason.
    cpu = "uncaptured: not every tensor argument is on a CUDA device" if torch.cuda.is_available() else "off"
    assert fast.report.runs[-1].stats.graph == cpu
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={"compiler": "eager"})
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 20)))
    program = diagpass.last_compile().program
    assert isinstance(program, diagpass.DiagonalProgram)  # its weight stacks are built outside its graph
    assert program.last_graph == cpu


def test_which_arguments_a_replay_refills() -> None:
    from diagpass.graphs import _refill_arg

    small = torch.zeros(4)
    big = torch.zeros(5 * 2**20)  # 20 MiB
    weight = torch.nn.Parameter(torch.zeros(4))
    assert _refill_arg(small, small.data_ptr())  # an input or state: copied even where it kept its address
    # A large input too: that it kept its address for two calls is the allocator's luck (fast.generate's
    # concatenated prefill segments moved on the third call and were captured again, every few calls).
    assert _refill_arg(big, big.data_ptr())
    assert not _refill_arg(big, big.data_ptr(), owned=True) and _refill_arg(big, big.data_ptr() + 1, owned=True)
    # A small stack of the program's own is copied: a restack after a weight update then replays.
    assert _refill_arg(small, small.data_ptr(), owned=True)
    assert not _refill_arg(weight, weight.data_ptr()) and _refill_arg(weight, None)
    assert not _refill_arg(3, None)
