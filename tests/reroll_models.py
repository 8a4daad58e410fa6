"""Variants of the reference-style ARMT that ``diagpass.compile`` must refuse, each for
one reason it cannot generalise from a probe to other lengths."""

from __future__ import annotations

import torch

from tests.reference_style import AssociativeBlock, ReferenceStyleARMT


class _ShiftedBlock(AssociativeBlock):
    def forward(self, hidden_states: torch.Tensor, shift: int = 0) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return super().forward(hidden_states.roll(shift, dims=-1))


class SegmentIndexInsideLayers(ReferenceStyleARMT):
    """Each layer shifts its input by the segment index, inside the layer: the cells of one
    diagonal would need different constants, so they could not share a kernel."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.__class__ = _ShiftedBlock

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for index, start in enumerate(range(0, input_ids.shape[1], self.segment_size)):
            x = self.embed(input_ids[:, start : start + self.segment_size])
            x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            for layer in self.layers:
                x = layer(x, shift=index)[0]
            logits.append(self.head(self.norm(x[:, : -self.num_mem_tokens])))
        return torch.cat(logits, dim=1)


class PerSegmentOutputs(ReferenceStyleARMT):
    """Returns a list with one tensor per segment: the return value grows with the length."""

    def forward(self, input_ids: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for start in range(0, input_ids.shape[1], self.segment_size):
            x = self.embed(input_ids[:, start : start + self.segment_size])
            x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            for layer in self.layers:
                x = layer(x)[0]
            logits.append(self.head(self.norm(x[:, : -self.num_mem_tokens])))
        return logits


class SegmentIndexBetweenLayers(ReferenceStyleARMT):
    """Shifts the hidden states between layers by the segment index: an int literal affine in
    ``s`` outside the layers, which the rerolled program computes per segment."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for index, start in enumerate(range(0, input_ids.shape[1], self.segment_size)):
            x = self.embed(input_ids[:, start : start + self.segment_size])
            x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            for layer in self.layers:
                x = layer(x.roll(index, dims=-1))[0]
            logits.append(self.head(self.norm(x[:, : -self.num_mem_tokens])))
        return torch.cat(logits, dim=1)


class SplitSegments(ReferenceStyleARMT):
    """Cuts the input with ``torch.split``: no per-segment slice to generalise."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for segment in input_ids.split(self.segment_size, dim=1):
            x = self.embed(segment)
            x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            for layer in self.layers:
                x = layer(x)[0]
            logits.append(self.head(self.norm(x[:, : -self.num_mem_tokens])))
        return torch.cat(logits, dim=1)


class CountsSegments(ReferenceStyleARMT):
    """Keeps a Python counter of the segments it has seen: its state depends on the length."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.seen = 0
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for start in range(0, input_ids.shape[1], self.segment_size):
            self.seen += 1
            x = self.embed(input_ids[:, start : start + self.segment_size])
            x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            for layer in self.layers:
                x = layer(x)[0]
            logits.append(self.head(self.norm(x[:, : -self.num_mem_tokens])))
        return torch.cat(logits, dim=1)
