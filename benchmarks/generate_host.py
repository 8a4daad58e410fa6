"""Host overhead of ``fast.generate`` on the CPU (issue 15: time to first token <= prefill + 10%).

    python benchmarks/generate_host.py                          # 16 tiny layers (296 modules), 127 segments
    python benchmarks/generate_host.py --layers 2 --segments 150 --profile

A tiny Llama ARMT (hidden 32) with eager steps: the compute per segment is small, so what the host
adds shows. Per call, min over --repeats (a shared CPU is noisy): ``fast(ids of the full
segments)`` (the any-length forward), ``fast.generate(ids, max_new_tokens=1)`` (time to first
token), its record's ``prefill_s`` (the prefill program alone), and HF ``generate`` of the last
segment alone (read-only layers). ``TTFT - prefill_s - HF`` is the model's own Python before HF
generate plus diagpass's collection and checks.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Any

import torch

import diagpass
from diagpass import models
from diagpass.models.builders import tiny_llama_config


def best(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--segments", type=int, default=127, help="full segments before the last (S-1)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile", action="store_true", help="cProfile of 3 fast.generate calls (cumulative)")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = tiny_llama_config(
        num_hidden_layers=args.layers, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
    )
    model = models.build_armt(config=config, segment_size=8, num_mem_tokens=2, d_mem=4)
    T, S = model.segment_size, args.segments
    ids = torch.randint(0, config.vocab_size, (1, S * T + 3), generator=torch.Generator().manual_seed(0))
    fast = diagpass.compile(model, ids[:, : 3 * T], options={"compiler": "eager"})
    with torch.no_grad():
        fast.generate(ids, max_new_tokens=1, do_sample=False)  # compiles the prefill loop
        forward = best(lambda: fast(ids[:, : S * T]), args.repeats)
        ttft = best(lambda: fast.generate(ids, max_new_tokens=1, do_sample=False), args.repeats)
        prefill = min(record.prefill_s for record in fast.report.generations[-args.repeats :])
        assert fast.report.generations[-1].path == "diagonal", fast.report.generations[-1]
        last = model.model.get_input_embeddings()(ids[:, S * T :])
        model._set_read_only(True)
        hf = best(lambda: model.model.generate(inputs_embeds=last, max_new_tokens=1, do_sample=False), args.repeats)
        model._set_read_only(False)
        model.reset_memory()
        modules = len(list(model.modules()))
        print(
            f"L={args.layers} ({modules} modules) S-1={S}: fast(full) {forward * 1e3:.1f} ms | fast.generate TTFT "
            f"{ttft * 1e3:.1f} ms | prefill_s {prefill * 1e3:.1f} ms | HF generate of the last segment {hf * 1e3:.1f} ms"
        )
        print(
            f"TTFT - prefill_s - HF = {(ttft - prefill - hf) * 1e3:.1f} ms; "
            f"TTFT / (fast(full) + HF) = {ttft / (forward + hf):.3f}; TTFT / (prefill_s + HF) = {ttft / (prefill + hf):.3f}"
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(3):
                fast.generate(ids, max_new_tokens=1, do_sample=False)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"generate.py|_segment_loop|anylength.py:440", 30)


if __name__ == "__main__":
    main()
