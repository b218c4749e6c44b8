"""Tiny random models of every supported family, built from configs (no downloads)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedModel,
    SiglipVisionConfig,
)

VOCAB = 100
N_LAYERS = 3
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
_GEMMA = dict(_DECODER, head_dim=16)
_NEOX = dict(_DECODER, rotary_pct=0.5)
del _NEOX["num_key_value_heads"]

FAMILIES = (
    "gpt2",
    "neox_parallel",
    "neox_sequential",
    "llama",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_multimodal",
)


def build_tiny_model(family: str) -> PreTrainedModel:
    if family == "gemma3_multimodal":  # blocks live under model.language_model
        vision = SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14,
        )
        config = Gemma3Config(
            text_config=Gemma3TextConfig(**_GEMMA), vision_config=vision, mm_tokens_per_image=4,
            image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
        )
        return Gemma3ForConditionalGeneration(config).eval()
    config = {
        "gpt2": lambda: GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                   bos_token_id=0, eos_token_id=0),
        "neox_parallel": lambda: GPTNeoXConfig(**_NEOX, use_parallel_residual=True),
        "neox_sequential": lambda: GPTNeoXConfig(**_NEOX, use_parallel_residual=False),
        "llama": lambda: LlamaConfig(**_DECODER),
        "gemma": lambda: GemmaConfig(**_GEMMA),
        "gemma2": lambda: Gemma2Config(**_GEMMA),
        "gemma3": lambda: Gemma3TextConfig(**_GEMMA),
    }[family]()
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_model(request) -> PreTrainedModel:
    """Shared by the tests of a module: they must not change it (use make_tiny_model for that)."""
    return build_tiny_model(request.param)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB - 4, (2, 7))


@pytest.fixture
def make_tiny_model():
    """The builder, for tests that need one particular family (`make_tiny_model("llama")`)."""
    return build_tiny_model
