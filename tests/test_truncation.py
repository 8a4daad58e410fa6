"""Truncated BPTT through the diagonal training program (issue 16, point 2a): the memory detached
between some segments and not others, as RMT's ``k2`` window and ARMT's ``detach_mem`` do. The
detaches are stripped for the proof (passes/detach.py) and put back on the cells' inputs at run
time; the loss and every gradient equal the sequential eager model's, and differ from full BPTT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import diagpass
from diagpass import models
from tests.helpers import assert_gradients_close, drop_autograd_history, loss_and_grads, max_rel_err
from tests.reference_style import TruncatedReferenceARMT

EAGER = {"compiler": "eager"}


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _window(segments: int, k2: int | None) -> list[int]:
    """Segments whose memory the reference's manage_gradients detached (max_n_segments = S)."""
    if k2 in (None, -1):
        return []
    return [seg_num + 1 for seg_num in range(1, segments - 1) if seg_num + k2 <= segments]


def assert_truncated_gradients_match(
    model: torch.nn.Module, run: Callable[[torch.Tensor], Any], ids: torch.Tensor, *, set_k2: Callable[[int | None], None]
) -> dict[str, torch.Tensor]:
    """Loss and gradients of ``run(ids)`` against eager, within 1e-5 relative or three times eager
    fp32's own distance from fp64 (:func:`_differs_from_full_bptt` checks they are not full BPTT's)."""
    return assert_gradients_close(model, lambda: run(ids), lambda m: m(ids))


def _differs_from_full_bptt(model: torch.nn.Module, grads: dict[str, torch.Tensor], ids: torch.Tensor, set_k2: Callable[[int | None], None], k2: int | None) -> bool:
    set_k2(None)
    try:
        _, full = loss_and_grads(model, lambda: model(ids))
    finally:
        set_k2(k2)
    drop_autograd_history(model)
    return max(max_rel_err(grads[name], full[name]) for name in full) > 1e-4


def _zoo_k2(model: Any) -> Callable[[int | None], None]:
    return lambda k2: setattr(model, "k2", k2)


def _reference_k2(model: TruncatedReferenceARMT) -> Callable[[int | None], None]:
    return lambda k2: model.rmt_config.update(k2=k2)


@pytest.mark.parametrize("k2", [1, 2, None])
def test_zoo_armt_truncation_through_diagpass_compile(k2: int | None) -> None:
    torch._dynamo.reset()
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=4, k2=k2, w_mv_std=0.2)
    vocab = model.config.vocab_size
    fast = diagpass.compile(model, _ids(1, 24, vocab), options=EAGER)
    ids = _ids(1, 8 * 5 + 3, vocab, seed=1)  # 6 segments, the last of 3: not the probe's length
    counters.clear()
    grads = assert_truncated_gradients_match(model, fast, ids, set_k2=_zoo_k2(model))
    run = fast.report.runs[-1]
    assert run.path == "diagonal" and run.autograd, run
    # The cut lands exactly where the reference rule puts it: W_mem and z of every layer.
    assert counters["diagpass"]["detached_inputs"] == 2 * model.num_layers * len(_window(6, k2))
    assert (fast.training_program.plan.detach is None) == (k2 is None)
    if k2 is not None:
        assert _differs_from_full_bptt(model, grads, ids, _zoo_k2(model), k2)
    # The state left behind is detached where eager left it detached (k2=1: after the last segment too).
    fast(ids)
    left = [layer.W_mem.grad_fn is None for layer in model.layers]
    model(ids)
    assert left == [layer.W_mem.grad_fn is None for layer in model.layers]
    drop_autograd_history(model)


def test_zoo_armt_truncation_through_the_backend() -> None:
    """The backend traces the length it runs: the window's far end (k2=3) is exact too."""
    torch._dynamo.reset()
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=4, k2=3, w_mv_std=0.2)
    ids = _ids(2, 8 * 6, model.config.vocab_size, seed=2)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER)
    counters.clear()
    grads = assert_truncated_gradients_match(model, compiled, ids, set_k2=_zoo_k2(model))
    record = diagpass.last_compile()
    assert record.applied and record.training and record.path == "diagonal program", record.summary()
    assert counters["diagpass"]["stripped_detaches"] == 2 * model.num_layers * len(_window(6, 3))
    assert counters["diagpass"]["detached_inputs"] == 2 * model.num_layers * len(_window(6, 3))
    assert _differs_from_full_bptt(model, grads, ids, _zoo_k2(model), 3)


@pytest.mark.parametrize(
    "build, state_slots",
    [
        (lambda: models.build_linear_memory(segment_size=8, d_key=8, k2=2, w_v_std=0.2), 2),  # S and z
        (lambda: models.build_per_layer_memory_rmt(segment_size=8, num_mem_tokens=2, k2=2), 1),  # mem
    ],
    ids=["linear_memory", "per_layer_memory_rmt"],
)
def test_other_zoo_variants_truncation(build: Callable[[], Any], state_slots: int) -> None:
    torch._dynamo.reset()
    model = build()
    vocab = model.config.vocab_size
    fast = diagpass.compile(model, _ids(1, 32, vocab), options=EAGER)
    ids = _ids(1, 8 * 5, vocab, seed=3)
    counters.clear()
    grads = assert_truncated_gradients_match(model, fast, ids, set_k2=_zoo_k2(model))
    assert fast.report.runs[-1].path == "diagonal" and fast.report.runs[-1].autograd
    assert counters["diagpass"]["detached_inputs"] == state_slots * model.num_layers * len(_window(5, 2))
    assert _differs_from_full_bptt(model, grads, ids, _zoo_k2(model), 2)


def test_reference_style_manage_gradients_both_front_ends() -> None:
    torch._dynamo.reset()
    model = TruncatedReferenceARMT(k2=3, layers=3, segment_size=4, num_mem_tokens=2)
    ids = _ids(2, 4 * 7 - 1, 64, seed=4)  # 7 segments, the last of 3
    fast = diagpass.compile(model, _ids(2, 16, 64), options=EAGER)  # 4 segments: the window shows its far end
    grads = assert_truncated_gradients_match(model, fast, ids, set_k2=_reference_k2(model))
    assert fast.report.runs[-1].path == "diagonal"
    assert _differs_from_full_bptt(model, grads, ids, _reference_k2(model), 3)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER)
    assert_truncated_gradients_match(model, compiled, ids, set_k2=_reference_k2(model))
    assert diagpass.last_compile().path == "diagonal program"


def test_reference_max_n_segments_constant_through_the_backend() -> None:
    """A fixed ``max_n_segments`` (the reference's config) is a rule of the length the backend
    traces: its table of detached cells is exact."""
    torch._dynamo.reset()
    model = TruncatedReferenceARMT(k2=2, max_n_segments=5, layers=2, segment_size=4, num_mem_tokens=2)
    ids = _ids(1, 4 * 7, 64, seed=5)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER)
    assert_truncated_gradients_match(model, compiled, ids, set_k2=_reference_k2(model))
    assert diagpass.last_compile().path == "diagonal program"


def test_a_fallback_keeps_the_detaches() -> None:
    """The analysis strips the detaches; a fallback must run the graph with them again."""
    torch._dynamo.reset()
    model = TruncatedReferenceARMT(k2=2, layers=2, segment_size=4, num_mem_tokens=2)
    ids = _ids(1, 4 * 6, 64, seed=6)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={**EAGER, "min_segments": 10})
    grads = assert_truncated_gradients_match(model, compiled, ids, set_k2=_reference_k2(model))
    assert not diagpass.last_compile().applied
    assert _differs_from_full_bptt(model, grads, ids, _reference_k2(model), 2)


class EveryOtherSegment(TruncatedReferenceARMT):
    """Detaches after segments 0, 2, 4...: no window ``lo <= s <= S - k``."""

    def manage_gradients(self, memory_state: torch.Tensor, seg_num: int, n_segments: int) -> torch.Tensor:
        return memory_state.detach() if seg_num % 2 == 0 else memory_state


def test_a_pattern_that_is_no_window_is_refused_for_any_length_and_exact_for_the_backend() -> None:
    torch._dynamo.reset()
    model = EveryOtherSegment(layers=2, segment_size=4, num_mem_tokens=2)
    with pytest.raises(diagpass.GeneralisationError, match="truncated BPTT not proven"):
        diagpass.compile(model, _ids(1, 20, 64), options=EAGER)
    drop_autograd_history(model)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER)
    assert_truncated_gradients_match(model, compiled, _ids(1, 22, 64, seed=7), set_k2=lambda _: None)
    assert diagpass.last_compile().path == "diagonal program"


@settings(max_examples=4, deadline=None)
@given(
    layers=st.integers(1, 3),
    segments=st.integers(2, 6),
    short_last=st.integers(0, 3),
    batch=st.integers(1, 2),
    trains=st.sampled_from(["all", "memory", "layers"]),
    k2=st.sampled_from([None, 1, 2, 3]),
)
def test_property_truncated_gradients_match(
    layers: int, segments: int, short_last: int, batch: int, trains: str, k2: int | None
) -> None:
    torch._dynamo.reset()
    model = TruncatedReferenceARMT(k2=k2, layers=layers, segment_size=4, num_mem_tokens=2)
    for name, param in model.named_parameters():
        param.requires_grad_(trains == "all" or (trains == "memory") == ("W_m" in name or name == "memory"))
    fast = diagpass.compile(model, _ids(batch, 16, 64), options=EAGER)  # 4 segments: shows windows up to k2=3
    ids = _ids(batch, segments * 4 - short_last, 64, seed=segments)
    counters.clear()
    assert_truncated_gradients_match(model, fast, ids, set_k2=_reference_k2(model))
    assert fast.report.runs[-1].path == "diagonal" and fast.report.runs[-1].autograd
    assert counters["diagpass"]["detached_inputs"] == 2 * layers * len(_window(segments, k2))
