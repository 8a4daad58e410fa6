"""Plot latency against input length for every peer from benchmarks/results/*.json.

    python benchmarks/plot_results.py                  # writes benchmarks/results/latency_h100.png
    python benchmarks/plot_results.py --machine h200   # writes benchmarks/results/latency_h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent / "results"
LABELS = {
    "full": "(a) full attention (SDPA)",
    "eager": "(b) sequential ARMT, eager",
    "layers": "(c) sequential ARMT, per-layer torch.compile",
    "model": "(c') sequential ARMT, whole-model torch.compile (4K only)",
    "diagbatch": "(d) diagbatch",
    "ablation": "(f) diagpass program, sequential schedule",
    "floor": "(e) FLOP floor at measured peak",
    "paper": "(g) the paper's official executor (CUTLASS, ../shared/anchors)",
}

# H200 (2026-12-03): the sweep of every peer but the compiled sequential ones, in one process; the
# paper's own code at 131K on the same kind of machine.
H200_SWEEP = ["h200_sweep.json", "h200_sweep_all.json"]  # later files win where they overlap
H200_PAPER = "h200_db_official_131k.json"


def h100_points() -> dict[str, dict[int, float]]:
    points: dict[str, dict[int, float]] = {}
    # The main sweep, oldest first (later runs win): run1-4 (2026-11-22), run12-13, run26, run33, run37,
    # run42 (current: carried lanes; run42 ran every peer but the 4K-only ones in one process).
    main_sweep = ["h100_run1_4k.json", "h100_run2_16k_32k.json", "h100_run3_4k_64k.json", "h100_run4_128k.json"]
    main_sweep += ["h100_run12_seg1024.json", "h100_run13_131k_split.json", "h100_run26_sweep_graph.json"]
    main_sweep += ["h100_run33_sweep.json", "h100_run37_sweep.json", "h100_run42_all_peers.json"]
    # Runs that add only some peers (on run42's machine: the 4K-only whole-model compile and ablation).
    only = {"h100_run43_4k_model_ablation.json": {"model", "ablation"}}
    main_sweep += list(only)
    for name in main_sweep:
        path = HERE / name
        data = json.loads(path.read_text())
        env = data["env"]
        if env["segment"] != 1024 or env["layers"] != 16:
            continue  # the main sweep only: Llama-3.2-1B shapes, segment 1024
        for row in data["rows"]:
            tokens = row["tokens"]
            if name not in only:
                points.setdefault("floor", {})[tokens] = row["floor_s"]
            for peer in LABELS:
                if name in only and peer not in only[name]:
                    continue
                if peer in row and isinstance(row[peer], dict):
                    points.setdefault(peer, {})[tokens] = row[peer]["s"]  # later runs win
    return points


def h200_points() -> dict[str, dict[int, float]]:
    points: dict[str, dict[int, float]] = {}
    for name in H200_SWEEP:
        for row in json.loads((HERE / name).read_text())["rows"]:
            points.setdefault("floor", {})[row["tokens"]] = row["floor_s"]
            for peer in LABELS:
                if isinstance(row.get(peer), dict):
                    points.setdefault(peer, {})[row["tokens"]] = row[peer]["s"]
    paper = json.loads((HERE / H200_PAPER).read_text())
    points["paper"] = {131072: paper["db_131072"]}
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default="h100", choices=["h100", "h200"])
    machine = p.parse_args().machine
    points = h100_points() if machine == "h100" else h200_points()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for peer, label in LABELS.items():
        if peer not in points:
            continue
        xs = sorted(points[peer])
        style = "--" if peer == "floor" else ("s" if len(points[peer]) == 1 else "-o")
        ax.plot(xs, [points[peer][x] for x in xs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input tokens")
    ax.set_ylabel("prefill latency, s (median of 3-5)")
    ax.set_title(f"ARMT prefill, Llama-3.2-1B shapes, bf16, {machine.upper()}, segment 1024+128")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = HERE / f"latency_{machine}.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
