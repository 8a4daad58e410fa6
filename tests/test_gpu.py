"""GPU-only checks of the paths CPU CI cannot reach: Inductor/Triton steps and CUDA graphs.

Skipped without CUDA; run them on a GPU with `python -m pytest tests/test_gpu.py -q`.
"""

from __future__ import annotations

import pytest
import torch

import diagpass
from torch._dynamo.utils import counters

from diagpass import models
from tests.helpers import compare_low_precision, compile_and_compare
from tests.reference_style import ReferenceStyleARMT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ids(batch: int, length: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).cuda()


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_gpu_fp32_exact(cudagraphs: bool) -> None:
    model = ReferenceStyleARMT(layers=4, segment_size=8, width=32, heads=4).cuda()
    record = compile_and_compare(
        model, _ids(2, 45), options={"compiler": "inductor", "cudagraphs": cudagraphs}, noise_aware=True
    )
    assert record.applied and record.num_steps == 4 + 6 - 1
    assert record.batched_gemms > 0
    if cudagraphs:
        assert counters["diagpass"]["cuda_graph_replays"] > 0


def test_gpu_zoo_armt_bf16_within_sequential_noise() -> None:
    model = models.build_armt(segment_size=32, num_mem_tokens=8, d_mem=16, dtype=torch.bfloat16, device="cuda")
    record, diag_err, eager_err = compare_low_precision(
        model, _ids(1, 150, vocab=model.config.vocab_size), options={"compiler": "inductor"}
    )
    assert record.applied and eager_err > 0


# --- whole-program CUDA graphs (diagpass.graphs, option cudagraph_program) ---------------------------


def test_program_graphs_replay_refills_and_copies_out() -> None:
    """Warm-up, capture, replay; new inputs each call are read through the graph's buffers,
    weights in place; outputs are copies, so the next replay does not change them."""
    from diagpass.graphs import ProgramGraphs

    graphs = ProgramGraphs(name="test")
    weight = torch.nn.Parameter(torch.randn(16, 16, device="cuda"), requires_grad=False)  # read in place

    def program(x: torch.Tensor, w: torch.Tensor) -> tuple[tuple[torch.Tensor], int]:
        return (torch.relu(x @ w) + 1,), 7

    hows, kept = [], []
    for i in range(4):
        x = torch.randn(8, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
        (out,), info, how = graphs(program, [x, weight], key="k")
        hows.append(how)
        assert info == 7
        torch.testing.assert_close(out, torch.relu(x @ weight) + 1)
        kept.append((out, torch.relu(x @ weight) + 1))
    assert hows == ["warm-up", "captured", "replayed", "replayed"]  # nothing compiled: one warm-up
    for out, want in kept:  # earlier results survived later replays
        torch.testing.assert_close(out, want)
    with torch.no_grad():
        moved = torch.nn.Parameter(weight.clone(), requires_grad=False)  # moved: captured again, never read stale
    x = torch.randn(8, 16, device="cuda")
    (out,), _, how = graphs(program, [x, moved], key="k")
    assert how == "warm-up"
    torch.testing.assert_close(out, torch.relu(x @ moved) + 1)


def test_program_graphs_replay_a_large_input_built_anew_each_call() -> None:
    """A large input (fast.generate's concatenated prefill segments) is a new tensor each call, at
    an address the allocator picks: copied in, never read in place, so the graph keeps replaying
    (it was captured again whenever the input moved after two calls at the same address)."""
    from diagpass.graphs import ProgramGraphs

    graphs = ProgramGraphs(name="test")
    weight = torch.nn.Parameter(torch.randn(64, 64, device="cuda"), requires_grad=False)

    def program(x: torch.Tensor, w: torch.Tensor) -> tuple[tuple[torch.Tensor], None]:
        return (x[:8] @ w,), None

    hows = []
    for i in range(6):
        x = torch.randn(2**16 + 8 * i, 64, device="cuda")  # 16+ MiB, a new size (so a new block) now and then
        x = x[: 2**16] if i % 2 else torch.randn(2**16, 64, device="cuda")
        (out,), _, how = graphs(program, [x.contiguous(), weight], key="k")
        hows.append(how)
        torch.testing.assert_close(out, x[:8] @ weight)
    assert hows == ["warm-up", "captured", "replayed", "replayed", "replayed", "replayed"], hows


def test_program_graphs_capture_again_while_a_dropped_graphs_tensor_lives() -> None:
    """A graph dropped (its weight moved) while a tensor of its pool is still held: the next capture
    takes a new pool. Capturing into the old one failed in the allocator ("use_count > 0"), as
    seen once in fast.generate at 131K."""
    from diagpass.graphs import ProgramGraphs

    graphs = ProgramGraphs(name="test")

    def program(x: torch.Tensor, w: torch.Tensor) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        return (x @ w,), w.sum(0)  # the info tensor lives in the graph's pool, never copied out

    # a parameter is read in place (a small plain tensor would be refilled, so never "move")
    weight = torch.nn.Parameter(torch.randn(16, 16, device="cuda"), requires_grad=False)
    x = torch.randn(8, 16, device="cuda")
    held = [graphs(program, [x, weight], key="k")[1] for _ in range(2)]  # warm-up, capture
    for _ in range(3):  # the weight moves: dropped, warmed up, captured again
        weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        hows = [graphs(program, [x, weight], key="k")[2] for _ in range(2)]
        held.append(graphs(program, [x, weight], key="k")[1])
        assert hows == ["warm-up", "captured"], hows
    assert not graphs.failures, graphs.failures


def test_program_graphs_failed_capture_runs_uncaptured() -> None:
    from diagpass.graphs import ProgramGraphs

    graphs = ProgramGraphs(name="test")

    def syncs(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x * float(x.sum().item()), None  # a host sync: not capturable

    x = torch.ones(4, device="cuda")
    hows = [graphs(syncs, [x.clone()], key=0)[2] for _ in range(3)]
    assert all(h.startswith("uncaptured: the program synchronises with the host") for h in hows), hows
    out, _, _ = graphs(syncs, [x.clone()], key=0)
    torch.testing.assert_close(out, x * 4)
    assert graphs.captures == 0


def test_failed_capture_leaves_the_rng_usable() -> None:
    """A capture that fails anyway (the sync check bypassed) falls back, and random ops still work."""
    from diagpass.graphs import ProgramGraphs

    graphs = ProgramGraphs(name="test")

    def syncs(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x * float(x.sum().item()), None

    x = torch.ones(4, device="cuda")
    assert graphs._capture(syncs, [x], [x.data_ptr()], "k", 0) is None
    assert graphs.failures["k"].startswith("CUDA graph capture failed")
    torch.randn(8, device="cuda").normal_()  # raised "Offset increment outside graph capture" before


def test_any_length_program_graph_exact() -> None:
    """diagpass.compile on CUDA: the second call at a length captures, later calls replay; each
    call (new ids every time) matches eager, outputs and state, also after a weight update."""
    import diagpass
    from tests.helpers import logits_of, max_rel_err, state_of

    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8, device="cuda")
    vocab = model.config.vocab_size
    fast = diagpass.compile(model, _ids(1, 24, vocab), options={"compiler": "inductor"})
    layer_weight = next(p for n, p in model.named_parameters() if ".layers.1." in n and p.dim() == 2)
    hows = []
    for i, length in enumerate([56, 56, 56, 56, 56, 53, 53, 53, 53]):
        if i == 4:
            with torch.no_grad():
                layer_weight.mul_(1.01)  # in place: restacked, captured again
        ids = torch.randint(0, vocab, (1, length), device="cuda")
        with torch.no_grad():
            expected = logits_of(model(ids)).clone()
            expected_state = state_of(model)
            actual = logits_of(fast(ids))
        hows.append(fast.report.runs[-1].stats.graph)
        assert max_rel_err(actual, expected) <= 1e-4, (i, hows)
        for got, want in zip(state_of(model), expected_state):
            assert max_rel_err(got, want) <= 1e-4
    # The first call compiles steps (syncs), so the second is watched for host syncs, the third captures.
    assert hows[:4] == ["warm-up", "warm-up", "captured", "replayed"], hows
    # Restacked after the update: this model's stacks are small, so a replay copies them in (a
    # large stack that moved is captured again: test_program_graphs_replay_refills_and_copies_out).
    assert hows[4] == "replayed", hows
    assert hows[5:] == ["warm-up", "warm-up", "captured", "replayed"], hows
    # The hidden states were carried one lane up in the steady steps (read in place, exact above).
    assert fast.report.carry is not None
    assert any(run.stats is not None and run.stats.carried_steps > 0 for run in fast.report.runs)


def test_backend_program_graph_exact() -> None:
    model = ReferenceStyleARMT(layers=3, segment_size=8, width=32, heads=4).cuda()
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={"compiler": "inductor"})
    from diagpass import last_compile
    from tests.helpers import logits_of, max_rel_err

    hows = []
    for seed in range(4):
        ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            expected = logits_of(model(ids)).clone()
            actual = logits_of(compiled(ids))
        program = last_compile().program
        hows.append(program.last_graph)
        assert max_rel_err(actual, expected) <= 1e-4
    assert isinstance(program, diagpass.DiagonalProgram)  # its weight stacks are built outside its graph
    # Warm-up calls (one more where the first compiled steps), one capture, then replays.
    captured = hows.index("captured")
    assert 1 <= captured <= 2 and set(hows[:captured]) == {"warm-up"} and hows[captured + 1 :] == ["replayed"] * (3 - captured), hows


def test_dynamic_short_tail_exact_captured_and_compiled_for_two_lengths_only() -> None:
    """``short_tail="dynamic"`` on CUDA: every short length matches eager; the first short length
    compiles the tail's step, the second once more (symbolic), no later one (one full segment
    included), and a repeated length is captured in the program graph, then replayed."""
    from tests.helpers import logits_of, max_rel_err, state_of

    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8, device="cuda")
    vocab = model.config.vocab_size
    fast = diagpass.compile(model, _ids(1, 24, vocab), options={"compiler": "inductor", "short_tail": "dynamic"})
    compiles, hows = [], []
    for i, length in enumerate([53, 51, 15, 54, 50, 50, 50]):
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(i)).cuda()
        with torch.no_grad():
            expected = logits_of(model(ids)).clone()
            expected_state = state_of(model)
            actual = logits_of(fast(ids))
        assert max_rel_err(actual, expected) <= 1e-4, length
        for got, want in zip(state_of(model), expected_state):
            assert max_rel_err(got, want) <= 1e-4, length
        compiles.append(counters["diagpass"]["dynamic_tail_compiles"])
        hows.append(fast.report.runs[-1].stats.graph)
    assert compiles == [1, 2, 2, 2, 2, 2, 2], compiles
    assert hows[-2:] == ["captured", "replayed"] or hows[-1] == "replayed", hows
