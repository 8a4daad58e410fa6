"""Variants of the reference-style ARMT that ``diagpass.compile`` must refuse, each for
one reason it cannot generalise from a probe to other lengths."""

from __future__ import annotations

import torch

from collections.abc import Callable, Iterable

from torch import nn

from tests.reference_style import AssociativeBlock, ReferenceStyleARMT


def _segment(model: ReferenceStyleARMT, ids: torch.Tensor, call: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One segment of the reference loop, each layer run through ``call``."""
    x = model.embed(ids)
    x = torch.cat([x, model.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)  # [B, T+m, d]
    for layer in model.layers:
        x = call(layer, x)
    return model.head(model.norm(x[:, : -model.num_mem_tokens]))


def _slices(model: ReferenceStyleARMT, input_ids: torch.Tensor) -> Iterable[torch.Tensor]:
    for layer in model.layers:
        layer.zero_mem()
    for start in range(0, input_ids.shape[1], model.segment_size):
        yield input_ids[:, start : start + model.segment_size]


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
        return torch.cat(
            [
                _segment(self, ids, lambda layer, x, i=index: layer(x, shift=i)[0])
                for index, ids in enumerate(_slices(self, input_ids))
            ],
            dim=1,
        )


class PerSegmentOutputs(ReferenceStyleARMT):
    """Returns a list with one tensor per segment: the return value grows with the length."""

    def forward(self, input_ids: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return [_segment(self, ids, lambda layer, x: layer(x)[0]) for ids in _slices(self, input_ids)]


class SegmentIndexBetweenLayers(ReferenceStyleARMT):
    """Shifts the hidden states between layers by the segment index: an int literal affine in
    ``s`` outside the layers, which the rerolled program computes per segment."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.cat(
            [
                _segment(self, ids, lambda layer, x, i=index: layer(x.roll(i, dims=-1))[0])
                for index, ids in enumerate(_slices(self, input_ids))
            ],
            dim=1,
        )


class SplitSegments(ReferenceStyleARMT):
    """Cuts the input with ``Tensor.split``, the last chunk maybe shorter: generalised (the
    chunk index is the segment index)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        segments = input_ids.split(self.segment_size, dim=1)
        return torch.cat([_segment(self, ids, lambda layer, x: layer(x)[0]) for ids in segments], dim=1)


class TorchSplitSegments(ReferenceStyleARMT):
    """Cuts the input with ``torch.split`` along a negative dim, in a ``for`` loop."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for ids in torch.split(input_ids, self.segment_size, dim=-1):
            logits.append(_segment(self, ids, lambda layer, x: layer(x)[0]))
        return torch.cat(logits, dim=1)


class ChunkSegments(ReferenceStyleARMT):
    """Cuts the input with ``torch.chunk`` into a count of segments: the count is a literal of the
    computation before the loop that changes with the length (not generalised yet)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        count = -(-input_ids.shape[1] // self.segment_size)
        segments = input_ids.chunk(count, dim=1)
        return torch.cat([_segment(self, ids, lambda layer, x: layer(x)[0]) for ids in segments], dim=1)


class CountsSegments(ReferenceStyleARMT):
    """Keeps a Python counter of the segments it has seen: its state depends on the length."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.seen = 0
        logits = []
        for ids in _slices(self, input_ids):
            self.seen += 1
            logits.append(_segment(self, ids, lambda layer, x: layer(x)[0]))
        return torch.cat(logits, dim=1)


class _FirstLayerScaled(AssociativeBlock):
    """Layer 0 only scales its input (a branch on the layer index, as research code writes it)."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if self.layer_index == 0:
            hidden_states = hidden_states * 2.0
        return super().forward(hidden_states)


class LayerZeroBranch(ReferenceStyleARMT):
    """Layer-specific code: a branch taken on layer 0 only. Layers 1..L-1 share one template,
    so their cells still batch on every diagonal; layer 0 runs as its own variant."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        for index, layer in enumerate(self.layers):
            layer.__class__ = _FirstLayerScaled
            layer.layer_index = index
