"""The segment loop shared by the per-layer-memory wrappers (ARMT, linear memory, per-layer memory RMT).

Written the way research code is written: state lives in the layer wrappers' attributes, the loop over
segments is plain Python, and every segment is a fresh call of the Hugging Face model on
``inputs_embeds`` (so positions restart at 0 and attention is causal within the segment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ._common import _get_path, check_input_ids, find_decoder_layers, install_output_capturing_hooks

__all__ = ["SegmentedMemoryLM", "causal_lm_loss"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over the whole (concatenated) sequence; ``-100`` labels are ignored."""
    vocab = logits.shape[-1]
    shifted = logits[:, :-1].reshape(-1, vocab).float()  # [B*(N-1), V]
    targets = labels[:, 1:].reshape(-1).to(shifted.device)  # [B*(N-1)]
    return F.cross_entropy(shifted, targets, ignore_index=-100)


class SegmentedMemoryLM(nn.Module):
    """Base of the wrappers whose memory lives in the decoder layers.

    Holds the Hugging Face causal LM as ``self.model`` and ``m`` learned memory-token embeddings
    ``self.memory`` ([m, d]) that are appended at the END of every segment (and, when the class sets
    ``read_memory = True``, also put at its START, RMT-style, so that the text can attend to them).
    Subclasses replace each decoder layer, in place in the base model's ``nn.ModuleList``, by a stateful
    wrapper that has a ``reset_memory()`` method.
    """

    read_memory: bool = False

    def __init__(
        self,
        base_model: nn.Module,
        *,
        segment_size: int,
        num_mem_tokens: int,
        memory_init_std: float | None = None,
        k2: int | None = None,
    ) -> None:
        super().__init__()
        if segment_size < 1:
            raise ValueError(f"segment_size must be >= 1, got {segment_size}")
        if num_mem_tokens < 0:
            raise ValueError(f"num_mem_tokens must be >= 0, got {num_mem_tokens}")
        self.model = base_model
        self.config = getattr(base_model, "config", None)
        self.segment_size = int(segment_size)
        self.num_mem_tokens = int(num_mem_tokens)
        self._layers_path, layers = find_decoder_layers(base_model)
        install_output_capturing_hooks(base_model)
        self.num_layers = len(layers)
        embed = base_model.get_input_embeddings()
        weight = embed.weight  # [V, d]
        self.d_model = int(weight.shape[-1])
        std = float(weight.detach().float().std()) if memory_init_std is None else float(memory_init_std)
        memory = torch.randn(self.num_mem_tokens, self.d_model, device=weight.device) * std  # [m, d]
        self.memory = nn.Parameter(memory.to(weight.dtype))
        if k2 is not None and k2 != -1 and k2 < 1:
            raise ValueError(f"k2 must be None, -1 (full BPTT) or >= 1, got {k2}")
        self.k2 = k2
        """Truncated BPTT, RMT's knob: the memory carries gradient through the last ``k2`` segments
        only (:meth:`manage_gradients`); ``None`` or ``-1``: full BPTT."""

    # -- layers ---------------------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        """The base model's decoder-layer ``nn.ModuleList`` (holding the wrappers once wrapped)."""
        return _get_path(self.model, self._layers_path)

    @property
    def layers_path(self) -> str:
        """Dotted path of the decoder-layer list relative to ``self.model`` (e.g. ``model.layers``)."""
        return self._layers_path

    def _wrap_layers(self, make_wrapper: Callable[[nn.Module, int], nn.Module]) -> None:
        """Replace every decoder layer, in place, by ``make_wrapper(layer, index)``."""
        layers = self.layers
        for i in range(len(layers)):
            layers[i] = make_wrapper(layers[i], i)

    def reset_memory(self) -> None:
        """Clear the recurrent state of every layer wrapper."""
        for layer in self.layers:
            layer.reset_memory()

    def manage_gradients(self, seg_num: int, n_segments: int) -> None:
        """After segment ``seg_num`` of ``n_segments``: cut the memory's gradient, as the RMT
        reference's ``manage_gradients`` does with ``max_n_segments`` = this forward's segments.
        Kept: after segment 0, with ``k2`` None or -1, and once ``seg_num + k2 > n_segments``; so
        the memory read by segments ``2 .. n_segments - k2 + 1`` is detached (``k2 = 1`` also
        detaches the memory left after the last segment)."""
        k2 = self.k2
        if seg_num == 0 or k2 in (-1, None) or seg_num + k2 > n_segments:
            return
        for layer in self.layers:
            layer.detach_memory()

    # -- forward --------------------------------------------------------------------------------------

    def _segment_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base model's ``inputs_embeds`` [B, t+m, d] (or [B, m+t+m, d]) and mask of tokens ``start:end``."""
        batch = input_ids.shape[0]
        m = self.num_mem_tokens
        lead = m if self.read_memory else 0  # memory rows before the text
        seg_embeds = self.model.get_input_embeddings()(input_ids[:, start:end])  # [B, t, d]
        if m > 0:
            memory = self.memory.unsqueeze(0).expand(batch, -1, -1).to(seg_embeds.dtype)  # [B, m, d]
            if self.read_memory:
                seg_embeds = torch.cat([memory, seg_embeds, memory], dim=1)  # [B, m+t+m, d]
            else:
                seg_embeds = torch.cat([seg_embeds, memory], dim=1)  # [B, t+m, d]
        seg_mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, m)  # [B, m]
            seg_mask = torch.cat([ones[:, :lead], attention_mask[:, start:end], ones], dim=1)  # like embeds
        return seg_embeds, seg_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the segments in order; return the logits ``[B, N, V]`` of the N text tokens.

        ``attention_mask`` ([B, N], optional) is split like the tokens; memory rows are always attended.
        Extra keyword arguments go to every call of the base model.
        """
        check_input_ids(input_ids)
        self.reset_memory()
        n_tokens = input_ids.shape[1]
        lead = self.num_mem_tokens if self.read_memory else 0  # memory rows before the text

        n_segments = -(-n_tokens // self.segment_size)
        all_logits = []
        all_hidden = []
        for seg_num, start in enumerate(range(0, n_tokens, self.segment_size)):
            end = min(start + self.segment_size, n_tokens)
            n_text = end - start
            seg_embeds, seg_mask = self._segment_inputs(input_ids, attention_mask, start, end)
            out = self.model(
                inputs_embeds=seg_embeds,
                attention_mask=seg_mask,
                use_cache=False,
                output_hidden_states=output_hidden_states,
                **kwargs,
            )
            all_logits.append(out.logits[:, lead : lead + n_text])  # [B, t, V]
            if output_hidden_states:
                all_hidden.append([h[:, lead : lead + n_text] for h in out.hidden_states])  # L+1 x [B, t, d]
            self.manage_gradients(seg_num, n_segments)

        logits = torch.cat(all_logits, dim=1)  # [B, N, V]
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*all_hidden))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states)

    # -- generation -----------------------------------------------------------------------------------

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs: Any
    ) -> Any:
        """Read a prompt of any length, then decode with the base model's Hugging Face ``generate``.

        The reference semantics (DESIGN.md §8.2): the memory is reset; every segment of the prompt
        but the last (the last may be full) runs through the model with memory read and written;
        then the last segment, without memory tokens, is the prompt of the base model's own
        ``generate`` (with its KV cache, positions restarting at 0), while every layer reads the
        memory and never writes it. Returns what HF ``generate`` returns for ``inputs_embeds``: the
        new tokens only. ``generate_kwargs`` (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ``eos_token_id``, ``pad_token_id``...) go to HF ``generate`` unchanged. The
        memory is reset again at the end.
        """
        check_input_ids(input_ids)
        self._check_can_generate()
        n_tokens = input_ids.shape[1]
        prefill_end = ((n_tokens - 1) // self.segment_size) * self.segment_size  # >= 1 token left to decode from
        self.reset_memory()
        try:
            for start in range(0, prefill_end, self.segment_size):
                seg_embeds, seg_mask = self._segment_inputs(input_ids, attention_mask, start, start + self.segment_size)
                # The per-segment call diagpass.compile's fast.generate collects (one module call per segment).
                self.model(inputs_embeds=seg_embeds, attention_mask=seg_mask, use_cache=False)
            last_embeds = self.model.get_input_embeddings()(input_ids[:, prefill_end:])  # [B, t, d], no memory rows
            last_mask = None if attention_mask is None else attention_mask[:, prefill_end:]  # [B, t]
        except BaseException:
            self.reset_memory()
            raise
        # Decoding is a call of its own, outside any try block here: torch.compile(model.generate)
        # can then end the prefill's graph at this call (Dynamo cannot break a graph inside a try).
        return self._decode(last_embeds, last_mask, generate_kwargs)

    def _decode(self, last_embeds: torch.Tensor, last_mask: torch.Tensor | None, generate_kwargs: dict[str, Any]) -> Any:
        """HF ``generate`` on the last segment with every layer read-only; the memory is reset after."""
        self._set_read_only(True)
        try:
            return self.model.generate(inputs_embeds=last_embeds, attention_mask=last_mask, **generate_kwargs)
        finally:
            self._set_read_only(False)
            self.reset_memory()

    def _check_can_generate(self) -> None:
        """``NotImplementedError`` unless every layer has a read-only mode and memory sits only at the end."""
        if self.read_memory:
            raise NotImplementedError(
                f"{type(self).__name__}.generate: memory tokens read at the start of a segment would have to sit in "
                "the decoder's KV cache; only end-of-segment memory (ARMT, linear memory) generates"
            )
        missing = [i for i, layer in enumerate(self.layers) if not hasattr(layer, "read_only")]
        if missing:
            raise NotImplementedError(
                f"{type(self).__name__}.generate: layers {missing} have no read-only mode (read the memory, never write)"
            )

    def _set_read_only(self, on: bool) -> None:
        for layer in self.layers:
            if hasattr(layer, "read_only"):
                layer.read_only = on
