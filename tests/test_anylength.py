"""``diagpass.compile``: prove on a 3-segment probe, run any length exactly, never trace again."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import diagpass
from diagpass import models
from tests.helpers import float64_noise, logits_of, max_rel_err, rel_err, state_of
from tests.reference_style import ReferenceStyleARMT
from tests.reroll_models import (
    ChunkSegments,
    CountsSegments,
    InPlaceMask,
    InPlaceState,
    LayerZeroBranch,
    PerSegmentKeys,
    PerSegmentOutputs,
    ReadsBelowPrevious,
    RemembersLength,
    SegmentIndexBetweenLayers,
    SegmentIndexInsideLayers,
    SplitSegments,
    TorchSplitSegments,
    UnbindSegments,
)

EAGER_STEPS = {"compiler": "eager"}


def _ids(batch: int, length: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _graphs_traced() -> int:
    """Dynamo graphs traced of the model (a dynamic short tail's step compiles are Dynamo's too)."""
    return counters["stats"]["unique_graphs"] - counters["diagpass"]["dynamic_tail_compiles"]


def assert_any_length_exact(
    model: torch.nn.Module,
    *,
    segment: int,
    lengths: list[int],
    batch: int = 1,
    vocab: int = 64,
    options: dict[str, Any] | None = None,
    tol: float = 1e-5,
    noise_aware: bool = False,
) -> diagpass.AnyLengthModel:
    """Compile on a 3-segment probe; every length then matches eager (outputs and state),
    runs the rerolled program (but a single segment), and traces nothing new."""
    fast = diagpass.compile(model, _ids(batch, 3 * segment, vocab), options=options or EAGER_STEPS)
    traced = _graphs_traced()
    for i, length in enumerate(lengths):
        ids = _ids(batch, length, vocab, seed=i + 1)
        bound = max(tol, 3 * float64_noise(model, ids)) if noise_aware else tol
        with torch.no_grad():
            expected = logits_of(model(ids)).clone()
            expected_state = state_of(model)
            actual = logits_of(fast(ids))
        run = fast.report.runs[-1]
        segments = -(-length // segment)
        assert (run.segments, run.last_length) == (segments, length - (segments - 1) * segment)
        assert run.path == ("eager" if segments == 1 else "diagonal"), run
        assert actual.shape == expected.shape
        err = max_rel_err(actual, expected)
        assert err <= bound, f"{length} tokens: max rel err {err:.3e} > {bound:.1e}\n{fast.report}"
        state = state_of(model)
        assert len(state) == len(expected_state) > 0
        for got, want in zip(state, expected_state):
            assert max_rel_err(got, want) <= bound, f"{length} tokens: final state differs"
        if segments > 1:
            sequential = (options or {}).get("schedule") == "sequential"
            steps = segments * len(model.layers) if sequential else segments + len(model.layers) - 1
            assert run.stats is not None and run.stats.steps == steps
    assert _graphs_traced() == traced, "a new length traced the model again"
    return fast


# --- the acceptance grid: probe at 3 segments, run at 1, 2, 7 and 33 --------------------------------


def test_zoo_armt_any_length_exact() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8)
    fast = assert_any_length_exact(
        model, segment=8, vocab=model.config.vocab_size, lengths=[8, 16, 56, 264, 53, 13, 261, 5]
    )
    report = fast.report
    assert report.short_tail and report.segment_size == 8 and report.num_layers == len(model.layers)
    assert report.probes[0] == (3, 8) and len(report.probes) == 3
    assert report.holes_checked > 0
    assert any(w.endswith("W_mem") for w in report.state_writes)
    assert "PROVEN" in str(report) and "261 tokens" in str(report)


def test_zoo_linear_memory_any_length_exact() -> None:
    model = models.build_linear_memory(segment_size=8, d_key=8)
    assert_any_length_exact(model, segment=8, vocab=model.config.vocab_size, lengths=[8, 16, 56, 264, 29], batch=2)


def test_zoo_gpt2_armt_any_length_exact() -> None:
    model = models.build_armt(base="gpt2", segment_size=8, num_mem_tokens=2, d_mem=8)
    assert_any_length_exact(model, segment=8, vocab=model.config.vocab_size, lengths=[16, 56, 61])


def test_reference_style_any_length_exact() -> None:
    """Plain PyTorch, state in reassigned module attributes, per-segment outputs concatenated."""
    model = ReferenceStyleARMT(layers=3, segment_size=8, num_mem_tokens=2)
    assert_any_length_exact(model, segment=8, lengths=[8, 16, 56, 264, 259], batch=2, noise_aware=True)


def test_sequential_schedule_any_length_exact() -> None:
    """The ablation (one cell per step, the same kernels) through diagpass.compile: L * S steps."""
    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8)
    assert_any_length_exact(
        model, segment=8, vocab=model.config.vocab_size, lengths=[16, 56, 53], options={**EAGER_STEPS, "schedule": "sequential"}
    )


def test_segment_index_between_layers_is_generalised() -> None:
    """An int literal affine in s outside the layers is recomputed for every segment."""
    model = SegmentIndexBetweenLayers(layers=2, segment_size=4, num_mem_tokens=2)
    assert_any_length_exact(model, segment=4, lengths=[8, 28, 45], noise_aware=True)


@settings(max_examples=8)
@given(
    layers=st.integers(1, 4),
    segment_size=st.sampled_from([4, 8]),
    mem=st.integers(1, 3),
    width=st.sampled_from([8, 16]),
    batch=st.integers(1, 3),
    segments=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    short_last=st.integers(0, 3),
)
def test_property_reference_style_any_length(
    layers: int, segment_size: int, mem: int, width: int, batch: int, segments: list[int], short_last: int
) -> None:
    torch._dynamo.reset()
    counters.clear()
    model = ReferenceStyleARMT(layers=layers, width=width, segment_size=segment_size, num_mem_tokens=mem, d_mem=4)
    lengths = [s * segment_size - min(short_last, segment_size - 1) * (i % 2) for i, s in enumerate(segments)]
    assert_any_length_exact(model, segment=segment_size, lengths=lengths, batch=batch, noise_aware=True)


@settings(max_examples=3)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), segments=st.integers(2, 9), short_last=st.integers(0, 3))
def test_property_low_precision_any_length(dtype: torch.dtype, segments: int, short_last: int) -> None:
    """bf16/fp16: as close to a float32 run as sequential eager in the same dtype."""
    torch._dynamo.reset()
    model = ReferenceStyleARMT(layers=3, width=16, segment_size=8).to(dtype)
    reference = copy.deepcopy(model).float()
    fast = diagpass.compile(model, _ids(2, 24), options=EAGER_STEPS)
    ids = _ids(2, segments * 8 - short_last, seed=3)
    with torch.no_grad():
        expected = reference(ids)
        eager = model(ids).clone()
        actual = fast(ids)
    assert actual.dtype == dtype
    assert rel_err(actual, expected) <= 2 * rel_err(eager, expected) + 1e-3


# --- the same machinery as the torch.compile backend --------------------------------------------


def test_equals_the_torch_compile_path_and_shares_its_steps() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8)
    vocab = model.config.vocab_size
    fast = diagpass.compile(model, _ids(1, 24, vocab), options=EAGER_STEPS)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER_STEPS)
    for length in (53, 56):
        ids = _ids(1, length, vocab, seed=length)
        with torch.no_grad():
            mine = logits_of(fast(ids)).clone()
            compiles = counters["diagpass"]["step_compiles"]
            theirs = logits_of(compiled(ids))
        assert diagpass.last_compile().applied
        assert torch.equal(mine, theirs), length
    # Full segments: the backend found every step diagpass.compile had compiled. (A short
    # last segment is keyed by its length in diagpass.compile, by its graph in the backend.)
    assert counters["diagpass"]["step_compiles"] == compiles


def test_memory_does_not_grow_with_segments() -> None:
    model = ReferenceStyleARMT(layers=3, segment_size=4, num_mem_tokens=2)
    fast = diagpass.compile(model, _ids(1, 12), options=EAGER_STEPS)
    for segments in (4, 40):
        with torch.no_grad():
            fast(_ids(1, 4 * segments))
        stats = fast.report.runs[-1].stats
        assert stats is not None and stats.peak_live_segments <= len(model.layers) + 2


@pytest.mark.slow
def test_inductor_any_length_exact() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8)
    fast = assert_any_length_exact(
        model, segment=8, vocab=model.config.vocab_size, lengths=[16, 56, 53, 61], options={"short_tail": "inductor"}
    )
    assert counters["diagpass"]["batched_gemms"] > 0
    # 53 and 61 tokens end in segments of 5: one compiled tail step, reused.
    tails = [r.stats.compile_s for r in fast.report.runs if r.last_length == 5]
    assert tails[0] > 0 and tails[1] == 0
    # The default runs a short tail's cells eagerly: a new short length compiles nothing.
    fast = assert_any_length_exact(model, segment=8, vocab=model.config.vocab_size, lengths=[56, 50])
    assert fast.report.runs[-1].stats.compile_s < 0.05


@pytest.mark.slow
def test_dynamic_short_tail_compiles_twice_for_every_short_length() -> None:
    """``short_tail="dynamic"``: the first short length compiles the tail's step, the second once
    more with the length symbolic, later lengths none, with one full segment (a lane buffer of
    one lane, which Dynamo would specialise on were the lanes passed as views) or several; each
    matches eager, outputs and state."""
    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8)
    compiles = []
    fast = diagpass.compile(model, _ids(1, 24, model.config.vocab_size), options={"short_tail": "dynamic"})
    for length in (53, 51, 54, 53, 15, 42):
        assert_fast_matches_eager(fast, model, length)
        compiles.append(counters["diagpass"]["dynamic_tail_compiles"])
        variants = fast.program.layout(-(-length // 8), length % 8).plans
        assert any(v.length == length % 8 and v.key.endswith("|n=any") for v in variants)
    assert compiles == [1, 2, 2, 2, 2, 2], compiles
    assert fast.report.runs[-1].stats.compile_s < 0.05


# One model and its compiled program for every example of the property below: a fresh compile per
# example would spend the test on the tail's two compiles, which the test above counts already.
_DYNAMIC_TAIL: dict[str, Any] = {}


@pytest.mark.slow
@settings(max_examples=10)
@given(segments=st.integers(1, 9), tail=st.integers(1, 7))
def test_property_dynamic_short_tail_batch_of_two(segments: int, tail: int) -> None:
    """``short_tail="dynamic"`` over full segments and short tails, batch 2 (the test above: batch
    1): every length runs the diagonal and equals eager, outputs and state; once two tail lengths
    have compiled the step, no other length compiles anything, whatever its full segments."""
    if not _DYNAMIC_TAIL:
        model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8)
        fast = diagpass.compile(model, _ids(2, 24, model.config.vocab_size), options={"short_tail": "dynamic"})
        _DYNAMIC_TAIL.update(model=model, fast=fast, tails=set())
    compiles = counters["diagpass"]["dynamic_tail_compiles"]
    assert_fast_matches_eager(_DYNAMIC_TAIL["fast"], _DYNAMIC_TAIL["model"], segments * 8 + tail, batch=2)
    tails = _DYNAMIC_TAIL["tails"]
    assert counters["diagpass"]["dynamic_tail_compiles"] == compiles + (tail not in tails and len(tails) < 2), (tail, tails)
    tails.add(tail)


def assert_fast_matches_eager(fast: diagpass.AnyLengthModel, model: torch.nn.Module, length: int, batch: int = 1) -> None:
    ids = _ids(batch, length, model.config.vocab_size, seed=length)
    with torch.no_grad():
        expected = logits_of(model(ids)).clone()
        expected_state = state_of(model)
        actual = logits_of(fast(ids))
    assert fast.report.runs[-1].path == "diagonal", fast.report.runs[-1]
    assert max_rel_err(actual, expected) <= 1e-5, length
    for got, want in zip(state_of(model), expected_state):
        assert max_rel_err(got, want) <= 1e-5, length


def test_short_tail_option_is_validated() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8, num_mem_tokens=2)
    assert diagpass.compile(model, _ids(1, 24), options=EAGER_STEPS).diagbatch_config.short_tail == "eager"
    with pytest.raises(diagpass.ConfigError, match="short_tail"):
        diagpass.compile(model, _ids(1, 24), options={"short_tail": "fast"})


def test_short_tail_none_proves_whole_segments_with_one_cut_probe() -> None:
    """``short_tail="none"``: one cut probe (2 whole segments) instead of two; whole segments run
    on the diagonal, exact; a short last segment runs the model itself, the reason recorded; a
    probe that ends short is refused (nothing to prove whole segments with)."""
    model = ReferenceStyleARMT(layers=2, segment_size=8, num_mem_tokens=2)
    fast = diagpass.compile(model, _ids(1, 24), options={**EAGER_STEPS, "short_tail": "none"})
    assert fast.report.probes == [(3, 8), (2, 8)] and not fast.report.short_tail
    for length, path in ((40, "diagonal"), (37, "eager")):
        ids = _ids(1, length, seed=length)
        with torch.no_grad():
            expected, actual = model(ids), fast(ids)
        _assert_outputs_equal(actual, expected)
        run = fast.report.runs[-1]
        assert run.path == path, run
        assert (run.reason is None) == (path == "diagonal"), run
    with pytest.raises(diagpass.InputError, match="whole segments"):
        diagpass.compile(model, _ids(1, 20), options={**EAGER_STEPS, "short_tail": "none"})


# --- refusals: clear errors where generalisation is not proven ----------------------------------


def test_vanilla_rmt_is_refuted_with_its_edge() -> None:
    model = models.build_rmt(segment_size=8, num_mem_tokens=2)
    with pytest.raises(diagpass.StructureError, match="rmt.py") as caught:
        diagpass.compile(model, _ids(1, 24, model.config.vocab_size), options=EAGER_STEPS)
    assert caught.value.violations


def test_probe_too_short() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    with pytest.raises(diagpass.GeneralisationError, match="at least 3 segments"):
        diagpass.compile(model, _ids(1, 16), options=EAGER_STEPS)


@pytest.mark.parametrize(
    "model_class,needle",
    [
        (SegmentIndexInsideLayers, "changes with the segment index"),
        (RemembersLength, "depends on the input length"),
    ],
)
def test_refuses_what_does_not_generalise(model_class: type, needle: str) -> None:
    model = model_class(layers=2, segment_size=4, num_mem_tokens=2)
    with pytest.raises(diagpass.GeneralisationError, match=needle):
        diagpass.compile(model, _ids(1, 12), options=EAGER_STEPS)


def test_bad_inputs_are_clear_errors() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    fast = diagpass.compile(model, _ids(2, 24), options=EAGER_STEPS)
    with pytest.raises(diagpass.InputError, match="dtype"):
        fast(_ids(2, 40).float())
    with pytest.raises(diagpass.InputError, match="only dim 1 may differ"):
        fast(_ids(3, 40))
    with pytest.raises(diagpass.InputError, match="empty"):
        fast(_ids(2, 0))
    with pytest.raises(diagpass.InputError, match="structured"):
        fast(_ids(2, 40), _ids(2, 40))
    with pytest.raises(diagpass.InputError, match="nn.Module"):
        diagpass.compile(lambda x: x, _ids(2, 24))  # type: ignore[arg-type]


def test_autograd_runs_the_training_program() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    fast = diagpass.compile(model, _ids(1, 24), options=EAGER_STEPS)
    out = fast(_ids(1, 40))
    assert out.requires_grad
    assert fast.report.runs[-1].path == "diagonal" and fast.report.runs[-1].autograd


def test_min_lanes_pads_the_ramps() -> None:
    model = ReferenceStyleARMT(layers=4, segment_size=4, num_mem_tokens=2)
    fast = diagpass.compile(model, _ids(1, 12), options={**EAGER_STEPS, "min_lanes": 4})
    with torch.no_grad():
        assert max_rel_err(fast(_ids(1, 40)), model(_ids(1, 40))) < 1e-5
    layout = next(iter(fast.program._layouts.values()))
    steady = [len(g.lanes) for g in layout.groups if g.variant == 0]
    first = [len(g.lanes) for g in layout.groups if g.variant == 1]
    assert set(steady) == {4} and set(first) == {1}  # the first segment is never padded
    assert diagpass.compile(model, _ids(1, 12)).diagbatch_config.min_lanes == 4  # diagpass.compile default


# --- errors name the user's code, probes that prove nothing are input errors ---------------------


@pytest.mark.parametrize("probe", [_ids(1, 0), _ids(1, 4), _ids(1, 8)])
def test_empty_or_short_probe_is_an_input_error_saying_what_to_pass(probe: torch.Tensor) -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=4, num_mem_tokens=2)
    with pytest.raises(diagpass.InputError, match=r"3 or 4 segments long") as caught:
        diagpass.compile(model, probe, options=EAGER_STEPS)
    assert isinstance(caught.value, diagpass.GeneralisationError)  # as before, for existing handlers


@pytest.mark.parametrize(
    "model_class,code,attribute",
    [
        (SegmentIndexInsideLayers, "hidden_states.roll(shift, dims=-1)", None),
        (RemembersLength, None, "`tokens_seen`"),
    ],
)
def test_generalisation_errors_name_the_users_code(model_class: type, code: str | None, attribute: str | None) -> None:
    model = model_class(layers=2, segment_size=4, num_mem_tokens=2)
    with pytest.raises(diagpass.GeneralisationError) as caught:
        diagpass.compile(model, _ids(1, 12), options=EAGER_STEPS)
    message = str(caught.value)
    if code is not None:
        assert code in message and "reroll_models.py:" in message
        assert not re.search(r"\broll_\d+\b", message)  # no FX node names
    if attribute is not None:
        assert attribute in message and "counter of segments" in message
    assert "probe 0" not in message


def test_layer_specific_branch_any_length_exact_and_batched() -> None:
    model = LayerZeroBranch(layers=4, segment_size=4, num_mem_tokens=2)
    fast = assert_any_length_exact(model, segment=4, lengths=[4, 8, 28, 132, 30], batch=2, noise_aware=True)
    cells = fast.report.runs[-1].stats.cells_per_call
    assert max(cells) == 3  # layers 1..3 batch on every full diagonal; layer 0 is its own variant
    variants = {v.name for v in fast.program.plan.variants}
    assert len(fast.program.plan.variants) == 4  # steady and first segment, each for layer 0 and the others
    assert "steady" in variants and "first segment" in variants


@pytest.mark.parametrize("model_class", [SplitSegments, TorchSplitSegments])
def test_inputs_cut_by_split_any_length_exact(model_class: type) -> None:
    model = model_class(layers=3, segment_size=4, num_mem_tokens=2)
    fast = assert_any_length_exact(model, segment=4, lengths=[4, 8, 28, 132, 30], batch=2, noise_aware=True)
    assert fast.report.segment_size == 4 and fast.report.length_inputs == {"argument 0": 1}


@pytest.mark.parametrize("base", ["gemma2", "gemma3"])
def test_gemma_bases_any_length_exact(base: str) -> None:
    """Gemma recomputes the final norm's ``1 + weight`` in every segment (one value once the
    repeated pure computations are merged) and has per-layer-type masks and rotary tables."""
    model = models.build_armt(base=base, segment_size=8, num_mem_tokens=2, d_mem=8)
    assert_any_length_exact(
        model, segment=8, vocab=model.config.vocab_size, lengths=[8, 16, 56, 264, 61], noise_aware=True
    )


# --- issue 14: the reference wrapper's structure, state written in place ----------------------------


def _assert_outputs_equal(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    """Same structure (types, keys in order) and every tensor within ``tol`` relative."""
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys())
        for key in expected:
            _assert_outputs_equal(actual[key], expected[key], tol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_outputs_equal(a, e, tol)
    elif isinstance(expected, torch.Tensor):
        assert max_rel_err(actual, expected) <= tol
    else:
        assert actual == expected


@pytest.mark.parametrize("with_labels", [False, True])
def test_per_segment_keys_any_length_exact(with_labels: bool) -> None:
    """The reference wrapper's return value: ``logits`` plus ``logits_{i}`` (and ``loss_{i}``) for
    every segment; its list-comprehension cut; a ``seg_num`` counter per layer."""
    model = PerSegmentKeys(layers=3, segment_size=4, num_mem_tokens=2)
    probe = _ids(2, 12)
    fast = diagpass.compile(model, probe, **({"labels": probe} if with_labels else {}), options=EAGER_STEPS)
    for length in [4, 8, 28, 132, 30]:
        ids = _ids(2, length, seed=length)
        kwargs = {"labels": ids} if with_labels else {}
        with torch.no_grad():
            expected = model(ids, **kwargs)
            expected_state = state_of(model)
            actual = fast(ids, **kwargs)
        segments = -(-length // 4)
        assert sum(key.startswith("logits_") for key in actual) == segments
        _assert_outputs_equal(actual, expected)
        assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(state_of(model), expected_state))
        assert [layer.seg_num for layer in model.layers] == [segments] * 3
        assert fast.report.runs[-1].path == ("eager" if segments == 1 else "diagonal")


def test_per_segment_list_and_segment_counter_generalise() -> None:
    for model_class in (PerSegmentOutputs, CountsSegments):
        model = model_class(layers=2, segment_size=4, num_mem_tokens=2)
        fast = diagpass.compile(model, _ids(1, 12), options=EAGER_STEPS)
        for length in [9, 28, 30]:
            ids = _ids(1, length, seed=length)
            with torch.no_grad():
                expected = model(ids)
                seen = getattr(model, "seen", None)
                actual = fast(ids)
            _assert_outputs_equal(actual, expected)
            assert getattr(model, "seen", None) == seen
            assert fast.report.runs[-1].path == "diagonal"


@pytest.mark.parametrize("model_class", [InPlaceState, InPlaceMask])
def test_state_and_masks_written_in_place_any_length_exact(model_class: type) -> None:
    """``W_mem.add_``, ``z +=``, ``index_copy_`` into state, and ``masked_fill_`` on a fresh mask:
    made out-of-place by the functionalize pass, then batched like any other model."""
    model = model_class(layers=3, segment_size=4, num_mem_tokens=2)
    counters.clear()
    fast = diagpass.compile(model, _ids(2, 12), options=EAGER_STEPS)
    assert counters["diagpass"]["functionalized_writes"] > 0
    for length in [4, 8, 28, 132, 30]:
        ids = _ids(2, length, seed=length)
        with torch.no_grad():
            expected = model(ids)
            expected_state = state_of(model) + [getattr(l, "snapshot", torch.zeros(())).clone() for l in model.layers]
            actual = fast(ids)
        _assert_outputs_equal(actual, expected)
        got = state_of(model) + [getattr(l, "snapshot", torch.zeros(())) for l in model.layers]
        assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(got, expected_state))
        if length > 8:
            assert fast.report.runs[-1].path == "diagonal"
            assert max(fast.report.runs[-1].stats.cells_per_call) >= 2  # batched, not one cell per call


def test_in_place_state_under_the_backend_is_batched() -> None:
    model = InPlaceState(layers=3, segment_size=4, num_mem_tokens=2)
    ids = _ids(2, 28)
    with torch.no_grad():
        expected = model(ids)
        compiled = torch.compile(model, backend="diagbatch", options=EAGER_STEPS)
        actual = compiled(ids)
    record = diagpass.last_compile()
    assert record.applied and record.path == "diagonal program", record.summary()
    assert record.num_steps == 7 + 3 - 1  # S + L - 1
    assert max(len(group.cells) for group in record.program.groups) >= 2  # batched, not one cell per call
    assert max_rel_err(actual, expected) <= 1e-5


def test_writes_into_inputs_or_live_views_stay_in_place() -> None:
    """The pass only rewrites writes no one else can see: a write into a graph input, or into a
    tensor a live view also reads, is left alone."""
    from diagpass.capture import capture_whole
    from diagpass.passes.functionalize import functionalize_local_writes

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x.add_(1)  # a graph input: the caller sees the write
        t = y * 2
        view = t[:1]
        t.mul_(3)  # `view` sees this write
        fresh = y + 1
        fresh.add_(y)  # nobody else sees this one
        return view + fresh + t

    with torch.no_grad():
        captured = capture_whole(f, (torch.ones(2, 3), torch.ones(2, 3)), {})
    result = functionalize_local_writes(captured.graph_module)
    assert len(result.rewritten) == 1 and "add_" in result.rewritten[0]
    assert any("graph input" in why for why in result.kept) and any("read after the write" in why for why in result.kept)
    x, y = torch.ones(2, 3), torch.rand(2, 3)
    expected = f(x.clone(), y)
    got = captured.graph_module(torch.ones(2, 3), y)
    assert torch.equal(got[0] if isinstance(got, (tuple, list)) else got, expected)


def _gemma_family(base: str) -> Any:
    def build(layers: int, segment_size: int, num_mem_tokens: int) -> torch.nn.Module:
        make = models.tiny_gemma2_config if base == "gemma2" else models.tiny_gemma3_config
        return models.build_armt(
            base=base, config=make(num_hidden_layers=layers), segment_size=segment_size, num_mem_tokens=num_mem_tokens, d_mem=8
        )

    build.__name__ = f"armt_{base}"
    return build


_FAMILIES = [
    ReferenceStyleARMT, PerSegmentKeys, SplitSegments, TorchSplitSegments, InPlaceState, InPlaceMask,
    LayerZeroBranch, ReadsBelowPrevious, SegmentIndexBetweenLayers, ChunkSegments, UnbindSegments,
    _gemma_family("gemma2"), _gemma_family("gemma3"),
]


def _max_leaf_err(actual: Any, expected: Any) -> float:
    if isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys())
        return max(_max_leaf_err(actual[k], expected[k]) for k in expected)
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        return max((_max_leaf_err(a, e) for a, e in zip(actual, expected)), default=0.0)
    if isinstance(expected, torch.Tensor):
        return max_rel_err(actual, expected)
    assert actual == expected
    return 0.0


@settings(max_examples=8)
@given(
    family=st.sampled_from(_FAMILIES),
    layers=st.integers(1, 3),
    mem=st.integers(1, 3),
    batch=st.integers(1, 2),
    segments=st.lists(st.integers(1, 9), min_size=1, max_size=2),
    short_last=st.integers(0, 3),
)
def test_property_model_families_any_length(
    family: type, layers: int, mem: int, batch: int, segments: list[int], short_last: int
) -> None:
    """Every structural feature of issue 14, drawn with layers, segments, short tail, batch and
    memory tokens: outputs (whole structure) and state equal eager within fp32 noise."""
    torch._dynamo.reset()
    counters.clear()
    model = family(layers=layers, segment_size=4, num_mem_tokens=mem)
    vocab = model.config.vocab_size if hasattr(model, "config") else 64
    fast = diagpass.compile(model, _ids(batch, 12, vocab), options=EAGER_STEPS)
    full_only = family in (ChunkSegments, UnbindSegments)  # they cut segments of T only when T divides n
    for i, count in enumerate(segments):
        tail = 0 if full_only else min(short_last, 3) * (i % 2 == 0)
        ids = _ids(batch, count * 4 - tail, vocab, seed=i + 1)
        bound = max(1e-5, 3 * float64_noise(model, ids))
        with torch.no_grad():
            expected = model(ids)
            expected_state = state_of(model)
            actual = fast(ids)
        assert _max_leaf_err(actual, expected) <= bound
        assert all(max_rel_err(a, b) <= bound for a, b in zip(state_of(model), expected_state))
        assert fast.report.runs[-1].path == ("eager" if -(-ids.shape[1] // 4) == 1 else "diagonal")


@pytest.mark.slow
@pytest.mark.parametrize(
    "family", [PerSegmentKeys, InPlaceState, ReadsBelowPrevious, TorchSplitSegments, LayerZeroBranch, _gemma_family("gemma3")]
)
def test_inductor_model_families_any_length_exact(family: Any) -> None:
    """The same features with the default step compiler (Inductor): one model per point of issue 14."""
    model = family(layers=3, segment_size=4, num_mem_tokens=2)
    vocab = model.config.vocab_size if hasattr(model, "config") else 64
    probe = _ids(2, 12, vocab)
    kwargs = {"labels": probe} if family is PerSegmentKeys else {}
    fast = diagpass.compile(model, probe, **kwargs)
    assert fast.diagbatch_config.compiler == "inductor"
    for length in [28, 30]:
        ids = _ids(2, length, vocab, seed=length)
        call = {"labels": ids} if kwargs else {}
        with torch.no_grad():
            expected = model(ids, **call)
            actual = fast(ids, **call)
        assert _max_leaf_err(actual, expected) <= max(1e-5, 3 * float64_noise(model, ids))
        assert fast.report.runs[-1].path == "diagonal" and max(fast.report.runs[-1].stats.cells_per_call) >= 2


@pytest.mark.parametrize("with_labels", [False, True])
def test_per_segment_keys_under_the_backend(with_labels: bool) -> None:
    """The backend runs the reference wrapper's structure as the diagonal program, batched."""
    model = PerSegmentKeys(layers=3, segment_size=4, num_mem_tokens=2)
    ids = _ids(2, 30)
    kwargs = {"labels": ids} if with_labels else {}
    with torch.no_grad():
        expected = model(ids, **kwargs)
        actual = torch.compile(model, backend="diagbatch", options=EAGER_STEPS)(ids, **kwargs)
    record = diagpass.last_compile()
    assert record.applied and record.path == "diagonal program", record.summary()
    assert record.num_steps == 8 + 3 - 1  # S + L - 1
    assert max(len(group.cells) for group in record.program.groups) >= 2
    _assert_outputs_equal(actual, expected)
    assert [layer.seg_num for layer in model.layers] == [8, 8, 8]


@pytest.mark.parametrize("model_class", [ChunkSegments, UnbindSegments])
def test_inputs_cut_by_chunk_or_unbind_full_segments(model_class: type) -> None:
    """``torch.chunk`` into ``ceil(n / T)`` parts and ``unbind`` of a view into ``(S, T)`` cut
    segments of ``T`` only when ``T`` divides ``n``: proven for full segments; any other length
    runs the model itself, with the reason in the report."""
    model = model_class(layers=3, segment_size=4, num_mem_tokens=2)
    counters.clear()
    fast = diagpass.compile(model, _ids(2, 12), options=EAGER_STEPS)
    assert counters["diagpass"]["segment_cuts_rewritten"] > 0
    assert not fast.report.short_tail and "full last segments only" in str(fast.report)
    for length in [4, 8, 28, 132]:
        ids = _ids(2, length, seed=length)
        with torch.no_grad():
            expected = model(ids)
            actual = fast(ids)
        assert max_rel_err(actual, expected) <= max(1e-5, 3 * float64_noise(model, ids))
        assert fast.report.runs[-1].path == ("eager" if length == 4 else "diagonal")
    if model_class is ChunkSegments:  # 30 tokens: chunks of 4 (7 of them) and 2, by the model itself
        with torch.no_grad():
            assert max_rel_err(fast(_ids(2, 30)), model(_ids(2, 30))) == 0
        assert "short last segment" in fast.report.runs[-1].reason
    with torch.no_grad():
        expected = model(_ids(2, 28))
        actual = torch.compile(model, backend="diagbatch", options=EAGER_STEPS, dynamic=False)(_ids(2, 28))
    assert diagpass.last_compile().path == "diagonal program" and max_rel_err(actual, expected) <= 1e-5
