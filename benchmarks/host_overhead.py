"""Host time of one ``diagpass.compile`` call once its CUDA graph replays: what the host does
before the device has anything to run (the "lead" of ``prefill.py --profile``).

    python benchmarks/host_overhead.py --lengths 32768 131072       # H100, Llama-3.2-1B shapes
    python benchmarks/host_overhead.py --tiny --device cpu          # smoke test (no graphs on CPU)

Per length: the median host wall time of a call (launch to return, no synchronisation), and
the top functions of one call under cProfile (cumulative time). Writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from typing import Any

import torch

import diagpass
from prefill import add_model_args, armt_for, settings  # benchmarks/ is on sys.path as a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    cfg = settings(args)
    device, _, model, options = armt_for(args, cfg)
    vocab = cfg["config"].vocab_size
    probe = torch.randint(0, vocab, (1, 3 * cfg["segment"]), device=device)
    with torch.no_grad():
        fast = diagpass.compile(model, probe, options={"min_lanes": 1, **options})
    rows: list[dict[str, Any]] = []
    for tokens in cfg["lengths"]:
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        with torch.no_grad():
            for _ in range(4):  # compile, watch for syncs, capture, replay
                fast(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            host = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fast(ids)
                host.append((time.perf_counter() - t0) * 1e3)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            fast(ids)
            profiler.disable()
            if device.type == "cuda":
                torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
        run = fast.report.runs[-1]
        row = {
            "tokens": tokens,
            "host_ms": statistics.median(host),
            "graph": run.stats.graph if run.stats else None,
            "profile": text.getvalue(),
        }
        rows.append(row)
        print(f"{tokens:>8} tokens: host {row['host_ms']:.3f} ms per call ({row['graph']})", flush=True)
        print(row["profile"], flush=True)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
