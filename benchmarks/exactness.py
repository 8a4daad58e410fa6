"""Exactness at scale, per segment, against an fp64 reference (DESIGN.md §8.5).

A random ARMT is chaotic: rounding differences grow from segment to segment, so one number for
the whole sequence says little. :func:`segment_check` reports, for every segment, the relative
error of the output against the same model run sequentially in fp64, for

  eager fp32    the sequential model in fp32 (its own rounding: the noise curve)
  diag fp32     diagpass.compile's program in fp32
  eager <dt>    the sequential model in the benchmark's dtype (bf16)
  diag <dt>     diagpass's program in that dtype (the callable the benchmark timed)

diagpass is exact when its curve follows the eager curve of the same dtype.

    python benchmarks/prefill.py --diag-via compile --lengths 32768 --peers diagbatch --check
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

import diagpass


def _output(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def per_segment_error(out: torch.Tensor, ref: torch.Tensor, segment: int) -> list[float]:
    """``|out_s - ref_s| / |ref_s|`` (Frobenius) for each segment ``s`` of the token dim (dim 1)."""
    errors = []
    for start in range(0, ref.shape[1], segment):
        a = out[:, start : start + segment].double()
        b = ref[:, start : start + segment].double()
        errors.append(((a - b).norm() / b.norm().clamp_min(1e-300)).item())
    return errors


def segment_check(
    model: torch.nn.Module, compiled: Callable[[torch.Tensor], Any], ids: torch.Tensor, *, segment: int, options: dict[str, Any]
) -> dict[str, Any]:
    """Per-segment errors against fp64 (see the module docstring). ``model`` is the benchmark's
    model (its dtype), ``compiled`` diagpass's callable on it; fp32 and fp64 copies are made here
    (the fp32 program is compiled with ``options`` on a 3-segment probe)."""
    dtype = next(model.parameters()).dtype
    name = str(dtype).replace("torch.", "")
    curves: dict[str, list[float]] = {}
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()
        reference = _output(ref64(ids)).clone()
        del ref64
        model32 = copy.deepcopy(model).float()
        curves["eager fp32"] = per_segment_error(_output(model32(ids)), reference, segment)
        fast32 = diagpass.compile(model32, ids[:, : 3 * segment], options=options)
        curves["diag fp32"] = per_segment_error(_output(fast32(ids)), reference, segment)
        del model32, fast32
        if dtype != torch.float32:
            curves[f"eager {name}"] = per_segment_error(_output(model(ids)), reference, segment)
            curves[f"diag {name}"] = per_segment_error(_output(compiled(ids)), reference, segment)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print_curves(curves)
    worst = {k: max(v) for k, v in curves.items()}
    # diagpass against the eager curve of its dtype: the ratio of their worst errors.
    ratio = {
        key: worst[f"diag {key}"] / max(worst[f"eager {key}"], 1e-300) for key in ("fp32", name) if f"diag {key}" in worst
    }
    return {"per_segment": curves, "worst": worst, "diag_over_eager": ratio}


def print_curves(curves: dict[str, list[float]]) -> None:
    names = list(curves)
    print("    per-segment relative error against fp64 eager")
    print("    " + f"{'segment':>7} " + " ".join(f"{n:>12}" for n in names))
    for s in range(len(next(iter(curves.values())))):
        print("    " + f"{s:>7} " + " ".join(f"{curves[n][s]:12.3e}" for n in names))
