"""Where ``fast.generate``'s time to first token goes: its phases, synced, and the prefill graph's use.

    python benchmarks/generate_phases.py --lengths 131072 --options '{"min_lanes": 1}'   # H200
    python benchmarks/generate_phases.py --tiny --device cpu                             # smoke test

One ``max_new_tokens=1`` call of ``fast.generate`` is split, with a device sync around each part,
into: collecting the segment calls (the model's own loop until its call into HF ``generate``),
the diagonal prefill (``AnyLengthModel.forward`` of the prefill loop), and HF ``generate`` on the
last segment. Also: the median time to first token after warm-up (unsynced, CUDA events), and
the whole-program CUDA graph counters over those calls (captures beyond the first mean the prefill
was captured again: see ``diagpass/graphs.py``). ``--profile`` adds a cProfile of one call.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diagpass  # noqa: E402
import diagpass.generate as generate_module  # noqa: E402
from diagpass.anylength import AnyLengthModel  # noqa: E402
from prefill import Timer, add_model_args, build, settings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="cProfile one call (top 30 by own time)")
    return p.parse_args(argv)


class PhaseClock:
    """Wraps functions so that each call is timed between two device syncs (while installed)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.phases: list[tuple[str, float, float]] = []  # (label, start, end), perf_counter seconds
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.phases.append((label, start, time.perf_counter()))

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = settings(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, full = build(cfg, device, args.w_mv_std)
    del full
    timer = Timer(device)
    T, vocab = cfg["segment"], cfg["config"].vocab_size
    options = {"compiler": cfg["compiler"], **json.loads(args.options)}
    fast = diagpass.compile(model, torch.randint(0, vocab, (1, 3 * T), device=device), options=options)
    kwargs = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    rows = []
    for tokens in cfg["lengths"]:
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        with torch.no_grad():
            fast.generate(ids, **kwargs)  # compiles the prefill loop and this length's steps
            counters["diagpass"].clear()
            ttft = timer.median(lambda: fast.generate(ids, **kwargs), warmup=args.warmup, repeats=args.repeats)
            graph_counts = {k: v for k, v in counters["diagpass"].items() if k.startswith("program_graph")}
            clock = PhaseClock(timer.sync)
            clock.wrap(generate_module._Session, "flush", "prefill (flush: concatenate, run, restore)")
            clock.wrap(AnyLengthModel, "forward", "diagonal prefill program")
            clock.wrap(transformers.GenerationMixin, "generate", "HF generate on the last segment")
            try:
                timer.sync()
                start = time.perf_counter()
                fast.generate(ids, **kwargs)
                timer.sync()
                total = time.perf_counter() - start
            finally:
                clock.uninstall()
            phases = [(label, 1e3 * (s - start), 1e3 * (e - s)) for label, s, e in sorted(clock.phases, key=lambda p: p[1])]
            collect = min(s for _, s, _ in phases)  # before the first phase: the model's own loop, collecting
            row: dict[str, Any] = {
                "tokens": tokens,
                "ttft_s": ttft,
                "synced_total_ms": 1e3 * total,
                "collect_ms": collect,
                "phases": phases,
                "graph_counters": graph_counts,
                "record": str(fast.report.generations[-1]),
            }
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                fast.generate(ids, **kwargs)
                timer.sync()
                profile.disable()
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
                row["profile"] = text.getvalue()
        rows.append(row)
        print(f"{tokens} tokens: time to first token {ttft * 1e3:.1f} ms (median of {args.repeats}); one synced call "
              f"{row['synced_total_ms']:.1f} ms, collecting the segment calls {collect:.1f} ms")
        for label, at, took in phases:
            print(f"    at {at:8.1f} ms  {took:8.1f} ms  {label}")
        print(f"    program graph counters over the timed calls: {graph_counts or 'none'}")
        if args.profile:
            print(row["profile"])
    if args.json:
        env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"env": env, "options": options, "rows": rows}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
