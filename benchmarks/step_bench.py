"""One diagonal step of diagbatch, side by side: baseline against variants (GPU).

    python benchmarks/step_bench.py --json step.json            # step A/B, kernel tables, raw GEMM/SDPA
    python benchmarks/step_bench.py --e2e 16384 --json e2e.json # end to end A/B in one process, gap stats

The step: a short capture (2 segments, steps run eagerly) gives the real steady-state cell
template and its arguments; the arguments are widened to a full diagonal of ``--lanes``
cells (the weight windows become the whole ``[L, ...]`` stacks) and each variant compiles
that step with a fresh :class:`~diagpass.lower.StepCompiler`. Timing: CUDA events after
warm-up, median of ``--iters``.

``--e2e N``: the whole diagbatch forward at N tokens, traced once; each variant clears the
compiled steps and runs again in the same process. The profiler gives the kernel split and
the GPU idle time (wall time of the forward minus the union of kernel intervals).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import diagpass
from diagpass import lower, models
from diagpass.config import parse_options
from kernel_kinds import kernel_kind
from prefill import idle_gaps  # benchmarks/ is on sys.path as a script

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"fuse": False, "causal": False, "late": False},
    "fuse": {"fuse": True, "causal": False, "late": False},
    "causal": {"fuse": False, "causal": True, "late": False},
    "late": {"fuse": False, "causal": False, "late": True},
    "late_causal": {"fuse": False, "causal": True, "late": True},
    "all": {"fuse": True, "causal": True, "late": True},
    "all_cg": {"fuse": True, "causal": True, "late": True, "options": {"cudagraphs": True}},
    "rr2": {"fuse": False, "causal": True, "late": True, "options": {"inductor": {"realize_reads_threshold": 2}}},
    "rr1": {"fuse": False, "causal": True, "late": True, "options": {"inductor": {"realize_reads_threshold": 1}}},
    "carry": {"fuse": False, "causal": True, "late": True, "carry": True},
    "carry_cdt": {"fuse": False, "causal": True, "late": True, "carry": True, "options": {"inductor": {"coordinate_descent_tuning": True}}},
}
"""fuse: diagpass.fuse (GEMMs sharing an input); causal: masks proven causal become
is_causal=True (lower.use_causal_attention) and the unread mask inputs are dropped
(placement.unused_slots); late: the prologue of a segment just before its first step
(diagpass.placement); options: extra diagbatch options (e.g. CUDA graphs, Inductor's
``realize_reads_threshold``: rr2 / rr1 materialise the residual stream once instead of
recomputing it in each reader); carry: the step writes its hidden-state output one lane up
after the next segment's input (``lower.with_carry``, ``carry_lanes``), as diagpass.compile
does in the steady state."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-1b", choices=["llama-1b", "llama-3b", "tiny"])
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--mem", type=int, default=128)
    p.add_argument("--d-mem", type=int, default=64)
    p.add_argument("--lanes", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--variants", default="base,fuse")
    p.add_argument("--raw", action="store_true", help="also time raw bmm / SDPA shapes")
    p.add_argument("--e2e", type=int, default=0, help="end-to-end A/B at this many tokens instead of the step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--options", default="{}", help="diagbatch options (JSON) for --e2e")
    p.add_argument("--trace-dir", default=None, help="write gzipped chrome traces here")
    p.add_argument("--json", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cpu: smoke test of the script (tiny config)")
    return p.parse_args(argv)


DEVICE = "cuda"


def cuda_median(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)  # ms


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def kernel_table(fn: Callable[[], Any], runs: int, trace: str | None = None) -> dict[str, Any]:
    """Device time per kernel (ms per run), the GEMM/attention/other split and GPU idle time."""
    from torch.profiler import ProfilerActivity, profile

    if DEVICE != "cuda":
        return {"split_ms": {}, "busy_ms": 0, "span_ms": 0, "idle_ms": 0, "launches": 0, "top": []}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    intervals = []
    sequence: list[tuple[float, str, float]] = []  # (start, name, us) of every kernel
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        entry = kernels.setdefault(event.name[:100], [0.0, 0])
        entry[0] += us / 1e3 / runs
        entry[1] += 1
        tr = event.time_range
        intervals.append((tr.start, tr.end))
        sequence.append((tr.start, event.name[:80], us))
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, (ms, _) in kernels.items():
        split[kernel_kind(name)] += ms
    gaps = idle_gaps(intervals, None)  # over all runs: busy and span in ms
    busy, span = gaps.get("busy_ms", 0.0), gaps.get("span_ms", 0.0)
    if trace:
        raw = trace + ".json"
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(trace + ".json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "split_ms": {k: round(v, 3) for k, v in split.items()},
        "busy_ms": round(busy / runs, 3),
        "span_ms": round(span / runs, 3),
        "idle_ms": round((span - busy) / runs, 3),
        "launches": round(sum(c for _, c in kernels.values()) / runs, 1),
        "top": [(name, round(ms, 4), count // runs) for name, (ms, count) in top],
        # one run's kernels in launch order, with their microseconds
        "sequence": [(name, round(us, 1)) for _, name, us in sorted(sequence)[: len(sequence) // max(runs, 1)]],
    }


def print_table(title: str, table: dict[str, Any]) -> None:
    print(f"  {title}: split {table['split_ms']} busy {table['busy_ms']} ms, span {table['span_ms']} ms, "
          f"idle {table['idle_ms']} ms, {table['launches']} launches", flush=True)
    for name, ms, count in table["top"][:18]:
        print(f"      {ms:8.3f} ms x{count:<3} {name}", flush=True)


def build_model(args: argparse.Namespace) -> Any:
    config = {
        "llama-1b": models.llama_3_2_1b_config,
        "llama-3b": models.llama_3_2_3b_config,
        "tiny": lambda: models.tiny_llama_config(num_hidden_layers=4),
    }[args.config]()
    armt = models.build_armt(
        config=config,
        segment_size=args.segment,
        num_mem_tokens=args.mem,
        d_mem=args.d_mem,
        dtype=getattr(torch, args.dtype),
        device=DEVICE,
        w_mv_std=0.005,
    )
    armt.model.lm_head = torch.nn.Identity()
    return armt


def set_variant(spec: dict[str, Any]) -> None:
    from diagpass import placement

    lower.FUSE_GEMMS = bool(spec["fuse"])
    lower.CAUSAL_ATTENTION = bool(spec["causal"])
    placement.DROP_UNUSED = bool(spec.get("drop", spec["causal"]))
    placement.LATE = bool(spec["late"])


def _force_causal(template: Any) -> Any:
    """A copy of the template whose attention is causal (what use_causal_attention proves)."""
    import copy

    template = copy.deepcopy(template)
    for node in template.graph.nodes:
        if node.op == "call_function" and node.target is lower.batched_sdpa:
            kwargs = dict(node.kwargs)
            kwargs["attn_mask"], kwargs["is_causal"] = None, True
            node.kwargs = kwargs
    template.recompile()
    return template


def _carry_of(template: Any, call: dict[str, Any], wide: list[Any]) -> tuple[int, torch.Tensor]:
    """The carried output (the hidden states: the first output shaped like a per-cell, non-static
    input) and a head for it (one lane of that input)."""
    with torch.no_grad():
        outs = lower.batched_template(template, call["in_dims"])(*wide)
    inputs = [v for v, dim, static in zip(wide, call["in_dims"], call["static"]) if dim is not None and not static]
    for value in sorted((v for v in inputs if isinstance(v, torch.Tensor)), key=lambda v: -v.numel()):  # the largest
        for index, out in enumerate(outs):
            if out.shape == value.shape and out.dtype == value.dtype:
                return index, value[0].clone()
    raise SystemExit("carry: no output is shaped like a per-cell input")


def step_ab(args: argparse.Namespace, armt: Any, results: dict[str, Any]) -> None:
    from diagpass.backend import step_compiler

    calls: list[dict[str, Any]] = []
    original = step_compiler.get

    def record(**kw: Any) -> Any:
        calls.append(kw)
        return original(**kw)

    step_compiler.get = record  # type: ignore[method-assign]
    set_variant(VARIANTS["base"])  # capture the unmodified template
    ids = torch.randint(0, armt.config.vocab_size, (1, 2 * args.segment), device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(armt, backend="diagbatch", dynamic=False, options={"compiler": "eager", "pad": "max"})
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(ids)
    step_compiler.get = original  # type: ignore[method-assign]
    print(f"capture of 2 segments: {time.perf_counter() - t0:.1f} s, {len(calls)} step calls", flush=True)
    call = calls[-1]  # the last step: a steady-state cell
    G = args.lanes
    wide = []
    for value, dim, static in zip(call["args"], call["in_dims"], call["static"]):
        if dim is None or not isinstance(value, torch.Tensor):
            wide.append(value)
        elif static:
            base = value._base if value._base is not None else value
            assert base.shape[0] >= G, (base.shape, G)
            wide.append(base[:G])
        else:
            wide.append(value[:1].expand(G, *value.shape[1:]).contiguous())
    outputs = {}
    for name in args.variants.split(","):
        spec = VARIANTS[name]
        set_variant(spec)
        config = parse_options({"compiler": "inductor", "pad": "max", **spec.get("options", {})})
        compiler = lower.StepCompiler()
        template = _force_causal(call["template"]) if spec["causal"] else call["template"]
        carry, step_args = None, wide
        if spec.get("carry"):
            carry, head = _carry_of(template, call, wide)
            step_args = [*wide, head]
        t0 = time.perf_counter()
        step, _ = compiler.get(
            key=call["key"], template=template, in_dims=call["in_dims"], args=step_args, batch=G,
            config=config, static=call["static"], carry=carry,
        )
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            outs = list(step.fn(*step_args))
            if carry is not None:
                outs[carry] = outs[carry][1:]  # lane 0 is the head
            outputs[name] = [o.float() for o in outs]
            ms = cuda_median(lambda: step.fn(*step_args), args.iters)
            table = kernel_table(lambda: step.fn(*step_args), 5, trace=f"{args.trace_dir}/step_{name}" if args.trace_dir else None)
        err = None
        reference = "base" if "base" in outputs else next(iter(outputs))  # else the first variant
        if name != reference:
            err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(outputs[name], outputs[reference]))
        results["step"][name] = {"ms": ms, "compile_s": compile_s, "gemms": step.batched_gemms, "rel_err_vs_base": err, **table}
        print(f"step {name}: {ms:.3f} ms (compile {compile_s:.1f} s, {step.batched_gemms} bmm, err vs {reference} {err})", flush=True)
        print_table(name, table)
    # the per-step gather of the cells' hidden states (StepRunner's torch.stack)
    per_cell = [v for v, d, s in zip(call["args"], call["in_dims"], call["static"]) if d is not None and not s]
    cells = [[v[0].clone() for _ in range(G)] for v in per_cell]
    ms = cuda_median(lambda: [torch.stack(c) for c in cells], args.iters)
    results["step"]["gather_stack_ms"] = ms
    print(f"gather (torch.stack of {len(cells)} per-cell slots x {G}): {ms:.3f} ms", flush=True)


def raw_bench(args: argparse.Namespace, armt: Any, results: dict[str, Any]) -> None:
    cfg = armt.config
    G, M, d, inter = args.lanes, args.segment + args.mem, cfg.hidden_size, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // heads
    dt = getattr(torch, args.dtype)
    x = torch.randn(G, M, d, device=DEVICE, dtype=dt)
    raw: dict[str, Any] = {}

    def gemm(name: str, ns: list[int], k: int = d) -> None:
        a = x if k == d else torch.randn(G, M, k, device=DEVICE, dtype=dt)
        ws = [torch.randn(G, n, k, device=DEVICE, dtype=dt) / 30 for n in ns]
        fused = torch.cat(ws, 1)
        sep = cuda_median(lambda: [torch.bmm(a, w.transpose(1, 2)) for w in ws], args.iters)
        one = cuda_median(lambda: torch.bmm(a, fused.transpose(1, 2)), args.iters)
        flop = 2 * G * M * k * sum(ns)
        raw[name] = {"separate_ms": sep, "fused_ms": one, "sep_tflops": flop / sep / 1e9, "fused_tflops": flop / one / 1e9}
        print(f"  gemm {name:<8} N={ns} K={k}: separate {sep:.3f} ms ({flop / sep / 1e9:.0f} TF/s), fused {one:.3f} ms ({flop / one / 1e9:.0f} TF/s)", flush=True)

    gemm("qkv", [heads * hd, kv * hd, kv * hd])
    gemm("gate_up", [inter, inter])
    gemm("o", [d])
    gemm("down", [d], k=inter)
    gemm("mk_mv", [args.d_mem, d])
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    q = torch.randn(G, heads, M, hd, device=DEVICE, dtype=dt)
    k = torch.randn(G, kv, M, hd, device=DEVICE, dtype=dt)
    v = torch.randn(G, kv, M, hd, device=DEVICE, dtype=dt)
    rep = heads // kv
    k_r = k.repeat_interleave(rep, 1)
    v_r = v.repeat_interleave(rep, 1)
    causal = torch.ones(M, M, dtype=torch.bool, device=DEVICE).tril()
    fmask = torch.zeros(G, 1, M, M, device=DEVICE, dtype=dt).masked_fill(~causal, float("-inf")).expand(G, heads, M, M)
    flop_causal = 2 * G * heads * M * M * hd  # half of 4 M^2 D
    cases = {
        "mask_default": lambda: F.scaled_dot_product_attention(q, k_r, v_r, attn_mask=fmask),
        "causal_default": lambda: F.scaled_dot_product_attention(q, k_r, v_r, is_causal=True),
        "causal_gqa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "mask_gqa_default": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=fmask, enable_gqa=True),
        "repeat_kv_clone": lambda: (k[:, :, None].expand(G, kv, rep, M, hd).reshape(G, heads, M, hd).contiguous(),
                                    v[:, :, None].expand(G, kv, rep, M, hd).reshape(G, heads, M, hd).contiguous()),
    }
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        b = getattr(SDPBackend, backend)
        cases[f"mask_{backend}"] = (lambda b=b: _with(b, lambda: F.scaled_dot_product_attention(q, k_r, v_r, attn_mask=fmask)))
        cases[f"causal_{backend}"] = (lambda b=b: _with(b, lambda: F.scaled_dot_product_attention(q, k_r, v_r, is_causal=True)))
        cases[f"causal_gqa_{backend}"] = (lambda b=b: _with(b, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))
    ref = F.scaled_dot_product_attention(q.float(), k_r.float(), v_r.float(), is_causal=True)
    for name, fn in cases.items():
        try:
            out = fn()
            err = None
            if isinstance(out, torch.Tensor):
                err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = cuda_median(fn, args.iters)
            raw[f"sdpa_{name}"] = {"ms": ms, "causal_tflops": flop_causal / ms / 1e9, "err": err}
            print(f"  sdpa {name:<32} {ms:.3f} ms ({flop_causal / ms / 1e9:.0f} causal TF/s) err {err}", flush=True)
        except Exception as error:  # noqa: BLE001 - a backend may not take these inputs
            raw[f"sdpa_{name}"] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            print(f"  sdpa {name:<32} failed: {type(error).__name__}: {str(error)[:120]}", flush=True)
    results["raw"] = raw


def _with(backend: Any, fn: Callable[[], Any]) -> Any:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return fn()


def e2e_ab(args: argparse.Namespace, armt: Any, results: dict[str, Any]) -> None:
    """Trace once; build one program per variant from the same graph (no retrace)."""
    from diagpass.backend import diagbatch

    ids = torch.randint(0, armt.config.vocab_size, (1, args.e2e), device=DEVICE)
    captured: dict[str, Any] = {}

    def grab(gm: Any, example_inputs: list[Any], **_: Any) -> Any:
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.compile(armt, backend=grab, dynamic=False)(ids)
    print(f"trace of {args.e2e} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
    gm, inputs = captured["gm"], captured["inputs"]
    options = json.loads(args.options)
    outputs = {}
    for name in args.variants.split(","):
        set_variant(VARIANTS[name])
        t0 = time.perf_counter()
        with torch.no_grad():
            fn = diagbatch(gm, inputs, options={**options, **VARIANTS[name].get("options", {})})
        record = diagpass.last_compile()
        assert record is not None and record.applied, record and record.reason
        with torch.no_grad():
            out = fn(*inputs)
        _sync()
        first_s = time.perf_counter() - t0
        outputs[name] = [o.float().clone() for o in out if isinstance(o, torch.Tensor)]
        with torch.no_grad():
            ms = cuda_median(lambda: fn(*inputs), args.repeats, warmup=1)
            # host time to issue one forward (the GPU may still be running when it returns)
            _sync()
            h0 = time.perf_counter()
            fn(*inputs)
            host_ms = (time.perf_counter() - h0) * 1e3
            _sync()
            table = kernel_table(lambda: fn(*inputs), 1, trace=f"{args.trace_dir}/e2e_{name}" if args.trace_dir else None)
        err = None
        if "base" in outputs and name != "base":
            err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(outputs[name], outputs["base"]))
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
        results["e2e"][name] = {"ms": ms, "first_call_s": first_s, "host_issue_ms": host_ms, "rel_err_vs_base": err,
                                "steps": record.num_steps, "step_compiles": record.step_compiles, "peak_gib": peak, **table}
        print(f"e2e {args.e2e} {name}: {ms:.2f} ms (first call {first_s:.1f} s, host issue {host_ms:.1f} ms, "
              f"err vs base {err}, peak {peak} GiB)", flush=True)
        print_table(name, table)
        del fn
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    armt = build_model(args)
    import transformers

    try:
        import triton  # type: ignore[import-not-found]

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    results: dict[str, Any] = {
        "env": {
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
            "torch": torch.__version__,
            "triton": triton_version,
            "transformers": transformers.__version__,
            "command": " ".join(["step_bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "config": args.config, "segment": args.segment, "mem": args.mem, "d_mem": args.d_mem, "lanes": args.lanes,
        },
        "step": {},
        "e2e": {},
    }
    print("env:", json.dumps(results["env"]), flush=True)
    try:
        if args.e2e:
            e2e_ab(args, armt, results)
        else:
            step_ab(args, armt, results)
            if args.raw:
                raw_bench(args, armt, results)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
