"""Published architectures, built on the meta device from their published hyperparameters
(transformers' configs; no weights are downloaded or allocated), for `planner.estimate`.

A preset's builder takes ``(batch_size, seq_len)`` and returns ``(model, example_inputs,
example_kwargs)`` on the meta device; a vision preset reads ``seq_len`` as the image side
in pixels. Language models get ``labels=input_ids`` so that they return their loss.

Sources: GPT-2, Radford et al. 2019 ("Language Models are Unsupervised Multitask
Learners", Table 2: 117M/1542M as counted there; 124M/1558M with transformers' tied
embeddings and position table); Llama 2, Touvron et al. 2023 (7B: d=4096, 32 layers, 32
heads, FFN 11008, vocabulary 32000); Llama 3.2, Meta's model cards (1B: d=2048, 16 layers,
FFN 8192; 3B: d=3072, 28 layers, 24 heads; 8 key-value heads, vocabulary 128256, tied
embeddings); ViT-H/14, Dosovitskiy et al. 2021 (Table 1: d=1280, 32 layers, 16 heads, MLP
5120, 632M parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from planner.errors import OptionError

Builder = Callable[[int, int], tuple[torch.nn.Module, tuple, dict]]


@dataclass(frozen=True)
class Preset:
    name: str
    build: Builder
    published_parameters: int        # as the source counts them, for the preset's check
    default_seq_len: int
    source: str


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise OptionError("the architecture presets need transformers: pip install 'memsched[experiments]'") from error
    transformers.logging.set_verbosity_error()
    return transformers


def _causal_lm(config_class: str, model_class: str, **config: Any) -> Builder:
    def build(batch_size: int, seq_len: int) -> tuple[torch.nn.Module, tuple, dict]:
        transformers = _transformers()
        with torch.device("meta"):
            model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).train()
            input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        return model, (input_ids,), {"labels": input_ids}
    return build


def _vit(**config: Any) -> Builder:
    def build(batch_size: int, image_size: int) -> tuple[torch.nn.Module, tuple, dict]:
        transformers = _transformers()
        with torch.device("meta"):
            model = transformers.ViTForImageClassification(
                transformers.ViTConfig(image_size=image_size, **config)).train()
            pixels = torch.zeros(batch_size, 3, image_size, image_size)
            labels = torch.zeros(batch_size, dtype=torch.long)
        return model, (pixels,), {"labels": labels}
    return build


_LLAMA_3_2 = dict(num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                  max_position_embeddings=131072, intermediate_size=8192)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("gpt2", _causal_lm("GPT2Config", "GPT2LMHeadModel"), 124_439_808, 1024,
           "Radford et al. 2019; transformers' gpt2 config (n_embd 768, 12 layers, 12 heads)"),
    Preset("gpt2-xl", _causal_lm("GPT2Config", "GPT2LMHeadModel", n_embd=1600, n_layer=48, n_head=25),
           1_557_611_200, 1024, "Radford et al. 2019; transformers' gpt2-xl config (n_embd 1600, 48 layers, 25 heads)"),
    Preset("llama-3.2-1b", _causal_lm("LlamaConfig", "LlamaForCausalLM", hidden_size=2048, num_hidden_layers=16,
                                      num_attention_heads=32, head_dim=64, **_LLAMA_3_2),
           1_235_814_400, 4096, "Meta Llama 3.2 model card; config d=2048, 16 layers, 32 heads, 8 KV heads"),
    Preset("llama-3.2-3b", _causal_lm("LlamaConfig", "LlamaForCausalLM", hidden_size=3072, num_hidden_layers=28,
                                      num_attention_heads=24, head_dim=128, **_LLAMA_3_2),
           3_212_749_824, 4096, "Meta Llama 3.2 model card; config d=3072, 28 layers, 24 heads, 8 KV heads"),
    Preset("llama-2-7b", _causal_lm("LlamaConfig", "LlamaForCausalLM", hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                    vocab_size=32000, max_position_embeddings=4096),
           6_738_415_616, 4096, "Touvron et al. 2023 (Llama 2), 7B: d=4096, 32 layers, 32 heads, FFN 11008"),
    Preset("vit-h-14", _vit(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                            patch_size=14, num_labels=1000),
           632_000_000, 224, "Dosovitskiy et al. 2021, Table 1: ViT-Huge, patch 14, 632M parameters"),
)}


def preset(name: str) -> Preset:
    """The named preset; `OptionError` listing them."""
    if name not in PRESETS:
        raise OptionError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}, or give a builder as "
                          "'module:function' taking (batch_size, seq_len)")
    return PRESETS[name]
