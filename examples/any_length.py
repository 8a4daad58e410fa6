"""Compile once on a short probe, then run inputs of any length (``diagpass.compile``).

    python examples/any_length.py                      # tiny ARMT, Inductor steps (CPU: ~1 min)
    python examples/any_length.py --compiler eager     # the same program, no Inductor (seconds)

1. builds a tiny ARMT on a random Llama (segments of 16 tokens, ``W_mv`` non-zero);
2. ``diagpass.compile(model, probe)`` with a probe of 3 segments: three short Dynamo traces and
   the induction proof, printed as ``fast.report``;
3. runs 1, 2, 7 and 33 segments, and lengths that end in a short segment, without tracing again,
   and checks every output and the final memory state against eager (fp32, 1e-5).

Exit status: 0 when every length matches eager, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import diagpass
from diagpass.models import build_armt, tiny_llama_config

TOLERANCE = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--segment", type=int, default=16)
    p.add_argument("--lengths", default="16,32,112,528,100,250", help="token counts to run after compiling")
    return p.parse_args(argv)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = tiny_llama_config(num_hidden_layers=args.layers)
    model = build_armt(config=config, segment_size=args.segment, num_mem_tokens=4, d_mem=8)
    vocab = model.config.vocab_size

    probe = torch.randint(0, vocab, (1, 3 * args.segment))
    start = time.perf_counter()
    fast = diagpass.compile(model, probe, options={"compiler": args.compiler})
    print(f"diagpass.compile: {time.perf_counter() - start:.1f} s")
    print(fast.report)
    print()

    worst = 0.0
    for tokens in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, vocab, (1, tokens))
        with torch.no_grad():
            expected = model(ids).logits.clone()
            expected_state = [t.clone() for pair in model.memory_states() for t in pair]
            start = time.perf_counter()
            actual = fast(ids).logits
            seconds = time.perf_counter() - start
        state = [t for pair in model.memory_states() for t in pair]
        err = max([max_rel_err(actual, expected)] + [max_rel_err(a, b) for a, b in zip(state, expected_state)])
        worst = max(worst, err)
        run = fast.report.runs[-1]
        print(
            f"{tokens:5d} tokens = {run.segments:2d} segments (last {run.last_length:2d}): {run.path:8s} "
            f"{seconds:6.3f} s, max relative error {err:.1e}"
        )
    if worst <= TOLERANCE:
        print(f"CHECK PASSED: every length matches eager within {TOLERANCE:.0e}, with no new trace.")
        return 0
    print(f"CHECK FAILED: max relative error {worst:.1e} > {TOLERANCE:.0e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
