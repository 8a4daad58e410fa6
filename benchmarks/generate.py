"""Generation after a long prompt: time to first token and total time (issue 15).

    python benchmarks/generate.py                        # H200: Llama-3.2-1B shapes, bf16, 4K..131K + 32 tokens
    python benchmarks/generate.py --tiny --device cpu    # CI smoke test: tiny Llama, fp32, eager steps

Peers, on the same random weights (W_mv non-zero) and the same prompt (batch 1, greedy):
  diagpass   fast.generate: the model's own generate with the full segments on the diagonal program
  own        the ARMT's own generate: segments one after another, then HF generate on the last one
  full       full-attention Llama (SDPA) HF generate on the whole prompt, with its KV cache

Time to first token is a ``max_new_tokens=1`` call; total is a ``max_new_tokens=N`` call
(``min_new_tokens=N`` so that no EOS stops it early). CUDA events after warm-up, median of
--repeats; peak memory of the total call. Decoding per token is timed inside each total call, from
the first new token to the last (median over the calls) (HF's ``streamer`` hook: :class:`TokenClock`), so that the noise
of a peer's prefill (the own generate's sequential segments move by 0.5 s between calls) does not
leak into it. diagpass's tokens are checked against the model's own.
The prefill latency of the full segments alone (the issue's bound on time to first token: +10%) is
measured in the same process, as ``benchmarks/prefill.py`` measures it: LM head Identity.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diagpass  # noqa: E402
from prefill import Timer, add_model_args, build, settings, strip_head  # noqa: E402

PEERS = ("diagpass", "own", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 32; tiny: 4)")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls after the first (diagpass: a watched run, then the prefill's CUDA-graph capture)",
    )
    p.add_argument("--quick", action="store_true", help="one repeat, no warm-up beyond the compile call")
    p.add_argument(
        "--decode-rounds",
        type=int,
        default=6,
        help="rounds of total calls, one per peer, in alternating order, for the side-by-side decoding speed (0: none)",
    )
    p.add_argument(
        "--noise",
        action="store_true",
        help="also run the own generate with the math attention kernel: its token agreement with the default "
        "kernel is the noise reference for diagpass's agreement",
    )
    return p.parse_args(argv)


def device_allocations(device: torch.device) -> int:
    """``cudaMalloc`` calls by the caching allocator so far (0 on the CPU): a decode loop whose
    cache finds no free block of its size (the rest held by a graph's private pool) pays for them."""
    return int(torch.cuda.memory_stats().get("num_device_alloc", 0)) if device.type == "cuda" else 0


def peak_memory(device: torch.device, fn: Any) -> tuple[Any, float]:
    """``fn()`` and the peak memory allocated during it, in GiB (0 on the CPU)."""
    if device.type != "cuda":
        return fn(), 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / 2**30


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = settings(args)
    device = torch.device(args.device)
    new_tokens = args.new_tokens or (4 if cfg["tiny"] else 32)
    repeats, warmup = (1, 0) if args.quick else (args.repeats, args.warmup)
    peers = [p for p in args.peers.split(",") if p]
    options = {"compiler": cfg["compiler"], **json.loads(args.options)}
    torch.manual_seed(0)
    model, full = build(cfg, device, args.w_mv_std)
    timer = Timer(device)
    T, vocab = cfg["segment"], cfg["config"].vocab_size

    started = time.perf_counter()
    probe = torch.randint(0, vocab, (1, 3 * T), device=device)
    fast = diagpass.compile(model, probe, options=options)
    compile_s = time.perf_counter() - started
    print(f"diagpass.compile: {compile_s:.1f}s; T={T} m={cfg['mem']} {cfg['dtype']} on {device}")
    headless = diagpass.compile(without_lm_head(model), probe, options=options) if "diagpass" in peers else None

    def call(peer: str, ids: torch.Tensor, n: int, streamer: Any = None) -> torch.Tensor:
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=streamer)
        with torch.no_grad():
            if peer == "diagpass":
                return fast.generate(ids, **kwargs)
            if peer == "own":
                return model.generate(ids, **kwargs)
            return full.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, ids.shape[1] :]

    rows = []
    for tokens in cfg["lengths"]:
        ids = torch.randint(0, vocab, (1, tokens), device=device, generator=None)
        row: dict[str, Any] = {"tokens": tokens, "segments": -(-tokens // T), "new_tokens": new_tokens}
        outputs = {}
        for peer in peers:
            first_call = time.perf_counter()
            call(peer, ids, 1)  # compiles what this length needs (diagpass: the prefill loop, new step shapes)
            timer.sync()
            first_call_s = time.perf_counter() - first_call
            ttft = timer.median(lambda: call(peer, ids, 1), warmup=warmup, repeats=repeats)
            clocks: list[TokenClock] = []

            def timed_total() -> torch.Tensor:
                clocks.append(TokenClock())
                return call(peer, ids, new_tokens, clocks[-1])  # noqa: B023

            total = timer.median(timed_total, warmup=0, repeats=repeats)
            allocs = device_allocations(device)
            outputs[peer], peak = peak_memory(device, lambda: call(peer, ids, new_tokens))  # noqa: B023
            allocs = device_allocations(device) - allocs
            row[peer] = {
                "ttft_s": ttft,
                "total_s": total,
                "decode_ms_per_token": statistics.median(c.ms_per_token() for c in clocks),
                "decode_ms_per_token_calls": [c.ms_per_token() for c in clocks],
                "device_allocations_per_total_call": allocs,
                "peak_gib": peak,
                "first_call_s": first_call_s,
            }
            if peer == "diagpass":
                record = fast.report.generations[-1]
                row[peer].update(
                    path=record.path, reason=record.reason, prefill_segments=record.prefill_segments, prefill_host_s=record.prefill_s
                )
                row["prefill_bound"] = prefill_bound(fast, headless, ids, T, timer, warmup, repeats)
        if "diagpass" in outputs and "own" in outputs:
            row["tokens_identical"] = bool(torch.equal(outputs["diagpass"], outputs["own"]))
            row["token_agreement"] = float((outputs["diagpass"] == outputs["own"]).float().mean())
            if args.noise:
                # The noise reference: the model's own generate against itself with another
                # attention kernel (the math one), the same prompt and greedy decoding.
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.MATH]):
                    own_math = call("own", ids, new_tokens)
                row["own_vs_own_math_agreement"] = float((own_math == outputs["own"]).float().mean())
                row["diagpass_vs_own_math_agreement"] = float((outputs["diagpass"] == own_math).float().mean())
                print(
                    f"  token agreement: diagpass vs own {row['token_agreement']:.3f}; own (math attention) vs own "
                    f"{row['own_vs_own_math_agreement']:.3f}; diagpass vs own (math) {row['diagpass_vs_own_math_agreement']:.3f}",
                    flush=True,
                )
        if args.decode_rounds and not args.quick and len(peers) > 1:
            row["decode_interleaved"] = interleaved_decode(
                lambda peer, clock: call(peer, ids, new_tokens, clock), peers, args.decode_rounds  # noqa: B023
            )
        rows.append(row)
        print_row(row, peers)

    print_table(rows, peers)
    if args.json:
        env = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "dtype": str(cfg["dtype"]),
            "segment": T,
            "mem": cfg["mem"],
            "layers": cfg["config"].num_hidden_layers,
            "compile_s": compile_s,
            "options": options,
        }
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str))
        print(f"wrote {args.json}")


def prefill_bound(
    fast: Any, headless: Any, ids: torch.Tensor, T: int, timer: Timer, warmup: int, repeats: int
) -> dict[str, Any]:
    """The issue's bound on time to first token, measured in this process: the prefill latency of
    the full segments before the last one, plus 10%. The prefill is timed as ``prefill.py`` times
    it, without the LM head (``headless``: the same weights, head Identity, DESIGN.md §3), since a
    prefill for generation needs no logits; the forward with the head (``fast``: logits for every
    prompt token) is reported beside it."""
    full_segments = (ids.shape[1] - 1) // T  # the last segment, partial or whole, is the model's own generate
    if full_segments == 0:
        return {"full_segments": 0, "prefill_s": 0.0, "bound_s": 0.0}
    head = ids[:, : full_segments * T]
    times: dict[str, Any] = {}
    with torch.no_grad():
        for name, compiled in (("prefill_s", headless), ("prefill_with_lm_head_s", fast)):
            try:
                compiled(head)  # compiles this length's steps, outside the timing
                times[name] = timer.median(functools.partial(compiled, head), warmup=warmup, repeats=repeats)
            except torch.OutOfMemoryError as error:
                if name == "prefill_s":
                    raise
                # Logits for every prompt token ([1, N, vocab]: 31 GiB at 131K tokens in bf16) need not
                # fit beside the model; the bound is on the headless prefill, so go on without them.
                times[name] = None
                times["prefill_with_lm_head_skipped"] = f"out of memory: {str(error).splitlines()[0]}"
                print(f"  prefill with the LM head skipped: {times['prefill_with_lm_head_skipped']}", flush=True)
                torch.cuda.empty_cache()
    return {"full_segments": full_segments, **times, "bound_s": 1.1 * times["prefill_s"]}


def interleaved_decode(run: Any, peers: list[str], rounds: int) -> dict[str, Any]:
    """Decoding speed of every peer from calls that alternate between the peers, the order reversed
    every round, so that a drift of the host (its clock, other load) falls on each peer alike.
    ``run(peer, clock)`` makes one total call with ``clock`` as its streamer. Per peer: the median
    over calls of the mean ms/token, and the median of every token-to-token interval."""
    clocks: dict[str, list[TokenClock]] = {peer: [] for peer in peers}
    for r in range(rounds):
        for peer in peers if r % 2 == 0 else peers[::-1]:
            clocks[peer].append(TokenClock())
            run(peer, clocks[peer][-1])
    return {
        peer: {
            "ms_per_token": statistics.median(c.ms_per_token() for c in calls),
            "median_interval_ms": statistics.median(i for c in calls for i in c.intervals_ms()),
            "ms_per_token_calls": [c.ms_per_token() for c in calls],
        }
        for peer, calls in clocks.items()
    }


class TokenClock:
    """An HF ``generate`` streamer that notes when each new token reaches the host (HF syncs
    there anyway, for its stopping criteria): the first ``put`` is the prompt, the rest tokens."""

    def __init__(self) -> None:
        self.puts: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ms_per_token(self) -> float:
        """Milliseconds per new token after the first (``nan`` with fewer than two tokens)."""
        tokens = self.puts[1:]
        return 1e3 * (tokens[-1] - tokens[0]) / (len(tokens) - 1) if len(tokens) >= 2 else float("nan")

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive new tokens."""
        tokens = self.puts[1:]
        return [1e3 * (b - a) for a, b in zip(tokens, tokens[1:])]


def without_lm_head(model: Any) -> Any:
    """A shallow copy of the zoo ARMT sharing every weight, its base model's LM head Identity."""
    stripped = copy.copy(model)
    stripped._modules = dict(model._modules)
    base = copy.copy(model.model)
    base._modules = dict(base._modules)
    strip_head(base, keep=False)
    stripped.model = base
    return stripped


def print_row(row: dict[str, Any], peers: list[str]) -> None:
    parts = [f"{row['tokens']:>7d} tokens"]
    for peer in peers:
        r = row[peer]
        parts.append(f"{peer}: ttft {r['ttft_s'] * 1e3:.1f} ms, total {r['total_s'] * 1e3:.1f} ms")
    if row.get("prefill_bound", {}).get("full_segments"):
        b = row["prefill_bound"]
        with_head = b["prefill_with_lm_head_s"]
        with_head_text = "out of memory" if with_head is None else f"{with_head * 1e3:.1f} ms"
        parts.append(
            f"prefill of the {b['full_segments']} full segments {b['prefill_s'] * 1e3:.1f} ms "
            f"({with_head_text} with the LM head) "
            f"(bound +10%: {b['bound_s'] * 1e3:.1f} ms; ttft/bound {row['diagpass']['ttft_s'] / b['bound_s']:.3f})"
        )
    print("; ".join(parts), flush=True)


def print_table(rows: list[dict[str, Any]], peers: list[str]) -> None:
    print("\ngeneration after a long prompt: time to first token / total (ms), peak GiB")
    header = f"{'tokens':>8s} " + " ".join(f"{p + ' ttft':>14s} {p + ' total':>14s} {p + ' GiB':>10s}" for p in peers)
    if "own" in peers and "diagpass" in peers:
        header += f" {'ttft own/diag':>14s} {'identical':>10s}"
    print(header)
    for row in rows:
        line = f"{row['tokens']:>8d} " + " ".join(
            f"{row[p]['ttft_s'] * 1e3:>14.1f} {row[p]['total_s'] * 1e3:>14.1f} {row[p]['peak_gib']:>10.2f}" for p in peers
        )
        if "own" in peers and "diagpass" in peers:
            line += f" {row['own']['ttft_s'] / row['diagpass']['ttft_s']:>14.2f} {str(row['tokens_identical']):>10s}"
        print(line)
    interleaved = [row for row in rows if "decode_interleaved" in row]
    if interleaved:
        print("\ndecoding, calls alternating between peers: ms/token (median interval ms)")
        print(f"{'tokens':>8s} " + " ".join(f"{p:>22s}" for p in peers))
        for row in interleaved:
            d = row["decode_interleaved"]
            print(
                f"{row['tokens']:>8d} "
                + " ".join(f"{d[p]['ms_per_token']:>13.2f} ({d[p]['median_interval_ms']:5.2f})" for p in peers)
            )


if __name__ == "__main__":
    main()
