"""The forward FLOP counter against counts done by hand for tiny Llama and GPT-2 models."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from saelab.errors import HookpointError
from saelab.models.flops import forward_flops_per_token

T = 8


def _llama() -> LlamaForCausalLM:
    # q 16x16, k and v 16x8 (one KV head of 8), o 16x16, gate/up/down 16x32: 2,304 weights per block
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                                        max_position_embeddings=T)).eval()


def test_llama_counts_the_blocks_run_and_causal_attention() -> None:
    model = _llama()
    per_block = 2 * (16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 32)  # 4,608
    attention = 2 * 2 * 16 * (T + 1) / 2  # scores and values, 16 = 2 heads x 8, mean keys (T + 1) / 2 = 4.5
    assert forward_flops_per_token(model, ["resid_post.1"], T) == 2 * (per_block + attention) == 9_792
    assert forward_flops_per_token(model, ["resid_post.0", "resid_post.2"], T) == 3 * (per_block + attention)
    assert forward_flops_per_token(model, ["resid_pre.1"], T) == per_block + attention  # block 1 not run yet
    assert forward_flops_per_token(model, ["mlp_out.1"], T) == per_block + attention  # only whole blocks count
    assert forward_flops_per_token(model, ["resid_pre.0"], T) == 0


def test_gpt2_counts_its_conv1d_matrices_and_not_the_lm_head() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=50, n_positions=T)).eval()
    per_block = 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)  # c_attn, attn c_proj, c_fc, mlp c_proj
    attention = 2 * 2 * 16 * (T + 1) / 2
    assert forward_flops_per_token(model, ["resid_post.1"], T) == 2 * (per_block + attention)


def test_no_hookpoint_is_refused() -> None:
    with pytest.raises(HookpointError, match="no hookpoints"):
        forward_flops_per_token(_llama(), [], T)
