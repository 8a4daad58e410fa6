"""Vanilla RMT (Bulatov et al., 2022) and a per-layer-memory variant.

* :class:`RMT`: the write memory tokens sit at the END of each segment. Segment 0 uses the learned memory
  embeddings; segment s > 0 uses the base model's final hidden state (``hidden_states[-1]``) at the write
  rows of segment s-1. So layer 0 at segment s depends on the LAST layer at segment s-1: no diagonal
  parallelism (the negative case for the dependency analyzer).
* :class:`PerLayerMemoryRMT`: layer l's write-row output at segment s-1 replaces the read memory rows of
  layer l's input at segment s (diagonal-safe: edges (l-1, s) and (l, s-1) only).

Under causal attention, text rows cannot see memory rows placed after them. So, as in Bulatov et al.'s
decoder-only RMT, the memory is ALSO placed at the start of the segment (the "read" copy):
the segment row is ``[memory (read), text, memory (write)]`` and the new memory is taken from the write
rows. ``read_memory=False`` gives the end-only layout (where memory cannot change the text logits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ._common import check_input_ids, copy_layer_attributes, find_decoder_layers, install_output_capturing_hooks, layer_hidden_states
from ._segment_loop import SegmentedMemoryLM, causal_lm_loss

__all__ = ["RMT", "PerLayerMemoryLayer", "PerLayerMemoryRMT"]


class RMT(nn.Module):
    """Recurrent Memory Transformer: memory tokens carried from the last layer of one segment to the next.

    No per-layer state and no layer wrappers: the base model is used as it is.
    """

    def __init__(
        self,
        base_model: nn.Module,
        *,
        segment_size: int,
        num_mem_tokens: int,
        memory_init_std: float | None = None,
        read_memory: bool = True,
    ) -> None:
        super().__init__()
        if segment_size < 1:
            raise ValueError(f"segment_size must be >= 1, got {segment_size}")
        if num_mem_tokens < 1:
            raise ValueError(f"RMT needs at least one memory token, got num_mem_tokens={num_mem_tokens}")
        self.model = base_model
        self.config = getattr(base_model, "config", None)
        self.segment_size = int(segment_size)
        self.num_mem_tokens = int(num_mem_tokens)
        self.read_memory = bool(read_memory)
        self._layers_path, layers = find_decoder_layers(base_model)
        install_output_capturing_hooks(base_model)
        self.num_layers = len(layers)
        weight = base_model.get_input_embeddings().weight  # [V, d]
        self.d_model = int(weight.shape[-1])
        std = float(weight.detach().float().std()) if memory_init_std is None else float(memory_init_std)
        memory = torch.randn(self.num_mem_tokens, self.d_model, device=weight.device) * std  # [m, d]
        self.memory = nn.Parameter(memory.to(weight.dtype))
        self.memory_state: torch.Tensor | None = None

    @property
    def layers_path(self) -> str:
        """Dotted path of the decoder-layer list relative to ``self.model``."""
        return self._layers_path

    def reset_memory(self) -> None:
        """Forget the memory carried by the last forward."""
        self.memory_state = None

    def memory_states(self) -> torch.Tensor | None:
        """The memory ``[B, m, d]`` that the last forward produced (final segment's memory rows)."""
        return self.memory_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the segments in order; return the logits ``[B, N, V]`` of the N text tokens."""
        check_input_ids(input_ids)
        self.reset_memory()
        batch, n_tokens = input_ids.shape
        embed = self.model.get_input_embeddings()
        m = self.num_mem_tokens
        lead = m if self.read_memory else 0  # memory rows before the text

        memory_state = self.memory.unsqueeze(0).expand(batch, -1, -1)  # [B, m, d]
        all_logits = []
        all_hidden = []
        for start in range(0, n_tokens, self.segment_size):
            end = min(start + self.segment_size, n_tokens)
            n_text = end - start
            seg_embeds = embed(input_ids[:, start:end])  # [B, t, d]
            memory = memory_state.to(seg_embeds.dtype)  # [B, m, d]
            if self.read_memory:
                seg_embeds = torch.cat([memory, seg_embeds, memory], dim=1)  # [B, m+t+m, d]
            else:
                seg_embeds = torch.cat([seg_embeds, memory], dim=1)  # [B, t+m, d]
            seg_mask = None
            if attention_mask is not None:
                ones = attention_mask.new_ones(batch, m)  # [B, m]
                seg_mask = torch.cat([ones[:, :lead], attention_mask[:, start:end], ones], dim=1)  # like embeds
            out = self.model(
                inputs_embeds=seg_embeds,
                attention_mask=seg_mask,
                use_cache=False,
                output_hidden_states=True,
                **kwargs,
            )
            memory_state = out.hidden_states[-1][:, -m:]  # [B, m, d]
            all_logits.append(out.logits[:, lead : lead + n_text])  # [B, t, V]
            if output_hidden_states:
                all_hidden.append([h[:, lead : lead + n_text] for h in out.hidden_states])  # L+1 x [B, t, d]

        self.memory_state = memory_state
        logits = torch.cat(all_logits, dim=1)  # [B, N, V]
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*all_hidden))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states)


class PerLayerMemoryLayer(nn.Module):
    """A decoder layer whose read memory rows at segment s are its own write-row output at segment s-1.

    The write rows are the last m rows; the read rows are the first m rows (``read_memory=True``) or,
    end-only layout, the last m rows. State: ``self.mem`` [B, m, d] and the bool ``first_seg``. On the
    first segment the memory rows come from the layer below (the learned memory embeddings at layer 0).
    """

    def __init__(self, layer: nn.Module, num_mem_tokens: int, read_memory: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.num_mem_tokens = num_mem_tokens
        self.read_memory = read_memory
        copy_layer_attributes(self, layer)
        self.reset_memory()

    def reset_memory(self) -> None:
        """Forget the carried memory rows."""
        self.mem: torch.Tensor | None = None
        self.first_seg = True

    def detach_memory(self) -> None:
        """Truncated BPTT: keep the memory rows, cut their gradient."""
        if self.mem is not None:
            self.mem = self.mem.detach()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Swap in the carried memory rows, run the layer, keep its memory-row output."""
        m = self.num_mem_tokens
        if not self.first_seg:
            mem = self.mem.to(hidden_states.device)  # [B, m, d]
            if self.read_memory:
                hidden_states = torch.cat([mem, hidden_states[:, m:]], dim=1)  # [B, m+T+m, d]
            else:
                hidden_states = torch.cat([hidden_states[:, :-m], mem], dim=1)  # [B, T+m, d]
        out = self.layer(hidden_states, *args, **kwargs)
        self.mem = layer_hidden_states(out)[:, -m:]  # [B, m, d]
        self.first_seg = False
        return out


class PerLayerMemoryRMT(SegmentedMemoryLM):
    """RMT variant with per-layer memory: layer l at segment s reads layer l's memory output at s-1.

    Segment rows are ``[memory (read), text, memory (write)]`` (``read_memory=True``, the default).
    """

    def __init__(
        self,
        base_model: nn.Module,
        *,
        segment_size: int,
        num_mem_tokens: int,
        memory_init_std: float | None = None,
        read_memory: bool = True,
        k2: int | None = None,
    ) -> None:
        if num_mem_tokens < 1:
            raise ValueError(f"PerLayerMemoryRMT needs at least one memory token, got {num_mem_tokens}")
        super().__init__(
            base_model,
            segment_size=segment_size,
            num_mem_tokens=num_mem_tokens,
            memory_init_std=memory_init_std,
            k2=k2,
        )
        self.read_memory = bool(read_memory)
        self._wrap_layers(lambda layer, i: PerLayerMemoryLayer(layer, num_mem_tokens, self.read_memory))

    def memory_states(self) -> list[torch.Tensor | None]:
        """Per layer, the memory rows ``[B, m, d]`` left by the last forward."""
        return [layer.mem for layer in self.layers]
