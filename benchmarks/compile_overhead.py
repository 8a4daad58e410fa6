"""diagpass's own compile cost against Dynamo's trace, on a tiny Llama ARMT (CPU is fine).

    python benchmarks/compile_overhead.py --layers 16 --segments 32 64

For each size: Dynamo's trace time, the analyzer's time (labelling, dependency DAG, templates),
and the backend's total own work (analysis + rewrite into the diagonal program). Steps run
eagerly (`compiler="eager"`) so that Inductor's time does not blur the comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diagpass
from diagpass import models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--segments", type=int, nargs="+", default=[32, 64])
    p.add_argument("--segment-size", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for segments in args.segments:
        torch._dynamo.reset()
        config = models.tiny_llama_config(num_hidden_layers=args.layers)
        model = models.build_armt(config=config, segment_size=args.segment_size, num_mem_tokens=4, d_mem=8)
        ids = torch.randint(0, config.vocab_size, (1, segments * args.segment_size))
        compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={"compiler": "eager"})
        start = time.perf_counter()
        with torch.no_grad():
            compiled(ids)
        wall = time.perf_counter() - start
        record = diagpass.last_compile()
        t = record.times
        row = {
            "layers": args.layers,
            "segments": segments,
            "nodes": record.num_nodes,
            "applied": record.applied,
            "trace_s": t.capture_s,
            "analysis_s": t.analysis_s,
            "rewrite_s": t.rewrite_s,
            "backend_s": t.backend_s,
            "first_call_s": wall,
            "analysis_pct_of_trace": 100 * t.analysis_s / t.capture_s,
            "backend_pct_of_trace": 100 * t.backend_s / t.capture_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'L':>3} {'S':>4} {'nodes':>7} {'trace s':>8} {'analysis s':>10} {'rewrite s':>9} {'analysis %':>10} {'backend %':>9}")
    for r in rows:
        print(
            f"{r['layers']:>3} {r['segments']:>4} {r['nodes']:>7} {r['trace_s']:8.1f} {r['analysis_s']:10.3f} "
            f"{r['rewrite_s']:9.3f} {r['analysis_pct_of_trace']:9.2f}% {r['backend_pct_of_trace']:8.2f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
