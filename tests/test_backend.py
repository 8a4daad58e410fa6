"""The diagbatch backend against sequential eager: exactness, schedule, fallback, options."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import diagpass
from diagpass import models
from tests.helpers import compare_low_precision, compile_and_compare, logits_of, max_rel_err
from tests.reference_style import ReferenceStyleARMT

EAGER_STEPS = {"compiler": "eager"}


def _ids(batch: int, length: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _assert_diagonal(record: diagpass.CompileRecord, layers: int, segments: int) -> None:
    assert record.applied, record.reason
    assert record.num_layers == layers and record.num_segments == segments
    assert record.num_steps == layers + segments - 1
    assert counters["diagpass"]["applied"] >= 1
    assert counters["diagpass"]["steps"] >= layers + segments - 1


# --- the zoo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("batch,length", [(1, 64), (3, 53)])
def test_zoo_armt_exact(base: str, batch: int, length: int) -> None:
    model = models.build_armt(base=base, segment_size=16, num_mem_tokens=4, d_mem=8)
    record = compile_and_compare(model, _ids(batch, length, vocab=model.config.vocab_size))
    _assert_diagonal(record, layers=len(model.layers), segments=-(-length // 16))
    assert record.report is not None and record.report.ok and record.report.uniform


def test_zoo_linear_memory_exact() -> None:
    model = models.build_linear_memory(segment_size=16, d_key=8)
    record = compile_and_compare(model, _ids(2, 60, vocab=model.config.vocab_size))
    _assert_diagonal(record, layers=len(model.layers), segments=4)


def test_zoo_per_layer_memory_exact() -> None:
    model = models.build_per_layer_memory_rmt(segment_size=16, num_mem_tokens=4)
    record = compile_and_compare(model, _ids(2, 48, vocab=model.config.vocab_size))
    _assert_diagonal(record, layers=len(model.layers), segments=3)


def test_memory_path_matters() -> None:
    """The comparison is meaningful: W_mv non-zero changes the output."""
    model = models.build_armt(segment_size=16, num_mem_tokens=4, d_mem=8)
    ids = _ids(1, 64, vocab=model.config.vocab_size)
    with torch.no_grad():
        with_memory = logits_of(model(ids)).clone()
        for layer in model.layers:
            layer.W_mv.weight.zero_()
        without = logits_of(model(ids))
    assert max_rel_err(without, with_memory) > 1e-3


# --- the reference-style user code, swept by Hypothesis ------------------------------------------


@settings(max_examples=10)
@given(
    layers=st.integers(1, 6),
    segments=st.integers(1, 8),
    segment_size=st.sampled_from([4, 8]),
    mem=st.integers(1, 3),
    width=st.sampled_from([8, 16]),
    batch=st.integers(1, 3),
    short_last=st.integers(0, 3),
)
def test_property_reference_style_exact(
    layers: int, segments: int, segment_size: int, mem: int, width: int, batch: int, short_last: int
) -> None:
    torch._dynamo.reset()
    counters.clear()
    short_last = min(short_last, segment_size - 1)
    model = ReferenceStyleARMT(layers=layers, width=width, segment_size=segment_size, num_mem_tokens=mem, d_mem=4)
    ids = _ids(batch, segments * segment_size - short_last)
    record = compile_and_compare(model, ids, options=EAGER_STEPS, noise_aware=True)
    if segments >= 2:
        _assert_diagonal(record, layers=layers, segments=segments)
        assert record.report.critical_path == layers + segments - 1
    else:
        assert not record.applied and "segment" in record.reason


@settings(max_examples=6)
@given(
    layers=st.integers(1, 4),
    segments=st.integers(2, 6),
    batch=st.integers(1, 3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    short_last=st.integers(0, 3),
)
def test_property_low_precision_within_sequential_noise(
    layers: int, segments: int, batch: int, dtype: torch.dtype, short_last: int
) -> None:
    """bf16/fp16: diagbatch is as close to float32 as sequential eager in the same dtype."""
    torch._dynamo.reset()
    model = ReferenceStyleARMT(layers=layers, width=16, segment_size=8).to(dtype)
    record, diag_err, eager_err = compare_low_precision(model, _ids(batch, segments * 8 - short_last))
    _assert_diagonal(record, layers=layers, segments=segments)


def test_zoo_armt_bf16_within_sequential_noise() -> None:
    model = models.build_armt(segment_size=16, num_mem_tokens=4, d_mem=8, dtype=torch.bfloat16)
    record, diag_err, eager_err = compare_low_precision(model, _ids(2, 64, vocab=model.config.vocab_size))
    _assert_diagonal(record, layers=len(model.layers), segments=4)
    assert eager_err > 0  # bf16 really differs from float32: the check is not vacuous


def test_reference_style_sequential_ablation_exact() -> None:
    model = ReferenceStyleARMT(layers=3, segment_size=8)
    record = compile_and_compare(model, _ids(2, 40), options={"compiler": "eager", "schedule": "sequential"})
    assert record.applied and record.num_steps == 3 * 5
    assert all(len(g.cells) == 1 for g in record.program.groups)


@pytest.mark.parametrize("pad", ["none", "pow2", "max", "split"])
def test_padding_modes_exact(pad: str) -> None:
    model = ReferenceStyleARMT(layers=5, segment_size=4)
    record = compile_and_compare(model, _ids(2, 26), options={"compiler": "eager", "pad": pad})
    lanes = {len(g.lanes) for g in record.program.groups}
    if pad == "max":
        assert lanes == {5}
    elif pad == "pow2":
        assert lanes <= {1, 2, 4, 5}
    elif pad == "split":  # 5 cells = 4 + 1, 3 = 2 + 1: no padding at all
        assert lanes <= {1, 2, 4} and all(len(g.lanes) == len(g.cells) for g in record.program.groups)
    assert record.step_compiles == len({(g.variant, len(g.lanes)) for g in record.program.groups})


def test_split_with_min_lanes_pads_the_remainder() -> None:
    from diagpass.program.schedule import contiguous_groups

    cells = [(layer, 20 - layer) for layer in range(13)]
    groups = contiguous_groups(
        step=20, variant=0, cells=cells, positions=list(range(13)), num_layers=16, limit=16, mode="split", floor=4
    )
    assert [len(g.lanes) for g in groups] == [8, 4, 4]
    assert [len(g.cells) for g in groups] == [8, 4, 1]
    assert groups[2].lanes == [12, 13, 14, 15] and groups[2].cell_lane == [0]


# --- refuted models and fallbacks ----------------------------------------------------------------


def test_vanilla_rmt_falls_back_exactly() -> None:
    model = models.build_rmt(segment_size=16, num_mem_tokens=4)
    record = compile_and_compare(model, _ids(2, 48, vocab=model.config.vocab_size))
    assert not record.applied
    assert "wavefront" in record.reason
    assert record.report.violations and record.report.violations[0].dst[0] == 0
    assert counters["diagpass"]["fallbacks"] == 1


def test_vanilla_rmt_strict_names_the_edge() -> None:
    model = models.build_rmt(segment_size=16, num_mem_tokens=4)
    layers = model.config.num_hidden_layers
    compiled = torch.compile(model, backend="diagbatch", options={"strict": True, "compiler": "eager"})
    with pytest.raises(diagpass.StructureError) as info, torch.no_grad():  # itself, not Dynamo's wrapper
        compiled(_ids(1, 48, vocab=model.config.vocab_size))
    message = str(info.value)
    assert isinstance(info.value, diagpass.StructureError) and info.value.violations
    assert f"({layers - 1}, 0) -> (0, 1)" in message
    assert "rmt.py:" in message


def test_mlp_falls_back_cleanly() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    record = compile_and_compare(mlp, torch.randn(3, 8))
    assert not record.applied and record.reason


def test_single_segment_falls_back() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    record = compile_and_compare(model, _ids(1, 8))
    assert not record.applied and "segment" in record.reason


def test_min_segments_threshold() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    record = compile_and_compare(model, _ids(1, 24), options={"compiler": "eager", "min_segments": 4})
    assert not record.applied and "min_segments" in record.reason


def test_autograd_runs_the_training_program_with_eager_gradients() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    ids = _ids(1, 40)
    expected = model(ids)
    expected.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    actual = torch.compile(model, backend="diagbatch", options=EAGER_STEPS, dynamic=False)(ids)
    record = diagpass.last_compile()
    assert record.applied and record.training and record.path == "diagonal program", record.summary()
    assert not record.config.lane_views and not record.config.carry_lanes
    assert max_rel_err(actual.detach(), expected.detach()) < 1e-5 and actual.requires_grad
    actual.square().mean().backward()
    for name, param in model.named_parameters():
        assert max_rel_err(param.grad, want[name]) < 1e-4, name


def test_recompile_after_length_change_is_exact() -> None:
    model = ReferenceStyleARMT(layers=3, segment_size=8)
    compiled = torch.compile(model, backend="diagbatch", options=EAGER_STEPS, dynamic=False)
    for length in (24, 40, 37, 16):
        with torch.no_grad():
            expected = model(_ids(2, length)).clone()
            actual = compiled(_ids(2, length))
        record = diagpass.last_compile()
        assert record.applied and record.num_segments == -(-length // 8)
        assert max_rel_err(actual, expected) < 1e-5


def test_recompile_with_automatic_dynamic_shapes_is_exact() -> None:
    """Default torch.compile (dynamic=None) marks the length dynamic on the second shape:
    diagbatch must stay exact (it falls back and says so)."""
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    compiled = torch.compile(model, backend="diagbatch", options=EAGER_STEPS)
    for length in (24, 21, 23):
        with torch.no_grad():
            expected = model(_ids(1, length)).clone()
            actual = compiled(_ids(1, length))
        assert max_rel_err(actual, expected) < 1e-5
    reasons = [r.reason or "" for r in diagpass.compile_history()]
    assert any("dynamic" in reason for reason in reasons) or all(r.applied for r in diagpass.compile_history()[-3:])


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"strct": True}, "unknown option 'strct'"),
        ({"strict": "yes"}, "'strict' must be a bool"),
        ({"min_segments": 0}, "min_segments"),
        ({"pad": "lots"}, "'pad' must be one of"),
        ({"inductor": {"not_a_knob": 1}}, "unknown Inductor config keys"),
    ],
)
def test_bad_options_are_clear_errors(options: dict, needle: str) -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    with pytest.raises(diagpass.ConfigError) as info, torch.no_grad():  # itself, not Dynamo's wrapper
        torch.compile(model, backend="diagbatch", options=options)(_ids(1, 16))
    assert needle in str(info.value)


def test_parse_options_modes() -> None:
    overhead = diagpass.parse_options(None, mode="reduce-overhead")
    assert overhead.cudagraph_program and not overhead.cudagraphs  # one graph per program, not per step
    assert not diagpass.parse_options(None, mode="max-autotune-no-cudagraphs").cudagraph_program
    assert not diagpass.parse_options({"cudagraph_program": False}).cudagraph_program
    with pytest.raises(diagpass.ConfigError, match="cudagraph_program"):
        diagpass.parse_options({"cudagraph_program": 1})
    config = diagpass.parse_options({"max_autotune": True, "strict": True}, mode=None)
    assert config.strict and config.inductor == {"max_autotune": True}
    assert diagpass.parse_options(None, mode="max-autotune").inductor["max_autotune"]
    with pytest.raises(diagpass.ConfigError):
        diagpass.parse_options(None, mode="fastest")


def test_mode_reduce_overhead_accepted_on_cpu() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    record = compile_and_compare(model, _ids(1, 24), options={"compiler": "eager", "cudagraphs": False})
    assert record.applied


# --- inspection ------------------------------------------------------------------------------------


def test_last_compile_record_is_inspectable() -> None:
    model = ReferenceStyleARMT(layers=3, segment_size=8)
    record = compile_and_compare(model, _ids(1, 32))
    assert record.times.analysis_s > 0 and record.times.rewrite_s > 0
    assert record.times.capture_s is None or record.times.capture_s > 0
    text = str(record)
    assert "APPLIED" in text and "steps=6" in text
    assert record.report.schedule[0] == [(0, 0)]
    # The program keeps the captured graph's interface: every graph input, by position.
    assert isinstance(record.program, diagpass.DiagonalProgram) and record.path == "diagonal program"
    keys = record.program.plan.input_keys
    assert keys and keys == [("input", i) for i in range(len(keys))]


def test_weights_restack_after_in_place_update() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=8)
    compiled = torch.compile(model, backend="diagbatch", options=EAGER_STEPS, dynamic=False)
    ids = _ids(1, 24)
    with torch.no_grad():
        compiled(ids)
        model.layers[1].W_mv.weight.mul_(2.0)  # in place: Dynamo's guards still pass
        expected = model(ids).clone()
        actual = compiled(ids)
    assert max_rel_err(actual, expected) < 1e-5
    assert counters["diagpass"]["weight_restacks"] >= 2


# --- Inductor ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_steps_exact_with_batched_gemms() -> None:
    model = ReferenceStyleARMT(layers=3, segment_size=8)
    record = compile_and_compare(model, _ids(2, 37), options={"compiler": "inductor", "pad": "max"})
    _assert_diagonal(record, layers=3, segments=5)
    assert record.batched_gemms > 0 and counters["diagpass"]["batched_gemms"] > 0
    assert record.times.inductor_s > 0


@pytest.mark.slow
def test_inductor_zoo_armt_exact() -> None:
    model = models.build_armt(segment_size=16, num_mem_tokens=4, d_mem=8)
    record = compile_and_compare(
        model, _ids(2, 60, vocab=model.config.vocab_size), options={"compiler": "inductor", "pad": "max"}
    )
    _assert_diagonal(record, layers=len(model.layers), segments=4)
    assert record.batched_gemms > 0


class _Unbatchable(torch.nn.Module):
    """A small stateful layer: its per-layer state is the mean of its last output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.state: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.state is not None:
            y = y + self.state
        self.state = y.mean(dim=1, keepdim=True)
        return y


class _UnbatchableModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Unbatchable() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer.state = None
        outs = []
        for start in range(0, x.shape[1], 4):
            h = x[:, start : start + 4]
            for layer in self.layers:
                h = layer(h)
            outs.append(h)
        return torch.cat(outs, dim=1)


def test_failing_first_run_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the steps fail on their first run, the plain graph answers, and the record says why."""
    from diagpass import lower

    def broken(*_: object, **__: object) -> object:
        raise RuntimeError("vmap: no batching rule (simulated)")

    monkeypatch.setattr(lower, "batched_template", broken)
    model = _UnbatchableModel()
    record = compile_and_compare(model, torch.randn(2, 12, 8))
    assert not record.applied and "first run of the steps" in record.reason and "simulated" in record.reason
    assert counters["diagpass"]["internal_errors"] == 1


def test_pad_max_is_min_of_layers_and_segments() -> None:
    model = ReferenceStyleARMT(layers=5, segment_size=4)
    record = compile_and_compare(model, _ids(1, 10), options={"compiler": "eager", "pad": "max"})  # S=3 < L=5
    assert {len(g.lanes) for g in record.program.groups} == {3}


def test_new_length_compiles_no_new_step() -> None:
    """A new segment count retraces (Dynamo), but Inductor compiles nothing new: the steps are
    cached by template, batch and layout."""
    model = ReferenceStyleARMT(layers=3, segment_size=8)
    compiled = torch.compile(model, backend="diagbatch", options={"compiler": "eager", "pad": "max"}, dynamic=False)
    with torch.no_grad():
        compiled(_ids(1, 40))  # S=5
        compiles = counters["diagpass"]["step_compiles"]
        hits = counters["diagpass"]["step_cache_hits"]
        expected = model(_ids(1, 64)).clone()
        actual = compiled(_ids(1, 64))  # S=8: a new graph, the same step shapes
    assert diagpass.last_compile().num_segments == 8
    assert counters["diagpass"]["step_compiles"] == compiles
    assert counters["diagpass"]["step_cache_hits"] > hits
    assert max_rel_err(actual, expected) < 1e-5


# --- step optimisations (diagpass.placement, lower.use_causal_attention, diagpass.fuse) -------------


def test_causal_mask_is_proven_dropped_and_exact() -> None:
    """HF's mask is built from constants: the steps attend causally and never read it."""
    model = models.build_armt(segment_size=16, num_mem_tokens=4, d_mem=8)
    record = compile_and_compare(model, _ids(2, 60, vocab=model.config.vocab_size))
    _assert_diagonal(record, layers=len(model.layers), segments=4)
    assert counters["diagpass"]["sdpa_causal"] == counters["diagpass"]["sdpa_batched"] > 0
    assert counters["diagpass"]["unread_nodes_erased"] > 0  # the per-segment mask computations
    program = record.program
    assert program is not None
    assert all("unused" in plan.slot_kinds for plan in program.runner.plans)


def test_prologue_runs_just_before_its_first_step() -> None:
    """Segment s's embedding is computed after step 0 has been issued, not all up front."""
    model = models.build_armt(segment_size=16, num_mem_tokens=4, d_mem=8)
    record = compile_and_compare(model, _ids(1, 64, vocab=model.config.vocab_size))
    program = record.program
    assert isinstance(program, diagpass.DiagonalProgram)
    layout = program.layout(*program.fixed_length)
    embeds = {
        name: [
            phase
            for phase, chunk in program.plan.units[name].chunks.items()
            if any(n.target is torch.nn.functional.embedding for n in chunk.module.graph.nodes)
        ]
        for name in ("first", "steady")
    }
    assert embeds == {"first": [0], "steady": [0]}  # the embedding runs in the segment's first chunk
    runs = {s: t for t, phases in enumerate(layout.phases_at) for s, phase in phases if phase == 0}
    steps = [t for t, step in enumerate(layout.step_at) if step is not None]
    assert len(runs) == 4
    assert runs[0] < steps[0] < runs[1] < runs[2] < runs[3]


def test_placement_keeps_early_order_with_in_place_ops() -> None:
    from diagpass.placement import has_mutation

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_method("add_", (x, 1))
    z = graph.call_function(torch.add, (x, 1))
    graph.output((y, z))
    assert has_mutation(list(graph.nodes), {})
    assert not has_mutation([z], {})


def _sdpa_template(T: int) -> torch.fx.GraphModule:
    from diagpass.ops import batched_sdpa

    graph = torch.fx.Graph()
    q, k, v, mask = (graph.placeholder(name) for name in ("q", "k", "v", "mask"))
    for node in (q, k, v):
        node.meta["val"] = torch.empty(1, 2, T, 8)
    out = graph.call_function(batched_sdpa, (q, k, v), {"attn_mask": mask, "is_causal": False})
    graph.output((out,))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("which,proven", [("causal", True), ("full", False), ("window", False), ("data", False)])
def test_use_causal_attention_needs_a_constant_causal_mask(which: str, proven: bool) -> None:
    from diagpass.lower import use_causal_attention

    T = 6

    # As Dynamo records HF's mask: ops on constants only (no graph input), except "data".
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    ones = graph.call_function(torch.ones, (T, T), {"dtype": torch.bool})
    lower_tri = graph.call_method("tril", (ones,))
    window = graph.call_function(operator.and_, (lower_tri, graph.call_method("triu", (ones, -2))))
    data = graph.call_function(operator.gt, (x, 0))
    sources = {"causal": lower_tri, "full": ones, "window": window, "data": data}
    nodes = {name: graph.call_function(operator.getitem, (node, (None, None))) for name, node in sources.items()}
    graph.output(tuple(nodes.values()))
    source = nodes[which]
    template = _sdpa_template(T)
    q, k, v = (torch.randn(1, 2, T, 8) for _ in range(3))
    mask = {"causal": torch.ones(T, T, dtype=torch.bool).tril()}.get(which, torch.ones(T, T, dtype=torch.bool))
    expected = template(q, k, v, mask[None, None])[0]
    assert use_causal_attention(template, lambda slot: [source]) == int(proven)
    assert counters["diagpass"]["sdpa_causal"] == int(proven)
    if proven:
        assert torch.allclose(template(q, k, v, None)[0], expected, atol=1e-6)


def test_fused_gemms_match_separate_ones() -> None:
    """The fusion pass on a real batched step graph: same values, fewer GEMMs, weights concatenated once."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from diagpass import lower
    from diagpass.backend import step_compiler
    from diagpass.fuse import fuse_horizontal_gemms

    model = models.build_armt(segment_size=16, num_mem_tokens=4, d_mem=8)
    calls = []
    original = step_compiler.get

    def record(**kw):  # type: ignore[no-untyped-def]
        calls.append(kw)
        return original(**kw)

    step_compiler.get = record  # type: ignore[method-assign]
    try:
        compile_and_compare(model, _ids(1, 48, vocab=model.config.vocab_size), options={"compiler": "eager", "pad": "max"})
    finally:
        step_compiler.get = original  # type: ignore[method-assign]
    call = calls[-1]
    args, static = call["args"], call["static"]
    batched = lower.batched_template(call["template"], call["in_dims"])
    if call["carry"] is not None:  # the step writes its hidden states one lane up, after a head
        batched = lower.with_carry(batched, call["carry"])
        static = [*static, False]
    present = [i for i, a in enumerate(args) if a is not None]
    given = [args[i] for i in present]

    def step(*xs):  # type: ignore[no-untyped-def]
        full = [None] * len(args)
        for i, x in zip(present, xs):
            full[i] = x
        return batched(*full)

    with torch.no_grad():
        reference = make_fx(step, tracing_mode="fake")(*given)
        graph = make_fx(step, tracing_mode="fake")(*given)
        before = lower.count_batched_gemms(graph)
        graph, makers = fuse_horizontal_gemms(graph, [static[i] for i in present])
        assert counters["diagpass"]["fused_gemms"] >= 5  # q/k/v, gate/up or W_mk/W_mv
        assert lower.count_batched_gemms(graph) < before
        for node in graph.graph.nodes:
            assert node.op == "output" or isinstance(node.meta.get("val"), torch.Tensor) or node.meta.get("val") is not None
        outputs = graph(*given, *(make(given) for make in makers))
        builds = counters["diagpass"]["fused_weight_builds"]
        outputs_again = graph(*given, *(make(given) for make in makers))
        assert counters["diagpass"]["fused_weight_builds"] == builds  # cached: no copy per step
        for got, again, want in zip(outputs, outputs_again, reference(*given)):
            assert max_rel_err(got, want) <= 1e-6
            assert torch.equal(got, again)
        window = given[makers[0].positions[0]]
        window._base.mul_(1.0)  # an in-place update of the stack: the concatenation is rebuilt
        makers[0](given)
        assert counters["diagpass"]["fused_weight_builds"] == builds + 1


@pytest.mark.slow
def test_inductor_fused_gemms_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from diagpass import lower

    monkeypatch.setattr(lower, "FUSE_GEMMS", True)
    model = models.build_armt(segment_size=16, num_mem_tokens=4, d_mem=8)
    record = compile_and_compare(
        model, _ids(1, 60, vocab=model.config.vocab_size), options={"compiler": "inductor", "pad": "max"}
    )
    _assert_diagonal(record, layers=len(model.layers), segments=4)
    assert counters["diagpass"]["gemm_fusions"] > 0 and counters["diagpass"]["fused_weight_builds"] > 0


# --- clear reasons (issue "Any length for every model": errors and records) -----------------------


def test_train_mode_with_dropout_falls_back_saying_eval() -> None:
    config = models.tiny_llama_config(attention_dropout=0.25)
    model = models.build_armt(config=config, segment_size=16, num_mem_tokens=4, d_mem=8).train()
    for p in model.parameters():
        p.requires_grad_(False)  # inference, only the mode is wrong
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER_STEPS)
    with torch.no_grad():
        compiled(_ids(1, 48, vocab=model.config.vocab_size))
    record = diagpass.last_compile()
    assert not record.applied and "eval()" in record.reason and "draws random numbers" in record.reason
    assert "steps=" not in str(record)  # a fallback reports no step count
    with pytest.raises(diagpass.StructureError, match=r"model.eval\(\)"):
        diagpass.compile(model, _ids(1, 48, vocab=model.config.vocab_size), options=EAGER_STEPS)
    model.eval()  # the same model in eval mode applies
    record = compile_and_compare(model, _ids(1, 48, vocab=model.config.vocab_size))
    assert record.applied


@pytest.mark.parametrize(
    "call,random",
    [
        (lambda x: torch.nn.functional.dropout(x, 0.1, True), True),
        (lambda x: torch.nn.functional.dropout(x, 0.1, False), False),
        (lambda x: torch.nn.functional.dropout(x, 0.0, True), False),
        (lambda x: torch.rand_like(x) + x, True),
        (lambda x: torch.nn.functional.normalize(x), False),
        (lambda x: torch.nn.functional.layer_norm(x, (4,)), False),
    ],
)
def test_draws_random(call, random: bool) -> None:  # type: ignore[no-untyped-def]
    from diagpass.passes.template import draws_random

    graph = torch.fx.symbolic_trace(call).graph
    assert any(draws_random(n) for n in graph.nodes) == random
