"""Autograd through ``diagpass.compile``'s diagonal program (issue "Training through the diagonal
schedule", first part): the loss and every gradient equal the sequential eager model's."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diagpass
from diagpass import models
from tests.helpers import assert_gradients_close, logits_of, loss_and_grads, max_rel_err
from tests.reference_style import ReferenceStyleARMT
from tests.reroll_models import PerSegmentKeys


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_gradients_match(model: torch.nn.Module, ids: torch.Tensor, probe: torch.Tensor, **kwargs: Any) -> diagpass.AnyLengthModel:
    """Loss and gradients of the diagonal program against eager (:func:`assert_gradients_close`)."""
    fast = diagpass.compile(model, probe, **({"labels": probe} if kwargs else {}), options={"compiler": "eager"})
    call_kwargs = {"labels": ids} if kwargs else {}
    assert_gradients_close(model, lambda: fast(ids, **call_kwargs), lambda m: m(ids, **call_kwargs))
    run = fast.report.runs[-1]
    assert run.path == "diagonal" and run.autograd, run
    return fast


def test_reference_style_gradients_match_eager() -> None:
    model = ReferenceStyleARMT(layers=3, segment_size=4, num_mem_tokens=2)
    assert_gradients_match(model, _ids(2, 30, 64, seed=1), _ids(2, 12, 64))


def test_zoo_armt_gradients_match_eager_and_a_frozen_base() -> None:
    model = models.build_armt(segment_size=8, num_mem_tokens=4, d_mem=8)
    vocab = model.config.vocab_size
    assert_gradients_match(model, _ids(2, 61, vocab, seed=1), _ids(2, 24, vocab))
    for name, param in model.named_parameters():  # frozen base, trainable memory
        param.requires_grad_("W_m" in name or name == "memory")
    torch._dynamo.reset()
    fast = assert_gradients_match(model, _ids(2, 61, vocab, seed=2), _ids(2, 24, vocab))
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert fast.training_program is not None and not fast.training_program.config.lane_views


def test_per_segment_loss_gradients_match() -> None:
    """The reference wrapper's structure: the loss over all segments' logits, returned with the
    per-segment keys; ``loss.backward()`` through the diagonal program."""
    model = PerSegmentKeys(layers=2, segment_size=4, num_mem_tokens=2)
    assert_gradients_match(model, _ids(2, 30, 64, seed=3), _ids(2, 12, 64), labels=True)


def test_no_grad_still_runs_the_inference_program() -> None:
    model = ReferenceStyleARMT(layers=2, segment_size=4, num_mem_tokens=2)
    fast = diagpass.compile(model, _ids(1, 12, 64), options={"compiler": "eager"})
    with torch.no_grad():
        fast(_ids(1, 20, 64))
    assert not fast.report.runs[-1].autograd
    fast(_ids(1, 20, 64))
    assert fast.report.runs[-1].autograd


@settings(max_examples=4)
@given(
    layers=st.integers(1, 3),
    segments=st.integers(2, 6),
    short_last=st.integers(0, 3),
    batch=st.integers(1, 2),
    trains=st.sampled_from(["all", "memory", "layers"]),
)
def test_property_gradients_match(layers: int, segments: int, short_last: int, batch: int, trains: str) -> None:
    torch._dynamo.reset()
    model = ReferenceStyleARMT(layers=layers, segment_size=4, num_mem_tokens=2)
    for name, param in model.named_parameters():
        param.requires_grad_(trains == "all" or (trains == "memory") == ("W_m" in name or name == "memory"))
    if not any(p.requires_grad for p in model.parameters()):
        pytest.skip("nothing trains")
    assert_gradients_match(model, _ids(batch, segments * 4 - short_last, 64, seed=segments), _ids(batch, 12, 64))


def test_recall_task_trains_through_the_diagonal_program() -> None:
    """The smallest real ARMT workload: a few optimizer steps through the training program lower
    the loss, and the trained model predicts the same at 2x the length sequentially and diagonally
    (``examples/train_recall.py`` trains it to well above chance: 2000 steps, about 3 minutes)."""
    import torch.nn.functional as F

    from diagpass.recall import RecallTask, recall_accuracy

    torch.manual_seed(0)
    task = RecallTask(segment_size=8, segments=3)
    model = models.build_armt(config=models.tiny_llama_config(), segment_size=8, num_mem_tokens=2, d_mem=8)
    generator = torch.Generator().manual_seed(0)
    probe, _ = task.sample(8, generator)
    fast = diagpass.compile(model, probe, options={"compiler": "eager"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        ids, target = task.sample(8, generator)
        loss = F.cross_entropy(fast(ids).logits[:, -1], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert fast.report.runs[-1].autograd and fast.report.runs[-1].path == "diagonal"
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]  # from ~4.8 (uniform over 128) toward ln(8) and below
    longer = RecallTask(segment_size=8, segments=6)
    _, sequential = recall_accuracy(lambda ids: model(ids).logits, longer, batches=2, batch=8, seed=1)
    _, diagonal = recall_accuracy(lambda ids: fast(ids).logits, longer, batches=2, batch=8, seed=1)
    assert torch.equal(sequential, diagonal)


@pytest.mark.slow
def test_inductor_training_steps_compile_forward_and_backward() -> None:
    """The default step compiler: each training step is compiled by Inductor, forward and
    backward (AOTAutograd), and the loss and gradients still equal eager's."""
    from torch._dynamo.utils import counters

    model = models.tiny_armt()  # 2 layers, segments of 16
    ids = _ids(2, 64, 128)
    counters.clear()
    fast = diagpass.compile(model, ids[:, :48])
    loss, grads = loss_and_grads(model, lambda: fast(ids))
    run = fast.report.runs[-1]
    assert run.path == "diagonal" and run.autograd, run
    assert counters["diagpass"]["training_step_compiles"] >= 2  # the first-segment cell and the steady steps
    assert counters["aot_autograd"]["total"] >= 2  # each went through AOTAutograd (forward + backward)
    want_loss, want = loss_and_grads(model, lambda: model(ids))
    assert grads.keys() == want.keys() and grads
    assert max_rel_err(loss, want_loss) <= 1e-5
    for name in want:
        assert max_rel_err(grads[name], want[name]) <= 1e-4, name


def test_weights_in_stack_trains_exactly_without_a_stacked_copy() -> None:
    """``weights_in_stack``: the layers' weights move into the stacks (no second copy), gradients
    still equal eager's, and an optimizer step writes the stack itself (nothing is restacked)."""
    from torch._dynamo.utils import counters

    model = models.tiny_armt()
    twin = copy.deepcopy(model)
    ids = _ids(2, 56, 128)
    fast = diagpass.compile(model, ids[:, :48], options={"compiler": "eager", "weights_in_stack": True})
    program = fast.training_program
    assert program is not None and program.stacks is fast.program.stacks  # one set of stacks for both programs
    for step in range(2):
        loss, grads = loss_and_grads(model, lambda: fast(ids))
        want_loss, want = loss_and_grads(twin, lambda: twin(ids))
        assert fast.report.runs[-1].path == "diagonal" and fast.report.runs[-1].autograd
        assert max_rel_err(loss, want_loss) <= 1e-5 and grads.keys() == want.keys()
        for name in want:
            assert max_rel_err(grads[name], want[name]) <= 1e-5, (step, name)
        assert program.stacks.extra_bytes == 0
        stack = next(s for s in program.stacks._stacks if s is not None)
        layer_weight = model.layers[1].layer.mlp.down_proj.weight
        assert any(layer_weight.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in program.stacks._stacks)
        if step == 0:
            restacks = counters["diagpass"]["weight_restacks"]
        with torch.no_grad():  # an optimizer-like in-place step on both models
            for p, q in zip(model.parameters(), twin.parameters()):
                p.add_(p.grad, alpha=-0.1)
                q.add_(q.grad, alpha=-0.1)
        assert stack is next(s for s in program.stacks._stacks if s is not None)
    with torch.no_grad():  # inference reads the same (updated) stacks
        assert max_rel_err(logits_of(fast(ids)), logits_of(twin(ids))) <= 1e-5
    assert counters["diagpass"]["weight_restacks"] == restacks  # the in-place steps wrote the stacks
