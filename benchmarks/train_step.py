"""One training step of ARMT: forward, backward and AdamW (issue 16).

    python benchmarks/train_step.py                        # H200: Llama-3.2-1B shapes, bf16, 8 and 16 segments of 1024
    python benchmarks/train_step.py --tiny --device cpu    # CI smoke test: tiny Llama, fp32, eager steps

Peers, on the same random weights (W_mv non-zero), inputs and labels (next-token loss over the
whole input, LM head kept):
  eager      the sequential ARMT, eager (the zoo model)
  layers     the sequential ARMT with each decoder layer torch.compile'd (torchtitan style)
  diagpass   diagpass.compile's training program: the diagonal schedule, steps compiled forward
             and backward by Inductor (AOTAutograd)

Each peer gets a fresh copy of the model and its own AdamW (fused on CUDA). One step is
``zero_grad; loss = model(ids, labels=ids).loss; loss.backward(); opt.step()``. The first steps
compile (their time is reported apart); then CUDA events, median of --repeats. Peak memory is
that of one timed step. --profile adds the GEMM / attention / other split of one step.
The loss of the first step (same weights for every peer) is printed beside eager's.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diagpass  # noqa: E402
from prefill import Timer, add_model_args, build, profile_split, settings  # noqa: E402

PEERS = ("eager", "layers", "diagpass")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--segments", default=None, help="comma-separated segment counts (default 8,16; tiny: 3,5)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--profile", action="store_true", help="GEMM / attention / other split of one step per peer")
    return p.parse_args(argv)


def make_step(model: torch.nn.Module, forward: Callable[..., Any], fused: bool, lr: float) -> Callable[[torch.Tensor], float]:
    """One optimizer step of ``forward`` (the peer) on ``model``'s parameters; returns the loss tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=fused)

    def step(ids: torch.Tensor) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = forward(ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def peer_forward(name: str, model: torch.nn.Module, probe: torch.Tensor, compiler: str, options: dict[str, Any]) -> Callable[..., Any]:
    """The callable each peer trains through."""
    backend = "inductor" if compiler == "inductor" else "eager"
    if name == "eager":
        return model
    if name == "layers":
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        for wrapper in model.layers:
            wrapper.layer.compile(backend=backend, dynamic=False)
        return model
    if name == "diagpass":
        with torch.no_grad():  # the probe traces once; the training program compiles at the first step
            return diagpass.compile(model, probe, labels=probe, options={"compiler": compiler, **options})
    raise ValueError(f"unknown peer {name!r}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = settings(args)
    device = torch.device(args.device)
    timer = Timer(device)
    peers = [p for p in args.peers.split(",") if p]
    if set(peers) - set(PEERS):
        raise SystemExit(f"unknown peers {sorted(set(peers) - set(PEERS))}; choose from {PEERS}")
    counts = [int(x) for x in (args.segments or ("3,5" if s["tiny"] else "8,16")).split(",")]
    options = json.loads(args.options)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(s["dtype"]),
        "segment": s["segment"],
        "mem": s["mem"],
        "batch": args.batch,
        "compiler": s["compiler"],
        "command": " ".join(sys.argv),
    }
    print(json.dumps(env))
    torch.manual_seed(0)
    base, _ = build(s, device, args.w_mv_std)
    del _
    rows = []
    for count in counts:
        tokens = count * s["segment"]
        ids = torch.randint(0, s["config"].vocab_size, (args.batch, tokens), device=device, generator=None)
        probe = ids[:, : 3 * s["segment"]]
        row: dict[str, Any] = {"segments": count, "tokens": tokens}
        for name in peers:
            model = copy.deepcopy(base)
            model.train(False)  # dropout off: exactness and timing without random masks
            torch._dynamo.reset()
            forward = peer_forward(name, model, probe, s["compiler"], options)
            step = make_step(model, forward, fused=device.type == "cuda", lr=args.lr)
            start = time.perf_counter()
            first_loss = float(step(ids))
            timer.sync()
            first_s = time.perf_counter() - start
            for _ in range(args.warmup):
                step(ids)
            seconds = timer.median(lambda: step(ids), warmup=0, repeats=args.repeats)
            peak = 0.0
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step(ids)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
            result = {
                "seconds": round(seconds, 4),
                "tokens_per_s": round(args.batch * tokens / seconds),
                "peak_gib": round(peak, 2),
                "first_step_s": round(first_s, 2),
                "first_loss": first_loss,
            }
            if name == "diagpass":
                run = forward.report.runs[-1]
                result["path"] = run.path
                result["autograd"] = run.autograd
                if run.path != "diagonal" or not run.autograd:
                    print(f"  WARNING: diagpass ran {run.path!r} (autograd={run.autograd}): {run}", flush=True)
            if args.profile:
                result["profile"] = profile_split(lambda: step(ids))
            row[name] = result
            print(f"  {count:>3} seg {tokens:>7} tok  {name:<9} {seconds:8.4f} s/step  {result['tokens_per_s']:>9} tok/s  "
                  f"peak {peak:6.2f} GiB  first step {first_s:6.1f} s  loss {first_loss:.6f}"
                  + (f"  split {result['profile']['split']}" if args.profile else ""), flush=True)
            del model, forward, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    print_table(rows, peers)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str))
        print(f"wrote {args.json}")


def print_table(rows: list[dict[str, Any]], peers: list[str]) -> None:
    print("\n| segments | tokens | " + " | ".join(f"{p} s/step" for p in peers) + " | eager/diagpass | "
          + " | ".join(f"{p} peak GiB" for p in peers) + " | loss diagpass - eager |")
    print("|" + "---|" * (3 + 2 * len(peers) + 1))
    for row in rows:
        cells = [str(row["segments"]), str(row["tokens"])]
        cells += [f"{row[p]['seconds']:.4f}" for p in peers if p in row]
        speedup = row["eager"]["seconds"] / row["diagpass"]["seconds"] if "eager" in row and "diagpass" in row else float("nan")
        cells.append(f"{speedup:.2f}x")
        cells += [f"{row[p]['peak_gib']:.2f}" for p in peers if p in row]
        diff = row["diagpass"]["first_loss"] - row["eager"]["first_loss"] if "eager" in row and "diagpass" in row else float("nan")
        cells.append(f"{diff:+.2e}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
