"""Helpers shared by the zoo's wrappers: find the decoder layers of an HF model, check inputs.

Plain PyTorch; nothing here knows about the compiler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "LAYER_ATTRIBUTES",
    "KNOWN_LAYER_PATHS",
    "find_decoder_layers",
    "copy_layer_attributes",
    "check_input_ids",
    "layer_hidden_states",
    "replace_hidden_states",
]

# Dotted attribute paths, relative to the causal LM, where known HF families keep their decoder layers.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi3 ...
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
    "model.language_model.layers",
    "layers",
    "h",
)

# Attributes an HF model loop may read from a decoder layer (e.g. Qwen2 in transformers 4.5x indexes its
# mask mapping with `decoder_layer.attention_type`). A wrapper copies the ones the layer has.
LAYER_ATTRIBUTES: tuple[str, ...] = (
    "attention_type",
    "layer_type",
    "layer_idx",
    "is_sliding",
    "sliding_window",
    "use_sliding_window",
)


def _get_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(base: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_path, module_list)`` of the decoder layers of a causal LM.

    Tries the attribute paths of known HF families first, then falls back to the largest ``nn.ModuleList``
    in the module tree.
    """
    for path in KNOWN_LAYER_PATHS:
        found = _get_path(base, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    best_path, best = "", None
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best_path, best = name, module
    if best is None or len(best) == 0:
        raise ValueError(f"could not find the decoder layers of {type(base).__name__}: no nn.ModuleList")
    return best_path, best


def copy_layer_attributes(wrapper: nn.Module, layer: nn.Module) -> None:
    """Copy the plain attributes an HF model loop reads from a decoder layer onto its wrapper."""
    for name in LAYER_ATTRIBUTES:
        if name in layer.__dict__:  # plain attribute, not a submodule / parameter
            setattr(wrapper, name, layer.__dict__[name])


def check_input_ids(input_ids: Any) -> None:
    """Reject what the wrappers cannot run: non-tensors, non-integer dtypes, wrong rank, empty inputs."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, tokens], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): need at least one token")


def layer_hidden_states(out: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output, version-correctly.

    transformers 5.x decoder layers return a tensor; 4.x return a tuple whose first entry is the hidden
    states. (Blindly taking ``out[0]`` of a 5.x tensor would silently take batch row 0.)
    """
    return out[0] if isinstance(out, tuple) else out


def replace_hidden_states(out: Any, hidden_states: torch.Tensor) -> Any:
    """Rebuild a decoder layer's output structure (tensor or tuple) around new hidden states."""
    if isinstance(out, tuple):
        return (hidden_states,) + tuple(out[1:])
    return hidden_states


def install_output_capturing_hooks(base: nn.Module) -> None:
    """Install transformers' lazy output-capturing hooks now, not on the first forward.

    transformers 5.x installs forward hooks on a model's first call, under a
    ``threading.Lock``. Dynamo cannot trace that, so a model compiled before its first
    eager call would graph-break inside the segment loop. Older versions have no such
    hooks, and this does nothing.
    """
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    for module in base.modules():
        if isinstance(module, PreTrainedModel):
            try:
                maybe_install_capturing_hooks(module)
            except Exception:  # a model without recordable outputs
                pass
