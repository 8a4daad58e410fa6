"""Tests of the reference model zoo ``diagpass.models`` against independent loop-based references."""

from __future__ import annotations

import copy
import os
import re
import sys
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import reference_models as ref  # noqa: E402

import diagpass.models as dm  # noqa: E402

BASES = ["llama", "qwen2", "gpt2"]
SEG = 8  # segment size
MEM = 3  # memory tokens
D_MEM = 8
LENGTHS = {"full": 3 * SEG, "short_last": 2 * SEG + 3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def ids_for(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, n), generator=g)


def armt64(base: str, **kw: Any) -> dm.ARMT:
    kw.setdefault("segment_size", SEG)
    kw.setdefault("num_mem_tokens", MEM)
    kw.setdefault("d_mem", D_MEM)
    return dm.build_armt(base=base, dtype=torch.float64, **kw)


def logits(model: nn.Module, input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kw).logits


# ---------------------------------------------------------------------------------------------------
# ARMT vs the reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", list(LENGTHS))
def test_armt_matches_reference_float64(base: str, batch: int, length: str) -> None:
    model = armt64(base, w_mv_std=0.1)
    input_ids = ids_for(batch, LENGTHS[length])
    out = logits(model, input_ids)
    assert out.shape == (batch, LENGTHS[length], 128)
    assert out.dtype == torch.float64
    expected = ref.reference_armt_logits(model, input_ids)
    assert rel_err(out, expected) < 1e-10


@pytest.mark.parametrize("base", BASES)
def test_armt_matches_reference_float32(base: str) -> None:
    model64 = armt64(base, w_mv_std=0.1)
    model32 = copy.deepcopy(model64).float()
    input_ids = ids_for(3, LENGTHS["short_last"])
    out = logits(model32, input_ids)
    assert out.dtype == torch.float32
    assert rel_err(out, ref.reference_armt_logits(model64, input_ids)) < 1e-5


@pytest.mark.parametrize("base", BASES)
def test_armt_memory_path_changes_output(base: str) -> None:
    model = armt64(base)  # builder's default W_mv (std 0.02)
    input_ids = ids_for(2, LENGTHS["full"])
    with_memory = logits(model, input_ids)

    no_memory = copy.deepcopy(model)
    for layer in no_memory.layers:
        nn.init.zeros_(layer.W_mv.weight)
    without = logits(no_memory, input_ids)

    # The first segment never reads memory; every later segment does.
    assert rel_err(with_memory[:, :SEG], without[:, :SEG]) < 1e-12
    assert rel_err(with_memory[:, SEG:], without[:, SEG:]) > 1e-3


def test_armt_batch_rows_are_independent() -> None:
    """Row b of a batched run equals a batch-1 run of row b (catches ``out[0]`` on 5.x tensors)."""
    model = armt64("llama")
    input_ids = ids_for(3, LENGTHS["short_last"])
    batched = logits(model, input_ids)
    for b in range(3):
        single = logits(model, input_ids[b : b + 1])
        assert rel_err(batched[b : b + 1], single) < 1e-12


def test_armt_resets_memory_every_forward() -> None:
    model = armt64("qwen2")
    input_ids = ids_for(2, LENGTHS["full"])
    first = logits(model, input_ids)
    logits(model, ids_for(1, 5, seed=7))  # a different batch size and length in between
    again = logits(model, input_ids)
    assert torch.equal(first, again)


def test_armt_memory_states_shapes_and_dtype() -> None:
    model = dm.build_armt(base="llama", dtype=torch.bfloat16, segment_size=SEG, num_mem_tokens=MEM, d_mem=D_MEM)
    out = logits(model, ids_for(2, LENGTHS["short_last"]))
    assert out.dtype == torch.bfloat16
    states = model.memory_states()
    d = model.d_model
    d_key = 2 * 3 * D_MEM
    assert len(states) == 2
    for W_mem, z in states:
        assert W_mem.shape == (2, d_key, d) and W_mem.dtype == torch.bfloat16
        assert z.shape == (2, d_key) and z.dtype == torch.bfloat16


def test_armt_single_segment_equals_plain_base_model() -> None:
    """One segment: no memory read, so the text logits are those of the base model on [text, memory]."""
    model = armt64("llama")
    input_ids = ids_for(2, SEG - 2)
    embeds = model.model.get_input_embeddings()(input_ids)
    row = torch.cat([embeds, model.memory.unsqueeze(0).expand(2, -1, -1)], dim=1)
    with torch.no_grad():
        plain = model.model(inputs_embeds=row).logits[:, : SEG - 2]
    assert rel_err(logits(model, input_ids), plain) < 1e-12


def test_armt_attention_mask_and_hidden_states_and_loss() -> None:
    model = armt64("gpt2")
    input_ids = ids_for(2, LENGTHS["short_last"])
    base_out = logits(model, input_ids)
    with torch.no_grad():
        out = model(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            output_hidden_states=True,
            labels=input_ids,
        )
    assert rel_err(out.logits, base_out) < 1e-12
    assert len(out.hidden_states) == model.num_layers + 1
    for h in out.hidden_states:
        assert h.shape == (2, LENGTHS["short_last"], model.d_model)
    assert out.loss is not None and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------
# Layer placement
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, path",
    [("llama", "model.model.layers"), ("qwen2", "model.model.layers"), ("gpt2", "model.transformer.h")],
)
@pytest.mark.parametrize(
    "builder, wrapper",
    [
        (dm.build_armt, dm.AssociativeLayer),
        (dm.build_linear_memory, dm.LinearMemoryLayer),
        (dm.build_per_layer_memory_rmt, dm.PerLayerMemoryLayer),
    ],
)
def test_wrappers_sit_in_the_layer_list(base: str, path: str, builder: Any, wrapper: type) -> None:
    model = builder(base=base)
    modules = dict(model.named_modules())
    for i in range(model.num_layers):
        assert isinstance(modules[f"{path}.{i}"], wrapper)
        assert not isinstance(modules[f"{path}.{i}.layer"], wrapper)
    assert model.layers is modules[path]
    # Attributes the HF model loop may read (e.g. Qwen2's `attention_type` in transformers 4.5x) are copied.
    for i in range(model.num_layers):
        inner, outer = modules[f"{path}.{i}.layer"], modules[f"{path}.{i}"]
        for name in ("attention_type", "layer_idx", "sliding_window"):
            if name in inner.__dict__:
                assert getattr(outer, name) == inner.__dict__[name]


def test_wrapper_copies_layer_attributes() -> None:
    layer = nn.Linear(4, 4)
    layer.attention_type = "sliding_attention"
    wrapper = dm.AssociativeLayer(layer, d_model=4, num_mem_tokens=1, d_mem=2)
    assert wrapper.attention_type == "sliding_attention"


def test_rmt_leaves_layers_alone() -> None:
    model = dm.build_rmt(base="llama")
    assert type(model.model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert model.layers_path == "model.layers"


def test_find_decoder_layers_fallback() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.ModuleList([nn.Identity()])
            self.blocks = nn.Sequential(nn.Identity())
            self.stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    path, layers = dm.find_decoder_layers(Custom())
    assert path == "stack" and len(layers) == 3
    with pytest.raises(ValueError):
        dm.find_decoder_layers(nn.Linear(2, 2))


@pytest.mark.parametrize("as_tuple", [False, True])
def test_associative_layer_handles_tensor_and_tuple_outputs(as_tuple: bool) -> None:
    """transformers 5.x layers return a tensor, 4.x a tuple: both give the same output and state."""

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8, dtype=torch.float64)

        def forward(self, h: torch.Tensor) -> Any:
            out = torch.tanh(self.lin(h))
            return (out, None) if as_tuple else out

    torch.manual_seed(0)
    layer = dm.AssociativeLayer(Layer(), d_model=8, num_mem_tokens=2, d_mem=4)
    nn.init.normal_(layer.W_mv.weight, std=0.5)
    h = torch.randn(3, 5, 8, dtype=torch.float64)
    outs = [layer(h), layer(h)]
    for out in outs:
        assert isinstance(out, tuple) == as_tuple
    hidden = [o[0] if as_tuple else o for o in outs]
    assert hidden[0].shape == (3, 5, 8)
    assert not torch.allclose(hidden[0], hidden[1])  # second call read the memory
    assert layer.W_mem.shape == (3, 2 * 3 * 4, 8) and layer.z.shape == (3, 24)


# ---------------------------------------------------------------------------------------------------
# RMT, per-layer-memory RMT, linear memory vs their references
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_rmt_matches_reference(base: str, batch: int) -> None:
    model = dm.build_rmt(base=base, dtype=torch.float64, segment_size=SEG, num_mem_tokens=MEM)
    input_ids = ids_for(batch, LENGTHS["short_last"])
    out = logits(model, input_ids)
    assert out.shape == (batch, LENGTHS["short_last"], 128)
    assert rel_err(out, ref.reference_rmt_logits(model, input_ids)) < 1e-10
    assert model.memory_states().shape == (batch, MEM, model.d_model)


def test_rmt_end_only_layout_matches_reference() -> None:
    model = dm.build_rmt(base="gpt2", dtype=torch.float64, segment_size=SEG, num_mem_tokens=MEM, read_memory=False)
    input_ids = ids_for(2, LENGTHS["short_last"])
    assert rel_err(logits(model, input_ids), ref.reference_rmt_logits(model, input_ids)) < 1e-10


@pytest.mark.parametrize("builder", [dm.build_rmt, dm.build_per_layer_memory_rmt])
def test_rmt_memory_is_carried(builder: Any) -> None:
    model = builder(base="llama", dtype=torch.float64, segment_size=SEG, num_mem_tokens=MEM)
    input_ids = ids_for(1, LENGTHS["full"])
    carried = logits(model, input_ids)
    separate = torch.cat([logits(model, input_ids[:, a : a + SEG]) for a in range(0, 3 * SEG, SEG)], dim=1)
    assert rel_err(carried[:, :SEG], separate[:, :SEG]) < 1e-12
    assert rel_err(carried[:, SEG:], separate[:, SEG:]) > 1e-3


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("read_memory", [True, False])
def test_per_layer_memory_rmt_matches_reference(base: str, read_memory: bool) -> None:
    model = dm.build_per_layer_memory_rmt(
        base=base, dtype=torch.float64, segment_size=SEG, num_mem_tokens=MEM, read_memory=read_memory
    )
    input_ids = ids_for(3, LENGTHS["short_last"])
    out = logits(model, input_ids)
    assert rel_err(out, ref.reference_per_layer_memory_logits(model, input_ids)) < 1e-10


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("num_mem_tokens", [0, 2])
def test_linear_memory_matches_reference(base: str, num_mem_tokens: int) -> None:
    model = dm.build_linear_memory(
        base=base, dtype=torch.float64, segment_size=SEG, d_key=8, num_mem_tokens=num_mem_tokens, w_v_std=0.1
    )
    input_ids = ids_for(2, SEG + 3)  # two segments, the last one short
    out = logits(model, input_ids)
    expected = ref.reference_linear_memory_logits(model, input_ids)
    assert rel_err(out, expected) < 1e-10
    no_memory = copy.deepcopy(model)
    for layer in no_memory.layers:
        nn.init.zeros_(layer.W_v.weight)
    assert rel_err(logits(no_memory, input_ids)[:, SEG:], expected[:, SEG:]) > 1e-3


# ---------------------------------------------------------------------------------------------------
# torch.compile: one graph, no breaks, module paths
# ---------------------------------------------------------------------------------------------------


def _compile_and_check(model: nn.Module, input_ids: torch.Tensor) -> torch.fx.GraphModule:
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(input_ids).logits
        compiled = torch.compile(model, backend=recording_backend, fullgraph=True)(input_ids).logits
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert rel_err(compiled, eager) < 1e-6
    return graphs[0]


def _wrapper_calls(gm: torch.fx.GraphModule, wrapper: type) -> set[tuple[str, int]]:
    """(module path, call index) of every ``wrapper`` entry in the graph's nn_module_stack metadata."""
    calls = set()
    for node in gm.graph.nodes:
        for key, (path, cls) in (node.meta.get("nn_module_stack") or {}).items():
            if cls is wrapper or getattr(cls, "__name__", str(cls)).endswith(wrapper.__name__):
                call = int(key.rsplit("@", 1)[1]) if "@" in key else 0
                calls.add((path, call))
    return calls


@pytest.mark.parametrize(
    "base, builder, wrapper, list_name",
    [
        ("llama", dm.build_armt, dm.AssociativeLayer, "layers"),
        ("gpt2", dm.build_armt, dm.AssociativeLayer, "h"),
        ("llama", dm.build_linear_memory, dm.LinearMemoryLayer, "layers"),
    ],
)
def test_compile_single_graph_with_layer_paths(base: str, builder: Any, wrapper: type, list_name: str) -> None:
    model = builder(base=base, segment_size=SEG)
    gm = _compile_and_check(model, ids_for(2, 3 * SEG))
    calls = _wrapper_calls(gm, wrapper)
    pattern = re.compile(rf"\.{list_name}\.(\d+)$")
    seen = set()
    for path, call in calls:
        match = pattern.search(path)
        assert match, path
        seen.add((int(match.group(1)), call))
    assert seen == {(layer, seg) for layer in range(2) for seg in range(3)}


def test_compile_rmt_single_graph() -> None:
    model = dm.build_rmt(base="llama", segment_size=SEG)
    _compile_and_check(model, ids_for(2, 3 * SEG))


# ---------------------------------------------------------------------------------------------------
# Builders, configs, from_pretrained
# ---------------------------------------------------------------------------------------------------


def test_llama_configs() -> None:
    c1 = dm.llama_3_2_1b_config()
    assert (c1.vocab_size, c1.hidden_size, c1.intermediate_size) == (128256, 2048, 8192)
    assert (c1.num_hidden_layers, c1.num_attention_heads, c1.num_key_value_heads) == (16, 32, 8)
    assert c1.tie_word_embeddings and c1.max_position_embeddings == 131072
    assert c1._attn_implementation == "sdpa"
    theta = getattr(c1, "rope_theta", None) or c1.rope_parameters["rope_theta"]
    assert theta == 500000.0
    c3 = dm.llama_3_2_3b_config()
    assert (c3.hidden_size, c3.num_hidden_layers, c3.num_attention_heads, c3.head_dim) == (3072, 28, 24, 128)
    assert dm.llama_3_2_1b_config(num_hidden_layers=2).num_hidden_layers == 2


def test_tiny_armt_defaults_and_determinism() -> None:
    a, b = dm.tiny_armt(), dm.tiny_armt()
    assert not a.training
    assert a.layers_path == "model.layers"
    assert all(layer.W_mv.weight.abs().sum() > 0 for layer in a.layers)
    input_ids = ids_for(1, 40)
    assert torch.equal(logits(a, input_ids), logits(b, input_ids))
    assert not torch.equal(logits(dm.tiny_armt(seed=1), input_ids), logits(a, input_ids))


def test_build_with_explicit_config() -> None:
    model = dm.build_armt(base="qwen2", config=dm.tiny_qwen2_config(num_hidden_layers=3, hidden_size=32))
    assert model.num_layers == 3 and model.d_model == 32
    assert logits(model, ids_for(1, 20)).shape == (1, 20, 128)


def test_armt_from_pretrained_round_trip(tmp_path: Any) -> None:
    base = dm.build_base("llama", dtype=torch.float32, seed=3)
    base.save_pretrained(tmp_path)
    fresh = dm.build_base("llama", dtype=torch.float32, seed=3)
    expected = dm.ARMT(fresh, segment_size=SEG, num_mem_tokens=MEM, d_mem=D_MEM)
    for layer in expected.layers:
        nn.init.normal_(layer.W_mv.weight, std=0.05)

    loaded = dm.armt_from_pretrained(
        tmp_path, segment_size=SEG, num_mem_tokens=MEM, d_mem=D_MEM, torch_dtype=torch.float32
    )
    assert not loaded.training
    assert all(layer.W_mv.weight.abs().sum() == 0 for layer in loaded.layers)  # reference-code init
    missing, unexpected = loaded.load_state_dict(expected.state_dict(), strict=True)
    assert not missing and not unexpected
    input_ids = ids_for(2, LENGTHS["short_last"])
    assert rel_err(logits(loaded, input_ids), logits(expected, input_ids)) < 1e-6

    loaded64 = dm.armt_from_pretrained(tmp_path, segment_size=SEG, num_mem_tokens=MEM, torch_dtype=torch.float64)
    assert loaded64.memory.dtype == torch.float64 and loaded64.layers[0].W_mq.weight.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [dm.build_armt, dm.build_rmt, dm.build_linear_memory])
def test_bad_inputs(builder: Any) -> None:
    model = builder(base="llama")
    with pytest.raises(ValueError):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError):
        model([[1, 2, 3]])
    with pytest.raises(ValueError):
        model(torch.zeros(4, dtype=torch.long))


def test_bad_constructor_arguments() -> None:
    base = dm.build_base("llama")
    with pytest.raises(ValueError):
        dm.ARMT(base, segment_size=0, num_mem_tokens=2)
    with pytest.raises(ValueError):
        dm.ARMT(dm.build_base("llama"), segment_size=8, num_mem_tokens=0)
    with pytest.raises(ValueError):
        dm.RMT(dm.build_base("llama"), segment_size=8, num_mem_tokens=0)
    with pytest.raises(ValueError):
        dm.build_armt(base="bert")
