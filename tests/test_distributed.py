"""``diagpass.compile(..., options={"pipeline": True})``: the layers split over the ranks of a gloo
process group, started here with ``torch.multiprocessing`` (spawn). Every rank's outputs and
final state must equal the single-process program's (the same plan, on one process) and the
sequential eager model's, and be the same on every rank."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diagpass
from diagpass.distributed import Stages, disable_multicast, single_process_twin
from tests.helpers import logits_of, max_rel_err, state_of

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
OPTIONS = {"pipeline": True, "compiler": "eager"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ids(length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _check_model(model: torch.nn.Module, segment: int, lengths: list[int]) -> dict[str, Any]:
    """On one rank: compile pipelined, run ``lengths``; each against the single-process twin
    (same plan) and the eager model, outputs and final state. Returns what the parent checks."""
    vocab = model.config.vocab_size
    fast = diagpass.compile(model, _ids(3 * segment, vocab, 0), options=OPTIONS)
    twin = single_process_twin(fast)
    runs = []
    for i, length in enumerate(lengths):
        ids = _ids(length, vocab, 10 + i)
        with torch.no_grad():
            eager = logits_of(model(ids)).clone()
            eager_state = state_of(model)
            single = logits_of(twin(ids)).clone()
            single_state = state_of(model)
            for module in model.modules():  # the pipeline must write the state itself
                for name in ("W_mem", "z", "S"):
                    if isinstance(module.__dict__.get(name), torch.Tensor):
                        setattr(module, name, torch.full_like(module.__dict__[name], float("nan")))
            piped = logits_of(fast(ids)).clone()
            piped_state = state_of(model)
        record = fast.report.runs[-1]
        assert len(piped_state) == len(single_state) == len(eager_state) > 0
        runs.append(
            {
                "length": length,
                "path": record.path,
                "vs_single": max_rel_err(piped, single),
                "vs_eager": max_rel_err(piped, eager),
                "single_vs_eager": max_rel_err(single, eager),
                "state_vs_single": max(max_rel_err(a, b) for a, b in zip(piped_state, single_state)),
                "state_vs_eager": max(max_rel_err(a, b) for a, b in zip(piped_state, eager_state)),
                "shape_ok": piped.shape == eager.shape,
                "logits": piped,
                "stats": None if record.stats is None else vars(record.stats),
            }
        )
    refused = ""
    try:  # autograd on (the parameters require grad): refused, clearly
        fast(_ids(2 * segment, vocab, 99))
    except diagpass.ConfigError as error:
        refused = str(error)
    return {"runs": runs, "report": str(fast.report), "pipeline": fast.report.pipeline, "refused": refused}


def _cases(name: str, world: int) -> dict[str, Any]:
    from diagpass import models

    if name == "armt":  # 2 layers: one per rank; a short last segment; a single segment (the model itself)
        armt = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8)
        return {"armt": _check_model(armt, 8, [40, 40, 37, 8])}
    if name == "linear":
        linear = models.build_linear_memory(segment_size=8, d_key=8)
        return {"linear": _check_model(linear, 8, [29, 29, 56])}
    if name == "four":
        # One model keeps the 4-process test within the CI budget on 2 cores: 5 GPT-2 layers give
        # uneven stages, and a short last segment.
        gpt2 = models.build_armt(base="gpt2", config=models.tiny_gpt2_config(n_layer=5), segment_size=8, num_mem_tokens=2, d_mem=8)
        result = {"gpt2": _check_model(gpt2, 8, [61])}
        too_many = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8)  # 2 layers over 4 ranks
        try:
            diagpass.compile(too_many, _ids(24, too_many.config.vocab_size, 0), options=OPTIONS)
            result["too_many"] = ""
        except diagpass.ConfigError as error:
            result["too_many"] = str(error)
        return result
    raise ValueError(name)


def _worker(rank: int, world: int, init: str, case: str, out: str) -> None:
    disable_multicast()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_cases(case, world), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(case: str, world: int) -> list[dict[str, Any]]:
    out = tempfile.mkdtemp(prefix="diagpass-dist-")
    try:
        mp.spawn(_worker, args=(world, f"tcp://127.0.0.1:{_free_port()}", case, out), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _assert_exact(results: list[dict[str, Any]], model: str, world: int) -> None:
    first = results[0][model]
    for rank, result in enumerate(results):
        mine = result[model]
        assert mine["pipeline"] is not None and mine["pipeline"].startswith(f"{world} stages: rank 0 layer")
        assert f"pipelined over {world} stages" in mine["report"]
        assert "inference only" in mine["refused"], mine["refused"]
        for index, run in enumerate(mine["runs"]):
            where = f"{model}, rank {rank}, {run['length']} tokens"
            assert run["shape_ok"], where
            assert run["vs_single"] <= TOL, f"{where}: against the single-process program {run['vs_single']:.2e}"
            assert run["vs_eager"] <= TOL, f"{where}: against eager {run['vs_eager']:.2e}"
            assert run["state_vs_single"] <= TOL, f"{where}: final state against the single-process program"
            assert run["state_vs_eager"] <= TOL, f"{where}: final state against eager"
            # Every rank returns the same outputs: broadcast from the owner, bit for bit.
            assert torch.equal(run["logits"], first["runs"][index]["logits"]), f"{where}: differs from rank 0's"
            if run["path"] == "eager":  # a single segment runs the model itself, on every rank
                continue
            stats = run["stats"]
            assert stats["rank"] == rank and stats["stages"] == mine["pipeline"]
            assert stats["metadata_exchanged"] == (index == 0 or run["length"] != mine["runs"][index - 1]["length"])
            assert (stats["sent"] > 0) == (rank < world - 1), stats
            assert (stats["received"] > 0) == (rank > 0), stats
            assert stats["broadcast_bytes"] > 0
    layers = [r[model]["runs"][0]["stats"]["layers"] for r in results]
    assert [l for ls in layers for l in ls] == list(range(len([l for ls in layers for l in ls])))


# -- quick: no process group needed -------------------------------------------------------------


def test_stages_split_contiguous_and_balanced() -> None:
    stages = Stages.split(7, 3, rank=1)
    assert stages.bounds == ((0, 3), (3, 5), (5, 7)) and list(stages.layers()) == [3, 4]
    assert stages.describe() == "3 stages: rank 0 layers 0-2, rank 1 layers 3-4, rank 2 layers 5-6"
    assert [stages.of_phase(p) for p in range(15)] == [None, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    with pytest.raises(diagpass.ConfigError, match="3 ranks but the model has 2 layers"):
        Stages.split(2, 3, rank=0)


def test_pipeline_needs_a_process_group() -> None:
    from diagpass import models

    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8)
    assert not dist.is_initialized()
    with pytest.raises(diagpass.ConfigError, match="process group is not initialised.*torchrun"):
        diagpass.compile(model, torch.randint(0, 128, (1, 24)), options=OPTIONS)
    with pytest.raises(diagpass.ConfigError, match="'pipeline' must be a bool"):
        diagpass.compile(model, torch.randint(0, 128, (1, 24)), options={"pipeline": "yes"})
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=OPTIONS)
    with pytest.raises(diagpass.ConfigError, match="'pipeline' is for diagpass.compile"):
        with torch.no_grad():
            compiled(torch.randint(0, 128, (1, 24)))


# -- ranks over gloo ----------------------------------------------------------------------------


def test_two_ranks_equal_the_single_process_program_and_eager() -> None:
    """tiny ARMT over 2 gloo ranks, each length run twice (the second run moves tensors only)."""
    _assert_exact(_spawn("armt", 2), "armt", 2)


@pytest.mark.slow
def test_two_ranks_linear_memory() -> None:
    """Another zoo model: the linear-memory transformer (state ``S``, ``z``) over 2 ranks."""
    _assert_exact(_spawn("linear", 2), "linear", 2)


@pytest.mark.slow
def test_four_ranks_equal_the_single_process_program_and_eager() -> None:
    """4 ranks: ARMT on 5 GPT-2 layers (uneven stages, a short last segment); 2 layers over 4 ranks
    is refused."""
    results = _spawn("four", 4)
    _assert_exact(results, "gpt2", 4)
    assert [r["gpt2"]["runs"][0]["stats"]["layers"] for r in results] == [(0, 1), (2,), (3,), (4,)]
    for result in results:
        assert "4 ranks but the model has 2 layers" in result["too_many"], result["too_many"]


@pytest.mark.slow
def test_example_under_torchrun() -> None:
    """``torchrun --nproc-per-node=2 examples/multi_gpu.py --device cpu --check`` exits 0."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [torchrun, "--nproc-per-node=2", f"--master-port={_free_port()}", "examples/multi_gpu.py", "--device", "cpu", "--check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "check passed" in done.stdout
