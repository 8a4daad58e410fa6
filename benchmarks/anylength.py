"""Compile once, run any length: ``diagpass.compile`` on a short probe (issue 6).

    python benchmarks/anylength.py                        # H100, Llama-3.2-1B shapes, bf16
    python benchmarks/anylength.py --tiny --device cpu    # smoke test

Measures, in one process:
  * ``diagpass.compile`` on a probe of --probe-segments segments (three Dynamo traces);
  * the first call at each of --lengths (wall time: new step compiles included), then the
    median latency (CUDA events) of further calls at that length;
  * bf16 agreement with sequential eager at each length, next to the eager-vs-eager noise
    (SDPA default kernel against the math kernel);
  * agreement with ``torch.compile(backend="diagbatch")`` at --backend-length.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

import diagpass
from prefill import add_model_args, armt_for, settings  # benchmarks/ is on sys.path when run as a script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)  # --lengths: the token counts, in call order
    p.add_argument("--probe-segments", type=int, default=3)
    p.add_argument("--no-check", action="store_true", help="skip the comparison with eager")
    p.add_argument("--backend-length", type=int, default=None, help="compare with the torch.compile path here")
    return p.parse_args(argv)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = settings(args)
    if args.lengths is None:
        cfg["lengths"] = [5 * cfg["segment"], 3 * cfg["segment"] + 5, 9 * cfg["segment"]] if cfg["tiny"] else [131072, 65536, 100000]
    device, timer, model, options = armt_for(args, cfg)
    vocab = cfg["config"].vocab_size
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(cfg["dtype"]),
        "segment": cfg["segment"],
        "mem": cfg["mem"],
        "layers": cfg["config"].num_hidden_layers,
        "options": options,
    }
    try:
        import triton
        import transformers

        env["triton"], env["transformers"] = triton.__version__, transformers.__version__
    except ImportError:
        pass

    probe = torch.randint(0, vocab, (1, args.probe_segments * cfg["segment"]), device=device)
    start = time.perf_counter()
    fast = diagpass.compile(model, probe, options=options)
    timer.sync()
    compile_s = time.perf_counter() - start
    print(fast.report)
    print(f"diagpass.compile: {compile_s:.2f} s (traces {sum(fast.report.trace_s):.2f} s)")

    rows: list[dict[str, Any]] = []
    for tokens in cfg["lengths"]:
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        start = time.perf_counter()
        with torch.no_grad():
            out = fast(ids).logits
        timer.sync()
        first_s = time.perf_counter() - start
        record = fast.report.runs[-1]
        with torch.no_grad():
            latency = timer.median(lambda: fast(ids), warmup=2, repeats=args.repeats)  # a watched run, the capture
        row: dict[str, Any] = {
            "tokens": tokens,
            "segments": record.segments,
            "last": record.last_length,
            "path": record.path,
            "first_call_s": round(first_s, 3),
            "step_compile_s": round(record.stats.compile_s, 3) if record.stats else None,
            "latency_s": round(latency, 4),
        }
        if not args.no_check:
            with torch.no_grad():
                eager = model(ids).logits.clone()
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.MATH):
                    math_out = model(ids).logits.clone()
            row["diag_vs_eager"] = rel(out, eager)
            row["math_vs_eager"] = rel(math_out, eager)
            del eager, math_out
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(row)
        print(row, flush=True)
        del out

    backend: dict[str, Any] = {}
    if args.backend_length:
        ids = torch.randint(0, vocab, (1, args.backend_length), device=device)
        compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=options)
        start = time.perf_counter()
        with torch.no_grad():
            via_backend = compiled(ids).logits.clone()
            via_compile = fast(ids).logits
        timer.sync()
        backend = {
            "tokens": args.backend_length,
            "backend_first_call_s": round(time.perf_counter() - start, 2),
            "compile_vs_backend": rel(via_compile, via_backend),
            "bitwise_equal": bool(torch.equal(via_compile, via_backend)),
        }
        print("torch.compile path:", backend)

    print()
    print(f"diagpass.compile, {env['device']}, torch {env['torch']}, {env['dtype']}, segment {cfg['segment']}+{cfg['mem']}")
    print(f"compile (probe of {args.probe_segments} segments, 3 traces): {compile_s:.2f} s")
    header = "| tokens | segments | last | path | first call s | step compiles s | latency s | vs eager | eager noise |"
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['tokens']:,} | {r['segments']} | {r['last']} | {r['path']} | {r['first_call_s']} | "
            f"{r['step_compile_s']} | {r['latency_s']} | {r.get('diag_vs_eager', float('nan')):.4g} | "
            f"{r.get('math_vs_eager', float('nan')):.4g} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"env": env, "compile_s": compile_s, "report": str(fast.report), "rows": rows, "backend": backend}, indent=2)
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
