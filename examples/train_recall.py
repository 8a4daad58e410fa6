"""Train a tiny ARMT on associative recall through the diagonal schedule, then evaluate it longer.

    python examples/train_recall.py                 # CPU, about 3 minutes (2000 steps)
    python examples/train_recall.py --steps 50      # a quick look

1. builds a small ARMT on a random tiny Llama (from scratch);
2. ``diagpass.compile(model, probe)``; with autograd on, the module runs its *training program*,
   so every optimizer step's forward and backward go through the batched diagonals;
3. trains on :class:`diagpass.recall.RecallTask` (pairs spread over the segments before the last,
   the query at the end) and prints the loss and recall accuracy as it goes;
4. evaluates at 2x and 4x the training length, sequential (the model itself) and diagonal
   (``diagpass.compile``): the predictions must be identical.

Exit status: 0 when accuracy ends well above chance and the predictions agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import diagpass
from diagpass.models import build_armt, tiny_llama_config
from diagpass.recall import RecallTask, recall_accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--segments", type=int, default=3, help="training length, in segments")
    p.add_argument("--segment", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    task = RecallTask(segment_size=args.segment, segments=args.segments)
    model = build_armt(
        config=tiny_llama_config(num_hidden_layers=args.layers), segment_size=args.segment, num_mem_tokens=4, d_mem=16,
        w_mv_std=0.02, seed=args.seed,
    )
    generator = torch.Generator().manual_seed(args.seed)
    probe, _ = task.sample(args.batch, generator)
    fast = diagpass.compile(model, probe[:, : 3 * args.segment], options={"compiler": "eager"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    chance = 1 / task.values
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, target = task.sample(args.batch, generator)
        logits = fast(ids).logits[:, -1]  # [B, vocab]: the training program (autograd on)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == 1:
            accuracy = float((logits.argmax(-1) == target).float().mean())
            print(f"step {step:4d}  loss {loss.item():.3f}  batch accuracy {accuracy:.2f}  ({time.perf_counter() - started:.0f}s)")
    assert fast.report.runs[-1].autograd, "the training steps did not run the diagonal training program"

    model.eval()
    accuracy, _ = recall_accuracy(lambda ids: fast(ids).logits, task, batches=8, batch=args.batch, seed=1)
    print(f"\ntrained at {args.segments} segments: recall accuracy {accuracy:.2f} (chance {chance:.2f})")
    agree = True
    for factor in (2, 4):
        longer = RecallTask(segment_size=args.segment, segments=factor * args.segments)
        seq_acc, seq_pred = recall_accuracy(lambda ids: model(ids).logits, longer, batches=4, batch=args.batch, seed=2)
        diag_acc, diag_pred = recall_accuracy(lambda ids: fast(ids).logits, longer, batches=4, batch=args.batch, seed=2)
        same = bool(torch.equal(seq_pred, diag_pred))
        agree &= same
        print(
            f"{factor}x length ({longer.segments} segments): sequential {seq_acc:.2f}, diagonal {diag_acc:.2f}, "
            f"predictions identical: {same}"
        )
    ok = agree and accuracy > 2 * chance
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
