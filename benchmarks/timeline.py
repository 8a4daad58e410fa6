"""Where a diagbatch forward waits: the device's idle gaps, attributed to schedule times.

    python benchmarks/timeline.py --lengths 131072                 # H100, Llama-3.2-1B shapes
    python benchmarks/timeline.py --tiny --device cpu              # smoke test (host times only)

Builds the model as ``prefill.py`` does, compiles it with ``diagpass.compile``, warms up,
then profiles one call. The rerolled program marks each schedule time with a profiler
range ``diagpass.t<t>`` (odd t: one diagonal's batched steps, even t: the segments'
chunks outside the layers). Every kernel is mapped to the time whose range launched it
(CUDA correlation ids), and every gap before a kernel, where the device had nothing to
run, is charged to that kernel's time. Prints, per phase (pre, ramp-up, steady,
ramp-down, post): host time, device busy time and idle time, the top host ops, and
writes JSON (and the gzipped Chrome trace with ``--trace``).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import diagpass
from prefill import add_model_args, armt_for, settings  # benchmarks/ is on sys.path as a script

PHASES = ("pre", "ramp_up", "steady", "ramp_down", "post")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--trace", default=None, help="write the Chrome trace here (gzipped, .json.gz added)")
    return p.parse_args(argv)


def phase_of(t: int | None, *, before: bool, segments: int, layers: int) -> str:
    """The schedule phase of time ``t`` (``None``: outside the loop, before or after it)."""
    if t is None:
        return "pre" if before else "post"
    d = (t - 1) // 2 if t % 2 else t // 2  # the diagonal an odd time runs; an even time prepares it
    if d < layers - 1:
        return "ramp_up"
    if d > segments - 1:
        return "ramp_down"
    return "steady"


def analyse(trace_path: str, *, segments: int, layers: int) -> dict[str, Any]:
    """Host time, device busy and idle time per schedule time and per phase, from a Chrome trace."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    regions = sorted(
        (e["ts"], e["ts"] + e["dur"], int(e["name"][len("diagpass.t") :]))
        for e in events
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("diagpass.t")
    )
    starts = [r[0] for r in regions]
    launches = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    kernels = sorted(
        (e["ts"], e["ts"] + e["dur"], e["args"].get("correlation"), e["name"])
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )

    def region_of(ts: float) -> int | None:
        i = bisect.bisect_right(starts, ts) - 1
        if i >= 0 and ts <= regions[i][1]:
            return regions[i][2]
        return None

    first_region = regions[0][0] if regions else float("inf")
    per_t: dict[Any, dict[str, float]] = defaultdict(lambda: {"host_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "kernels": 0})
    for start, end, t in regions:
        per_t[t]["host_ms"] += (end - start) / 1e3
    busy_end = None
    lead: list[tuple[str, float]] = []
    for start, end, corr, _name in kernels:
        launched = launches.get(corr)
        t = region_of(launched) if launched is not None else None
        key = t if t is not None else ("pre" if launched is None or launched < first_region else "post")
        entry = per_t[key]
        entry["busy_ms"] += (end - start) / 1e3
        entry["kernels"] += 1
        if busy_end is not None and start > busy_end:
            entry["idle_ms"] += (start - busy_end) / 1e3
        busy_end = end if busy_end is None else max(busy_end, end)
        if launched is not None:
            phase = key if isinstance(key, str) else phase_of(key, before=False, segments=segments, layers=layers)
            lead.append((phase, (start - launched) / 1e3))
    phases: dict[str, dict[str, float]] = {p: {"host_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "kernels": 0} for p in PHASES}
    for key, entry in per_t.items():
        phase = key if isinstance(key, str) else phase_of(key, before=False, segments=segments, layers=layers)
        for k, v in entry.items():
            phases[phase][k] += v
    for phase in PHASES:
        leads = [ms for p, ms in lead if p == phase]
        phases[phase]["median_launch_lead_ms"] = statistics.median(leads) if leads else 0.0
        phases[phase] = {k: round(v, 3) for k, v in phases[phase].items()}

    # Host ops at the top level of the loop's ranges, by total time.
    cpu_ops = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "cpu_op" and region_of(e["ts"]) is not None
    )
    top_level: dict[str, float] = defaultdict(float)
    covered_until = -1.0
    for start, end, name in cpu_ops:
        if start >= covered_until:
            top_level[name] += (end - start) / 1e3
            covered_until = end
    odd = [per_t[t] for t in per_t if isinstance(t, int) and t % 2 and phase_of(t, before=False, segments=segments, layers=layers) == "steady"]
    even = [per_t[t] for t in per_t if isinstance(t, int) and not t % 2 and phase_of(t, before=False, segments=segments, layers=layers) == "steady"]
    span = (kernels[-1][1] - kernels[0][0]) / 1e3 if kernels else 0.0
    loop = (regions[-1][1] - regions[0][0]) / 1e3 if regions else 0.0
    return {
        "device_span_ms": round(span, 3),
        "loop_host_ms": round(loop, 3),
        "busy_ms": round(sum(p["busy_ms"] for p in phases.values()), 3),
        "idle_ms": round(sum(p["idle_ms"] for p in phases.values()), 3),
        "phases": phases,
        "steady_median": {
            "odd_host_ms": round(statistics.median(e["host_ms"] for e in odd), 3) if odd else None,
            "odd_busy_ms": round(statistics.median(e["busy_ms"] for e in odd), 3) if odd else None,
            "even_host_ms": round(statistics.median(e["host_ms"] for e in even), 3) if even else None,
            "even_busy_ms": round(statistics.median(e["busy_ms"] for e in even), 3) if even else None,
        },
        "per_time": {str(k): {kk: round(vv, 3) for kk, vv in v.items()} for k, v in sorted(per_t.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]) if isinstance(kv[0], str) else kv[0]))},
        "top_host_ops": sorted(((n, round(ms, 3)) for n, ms in top_level.items()), key=lambda x: -x[1])[:20],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = settings(args)
    device, timer, model, options = armt_for(args, cfg)
    vocab = cfg["config"].vocab_size
    probe = torch.randint(0, vocab, (1, 3 * cfg["segment"]), device=device)
    fast = diagpass.compile(model, probe, options=options)
    results: dict[str, Any] = {
        "env": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "options": options,
            "segment": cfg["segment"],
            "layers": cfg["config"].num_hidden_layers,
        },
        "rows": [],
    }
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for tokens in cfg["lengths"]:
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        with torch.no_grad():
            fast(ids)  # compiles new step shapes
            latency = timer.median(lambda: fast(ids), warmup=1, repeats=args.repeats)
            timer.sync()
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                fast(ids)
                host_s = time.perf_counter() - start
                timer.sync()
        record = fast.report.runs[-1]
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            summary = analyse(raw, segments=record.segments, layers=cfg["config"].num_hidden_layers)
            if args.trace:
                with open(raw, "rb") as src, gzip.open(f"{args.trace}_{tokens}.json.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
        row = {"tokens": tokens, "segments": record.segments, "latency_s": round(latency, 4), "profiled_host_s": round(host_s, 4), **summary}
        results["rows"].append(row)
        print(f"\n{tokens} tokens, {record.segments} segments: latency {latency * 1e3:.1f} ms, "
              f"device span {summary['device_span_ms']} ms, busy {summary['busy_ms']} ms, idle {summary['idle_ms']} ms, "
              f"host loop {summary['loop_host_ms']} ms")
        print("| phase | host ms | busy ms | idle ms | kernels | median launch lead ms |")
        print("|---|---|---|---|---|---|")
        for phase, p in summary["phases"].items():
            print(f"| {phase} | {p['host_ms']} | {p['busy_ms']} | {p['idle_ms']} | {int(p['kernels'])} | {p['median_launch_lead_ms']} |")
        print("steady, per time (median):", summary["steady_median"])
        print("top host ops in the loop:", summary["top_host_ops"][:12])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
