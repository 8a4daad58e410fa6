"""diagpass demo: compile a tiny ARMT (on a random Llama) with diagonal batching and check it.

    python examples/armt_llama.py                       # 4 layers x 4 segments, Inductor (CPU: ~30 s)
    python examples/armt_llama.py --compiler eager      # the same rewrite, no Inductor (seconds)
    python examples/armt_llama.py --layers 2 --segments 8 --batch 2

What it does, top to bottom:

1. builds an ARMT around a tiny random-weight Llama (``diagpass.models.build_armt``; ``W_mv`` is
   non-zero so the memory really changes the output). Nothing is downloaded, no GPU is needed;
2. runs it eagerly under ``torch.no_grad()``: the reference logits and the final memory state;
3. compiles it with ``torch.compile(model, backend="diagbatch", dynamic=False)`` and runs it;
4. checks the compiled logits and the final memory state (``W_mem``, ``z`` of every layer) against
   eager: max relative error below 1e-5 in fp32;
5. prints what the backend did (``diagpass.last_compile()``) and the dependency report, and says
   whether the diagonal rewrite was applied or the backend fell back (and why).

Exit status: 0 when the compiled model matches eager, 1 when it does not.
Set ``DIAGPASS_LOG=info`` to see the backend's log lines as well.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import diagpass
from diagpass.models import build_armt, tiny_llama_config

# Largest accepted max relative error, per dtype. fp32 is the contract; the others are sanity checks
# (the diagonal program batches GEMMs, so low-precision rounding differs from eager's).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--segments", type=int, default=4, help="number of segments S (default 4)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers L (default 4)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--segment-size", type=int, default=16, help="text tokens per segment (default 16)")
    p.add_argument("--mem-tokens", type=int, default=4, help="memory tokens per segment (default 4)")
    p.add_argument(
        "--compiler",
        choices=["inductor", "eager"],
        default="inductor",
        help="how the batched step graphs are compiled (default inductor; eager skips Inductor)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in float64)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def best_time(fn, device: str, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def snapshot_memory(model) -> list[torch.Tensor]:
    """The final memory state: W_mem [B, d_key, d] and z [B, d_key] of every layer, copied."""
    return [t.detach().clone() for pair in model.memory_states() for t in pair]


def poison_memory(model) -> None:
    """Overwrite every layer's W_mem and z with NaN (same shapes), so that the state check below
    only passes if the compiled forward really writes the final state back to the modules."""
    for layer in model.layers:
        layer.W_mem = torch.full_like(layer.W_mem, float("nan"))
        layer.z = torch.full_like(layer.z, float("nan"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    tol = TOLERANCE[dtype]
    print(f"torch {torch.__version__}, diagpass {diagpass.__version__}, device {args.device}, dtype {args.dtype}")

    # 1. The model: ARMT around a tiny random Llama (hidden 64, 4 heads, vocab 128).
    model = build_armt(
        base="llama",
        config=tiny_llama_config(num_hidden_layers=args.layers),
        segment_size=args.segment_size,
        num_mem_tokens=args.mem_tokens,
        dtype=dtype,
        device=args.device,
        seed=args.seed,
    )
    n_tokens = args.segments * args.segment_size
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, n_tokens), generator=gen).to(args.device)
    L, S = args.layers, args.segments
    print(
        f"ARMT: L={L} layers, S={S} segments of {args.segment_size}+{args.mem_tokens} tokens, batch {args.batch} "
        f"-> {L * S} cells: {L * S} sequential steps, {L + S - 1} diagonal steps"
    )

    # 2. Eager reference.
    with torch.no_grad():
        ref_logits = model(input_ids).logits  # [B, N, V]
        ref_memory = snapshot_memory(model)
        eager_s = best_time(lambda: model(input_ids), args.device)

    # 3. Compile with diagonal batching and run (the first call traces, analyses, rewrites, compiles).
    poison_memory(model)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options={"compiler": args.compiler})
    with torch.no_grad():
        start = time.perf_counter()
        logits = compiled(input_ids).logits.clone()  # a copy: later calls may reuse output buffers
        if args.device == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        memory = snapshot_memory(model)  # the backend writes the final state back to the modules
        compiled_s = best_time(lambda: compiled(input_ids), args.device)  # later calls: the program only
    print(
        f"forward: eager {eager_s * 1e3:.1f} ms; compiled {compiled_s * 1e3:.1f} ms "
        f"(first call {first_s:.1f} s, including trace, analysis, rewrite and compile)"
    )

    # 4. Check against eager.
    logits_err = max_rel_error(logits, ref_logits)
    memory_err = max(max_rel_error(got, want) for got, want in zip(memory, ref_memory))
    logits_ok = logits.shape == ref_logits.shape and logits_err < tol
    memory_ok = len(memory) == len(ref_memory) == 2 * L and memory_err < tol
    print(f"logits:       max relative error {logits_err:.2e} (tolerance {tol:.0e}) -> {'OK' if logits_ok else 'MISMATCH'}")
    print(
        f"memory state: max relative error {memory_err:.2e} over W_mem, z of {L} layers -> "
        f"{'OK' if memory_ok else 'MISMATCH'}"
    )

    # 5. What the backend did.
    record = diagpass.last_compile()
    print()
    if record is None:
        print("diagpass.last_compile() is None: the diagbatch backend was never called")
        return 1
    print(record.summary())
    print()
    print(record.report if record.report is not None else "(no dependency report: the backend fell back before analysis)")
    print()
    if record.applied:
        print(f"RESULT: diagonal rewrite applied: {record.num_steps} batched steps instead of {L * S} sequential cells.")
    else:
        print(f"RESULT: the backend FELL BACK to plain {record.config.compiler}: {record.reason}")
    if logits_ok and memory_ok:
        print("CHECK PASSED: compiled output and memory state match eager.")
        return 0
    print("CHECK FAILED: compiled model does not match eager.", file=sys.stderr)
    print("CHECK FAILED")
    return 1


if __name__ == "__main__":
    sys.exit(main())
