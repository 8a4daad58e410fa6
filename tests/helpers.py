"""Shared test helpers: compile with diagbatch and compare against sequential eager."""

from __future__ import annotations

import copy
from typing import Any

import torch

import diagpass


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-relative error, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of the reference."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out.logits if hasattr(out, "logits") else out


def state_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every reassigned tensor attribute of the model's layer wrappers (recurrent state)."""
    states = []
    for module in model.modules():
        for name in ("W_mem", "z", "S", "mem", "memory_state"):
            value = module.__dict__.get(name)
            if isinstance(value, torch.Tensor):
                states.append(value.detach().clone())
    return states


def float64_noise(model: torch.nn.Module, *args: Any) -> float:
    """How far sequential eager float32 is from float64 on these inputs (output and state).

    ARMT's read divides by ``q . z + 1e-5``; on some random models that is tiny and
    float32 rounding is amplified. The noise floor says how exact "exact" can be.
    """
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        out32, state32 = logits_of(model(*args)).clone(), state_of(model)
        out64, state64 = logits_of(model64(*args)), state_of(model64)
    return max([max_rel_err(out32, out64)] + [max_rel_err(a, b) for a, b in zip(state32, state64)])


def compare_low_precision(
    model: torch.nn.Module, *args: Any, options: dict[str, Any] | None = None
) -> tuple[diagpass.CompileRecord, float, float]:
    """bf16/fp16: diagbatch must be as close to a float32 run as sequential eager is.

    Returns the record, diagbatch's error and eager's error, both against float32.
    """
    reference = copy.deepcopy(model).float()
    with torch.no_grad():
        expected = logits_of(reference(*args)).clone()
        eager = logits_of(model(*args)).clone()
        compiled = torch.compile(model, backend="diagbatch", options=options or {"compiler": "eager"}, dynamic=False)
        actual = logits_of(compiled(*args))
    record = diagpass.last_compile()
    diag_err, eager_err = rel_err(actual, expected), rel_err(eager, expected)
    assert actual.dtype == eager.dtype
    assert diag_err <= 2 * eager_err + 1e-3, f"diagbatch {diag_err:.3e} vs eager {eager_err:.3e} (against float32)"
    return record, diag_err, eager_err


def compile_and_compare(
    model: torch.nn.Module,
    *args: Any,
    options: dict[str, Any] | None = None,
    tol: float = 1e-5,
    noise_aware: bool = False,
    **kwargs: Any,
) -> diagpass.CompileRecord:
    """Run eager, then diagbatch; assert outputs and final state agree; return the record.

    ``noise_aware``: where sequential float32 itself is further than ``tol/3`` from
    float64 (an ill-conditioned random model), allow 3x that noise instead of ``tol``.
    """
    if noise_aware:
        tol = max(tol, 3 * float64_noise(model, *args))
    with torch.no_grad():
        expected = logits_of(model(*args, **kwargs)).clone()
        expected_state = state_of(model)
        compiled = torch.compile(model, backend="diagbatch", options=options or {"compiler": "eager"}, dynamic=False)
        actual = logits_of(compiled(*args, **kwargs))
    record = diagpass.last_compile()
    assert record is not None
    assert actual.shape == expected.shape
    err = max_rel_err(actual, expected)
    assert err <= tol, f"output differs from eager: max rel err {err:.3e} > {tol:.1e}\n{record}"
    actual_state = state_of(model)
    assert len(actual_state) == len(expected_state)
    for got, want in zip(actual_state, expected_state):
        state_err = max_rel_err(got, want)
        assert state_err <= tol, f"final recurrent state differs: {state_err:.3e}"
    return record


# --- gradients (the training tests) -------------------------------------------------------------


def training_loss(out: Any) -> torch.Tensor:
    """The model's own loss where it returns one, else a loss that reads every logit."""
    if isinstance(out, dict) and out.get("loss") is not None:
        return out["loss"]
    return logits_of(out).float().square().mean()


def loss_and_grads(model: torch.nn.Module, call: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``call()``'s loss and the gradient of every parameter that got one."""
    model.zero_grad(set_to_none=True)
    loss = training_loss(call())
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def drop_autograd_history(model: torch.nn.Module) -> None:
    """The state a run left may have autograd history: drop it, so the model can be copied."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, name, value.detach())


def assert_gradients_close(
    model: torch.nn.Module, run: Any, eager: Any
) -> dict[str, torch.Tensor]:
    """Loss and gradients of ``run()`` against ``eager(model)``, within 1e-5 relative or three times
    eager fp32's own distance from fp64 (a random ARMT amplifies rounding). Returns ``run``'s gradients."""
    loss, grads = loss_and_grads(model, run)
    want_loss, want = loss_and_grads(model, lambda: eager(model))
    drop_autograd_history(model)
    model64 = copy.deepcopy(model).double()
    _, grads64 = loss_and_grads(model64, lambda: eager(model64))
    assert grads.keys() == want.keys() and grads
    for name in want:
        bound = max(1e-5, 3 * max_rel_err(want[name], grads64[name].float()))
        assert max_rel_err(grads[name], want[name]) <= bound, name
    assert max_rel_err(loss, want_loss) <= 1e-5
    return grads
