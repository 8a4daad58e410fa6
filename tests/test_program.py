"""One :class:`diagpass.DiagonalProgram` for both front ends: the backend and ``diagpass.compile``
build the same program class, and at the same length they give bitwise equal outputs and state."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import diagpass
from diagpass import models
from tests.helpers import logits_of, state_of
from tests.reference_style import ReferenceStyleARMT
from tests.reroll_models import LayerZeroBranch, SegmentIndexBetweenLayers, SplitSegments


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


ZOO: dict[str, Callable[[], torch.nn.Module]] = {
    "armt-llama": lambda: models.build_armt(base="llama", segment_size=8, num_mem_tokens=4, d_mem=8),
    "armt-qwen2": lambda: models.build_armt(base="qwen2", segment_size=8, num_mem_tokens=4, d_mem=8),
    "armt-gpt2": lambda: models.build_armt(base="gpt2", segment_size=8, num_mem_tokens=4, d_mem=8),
    "armt-gemma2": lambda: models.build_armt(base="gemma2", segment_size=8, num_mem_tokens=4, d_mem=8),
    "armt-gemma3": lambda: models.build_armt(base="gemma3", segment_size=8, num_mem_tokens=4, d_mem=8),
    "linear-memory": lambda: models.build_linear_memory(segment_size=8, d_key=8),
    "per-layer-memory": lambda: models.build_per_layer_memory_rmt(segment_size=8, num_mem_tokens=4),
    "reference-style": lambda: ReferenceStyleARMT(layers=3, segment_size=8, num_mem_tokens=2),
    "segment-index-between-layers": lambda: SegmentIndexBetweenLayers(layers=3, segment_size=8, num_mem_tokens=2),
    "layer-zero-branch": lambda: LayerZeroBranch(layers=4, segment_size=8, num_mem_tokens=2),
    "split-input": lambda: SplitSegments(layers=3, segment_size=8, num_mem_tokens=2),
}


def _vocab(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return config.vocab_size if config is not None else 64


def _backend(model: torch.nn.Module, ids: torch.Tensor, options: dict[str, Any]) -> tuple[Any, ...]:
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=options)
    with torch.no_grad():
        out = logits_of(compiled(ids)).clone()
    record = diagpass.last_compile()
    assert record is not None and record.applied and record.path == "diagonal program", record
    return out, state_of(model), record.program


def _assert_one_program(model: torch.nn.Module, lengths: list[int], options: dict[str, Any], batch: int = 2) -> None:
    """At every length, the backend and ``diagpass.compile`` (one probe) agree to the bit."""
    vocab = _vocab(model)
    twin = copy.deepcopy(model)
    fast = diagpass.compile(twin, _ids(batch, 24, vocab), options=options)
    for length in lengths:
        ids = _ids(batch, length, vocab, seed=length)
        mine, my_state, program = _backend(model, ids, options)
        with torch.no_grad():
            theirs = logits_of(fast(ids)).clone()
        assert fast.report.runs[-1].path == "diagonal"
        assert isinstance(program, diagpass.DiagonalProgram) and isinstance(fast.program, diagpass.DiagonalProgram)
        assert torch.equal(mine, theirs), f"{length} tokens: {(mine - theirs).abs().max()}"
        their_state = state_of(twin)
        assert len(my_state) == len(their_state) > 0
        for a, b in zip(my_state, their_state):
            assert torch.equal(a, b), f"{length} tokens: final state differs"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_backend_and_compile_are_one_program_bitwise(name: str) -> None:
    # Gemma's traces are the slowest of the zoo: one length (with a short tail) keeps CI in budget.
    lengths = [37] if "gemma" in name else [40, 37]
    _assert_one_program(ZOO[name](), lengths, {"compiler": "eager", "min_lanes": 1})


@pytest.mark.slow
def test_backend_and_compile_are_one_program_bitwise_with_inductor() -> None:
    _assert_one_program(ZOO["armt-llama"](), [40], {"compiler": "inductor", "min_lanes": 1})


def test_print_program_says_what_it_decided() -> None:
    model = ZOO["armt-llama"]()
    fast = diagpass.compile(model, _ids(1, 24, _vocab(model)), options={"compiler": "eager"})
    with torch.no_grad():
        fast(_ids(1, 61, _vocab(model)))
    text = str(fast.program)
    for needle in (
        "DiagonalProgram",
        "variants:",
        "steady",
        "first segment",
        "8 segments (last 5)",
        "batched calls",
        "calls per step",
        "compiled step shapes",
        "carried lanes: output",
        "lane views: on",
        "hoisted invariants: on",
        "whole-program CUDA graphs:",
    ):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    # The backend's program describes itself the same way, for its one length.
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={"compiler": "eager"})
    with torch.no_grad():
        compiled(_ids(1, 40, _vocab(model)))
    text = str(diagpass.last_compile().program)
    assert "5 segments (last 8): 6 steps" in text and "carried lanes: output" in text


def test_record_counts_the_cells_of_every_call() -> None:
    """"Applied" never hides "nothing batched": the summary gives the cells per call."""
    model = ReferenceStyleARMT(layers=4, segment_size=4, num_mem_tokens=2)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={"compiler": "eager", "pad": "none"})
    with torch.no_grad():
        compiled(_ids(1, 32, 64))
    record = diagpass.last_compile()
    cells = [len(g.cells) for g in record.program.groups]
    assert max(cells) == 4 and sum(cells) == 4 * 8
    assert "batched calls of 1-4 cells" in str(record)
    assert counters["diagpass"]["programs"] >= 1


def test_layer_specific_cells_batch_per_variant_in_the_backend() -> None:
    model = LayerZeroBranch(layers=4, segment_size=4, num_mem_tokens=2)
    options = {"compiler": "eager", "pad": "none"}  # one call per variant and diagonal
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=options)
    ids = _ids(2, 30, 64)
    with torch.no_grad():
        expected = model(ids).clone()
        actual = compiled(ids)
    record = diagpass.last_compile()
    assert record.applied and record.path == "diagonal program" and record.num_steps == 4 + 8 - 1
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert max(len(g.cells) for g in record.program.groups) == 3  # layers 1..3 together, layer 0 alone
