"""The arithmetic a stopped-early forward pass does per token, to set achieved GFLOP/s against the GEMM roofline.

Counted honestly, as what the pass must compute: 2 FLOPs per weight-matrix entry of every block that runs (the
q/k/v/o and MLP projections: each token multiplies each entry once), plus attention's two matmuls (scores QKᵀ and
probabilities × V), each 2 · heads · head_dim FLOPs per key, over the (t + 1) keys a causal query at position t
sees: (T + 1) / 2 on average over a context of T. Norms, rotary embeddings, softmax and activations are elementwise
and not counted; neither are the embedding lookup (no arithmetic) and the LM head, which a stopped pass never runs.
A hookpoint inside a block counts only the whole blocks before it (an undercount, never an overcount).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from saelab.errors import HookpointError
from saelab.models.hookpoints import blocks, complete_blocks_before


def attention_width(model: nn.Module) -> int:
    """heads × head_dim: the width of the queries (Llama-style configs may set `head_dim` apart from the hidden
    size; GPT-2's config maps `num_attention_heads` to `n_head`)."""
    config = model.config.get_text_config()
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * int(head_dim)


def forward_flops_per_token(model: nn.Module, hookpoints: Sequence[str], context_length: int) -> float:
    """FLOPs per token of a forward pass over contexts of `context_length` that stops at the deepest of
    `hookpoints` (`capture(..., stop_early=True)`)."""
    if not hookpoints:
        raise HookpointError("forward_flops_per_token got no hookpoints; pass the ones the forward pass captures")
    n_blocks = max(complete_blocks_before(model, name) for name in hookpoints)
    run = blocks(model)[:n_blocks]
    matrix_entries = sum(p.numel() for block in run for p in block.parameters() if p.ndim == 2)
    attention = n_blocks * 2 * 2 * attention_width(model) * (context_length + 1) / 2
    return 2.0 * matrix_entries + attention
