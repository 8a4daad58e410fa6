"""Synthetic associative recall: the smallest real ARMT workload.

Key-value pairs are spread over the segments before the last; the last segment ends with one of
the keys, and the model must answer its value at the last position. Only the recurrent memory can
carry a pair from an earlier segment to the query, so a model that learns this task uses its
memory. Used by ``examples/train_recall.py`` (training through the diagonal schedule) and by tests.

Token layout (vocabulary of at least 128): filler ``[64, 128)``, keys ``[4, 4 + keys)``, values
``[32, 32 + values)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["RecallTask", "recall_accuracy"]

_KEY0, _VALUE0, _FILLER = 4, 32, (64, 128)


@dataclass(frozen=True, kw_only=True)
class RecallTask:
    """Batches of recall sequences: ``pairs`` pairs in the first ``segments - 1`` segments."""

    segment_size: int = 16
    """Tokens per segment ``T``."""
    segments: int = 3
    """Segments per sequence; the query sits in the last one."""
    pairs: int = 2
    """Key-value pairs per sequence (distinct keys)."""
    keys: int = 8
    """Distinct keys."""
    values: int = 8
    """Distinct values: chance accuracy is ``1 / values``."""

    def __post_init__(self) -> None:
        if self.segments < 2 or self.pairs < 1 or self.pairs > self.keys or self.keys > _VALUE0 - _KEY0:
            raise ValueError(f"bad recall task: {self}")
        if self.values > _FILLER[0] - _VALUE0 or 2 * self.pairs > (self.segments - 1) * self.segment_size:
            raise ValueError(f"bad recall task: {self}")

    @property
    def length(self) -> int:
        return self.segments * self.segment_size

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, S*T], target values [B])``."""
        T, context = self.segment_size, (self.segments - 1) * self.segment_size
        ids = torch.randint(*_FILLER, (batch, self.length), generator=generator)
        target = torch.empty(batch, dtype=torch.long)
        for b in range(batch):
            keys = torch.randperm(self.keys, generator=generator)[: self.pairs] + _KEY0
            values = torch.randint(0, self.values, (self.pairs,), generator=generator) + _VALUE0
            slots = torch.randperm(context // 2, generator=generator)[: self.pairs] * 2  # even positions: pairs never overlap
            ids[b, slots], ids[b, slots + 1] = keys, values
            asked = int(torch.randint(0, self.pairs, (1,), generator=generator))
            ids[b, -1], target[b] = keys[asked], values[asked]
        assert ids.shape[1] - T >= context
        return ids, target


def recall_accuracy(
    logits_of: Callable[[torch.Tensor], torch.Tensor], task: RecallTask, batches: int, batch: int, seed: int
) -> tuple[float, torch.Tensor]:
    """Accuracy of the value read off the last position's logits (over the value tokens only),
    and the predictions (for comparing two ways of running the same model)."""
    generator = torch.Generator().manual_seed(seed)
    correct, total, predictions = 0, 0, []
    for _ in range(batches):
        ids, target = task.sample(batch, generator)
        with torch.no_grad():
            last = logits_of(ids)[:, -1, _VALUE0 : _VALUE0 + task.values]  # [B, values]
        guess = last.argmax(-1) + _VALUE0
        predictions.append(guess)
        correct += int((guess == target).sum())
        total += batch
    return correct / total, torch.cat(predictions)
