"""Tests of ``diagpass.analyze``: the dependency report on the model zoo, on a synthetic model
family against the wavefront theorem's predictions (DESIGN.md §2), and on odd inputs."""

from __future__ import annotations

import gc
import os
import re
import sys
import time

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from synthetic import SyntheticRMT, example_input, predict  # noqa: E402

import diagpass  # noqa: E402
import diagpass.models as dm  # noqa: E402
from diagpass.capture import capture  # noqa: E402
from diagpass.report import analyze_graph  # noqa: E402

SEG = 8


def ids(batch: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, n_tokens), generator=g)


def diagonals(num_layers: int, num_segments: int) -> list[list[tuple[int, int]]]:
    """Step d: every (l, d - l) on the grid, layers ascending (computed here, not by diagpass)."""
    return [
        [(l, d - l) for l in range(num_layers) if 0 <= d - l < num_segments]
        for d in range(num_layers + num_segments - 1)
    ]


def assert_diagonal_proof(report: diagpass.DependencyReport, L: int, S: int) -> None:
    assert report.ok, report.reason
    assert report.reason is None
    assert (report.num_layers, report.num_segments) == (L, S)
    assert report.violations == []
    assert report.critical_path == S + L - 1
    assert report.schedule == diagonals(L, S)
    assert set(report.graph.nodes) == {(l, s) for l in range(L) for s in range(S)}
    assert nx.is_directed_acyclic_graph(report.graph)
    # Every edge comes from an earlier diagonal.
    assert all(a[0] + a[1] < b[0] + b[1] for a, b in report.graph.edges)


def grid_rows(text: str) -> dict[int, list[str]]:
    """The step grid of ``str(report)``: layer -> the cells of its row."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\s+l(\d+)\s+(.*)$", line)
        if match:
            rows[int(match.group(1))] = match.group(2).split()
    return rows


# -- the model zoo -------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["llama", "qwen2", "gpt2"])
def test_armt_is_proven_diagonal(base: str) -> None:
    model = dm.build_armt(base=base, segment_size=SEG, num_mem_tokens=2, d_mem=8)
    report = diagpass.analyze(model, ids(1, 4 * SEG))
    assert_diagonal_proof(report, L=2, S=4)
    # ARMT's edges are exactly (l-1, s) -> (l, s) and (l, s-1) -> (l, s) (DESIGN.md §7).
    expected = {((l - 1, s), (l, s)) for l in range(1, 2) for s in range(4)}
    expected |= {((l, s - 1), (l, s)) for l in range(2) for s in range(1, 4)}
    assert set(report.graph.edges) == expected
    assert report.uniform, report.uniformity
    assert report.layer_container and report.layer_container.endswith(
        "transformer.h" if base == "gpt2" else "model.layers"
    )
    text = str(report)
    assert "PROVEN" in text and "NOT PROVEN" not in text
    rows = grid_rows(text)
    assert rows == {l: [str(l + s) for s in range(4)] for l in range(2)}


def test_armt_with_output_hidden_states() -> None:
    """transformers 5.x installs its hidden-state hooks on first use: a graph break on the first
    trace only. analyze() traces again and proves the model (reference-style code, DESIGN.md §1.2)."""
    model = dm.build_armt(segment_size=SEG, num_mem_tokens=2, d_mem=8)
    report = diagpass.analyze(model, ids(1, 3 * SEG), output_hidden_states=True)
    assert_diagonal_proof(report, L=2, S=3)
    assert report.num_graphs == 1 and report.graph_breaks == []


def test_armt_deeper_than_long() -> None:
    """S < L: 4 layers, 2 segments; the diagonals are cut by the grid's edges."""
    model = dm.build_armt(config=dm.tiny_llama_config(num_hidden_layers=4), segment_size=SEG, num_mem_tokens=2, d_mem=8)
    report = diagpass.analyze(model, ids(1, 2 * SEG))
    assert_diagonal_proof(report, L=4, S=2)
    assert report.schedule[0] == [(0, 0)]
    assert report.schedule[2] == [(1, 1), (2, 0)]
    assert report.schedule[-1] == [(3, 1)]


def test_armt_batch_3() -> None:
    model = dm.build_armt(segment_size=SEG, num_mem_tokens=2, d_mem=8)
    report = diagpass.analyze(model, ids(3, 3 * SEG))
    assert_diagonal_proof(report, L=2, S=3)


def test_armt_short_last_segment_is_uniform_with_variants() -> None:
    model = dm.build_armt(segment_size=SEG, num_mem_tokens=2, d_mem=8)
    report = diagpass.analyze(model, ids(1, 3 * SEG + 3))  # segments 8, 8, 8, 3
    assert_diagonal_proof(report, L=2, S=4)
    assert report.uniform, report.uniformity
    roles = dict(report.variants)
    assert roles == {"steady": 4, "first segment": 2, "last segment": 2}
    assert "first segment" in report.uniformity and "last segment" in report.uniformity
    assert "NOT uniform" not in report.uniformity


def test_per_layer_memory_rmt_is_proven() -> None:
    model = dm.build_per_layer_memory_rmt(segment_size=SEG, num_mem_tokens=2)
    report = diagpass.analyze(model, ids(1, 3 * SEG))
    assert_diagonal_proof(report, L=2, S=3)
    assert any(a == (b[0], b[1] - 1) for a, b in report.graph.edges)  # (l, s-1) -> (l, s)


def test_linear_memory_transformer_is_proven() -> None:
    model = dm.build_linear_memory(segment_size=SEG, d_key=8)
    report = diagpass.analyze(model, ids(1, 3 * SEG))
    assert_diagonal_proof(report, L=2, S=3)
    assert report.uniform, report.uniformity


def test_vanilla_rmt_is_refuted_at_the_memory_feed() -> None:
    L, S = 2, 4
    model = dm.build_rmt(segment_size=SEG, num_mem_tokens=2)
    report = diagpass.analyze(model, ids(1, S * SEG))
    assert not report.ok
    assert (report.num_layers, report.num_segments) == (L, S)
    assert report.reason and "wavefront" in report.reason
    assert report.num_graphs == 1, report.graph_breaks  # the lazy hook install is retraced away
    pairs = {(v.src, v.dst) for v in report.violations}
    assert pairs == {((L - 1, s - 1), (0, s)) for s in range(1, S)}
    assert report.critical_path == S * L
    rmt_py = os.path.join(os.path.dirname(dm.__file__), "rmt.py")
    with open(rmt_py) as f:
        lines = f.read().splitlines()
    for v in report.violations:
        assert v.reason
        path, line = v.source.rsplit(":", 1)
        assert os.path.basename(path) == "rmt.py", v.source
        assert os.path.samefile(path, rmt_py)
        assert "memory" in lines[int(line) - 1], lines[int(line) - 1]  # the line that feeds the memory in
    # The fastest valid order is sequential; every cell fed by a violation is marked in the grid.
    assert report.num_steps == S * L
    text = str(report)
    assert "NOT PROVEN" in text and "rmt.py" in text
    rows = grid_rows(text)
    assert rows[0][1:] == [f"{2 * s}!" for s in range(1, S)]


# -- the theorem, on random synthetic models --------------------------------------------------------


@st.composite
def synthetic_cases(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[int, int, int]]]:
    L = draw(st.integers(1, 5))
    S = draw(st.integers(1, 5))
    T = draw(st.integers(1, 4))
    width = draw(st.sampled_from([8, 12, 16]))
    edge = st.tuples(st.integers(0, L - 1), st.integers(0, L - 1), st.integers(1, 4))
    edges = draw(st.lists(edge, max_size=5, unique=True))
    short = draw(st.integers(0, T - 1))  # rows missing from the last segment
    return L, S, T, width, edges, short


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=synthetic_cases())
def test_theorem_on_random_synthetic_models(case: tuple[int, int, int, int, list[tuple[int, int, int]], int]) -> None:
    L, S, T, width, edges, short = case
    torch._dynamo.reset()  # Dynamo caches per code object and has a recompile limit
    model = SyntheticRMT(L, T, width=width, edges=edges)
    x = example_input(S, T, width)
    report = diagpass.analyze(model, x[:, : S * T - short])
    expected = predict(L, S, edges)
    assert (report.num_layers, report.num_segments) == (L, S)
    assert {(v.src, v.dst) for v in report.violations} == expected.violations
    assert report.critical_path == expected.critical_path
    assert report.ok == expected.ok, report.reason
    if S == 1:
        assert report.reason.startswith("no segment recurrence")
    # A valid schedule in every case: each cell once, after everything it depends on.
    step_of = {cell: i for i, step in enumerate(report.schedule) for cell in step}
    assert sorted(step_of) == sorted((l, s) for l in range(L) for s in range(S))
    assert all(step_of[a] < step_of[b] for a, b in report.graph.edges)
    if report.ok:
        assert report.schedule == diagonals(L, S)
    else:
        assert report.num_steps == expected.critical_path
    # One template (a short last segment is a variant): every cell runs the same ops.
    assert report.uniform, report.uniformity
    if short and S >= 3:
        assert ("last segment", L) in report.variants


@pytest.mark.parametrize(
    ("edges", "bad"),
    [
        ([(2, 0, 1)], {((2, s - 1), (0, s)) for s in range(1, 4)}),  # vanilla RMT: last layer -> layer 0
        ([(1, 1, 1)], set()),  # per-layer memory
        ([(0, 1, 1)], set()),  # Transformer-XL cache: l-1 at s-1 -> l at s
        ([(2, 1, 1)], {((2, s - 1), (1, s)) for s in range(1, 4)}),  # l+1 at s-1 -> l at s: same diagonal
        ([(2, 0, 2)], {((2, s - 2), (0, s)) for s in range(2, 4)}),  # a - k = b: same diagonal
        ([(2, 0, 3)], set()),  # a - k < b: an earlier diagonal
    ],
)
def test_theorem_examples(edges: list[tuple[int, int, int]], bad: set) -> None:
    report = diagpass.analyze(SyntheticRMT(3, 2, edges=edges), example_input(4, 2))
    assert {(v.src, v.dst) for v in report.violations} == bad
    assert report.ok == (not bad)
    assert report.critical_path == predict(3, 4, edges).critical_path
    for v in report.violations:
        assert os.path.basename(v.source.rsplit(":", 1)[0]) == "synthetic.py"


# -- odd inputs ---------------------------------------------------------------------------------------


def test_single_segment_is_not_proven() -> None:
    model = dm.build_armt(segment_size=SEG, num_mem_tokens=2, d_mem=8)
    report = diagpass.analyze(model, ids(1, SEG - 3))
    assert not report.ok
    assert report.num_segments == 1
    assert report.reason.startswith("no segment recurrence")
    assert report.critical_path == 2  # the layers of the one segment, in order


def test_graph_break_in_the_segment_loop_is_reported() -> None:
    model = SyntheticRMT(3, 2, edges=[(l, l, 1) for l in range(3)], graph_break=True)
    report = diagpass.analyze(model, example_input(3, 2))
    assert not report.ok
    assert "graph break" in report.reason
    assert report.graph_breaks and "graph_break" in report.graph_breaks[0]
    assert "graph break" in str(report)


class _PrintsFirst(nn.Module):
    """A graph break before the segment loop: Dynamo splits the forward in two graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = SyntheticRMT(2, 2, edges=[(0, 0, 1), (1, 1, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        print("diagpass test: a graph break")
        return self.inner(y)


def test_graph_break_before_the_loop_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    report = diagpass.analyze(_PrintsFirst(), example_input(3, 2))
    assert not report.ok
    assert "graph break" in report.reason
    assert report.num_graphs >= 2
    # The largest graph holds the loop; the report still says what it would have proven.
    assert (report.num_layers, report.num_segments) == (2, 3)
    assert "Without them" not in report.reason  # nothing else is wrong


def test_analyze_twice_after_a_graph_break_still_reports_it() -> None:
    model = SyntheticRMT(2, 2, edges=[(1, 1, 1)], graph_break=True)
    for _ in range(2):  # the skip marks of the first analysis must not hide the second's breaks
        report = diagpass.analyze(model, example_input(3, 2))
        assert not report.ok and "graph break" in report.reason


def test_plain_transformer_is_not_proven() -> None:
    model = dm.build_base("llama")
    report = diagpass.analyze(model, ids(1, 12))
    assert not report.ok
    assert report.reason and "no segment recurrence" in report.reason


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(
    "make", [_MLP, lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))], ids=["mlp", "sequential"]
)
def test_mlp_is_not_proven(make) -> None:
    report = diagpass.analyze(make(), torch.randn(2, 8))
    assert not report.ok
    assert report.reason
    str(report)  # renders


def test_forward_that_dynamo_cannot_run_is_reported_not_raised() -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("bad input")

    report = diagpass.analyze(Fails(), torch.randn(2))
    assert not report.ok and "bad input" in report.reason


# -- uniformity ------------------------------------------------------------------------------------


def test_one_layer_with_another_op_is_not_uniform() -> None:
    model = SyntheticRMT(4, 2, edges=[(l, l, 1) for l in range(4)], acts={2: "gelu"})
    report = diagpass.analyze(model, example_input(3, 2))
    assert report.ok, report.reason  # the dependencies are fine ...
    assert not report.uniform  # ... but layer 2 is not an instance of the template
    assert report.uniformity.startswith("NOT uniform")
    assert "cell (2, 0)" in report.uniformity
    assert "gelu" in report.uniformity
    assert "synthetic.py" in report.uniformity
    assert "uniformity: NOT uniform" in str(report)


def test_synthetic_model_is_uniform() -> None:
    model = SyntheticRMT(3, 2, edges=[(l, l, 1) for l in range(3)])
    report = diagpass.analyze(model, example_input(4, 2))
    assert report.ok and report.uniform
    assert report.variants == [("steady", 12)]


# -- cost --------------------------------------------------------------------------------------------


def _analysis_seconds(model: nn.Module, x: torch.Tensor, repeats: int = 7) -> tuple[float, int]:
    """Best analysis time of the captured graph (GC off: it adds noise that grows with the heap)."""
    with torch.no_grad():
        gm = capture(model, (x,), {}).graph_module
    gc.collect()
    gc.disable()
    try:
        best = min(analyze_graph(gm).report.analysis_s for _ in range(repeats))
    finally:
        gc.enable()
    return best, len(gm.graph.nodes)


def test_analysis_time_is_linear_in_graph_size() -> None:
    L, T = 3, 2
    edges = [(l, l, 1) for l in range(L)] + [(0, 1, 1)]
    report = diagpass.analyze(SyntheticRMT(L, T, edges=edges), example_input(4, T))
    assert report.analysis_s > 0 and report.num_nodes > 0
    small_s, small_n = _analysis_seconds(SyntheticRMT(L, T, edges=edges), example_input(4, T))
    torch._dynamo.reset()
    big_s, big_n = _analysis_seconds(SyntheticRMT(L, T, edges=edges), example_input(32, T))
    assert big_n > 6 * small_n
    # Time per node may not grow much with the graph: a quadratic pass would give ~8x here
    # (measured: about 1x-2x, noise included).
    assert big_s / big_n < 4.0 * small_s / small_n + 1e-5, (small_s, small_n, big_s, big_n)


def test_analysis_is_a_small_part_of_the_cost() -> None:
    t0 = time.perf_counter()
    report = diagpass.analyze(SyntheticRMT(3, 2, edges=[(l, l, 1) for l in range(3)]), example_input(8, 2))
    wall = time.perf_counter() - t0
    assert report.trace_s is not None and report.trace_s > 0
    assert report.analysis_s < wall


def test_identical_pure_computations_before_the_loop_are_one_value() -> None:
    """Gemma's final RMSNorm computes ``1 + weight`` again in every segment: the unit cut merges
    the copies, so every segment reads one value and the segments share one form."""
    from diagpass import models
    from diagpass.capture import capture_whole
    from diagpass.passes.reroll import split_units
    from diagpass.report import analyze_graph

    model = models.build_armt(base="gemma3", segment_size=8, num_mem_tokens=2, d_mem=8)
    with torch.no_grad():
        captured = capture_whole(model, (torch.randint(0, 128, (1, 24)),), {})
    analysis = analyze_graph(captured.graph_module)
    split = split_units(captured.graph_module.graph, analysis.labels)
    adds = [n for n, i in split.pre_index.items() if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3 and len({split.pre_index[n] for n in adds}) == 1
