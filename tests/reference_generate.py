"""A reference-style ARMT with ``generate``, around a Hugging Face base (transformers 5.x).

Written like the public reference's ``AssociativeLayerWrapper`` / ``AssociativeMemoryCell`` /
``AssociativeRecurrentWrapper`` (DESIGN.md §1.2, §8.2), not copied from it: a ``generate_mode``
flag on every layer, ``zero_mem`` setting zero tensors of batch 1, a cell called once per
segment with keyword arguments, and a wrapper ``generate`` that runs every segment but the last
through the cell and hands the last one to the cell's ``generate`` (the base model's HF
``generate`` on ``inputs_embeds``), then zeroes the memory. No segment counter (``seg_num``):
``diagpass.compile`` cannot prove a Python counter (the reference keeps one for logging).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diagpass.models import build_base


def _dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    x_rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return torch.cat([x] * nu, dim=-1) * x_rolled


class LayerWrapper(nn.Module):
    def __init__(self, layer: nn.Module, d_model: int, num_mem_tokens: int, d_mem: int) -> None:
        super().__init__()
        self.layer = layer
        self.d_model = d_model
        self.num_mem_tokens = num_mem_tokens
        self.d_key = 6 * d_mem
        self.W_mq = nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False)
        self.W_mv = nn.Linear(d_model, d_model, bias=False)
        self.W_mb = nn.Linear(d_model, 1)
        for name in ("attention_type", "layer_idx"):
            if name in layer.__dict__:
                setattr(self, name, layer.__dict__[name])
        self.generate_mode = False
        self.zero_mem()

    def zero_mem(self) -> None:
        self.first_seg = True
        self.W_mem = torch.zeros(1, self.d_key, self.d_model)
        self.z = torch.zeros(1, self.d_key)

    def associate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.W_mem = self.W_mem.to(hidden_states.device)
        self.z = self.z.to(hidden_states.device)
        mq = _dpfp(self.W_mq(hidden_states))
        num = torch.einsum("ijk,ikt->ijt", mq, self.W_mem)
        denom = torch.einsum("ik,ijk->ij", self.z, mq)[..., None] + 1e-5
        return num / denom

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.first_seg:
            hidden_states = self.associate(hidden_states) + hidden_states
        out = self.layer(hidden_states, *args, **kwargs)
        if not self.generate_mode:
            rows = out[0] if isinstance(out, tuple) else out  # 5.x layers return a tensor
            self.update_mem(rows[:, -self.num_mem_tokens :])
            self.first_seg = False
        return out

    def update_mem(self, mem_tokens: torch.Tensor) -> None:
        self.W_mem = self.W_mem.to(mem_tokens.device)
        self.z = self.z.to(mem_tokens.device)
        mk = _dpfp(self.W_mk(mem_tokens))
        new_mv = self.W_mv(mem_tokens)
        if not self.first_seg:
            num = torch.einsum("ijk,ikt->ijt", mk, self.W_mem)
            denom = torch.einsum("ij,ikj->ik", self.z, mk)[..., None] + 1e-5
            prev_mv = num / denom
            coef = torch.clip(1 - denom / (torch.linalg.norm(mk, dim=-1) ** 2 + 1e-5)[..., None], 0, 1).detach()
        else:
            prev_mv = torch.zeros_like(new_mv)
            coef = 1
        mb = torch.sigmoid(self.W_mb(mem_tokens))[..., 0]
        self.W_mem = self.W_mem + torch.einsum("ijk,ijt,ij->ikt", mk, new_mv - prev_mv, mb)
        self.z = self.z + (coef * mk).sum(dim=1)


class MemoryCell(nn.Module):
    def __init__(self, base_model: nn.Module, num_mem_tokens: int, d_mem: int) -> None:
        super().__init__()
        self.model = base_model
        self.num_mem_tokens = num_mem_tokens
        d_model = base_model.get_input_embeddings().embedding_dim
        self.layers = base_model.model.layers
        for i in range(len(self.layers)):
            self.layers[i] = LayerWrapper(self.layers[i], d_model, num_mem_tokens, d_mem)
        std = base_model.get_input_embeddings().weight.data.std()
        self.memory = nn.Parameter(torch.randn(num_mem_tokens, d_model) * std)

    def generate_mode(self, is_on: bool) -> None:
        for layer in self.layers:
            layer.generate_mode = is_on

    def zero_mem(self) -> None:
        for layer in self.layers:
            layer.zero_mem()

    def forward(self, input_ids: torch.Tensor, zero_mem: bool = False, **kwargs: Any) -> Any:
        if zero_mem:
            self.zero_mem()
        seg_kwargs = self.process_input(input_ids, **kwargs)
        out = self.model(**seg_kwargs)
        return out.logits[:, : -self.num_mem_tokens]

    def process_input(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        memory = self.memory.repeat(input_ids.shape[0], 1, 1)
        inputs_embeds = torch.cat([self.model.get_input_embeddings()(input_ids), memory], dim=1)
        seg_kwargs = dict(**kwargs)
        seg_kwargs["input_ids"] = None
        seg_kwargs["inputs_embeds"] = inputs_embeds
        if kwargs.get("attention_mask") is not None:
            mask = torch.ones(*inputs_embeds.shape[:2], dtype=torch.int64).to(input_ids.device)
            mask[:, : -self.num_mem_tokens] = kwargs["attention_mask"]
            seg_kwargs["attention_mask"] = mask
        return seg_kwargs

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, zero_mem: bool = False, **generate_kwargs: Any) -> Any:
        if zero_mem:
            self.zero_mem()
        self.generate_mode(True)
        seg_kwargs = self.process_input(input_ids, attention_mask=attention_mask)
        mask = seg_kwargs.get("attention_mask")
        out = self.model.generate(
            inputs_embeds=seg_kwargs["inputs_embeds"][:, : -self.num_mem_tokens],
            attention_mask=None if mask is None else mask[:, : -self.num_mem_tokens],
            **generate_kwargs,
        )
        self.generate_mode(False)
        return out


class RecurrentWrapper(nn.Module):
    def __init__(self, memory_cell: MemoryCell, segment_size: int) -> None:
        super().__init__()
        self.memory_cell = memory_cell
        self.segment_size = segment_size

    def segment(self, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
        segments: list[dict[str, torch.Tensor]] = []
        for key, tensor in kwargs.items():
            if tensor is not None:
                for s, piece in enumerate(tensor.split(self.segment_size, dim=1)):
                    if s < len(segments):
                        segments[s][key] = piece
                    else:
                        segments.append({key: piece})
        return segments

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.memory_cell.zero_mem()
        logits = [self.memory_cell(**segment, zero_mem=False) for segment in self.segment(input_ids=input_ids, attention_mask=attention_mask)]
        self.memory_cell.zero_mem()
        return torch.cat(logits, dim=1)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs: Any) -> Any:
        self.memory_cell.zero_mem()
        segmented = self.segment(input_ids=input_ids, attention_mask=attention_mask)
        for segment in segmented[:-1]:
            cell_out = self.memory_cell(**segment, output_hidden_states=True, zero_mem=False)  # noqa: F841
        final_segment = segmented[-1]
        final_segment.setdefault("attention_mask", None)
        out = self.memory_cell.generate(**final_segment, zero_mem=False, **generate_kwargs)
        self.memory_cell.zero_mem()
        return out


def reference_style_armt(*, segment_size: int = 8, num_mem_tokens: int = 2, d_mem: int = 4, seed: int = 0) -> RecurrentWrapper:
    """A tiny random Llama (2 layers) in the reference's wrapper, ``W_mv`` non-zero."""
    base = build_base("llama", seed=seed)
    torch.manual_seed(seed)
    cell = MemoryCell(base, num_mem_tokens, d_mem)
    with torch.no_grad():
        for layer in cell.layers:
            layer.W_mv.weight.normal_(0.0, 0.05)
    return RecurrentWrapper(cell, segment_size).eval()
