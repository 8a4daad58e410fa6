"""Variants of the reference-style ARMT that ``diagpass.compile`` must refuse, each for
one reason it cannot generalise from a probe to other lengths."""

from __future__ import annotations

import torch

from collections.abc import Callable, Iterable

from torch import nn
from transformers.modeling_outputs import CausalLMOutput

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
    """Cuts the input with ``torch.chunk`` into ``ceil(n / T)`` parts, as the reference's
    ``segment_alignment='center'`` does: parts of ``T`` when ``T`` divides ``n`` (generalised for
    full segments), other sizes otherwise (the model itself runs)."""

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


class _InPlaceBlock(AssociativeBlock):
    """The memory update written with in-place ops: ``W_mem.add_``, ``z +=`` and ``index_copy_``
    into a snapshot of the memory tokens, each into state the first segment creates."""

    def update_mem(self, mem_tokens: torch.Tensor) -> None:
        k = torch.relu(self.W_mk(mem_tokens)).repeat(1, 1, 2 * self.nu)  # [B, m, d_key]
        v = self.W_mv(mem_tokens)  # [B, m, d]
        beta = torch.sigmoid(self.W_mb(mem_tokens))  # [B, m, 1]
        if self.first_seg:
            self.W_mem = torch.zeros(k.shape[0], self.d_key, v.shape[-1], device=k.device, dtype=k.dtype)
            self.z = torch.zeros(k.shape[0], self.d_key, device=k.device, dtype=k.dtype)
            self.snapshot = torch.zeros_like(mem_tokens)
        self.W_mem.add_((k * beta).transpose(1, 2) @ v)
        self.z += k.sum(1)
        rows = torch.arange(mem_tokens.shape[1] - 1, -1, -1, device=mem_tokens.device)
        self.snapshot.index_copy_(1, rows, mem_tokens + self.snapshot)
        self.first_seg = False


class InPlaceState(ReferenceStyleARMT):
    """State updated in place (issue 14, point 4): functionalized, so it batches and generalises."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.__class__ = _InPlaceBlock


class _CausalMaskBlock(AssociativeBlock):
    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return super().forward(hidden_states + mask.sum(-1, keepdim=True) * 1e-3)


class InPlaceMask(ReferenceStyleARMT):
    """Builds a mask before the layers with ``masked_fill_`` on a fresh tensor, as transformers
    4.x builds its causal mask (the reference ARMT runs on 4.51)."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.__class__ = _CausalMaskBlock

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        out: dict[str, torch.Tensor] = {}
        all_logits = []
        for s, ids in enumerate(input_ids.split(self.segment_size, dim=1)):
            x = self.embed(ids)
            x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)  # [B, T+m, d]
            size = x.shape[1]
            mask = torch.full((size, size), -1.0)
            cond = torch.arange(size)
            mask.masked_fill_(cond < (cond + 1).view(size, 1), 0)
            for layer in self.layers:
                x = layer(x, mask=mask)[0]
            logits = self.head(self.norm(x[:, : -self.num_mem_tokens]))
            all_logits.append(logits)
            out[f"logits_{s}"] = logits
        return {"logits": torch.cat(all_logits, dim=1), **out}


class _CountingBlock(AssociativeBlock):
    """Counts its segments in a Python int, as some reference versions keep ``seg_num``."""

    def zero_mem(self) -> None:
        super().zero_mem()
        self.seg_num = 0

    def update_mem(self, mem_tokens: torch.Tensor) -> None:
        super().update_mem(mem_tokens)
        self.seg_num += 1


class PerSegmentKeys(ReferenceStyleARMT):
    """Structured like the reference ``AssociativeRecurrentWrapper``: segments cut in a list
    comprehension over split indices, a ``seg_num`` counter per layer, a per-segment loss when
    labels are given, and a ``CausalLMOutput`` with one key per segment (``logits_{i}``,
    ``loss_{i}``) beside the concatenated logits and the loss over all of them."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.__class__ = _CountingBlock
            layer.seg_num = 0

    def split_tensor(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        split_inds = list(range(0, tensor.shape[1], self.segment_size)) + [tensor.shape[1]]
        return [tensor[:, start:end] for (start, end) in zip(split_inds, split_inds[1:])]

    def cell(self, ids: torch.Tensor, labels: torch.Tensor | None) -> CausalLMOutput:
        x = self.embed(ids)
        x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)  # [B, T+m, d]
        for layer in self.layers:
            x = layer(x)[0]
        out = CausalLMOutput(logits=self.head(self.norm(x[:, : -self.num_mem_tokens])))
        if labels is not None:
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            out["loss"] = nn.CrossEntropyLoss()(logits, labels[:, 1:].reshape(-1))
        return out

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        ids = self.split_tensor(input_ids)
        seg_labels = self.split_tensor(labels) if labels is not None else [None] * len(ids)
        cell_outputs = [self.cell(i, l) for i, l in zip(ids, seg_labels)]
        out = CausalLMOutput(logits=torch.cat([o.logits for o in cell_outputs], dim=1))
        if labels is not None:
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            out["loss"] = nn.CrossEntropyLoss()(logits, labels[:, 1:].reshape(-1))
        for seg_num, o in enumerate(cell_outputs):
            for key, value in o.items():
                out[f"{key}_{seg_num}"] = value
        return out


class RemembersLength(ReferenceStyleARMT):
    """Keeps the input length in a Python attribute: state that depends on the length in a way
    that is no count of segments."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.tokens_seen = input_ids.shape[1] * 2
        return super().forward(input_ids)


class _BelowBlock(AssociativeBlock):
    def forward(self, hidden_states: torch.Tensor, below: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if below is not None:
            hidden_states = hidden_states + 0.1 * torch.tanh(below.mean(-1))[:, None, None]
        return super().forward(hidden_states)


class ReadsBelowPrevious(ReferenceStyleARMT):
    """Layer l also reads the memory normaliser of layer l-1 from the previous segment, cell
    (l-1, s-1): diagonal-safe. Layer 0 reads none, so it is its own variant."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.__class__ = _BelowBlock

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        logits = []
        for ids in input_ids.split(self.segment_size, dim=1):
            previous = [layer.z for layer in self.layers]  # [B, d_key] each, None in segment 0
            x = self.embed(ids)
            x = torch.cat([x, self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)  # [B, T+m, d]
            for index, layer in enumerate(self.layers):
                x = layer(x, below=previous[index - 1] if index > 0 else None)[0]
            logits.append(self.head(self.norm(x[:, : -self.num_mem_tokens])))
        return torch.cat(logits, dim=1)


class UnbindSegments(ReferenceStyleARMT):
    """Cuts the input with ``unbind`` of a view into ``(S, T)``: full segments only (the view
    exists only when ``T`` divides the length)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            layer.zero_mem()
        segments = input_ids.view(input_ids.shape[0], -1, self.segment_size).unbind(1)
        return torch.cat([_segment(self, ids, lambda layer, x: layer(x)[0]) for ids in segments], dim=1)
