"""diagpass.models: the reference model zoo (recurrent-memory transformers around HF causal LMs).

Plain PyTorch / Hugging Face code, written in the style of research code; it never imports the
compiler. Layer wrappers sit IN the base model's decoder-layer ``nn.ModuleList`` (module path
``...layers.<l>`` for Llama/Qwen2, ``...h.<l>`` for GPT-2).
"""

from ._common import check_input_ids, find_decoder_layers, layer_hidden_states
from .armt import ARMT, AssociativeLayer, dpfp
from .builders import (
    BASES,
    armt_from_pretrained,
    build_armt,
    build_base,
    build_linear_memory,
    build_per_layer_memory_rmt,
    build_rmt,
    llama_3_2_1b_config,
    llama_3_2_3b_config,
    tiny_armt,
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_qwen2_config,
)
from .linear_memory import LinearMemoryLayer, LinearMemoryTransformer, elu_plus_one
from .rmt import RMT, PerLayerMemoryLayer, PerLayerMemoryRMT

__all__ = [
    "ARMT",
    "AssociativeLayer",
    "dpfp",
    "RMT",
    "PerLayerMemoryRMT",
    "PerLayerMemoryLayer",
    "LinearMemoryTransformer",
    "LinearMemoryLayer",
    "elu_plus_one",
    "find_decoder_layers",
    "layer_hidden_states",
    "check_input_ids",
    "BASES",
    "tiny_llama_config",
    "tiny_qwen2_config",
    "tiny_gpt2_config",
    "tiny_gemma2_config",
    "tiny_gemma3_config",
    "llama_3_2_1b_config",
    "llama_3_2_3b_config",
    "build_base",
    "build_armt",
    "build_rmt",
    "build_linear_memory",
    "build_per_layer_memory_rmt",
    "tiny_armt",
    "armt_from_pretrained",
]
