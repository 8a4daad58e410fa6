"""GPU-only checks of the paths CPU CI cannot reach: Inductor/Triton steps and CUDA graphs.

Skipped without CUDA; run them on a GPU with `python -m pytest tests/test_gpu.py -q`.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from diagpass import models
from tests.helpers import compare_low_precision, compile_and_compare
from tests.reference_style import ReferenceStyleARMT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ids(batch: int, length: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).cuda()


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_gpu_fp32_exact(cudagraphs: bool) -> None:
    model = ReferenceStyleARMT(layers=4, segment_size=8, width=32, heads=4).cuda()
    record = compile_and_compare(
        model, _ids(2, 45), options={"compiler": "inductor", "cudagraphs": cudagraphs}, noise_aware=True
    )
    assert record.applied and record.num_steps == 4 + 6 - 1
    assert record.batched_gemms > 0
    if cudagraphs:
        assert counters["diagpass"]["cuda_graph_replays"] > 0


def test_gpu_zoo_armt_bf16_within_sequential_noise() -> None:
    model = models.build_armt(segment_size=32, num_mem_tokens=8, d_mem=16, dtype=torch.bfloat16, device="cuda")
    record, diag_err, eager_err = compare_low_precision(
        model, _ids(1, 150, vocab=model.config.vocab_size), options={"compiler": "inductor"}
    )
    assert record.applied and eager_err > 0
