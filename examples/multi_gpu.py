"""ARMT pipelined over the ranks of ``torchrun``: one stage of contiguous layers per rank.

    torchrun --nproc-per-node=2 examples/multi_gpu.py --device cpu --check    # gloo; exit 0 only when exact
    torchrun --nproc-per-node=2 examples/multi_gpu.py --device cuda           # NCCL, one GPU per rank, timed

``diagpass.compile(model, probe, options={"pipeline": True})`` splits the layers over the ranks of
the default process group. Every rank holds the model and calls the compiled module with the same
input; each runs the diagonal schedule for its own layers' cells, and the hidden states leaving a
stage travel to the next by ``isend``/``irecv``. Every rank returns the same outputs and ends with
every layer's final memory state, as the single-process program leaves them.

``--check`` compares, on every rank, the outputs and the final state with the single-process
program (the same compiled plan, on one process) and with the sequential eager model. With
``--device cuda`` each rank takes the GPU ``LOCAL_RANK``, and the run is timed (CUDA events,
warm-up runs, medians) with its split per rank: compute, communication (stalled on a receive, the
final broadcast) and idle. NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, set before the process group starts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch
import torch.distributed as dist

import diagpass
from diagpass import models
from diagpass.distributed import PipelineRunStats, disable_multicast, single_process_twin


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--check", action="store_true", help="compare with the single-process program and eager; exit 1 if not equal")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on cpu, 16 on cuda)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: 64 on cpu, 2048 on cuda)")
    parser.add_argument("--segment-size", type=int, default=None, help="tokens per segment (default: 8 on cpu, 1024 on cuda)")
    parser.add_argument("--segments", type=int, default=None, help="segments of the timed input (default: 7 on cpu, 16 on cuda)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compiler", choices=["eager", "inductor"], default=None, help="step compiler (default: eager on cpu)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    return parser.parse_args()


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The same random ARMT on every rank (same seed)."""
    cpu = device.type == "cpu"
    layers = args.layers or (4 if cpu else 16)
    hidden = args.hidden or (64 if cpu else 2048)
    segment = args.segment_size or (8 if cpu else 1024)
    config = models.tiny_llama_config(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden if cpu else 4 * hidden,
        num_attention_heads=4 if cpu else hidden // 64,
        num_key_value_heads=2 if cpu else hidden // 256,
        vocab_size=128 if cpu else 32000,
        max_position_embeddings=max(512, 2 * segment),
    )
    dtype = getattr(torch, args.dtype)
    model = models.build_armt(
        config=config, segment_size=segment, num_mem_tokens=2 if cpu else 128, d_mem=8 if cpu else 64, dtype=dtype, device=device
    )
    return model, segment


def final_state(fast: diagpass.AnyLengthModel) -> dict[str, torch.Tensor]:
    """Every tensor attribute the forward writes back (the memory of every layer)."""
    state = {}
    for path in fast.report.state_writes:
        owner, _, name = path.rpartition(".")
        value = getattr(fast.model.get_submodule(owner), name)
        if isinstance(value, torch.Tensor):
            state[path] = value.detach().clone()
    return state


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check(fast: diagpass.AnyLengthModel, ids: torch.Tensor, tol: float) -> bool:
    """Outputs and final state against the single-process program and sequential eager."""
    rank = dist.get_rank()
    with torch.no_grad():
        eager = logits_of(fast.model(ids)).clone()
        eager_state = final_state(fast)
        single = logits_of(single_process_twin(fast)(ids)).clone()
        single_state = final_state(fast)
        piped = logits_of(fast(ids)).clone()
        piped_state = final_state(fast)
    errors = {
        "outputs vs single-process program": max_rel_err(piped, single),
        "outputs vs eager": max_rel_err(piped, eager),
        "state vs single-process program": max(max_rel_err(piped_state[k], single_state[k]) for k in single_state),
        "state vs eager": max(max_rel_err(piped_state[k], eager_state[k]) for k in eager_state),
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, piped.cpu())
    same = all(torch.equal(gathered[0], other) for other in gathered)
    ok = same and len(piped_state) > 0 and all(err <= tol for err in errors.values())
    text = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    print(f"[rank {rank}] {fast.report.runs[-1].stats.stages}: {text}; same outputs on every rank: {same}", flush=True)
    return ok


def timed(fast: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, device: torch.device) -> tuple[float, list[Any]]:
    """Median wall time of a call (CUDA events on a GPU) and the stats of the timed calls."""
    import time

    times, stats = [], []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            dist.barrier()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fast(ids)
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                fast(ids)
                seconds = time.perf_counter() - begin
            if i >= args.warmup:
                times.append(seconds)
                stats.append(fast.report.runs[-1].stats)
    return statistics.median(times), stats


def main() -> int:
    args = parse_args()
    disable_multicast()  # before the process group starts
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model, segment = build_model(args, device)
        vocab = model.config.vocab_size
        make = torch.Generator().manual_seed(0)
        probe = torch.randint(0, vocab, (1, 3 * segment), generator=make).to(device)
        compiler = args.compiler or ("eager" if args.device == "cpu" else "inductor")
        fast = diagpass.compile(model, probe, options={"pipeline": True, "compiler": compiler})
        if rank == 0:
            print(f"compiled: {fast.report.pipeline}", flush=True)
        segments = args.segments or (7 if args.device == "cpu" else 16)
        ids = torch.randint(0, vocab, (1, segments * segment - segment // 2), generator=make).to(device)
        ok = True
        if args.check:
            tol = 1e-5 if args.device == "cpu" and args.dtype == "float32" else 2e-2 if args.dtype == "bfloat16" else 1e-4
            ok = check(fast, ids, tol)
        fast.program.timing = True  # type: ignore[attr-defined]
        wall, stats = timed(fast, ids, args, device)
        single_wall, _ = timed(single_process_twin(fast), ids, args, device)
        median = {
            k: statistics.median(getattr(s, k) for s in stats if isinstance(s, PipelineRunStats))
            for k in ("total_s", "compute_s", "recv_wait_s", "broadcast_s")
        }
        line = PipelineRunStats(
            segments=0, last_length=0, steps=0, batched_calls=0, compile_s=0.0, rank=rank, layers=stats[-1].layers, **median
        ).timing_line()
        lines: list[Any] = [None] * world
        dist.all_gather_object(lines, (line, wall, single_wall))
        if rank == 0:
            print(f"{ids.shape[1]} tokens, {segments} segments, {args.dtype}, {world} ranks ({args.device}), medians of {args.iters}:")
            for text, rank_wall, rank_single in lines:
                print(f"  {text}; call {rank_wall * 1e3:.2f} ms (one process alone: {rank_single * 1e3:.2f} ms)")
        flags = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        ok = bool(flags.item())
        if args.check and rank == 0:
            print("check passed" if ok else "check FAILED", flush=True)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
