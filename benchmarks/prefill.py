"""Prefill latency of ARMT: diagbatch against its peers (DESIGN.md §5).

    python benchmarks/prefill.py                          # H100, Llama-3.2-1B shapes, bf16
    python benchmarks/prefill.py --tiny --device cpu      # CI smoke test, < 60 s

Peers, all on the same random weights (W_mv non-zero) and the same inputs:
  full       full-attention Llama (SDPA) on the whole sequence
  eager      sequential ARMT, eager (the zoo model)
  layers     sequential ARMT, each decoder-layer wrapper torch.compile'd (torchtitan style)
  model      sequential ARMT, whole model torch.compile'd (only up to --model-max-len)
  diagbatch  torch.compile(backend="diagbatch")
  ablation   diagbatch's program with schedule="sequential" (one cell per step, same kernels; with
             --diag-via compile through diagpass.compile too)
  floor      FLOPs / measured bf16 matmul peak

Timing: CUDA events after warm-up, median of --repeats. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import diagpass
from diagpass import models
from exactness import segment_check
from kernel_kinds import kernel_kind

PEERS = ("full", "eager", "layers", "model", "diagbatch", "ablation")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, input and output options every benchmark script shares (read by :func:`settings`)."""
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, short inputs (smoke test)")
    p.add_argument("--config", default="llama-1b", choices=["llama-1b", "llama-3b", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--lengths", default=None, help="comma-separated token counts")
    p.add_argument("--segment", type=int, default=None, help="segment length T")
    p.add_argument("--mem", type=int, default=None, help="memory tokens m")
    p.add_argument("--d-mem", type=int, default=None)
    p.add_argument(
        "--w-mv-std",
        type=float,
        default=0.005,
        help="std of the non-zero W_mv init (larger values make random bf16 ARMT diverge at long inputs)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--options", default="{}", help="JSON options for diagbatch / diagpass.compile")
    p.add_argument("--compiler", default=None, choices=["inductor", "eager"], help="step compiler (tiny: eager)")
    p.add_argument("--keep-lm-head", action="store_true", help="keep the LM head (default: Identity, as DESIGN §3)")
    p.add_argument("--json", default=None, help="write results here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed calls after the first (diagbatch: a watched run, then the CUDA-graph capture)"
    )
    p.add_argument(
        "--layers-scope",
        default="decoder",
        choices=["decoder", "wrapper"],
        help="what the per-layer peer compiles: the HF decoder layer, or the whole ARMT layer wrapper (memory ops too)",
    )
    p.add_argument("--model-max-len", type=int, default=4096, help="longest input for the whole-model compile peer")
    p.add_argument(
        "--diag-via",
        default="backend",
        choices=["backend", "compile"],
        help="diagbatch through torch.compile (traces every length: minutes at 131K) or through "
        "diagpass.compile (a 3-segment probe traced once; the same steps)",
    )
    p.add_argument("--mode", default=None, help="torch.compile mode for diagbatch")
    p.add_argument(
        "--check",
        action="store_true",
        help="bf16 error of diagbatch vs eager next to SDPA-kernel noise; with --diag-via compile also, per segment, "
        "diagpass and eager (fp32 and the run's dtype) against an fp64 reference (benchmarks/exactness.py)",
    )
    p.add_argument(
        "--sdpa",
        default="default",
        choices=["default", "flash", "cudnn", "efficient"],
        help="SDPA kernel for diagbatch's steps (chosen when the steps are traced, on the first call)",
    )
    p.add_argument("--profile", action="store_true", help="profile one diagbatch run: GEMM / attention / other split")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    tiny = args.tiny or args.config == "tiny"
    config = {
        "llama-1b": models.llama_3_2_1b_config,
        "llama-3b": models.llama_3_2_3b_config,
        "tiny": lambda: models.tiny_llama_config(num_hidden_layers=2),
    }["tiny" if tiny else args.config]()
    return {
        "tiny": tiny,
        "config": config,
        "dtype": getattr(torch, args.dtype or ("float32" if tiny else "bfloat16")),
        "lengths": [int(x) for x in (args.lengths or ("48,96" if tiny else "4096,16384,32768,65536,131072")).split(",")],
        "segment": args.segment or (16 if tiny else 1024),
        "mem": args.mem or (4 if tiny else 128),
        "d_mem": args.d_mem or (8 if tiny else 64),
        "compiler": args.compiler or ("eager" if tiny else "inductor"),
    }


class Timer:
    """CUDA events on GPU, perf_counter on CPU; median of repeats after warm-up."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median(self, fn: Callable[[], Any], *, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timer.median(lambda: a @ b, warmup=3, repeats=10)
    return 2 * n**3 / seconds / 1e12


def armt_flops(config: Any, tokens: int, segment: int, mem: int, d_mem: int, batch: int) -> float:
    """Forward FLOPs of ARMT prefill: linear layers, in-segment causal attention, memory."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    layer_params = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * inter
    d_key = 2 * 3 * d_mem
    segments = math.ceil(tokens / segment)
    flops = 0.0
    for s in range(segments):
        t = min(segment, tokens - s * segment)
        rows = t + mem
        per_layer = 2 * rows * layer_params  # linear layers
        per_layer += 2 * rows * rows * heads * head_dim  # causal QK^T and PV (half of 4*R^2*D)
        per_layer += 2 * rows * (d * d_mem + d_key * d) if s else 0  # read: W_mq, q @ W_mem
        per_layer += 2 * mem * (d * d_mem + d * d + 2 * d_key * d)  # write: W_mk, W_mv, v_old, update
        flops += layers * per_layer
    return batch * flops


def build(settings_: dict[str, Any], device: torch.device, w_mv_std: float) -> tuple[Any, Any]:
    armt = models.build_armt(
        config=settings_["config"],
        segment_size=settings_["segment"],
        num_mem_tokens=settings_["mem"],
        d_mem=settings_["d_mem"],
        dtype=settings_["dtype"],
        device=device,
        w_mv_std=w_mv_std,
    )
    full = models.build_base(config=settings_["config"], dtype=settings_["dtype"], device=device)
    return armt, full


def strip_head(model: Any, keep: bool) -> None:
    if not keep:
        model.lm_head = torch.nn.Identity()


def armt_for(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[torch.device, Timer, Any, dict[str, Any]]:
    """The ARMT (seed 0, head as ``--keep-lm-head`` says), its device, a timer and the
    ``diagpass`` options, for the scripts that time ``diagpass.compile`` alone."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, _ = build(cfg, device, args.w_mv_std)
    del _
    strip_head(model.model, args.keep_lm_head)
    return device, Timer(device), model, {"compiler": cfg["compiler"], **json.loads(args.options)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    device = torch.device(args.device)
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        print(f"unknown peers: {sorted(unknown)}; choose from {PEERS}", file=sys.stderr)
        return 2
    timer = Timer(device)
    torch.manual_seed(0)
    armt, full = build(s, device, args.w_mv_std)
    strip_head(armt.model, args.keep_lm_head)
    strip_head(full, args.keep_lm_head)
    peak = measured_peak_tflops(device, s["dtype"], timer)
    options = {"compiler": s["compiler"], **json.loads(args.options)}
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(s["dtype"]).replace("torch.", ""),
        "segment": s["segment"],
        "mem": s["mem"],
        "d_mem": s["d_mem"],
        "batch": args.batch,
        "w_mv_std": args.w_mv_std,
        "layers": s["config"].num_hidden_layers,
        "hidden": s["config"].hidden_size,
        "peak_tflops": peak,
        "diagbatch_options": {"min_lanes": 1, **options} if args.diag_via == "compile" else options,
        "mode": args.mode,
        "sdpa": args.sdpa,
        "layers_scope": args.layers_scope,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
        import triton  # type: ignore[import-not-found]

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print("env:", json.dumps(env))
    rows: list[dict[str, Any]] = []
    layer_compiled = None
    anylength = None
    sequential = None  # the ablation's diagpass.compile module (--diag-via compile)
    for tokens in s["lengths"]:
        ids = torch.randint(0, s["config"].vocab_size, (args.batch, tokens), device=device)
        flops = armt_flops(s["config"], tokens, s["segment"], s["mem"], s["d_mem"], args.batch)
        result: dict[str, Any] = {"tokens": tokens, "floor_s": flops / (peak * 1e12), "flops": flops}

        def measure(name: str, fn: Callable[[], Any], compile_fn: Callable[[], Any] | None = None) -> None:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            compile_s = None
            if compile_fn is not None:
                t0 = time.perf_counter()
                compile_fn()
                timer.sync()
                compile_s = time.perf_counter() - t0
            latency = timer.median(fn, warmup=args.warmup, repeats=args.repeats)
            peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            result[name] = {"s": latency, "compile_s": compile_s, "peak_gib": peak_mem, "tflops": flops / latency / 1e12}
            print(f"  {tokens:>7} {name:<10} {latency:8.4f} s" + (f"  (compile {compile_s:.1f} s)" if compile_s else ""), flush=True)

        with torch.no_grad():
            if "full" in peers:
                measure("full", lambda: full(ids))
            if "eager" in peers:
                measure("eager", lambda: armt(ids))
            for name, schedule in (("diagbatch", "diagonal"), ("ablation", "sequential")):
                if name not in peers:
                    continue
                if name == "diagbatch" and args.diag_via == "compile":
                    anylength = measure_anylength(armt, ids, s, options, anylength, measure, result, args)
                    continue
                if name == "ablation" and args.diag_via == "compile":
                    # The same program with one cell per step: through diagpass.compile too, so
                    # long inputs are not traced segment by segment.
                    sequential = measure_anylength(
                        armt, ids, s, {**options, "schedule": "sequential"}, sequential, measure, result, args, name="ablation"
                    )
                    continue
                torch._dynamo.reset()
                # torch.compile takes mode= or options=, not both: a mode uses the default options.
                compiled = torch.compile(
                    armt,
                    backend="diagbatch",
                    dynamic=False,
                    **({"mode": args.mode} if args.mode and schedule == "diagonal" else {"options": {**options, "schedule": schedule}}),
                )
                with sdpa_context(args.sdpa):
                    measure(name, lambda: compiled(ids), compile_fn=lambda: compiled(ids))
                record = diagpass.last_compile()
                result[name].update(
                    applied=record.applied,
                    reason=record.reason,
                    steps=record.num_steps,
                    step_compiles=record.step_compiles,
                    backend_s=record.times.backend_s,
                    capture_s=record.times.capture_s,
                    inductor_s=record.times.inductor_s,
                    graph=record.program.last_graph if record.program is not None else None,
                )
                if args.profile and name == "diagbatch":
                    result["profile"] = profile_split(lambda: compiled(ids))
                    print(f"  {tokens:>7} profile    {result['profile']['split']} idle {result['profile']['idle']}", flush=True)
                if args.check and name == "diagbatch":
                    result["check"] = bf16_check(armt, compiled, ids)
                    print(f"  {tokens:>7} check      {result['check']}", flush=True)
                del compiled
            if "model" in peers and tokens <= args.model_max_len:
                torch._dynamo.reset()
                backend = "inductor" if s["compiler"] == "inductor" else "eager"
                whole = torch.compile(armt, backend=backend, dynamic=False)
                measure("model", lambda: whole(ids), compile_fn=lambda: whole(ids))
                del whole
            if "layers" in peers:
                if layer_compiled is None:
                    # torchtitan style: compile each decoder layer (stateless, one graph for all
                    # layers); the ARMT memory read/write around it stays eager.
                    layer_compiled = copy.deepcopy(armt)
                    backend = "inductor" if s["compiler"] == "inductor" else "eager"
                    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
                    for wrapper in layer_compiled.layers:
                        target = wrapper.layer if args.layers_scope == "decoder" else wrapper
                        target.compile(backend=backend, dynamic=False)
                torch._dynamo.reset()
                measure("layers", lambda: layer_compiled(ids), compile_fn=lambda: layer_compiled(ids))
        rows.append(result)
    print_table(rows, peers, env)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def measure_anylength(
    armt: Any,
    ids: torch.Tensor,
    s: dict[str, Any],
    options: dict[str, Any],
    anylength: Any,
    measure: Callable[..., None],
    result: dict[str, Any],
    args: argparse.Namespace,
    name: str = "diagbatch",
) -> Any:
    """diagbatch (or the ``ablation``) through ``diagpass.compile``: compiled once on a 3-segment
    probe, reused."""
    probe_s = None
    if anylength is None:
        probe = torch.randint(0, s["config"].vocab_size, (ids.shape[0], 3 * s["segment"]), device=ids.device)
        t0 = time.perf_counter()
        # The backend's own default (no padded lanes), so that this runs the program that
        # torch.compile(backend="diagbatch") runs; diagpass.compile alone pads to 4 lanes.
        anylength = diagpass.compile(armt, probe, options={"min_lanes": 1, **options})
        probe_s = time.perf_counter() - t0
    with sdpa_context(args.sdpa):
        measure(name, lambda: anylength(ids), compile_fn=lambda: anylength(ids))
    run = anylength.report.runs[-1]
    result[name].update(
        applied=run.path == "diagonal",
        reason=run.reason,
        via="diagpass.compile",
        probe_compile_s=probe_s,
        steps=run.stats.steps if run.stats else None,
        step_compile_s=run.stats.compile_s if run.stats else None,
        graph=run.stats.graph if run.stats else None,
    )
    if name != "diagbatch":
        return anylength
    if args.profile:
        result["profile"] = profile_split(lambda: anylength(ids))
        print(f"  {ids.shape[1]:>7} profile    {result['profile']['split']} idle {result['profile']['idle']}", flush=True)
    if args.check:
        result["check"] = bf16_check(armt, anylength, ids)
        print(f"  {ids.shape[1]:>7} check      {result['check']}", flush=True)
        result["segment_check"] = segment_check(armt, anylength, ids, segment=s["segment"], options=options)
        print(f"  {ids.shape[1]:>7} per-segment worst {result['segment_check']['worst']}", flush=True)
    return anylength


def sdpa_context(choice: str) -> Any:
    """``sdpa_kernel`` for one backend, or a no-op for ``default``."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    return contextlib.nullcontext() if choice == "default" else sdpa_kernel([backends[choice]])


def profile_split(fn: Callable[[], Any]) -> dict[str, Any]:
    """Device time by kernel class (GEMM, attention, other) over one call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    kernels: dict[str, float] = {}
    intervals: list[tuple[float, float]] = []
    host_start = None
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            start = event.time_range.start
            host_start = start if host_start is None else min(host_start, start)
            continue
        name = event.name
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        kind = kernel_kind(name)
        split[kind] += us / 1e6
        kernels[name[:90]] = kernels.get(name[:90], 0.0) + us / 1e6
        intervals.append((event.time_range.start, event.time_range.end))
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    for name, seconds in top:
        print(f"      {seconds * 1e3:9.2f} ms  {name}")
    return {"split": {k: round(v, 4) for k, v in split.items()}, "top": top, "idle": idle_gaps(intervals, host_start)}


def idle_gaps(intervals: list[tuple[float, float]], host_start: float | None) -> dict[str, Any]:
    """Where the device idles in one call (microsecond intervals of its kernels): before the
    first kernel (host work before anything is launched), and between kernels, by gap size."""
    if not intervals:
        return {}
    intervals = sorted(intervals)
    bins = {"under_2us": [0, 0.0], "2_to_5us": [0, 0.0], "5_to_20us": [0, 0.0], "over_20us": [0, 0.0]}
    busy, end = 0.0, intervals[0][0]
    for start, stop in intervals:
        gap = start - end
        if gap > 0:
            key = "under_2us" if gap < 2 else "2_to_5us" if gap < 5 else "5_to_20us" if gap < 20 else "over_20us"
            bins[key][0] += 1
            bins[key][1] += gap / 1e3
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - intervals[0][0]
    return {
        "lead_ms": round((intervals[0][0] - host_start) / 1e3, 3) if host_start is not None else None,
        "span_ms": round(span / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "gaps": {k: {"count": c, "ms": round(ms, 3)} for k, (c, ms) in bins.items()},
    }


def bf16_check(model: Any, compiled: Any, ids: torch.Tensor) -> dict[str, float]:
    """diagbatch vs eager, next to eager-vs-eager with another attention kernel (the noise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.float(), b.float()
        return ((a - b).norm() / b.norm()).item()

    out_eager = model(ids).logits.clone()
    result = {}
    # Sequential eager with each other attention kernel: the spread of bf16 noise (one sample
    # per kernel; a chaotic random model turns any rounding difference into an O(1) error).
    for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                result[f"{name}_vs_eager"] = rel(model(ids).logits, out_eager)
        except RuntimeError:  # no such kernel for these inputs
            continue
    noise = list(result.values())
    out_diag = compiled(ids).logits
    return {"diag_vs_eager": rel(out_diag, out_eager), **result, "noise_max": max(noise) if noise else float("nan")}


def print_table(rows: list[dict[str, Any]], peers: list[str], env: dict[str, Any]) -> None:
    print()
    print(f"prefill latency, {env['device']}, torch {env['torch']}, {env['dtype']}, segment {env['segment']}+{env['mem']}")
    shown = [p for p in PEERS if p in peers]
    head = f"{'tokens':>8} " + " ".join(f"{p:>10}" for p in shown) + f" {'floor':>8} {'diag/seq*':>9} {'diag/full':>9} {'TFLOP/s':>8} {'%peak':>6} {'GiB':>6}"
    print(head)
    for r in rows:
        cells = [f"{r[p]['s']:10.4f}" if p in r else f"{'-':>10}" for p in shown]
        seq = [r[p]["s"] for p in ("eager", "layers", "model") if p in r]
        diag = r.get("diagbatch", {}).get("s")
        best = min(seq) if seq else None
        ratio = f"{best / diag:9.2f}" if diag and best else f"{'-':>9}"
        vs_full = f"{r['full']['s'] / diag:9.2f}" if diag and "full" in r else f"{'-':>9}"
        tflops = f"{r['diagbatch']['tflops']:8.1f}" if diag else f"{'-':>8}"
        pct = f"{100 * r['diagbatch']['tflops'] / env['peak_tflops']:6.1f}" if diag else f"{'-':>6}"
        mem = r.get("diagbatch", {}).get("peak_gib")
        print(f"{r['tokens']:>8} " + " ".join(cells) + f" {r['floor_s']:8.4f} {ratio} {vs_full} {tflops} {pct} {mem if mem is None else round(mem, 1)!s:>6}")
    print("diag/seq*: best sequential peer (eager, layers, model) over diagbatch; diag/full: full attention over diagbatch")


if __name__ == "__main__":
    raise SystemExit(main())
