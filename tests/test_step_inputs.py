"""What a step reads: lane views instead of stacked copies, grouped K/V instead of repeat_kv."""

from __future__ import annotations

import operator
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import diagpass
from diagpass import lower, models
from diagpass.ops import batched_sdpa
from diagpass.program import lane_view
from tests.helpers import compile_and_compare, logits_of, max_rel_err


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- lane_view -------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(
    lanes=st.integers(1, 6),
    start=st.integers(0, 3),
    count=st.integers(1, 6),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    transpose=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
)
def test_property_lane_view_is_the_stack_without_a_copy(
    lanes: int, start: int, count: int, shape: list[int], transpose: bool, dtype: torch.dtype
) -> None:
    base = (torch.randn(lanes + start + count, *shape) * 100).to(dtype)  # [n, ...]
    if transpose and len(shape) >= 2:
        base = base.transpose(1, 2)  # lanes whose own layout is not contiguous
    values = [base[start + i] for i in range(count)]
    view = lane_view(values)
    assert view is not None
    assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # no copy
    assert torch.equal(view, torch.stack(values))


def test_lane_view_of_one_tensor_for_every_lane_is_an_expand() -> None:
    table = torch.randn(5, 8)  # e.g. a rotary table hoisted out of the segment loop
    view = lane_view([table, table, table])
    assert view is not None and view.stride(0) == 0
    assert view.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
    assert torch.equal(view, torch.stack([table] * 3))


def test_lane_view_refuses_what_is_not_one_run_of_lanes() -> None:
    base = torch.randn(6, 3, 4)
    assert lane_view([base[0], base[2], base[1]]) is None  # not evenly spaced
    assert lane_view([base[2], base[1]]) is None  # backwards
    assert lane_view([base[0], base[1].clone()]) is None  # another storage
    assert lane_view([torch.randn(3, 4), torch.randn(3, 4)]) is None
    assert lane_view([base[0, :, :2], base[0, :, 1:3]]) is None  # overlapping
    assert lane_view([base[0], base[1, :2]]) is None  # another shape
    assert lane_view([base[0], base.view(torch.int32)[1]]) is None  # another dtype
    assert lane_view([]) is None
    spaced = lane_view([base[0], base[2], base[4]])  # every other lane: still one strided view
    assert spaced is not None and torch.equal(spaced, base[0::2])


def test_lane_views_skip_templates_that_write_in_place() -> None:
    from diagpass.config import DiagbatchConfig
    from diagpass.program.steps import StepRunner

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_method("add_", (x, 1)))
    plan = mock.Mock(template=torch.fx.GraphModule(torch.nn.Module(), graph))
    runner = StepRunner([], [], lower.StepCompiler(), DiagbatchConfig())
    base = torch.randn(4, 3)
    assert runner._lane_view(plan, [base[0], base[1]]) is None
    readonly = mock.Mock(template=torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()))
    assert runner._lane_view(readonly, [base[0], base[1]]) is not None
    off = StepRunner([], [], lower.StepCompiler(), DiagbatchConfig(lane_views=False))
    assert off._lane_view(readonly, [base[0], base[1]]) is None


def test_lane_views_fire_and_change_nothing() -> None:
    """ARMT's memory arrives as consecutive lanes of the last step's output: read in place,
    with outputs bit-identical to stacking."""
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)
    ids = _ids(2, 8 * 6, vocab=model.config.vocab_size)
    compile_and_compare(model, ids, options={"compiler": "eager", "lane_views": False})
    assert counters["diagpass"]["lane_views"] == 0
    with torch.no_grad():
        stacked = logits_of(torch.compile(model, backend="diagbatch", options={"compiler": "eager", "lane_views": False}, dynamic=False)(ids)).clone()
    torch._dynamo.reset()
    compile_and_compare(model, ids, options={"compiler": "eager"})
    assert counters["diagpass"]["lane_views"] > 0
    with torch.no_grad():
        viewed = logits_of(torch.compile(model, backend="diagbatch", options={"compiler": "eager"}, dynamic=False)(ids))
    assert torch.equal(viewed, stacked)


def test_lane_views_in_the_any_length_program() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)
    vocab = model.config.vocab_size
    with torch.no_grad():
        fast = diagpass.compile(model, _ids(1, 24, vocab), options={"compiler": "eager"})
        ids = _ids(1, 8 * 7 + 3, vocab, seed=1)
        expected = logits_of(model(ids)).clone()
        actual = logits_of(fast(ids))
    assert counters["diagpass"]["lane_views"] > 0
    assert max_rel_err(actual, expected) < 1e-5


# --- grouped K/V attention ------------------------------------------------------------------------


@settings(max_examples=4)
@given(kv_heads=st.sampled_from([1, 2, 4]), batch=st.integers(1, 2), segments=st.integers(2, 5))
def test_property_gqa_attention_exact(kv_heads: int, batch: int, segments: int) -> None:
    """With the rewrite allowed on CPU (SDPA's math path), outputs match sequential eager."""
    torch._dynamo.reset()
    counters.clear()
    config = models.tiny_llama_config(num_attention_heads=4, num_key_value_heads=kv_heads)
    model = models.build_armt(config=config, segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)
    ids = _ids(batch, 8 * segments, vocab=config.vocab_size)
    with mock.patch.object(lower, "GQA_DEVICES", ("cuda", "cpu")):
        compile_and_compare(model, ids, options={"compiler": "eager"})
    grouped = kv_heads < 4
    assert counters["diagpass"]["sdpa_causal"] > 0
    assert counters["diagpass"]["sdpa_gqa"] == (counters["diagpass"]["sdpa_causal"] if grouped else 0)


def test_gqa_attention_in_the_any_length_program_and_its_option() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)  # 4 heads, 2 KV heads
    vocab = model.config.vocab_size
    ids = _ids(1, 8 * 5, vocab, seed=2)
    with torch.no_grad(), mock.patch.object(lower, "GQA_DEVICES", ("cuda", "cpu")):
        expected = logits_of(model(ids)).clone()
        fast = diagpass.compile(model, _ids(1, 24, vocab), options={"compiler": "eager"})
        assert counters["diagpass"]["sdpa_gqa"] > 0
        assert max_rel_err(logits_of(fast(ids)), expected) < 1e-5
        counters.clear()
        diagpass.compile(model, _ids(1, 24, vocab), options={"compiler": "eager", "gqa_attention": False})
        assert counters["diagpass"]["sdpa_gqa"] == 0


def test_gqa_attention_is_cuda_only_by_default() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8)
    compile_and_compare(model, _ids(1, 32, vocab=model.config.vocab_size))
    assert counters["diagpass"]["sdpa_causal"] > 0 and counters["diagpass"]["sdpa_gqa"] == 0


def _repeat_kv_template(*, masked: bool, n_rep: int, dim: int = 2) -> torch.fx.GraphModule:
    """SDPA over Hugging Face's ``repeat_kv`` of K and V, as Dynamo records it."""
    B, H_kv, T, D = 1, 2, 5, 8
    graph = torch.fx.Graph()
    q, k, v, mask = (graph.placeholder(name) for name in ("q", "k", "v", "mask"))
    q.meta["example_value"] = torch.empty(B, H_kv * n_rep, T, D)
    repeated = []
    for source in (k, v):
        source.meta["example_value"] = torch.empty(B, H_kv, T, D)
        index = (slice(None),) * dim + (None,)
        item = graph.call_function(operator.getitem, (source, index))
        item.meta["example_value"] = torch.empty(B, H_kv, T, D).unsqueeze(dim)
        wide = (B, H_kv, n_rep, T, D) if dim == 2 else (B, H_kv, T, n_rep, D)
        expand = graph.call_method("expand", (item, *wide))
        expand.meta["example_value"] = torch.empty(wide)
        out = graph.call_method("reshape", (expand, B, H_kv * n_rep, T, D) if dim == 2 else (expand, B, H_kv, T * n_rep, D))
        out.meta["example_value"] = torch.empty(B, H_kv * n_rep, T, D) if dim == 2 else torch.empty(B, H_kv, T * n_rep, D)
        repeated.append(out)
    kwargs = {"attn_mask": mask if masked else None, "is_causal": not masked}
    graph.output((graph.call_function(batched_sdpa, (q, *repeated), kwargs),))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize(
    "masked,n_rep,dim,rewrites", [(False, 2, 2, 1), (True, 2, 2, 0), (False, 1, 2, 0), (False, 2, 3, 0)]
)
def test_use_gqa_attention_matches_repeat_kv_only(masked: bool, n_rep: int, dim: int, rewrites: int) -> None:
    template = _repeat_kv_template(masked=masked, n_rep=n_rep, dim=dim)
    q = torch.randn(1, 2 * n_rep, 5, 8)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    if dim == 2:
        expected = template(q, k, v, mask)[0]
    with mock.patch.object(lower, "GQA_DEVICES", ("cpu",)):
        assert lower.use_gqa_attention(template) == rewrites
    assert counters["diagpass"]["sdpa_gqa"] == rewrites
    if rewrites:
        assert not any(n.op == "call_method" and n.target == "expand" for n in template.graph.nodes)
        assert torch.allclose(template(q, k, v, mask)[0], expected, atol=1e-6)
    with mock.patch.object(lower, "GQA_DEVICES", ("cpu",)):
        assert lower.use_gqa_attention(_repeat_kv_template(masked=False, n_rep=2), enabled=False) == 0


# --- segment chunks: invariant part hoisted, s-free part compiled ---------------------------------


def test_split_invariant_moves_what_every_segment_shares() -> None:
    from diagpass.hoist import split_invariant

    graph = torch.fx.Graph()
    s, n, ids, freq, hidden = (graph.placeholder(name) for name in ("s", "n", "ids", "freq", "hidden"))
    for node, value in ((ids, torch.zeros(1, 20, dtype=torch.long)), (freq, torch.randn(4)), (hidden, torch.randn(5, 4))):
        node.meta["example_value"] = value
    positions = graph.call_function(torch.arange, (n,))
    positions.meta["example_value"] = torch.arange(5)
    table = graph.call_function(torch.outer, (graph.call_method("float", (positions,)), freq))
    table.meta["example_value"] = torch.empty(5, 4)
    cos = graph.call_method("cos", (table,))
    cos.meta["example_value"] = torch.empty(5, 4)
    noise = graph.call_function(torch.rand_like, (cos,))  # random: never hoisted
    seg = graph.call_function(operator.getitem, (ids, (slice(None), slice(s, None))))
    out = graph.call_function(torch.add, (hidden, cos))
    graph.output((out, seg, noise))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    split = split_invariant(module, global_inputs=[0, 1])  # ids and freq: the same every segment
    assert split is not None and split.hoisted == 1 and split.invariant_inputs == [1]
    args = (torch.arange(20).view(1, 20), torch.randn(4), torch.randn(5, 4))
    torch.manual_seed(0)
    want = module(3, 5, *args)
    torch.manual_seed(0)
    got = split.variant(3, 5, *args, *split.invariant(5, args[1]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert not any(n.target is torch.rand_like for n in split.invariant.graph.nodes)
    # freq not the same every segment: only the positions (a function of n) move.
    partial = split_invariant(module, global_inputs=[])
    assert partial is not None and partial.moved == 2
    assert not any(node.op == "call_method" and node.target == "cos" for node in partial.invariant.graph.nodes)


def test_chunks_hoisted_and_compiled_stay_exact() -> None:
    """diagpass.compile: the rotary tables leave the segment loop, the s-free chunks (the
    last norm) run as Inductor kernels (allowed on CPU here), outputs as eager."""
    from diagpass.program import chunks

    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)
    vocab = model.config.vocab_size
    ids = _ids(1, 8 * 6, vocab, seed=3)
    with torch.no_grad(), mock.patch.object(chunks, "COMPILE_CHUNK_DEVICES", ("cpu",)):
        expected = logits_of(model(ids)).clone()
        fast = diagpass.compile(model, _ids(1, 24, vocab), options={"compiler": "inductor", "min_lanes": 2})
        actual = logits_of(fast(ids))
    assert counters["diagpass"]["chunk_nodes_hoisted"] > 0
    assert counters["diagpass"]["chunk_compiles"] > 0
    assert max_rel_err(actual, expected) < 1e-5


# --- carried lanes: a step writes its hidden states one lane up, the next reads them in place ------


def test_with_carry_writes_the_output_one_lane_up() -> None:
    def step(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum(-1) + w  # [G, D], [G]

    x, w, head = torch.randn(3, 4), torch.randn(3), torch.randn(4)
    shifted, total = lower.with_carry(step, 0)(x, w, head)
    assert torch.equal(shifted, torch.cat([head[None], x * 2]))  # [G+1, D]
    assert torch.equal(total, x.sum(-1) + w)
    untouched, summed = lower.with_carry(step, 1)(x, w, torch.tensor(7.0))
    assert torch.equal(untouched, x * 2) and torch.equal(summed, torch.cat([torch.tensor([7.0]), x.sum(-1) + w]))


def _carried_and_stacked(model: torch.nn.Module, ids: torch.Tensor, options: dict[str, Any]) -> tuple[Any, ...]:
    vocab = model.config.vocab_size
    probe = _ids(ids.shape[0], 3 * model.segment_size, vocab)
    with torch.no_grad():
        expected = logits_of(model(ids)).clone()
        carried_model = diagpass.compile(model, probe, options=options)
        carried = logits_of(carried_model(ids)).clone()
        stacked_model = diagpass.compile(model, probe, options={**options, "carry_lanes": False})
        stacked = logits_of(stacked_model(ids)).clone()
    return expected, carried, stacked, carried_model, stacked_model


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(
    layers=st.integers(2, 4),
    segments=st.integers(2, 7),
    short=st.booleans(),
    mem=st.integers(1, 3),
    batch=st.integers(1, 2),
    width=st.sampled_from([32, 64]),
)
def test_property_carried_lanes_exact(layers: int, segments: int, short: bool, mem: int, batch: int, width: int) -> None:
    """The hidden states carried one lane up (the default) match sequential eager, and every
    full diagonal that starts a steady segment carries. (Bit-identity with stacking: below.)"""
    config = models.tiny_llama_config(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width)
    model = models.build_armt(config=config, segment_size=8, num_mem_tokens=mem, d_mem=8, w_mv_std=0.02)
    ids = _ids(batch, 8 * segments - (3 if short else 0), vocab=config.vocab_size, seed=segments)
    with torch.no_grad():
        expected = logits_of(model(ids)).clone()
        fast = diagpass.compile(model, _ids(batch, 24, config.vocab_size), options={"compiler": "eager", "min_lanes": 1})
        actual = logits_of(fast(ids))
    assert max_rel_err(actual, expected) < 1e-5
    assert fast.report.carry is not None
    # Steps 1..S-2 start a steady segment at layer 0 (with min_lanes 1 never padded); the step
    # before a short last segment does not carry (that segment runs its own template).
    stats = fast.report.runs[-1].stats
    assert stats is not None and stats.carried_steps == max(0, segments - 2 - int(short))


@pytest.mark.slow
def test_carried_lanes_are_read_in_place_with_inductor() -> None:
    """Inductor steps (CPU here): bit-identical to stacking; the next step reads the carried
    lanes as a view (one more lane view per carried step)."""
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)
    ids = _ids(1, 8 * 6 + 5, vocab=model.config.vocab_size, seed=4)
    counters.clear()
    expected, carried, stacked, carried_model, _ = _carried_and_stacked(
        model, ids, {"compiler": "inductor", "min_lanes": 1}
    )
    assert torch.equal(carried, stacked)
    assert max_rel_err(carried, expected) < 1e-5
    assert counters["diagpass"]["carried_step_compiles"] > 0
    runs = carried_model.report.runs[-1].stats
    assert runs is not None and runs.carried_steps == 6 - 2


def test_carried_lanes_change_nothing_against_stacking() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=3, d_mem=8, w_mv_std=0.02)
    ids = _ids(2, 8 * 7, vocab=model.config.vocab_size, seed=5)
    counters.clear()
    expected, carried, stacked, carried_model, stacked_model = _carried_and_stacked(
        model, ids, {"compiler": "eager", "min_lanes": 1}
    )
    assert torch.equal(carried, stacked)
    assert max_rel_err(carried, expected) < 1e-5
    assert carried_model.report.runs[-1].stats.carried_steps == 5  # type: ignore[union-attr]
    assert stacked_model.report.runs[-1].stats.carried_steps == 0  # type: ignore[union-attr]
    assert counters["diagpass"]["carried_steps"] == 5


def test_carried_lanes_need_lane_views_and_their_option() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)
    probe = _ids(1, 24, vocab=model.config.vocab_size)
    with torch.no_grad():
        assert diagpass.compile(model, probe, options={"compiler": "eager"}).report.carry == (2, 0)
        assert diagpass.compile(model, probe, options={"compiler": "eager", "lane_views": False}).report.carry is None
        fast = diagpass.compile(model, probe, options={"compiler": "eager", "carry_lanes": False})
    assert fast.report.carry is None and "carried lanes: none" in str(fast.report)
    with pytest.raises(diagpass.ConfigError, match="carry_lanes"):
        diagpass.compile(model, probe, options={"carry_lanes": "yes"})


def test_backend_carries_lanes_and_changes_nothing() -> None:
    """torch.compile(backend="diagbatch"): the step before each new segment carries, the
    segment's prologue runs a step early, and outputs are bit-identical to stacking."""
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8, w_mv_std=0.02)
    ids = _ids(2, 8 * 7, vocab=model.config.vocab_size, seed=6)
    counters.clear()
    compile_and_compare(model, ids, options={"compiler": "eager"})
    assert counters["diagpass"]["carried_steps"] == 5  # steps 1..5 start segments 2..6 at layer 0
    with torch.no_grad():
        carried = logits_of(torch.compile(model, backend="diagbatch", options={"compiler": "eager"}, dynamic=False)(ids)).clone()
        torch._dynamo.reset()
        counters.clear()
        off = {"compiler": "eager", "carry_lanes": False}
        stacked = logits_of(torch.compile(model, backend="diagbatch", options=off, dynamic=False)(ids)).clone()
    assert counters["diagpass"]["carried_steps"] == 0
    assert torch.equal(carried, stacked)


def test_a_head_computed_from_a_cell_is_not_carried() -> None:
    from diagpass.program.unrolled import _outside_ancestors

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    cell_out = graph.call_function(torch.relu, (x,))
    prologue = graph.call_function(torch.neg, (x,))
    head = graph.call_function(torch.add, (prologue, 1))
    late = graph.call_function(torch.add, (cell_out, prologue))
    cell_of = {cell_out: (0, 0)}
    assert _outside_ancestors(head, cell_of) == [head, prologue]  # inputs only: may run early
    assert _outside_ancestors(late, cell_of) is None  # reads a cell's output
