"""Canonical hookpoint names (`resid_post.6`, `mlp_out.3`, ...) resolved to modules of Hugging Face causal LMs.

One name means the same tensor in every supported family, so SAEs, stores and analyses never deal with module
paths. Within block L, in forward order:

    resid_pre.L ─► attention ─► attn_out.L ─(+)─► resid_mid.L ─► pre-MLP norm ─► mlp_in.L ─► MLP ─► mlp_out.L
                                                                                      ─(+)─► resid_post.L

`attn_out` and `mlp_out` are what the sublayer adds to the residual stream, so `resid_mid = resid_pre + attn_out`
and `resid_post = resid_mid + mlp_out` hold exactly (in eval mode). In Gemma 2/3 that contribution is the output of
the sandwich norm after the sublayer (`post_attention_layernorm` / `post_feedforward_layernorm`), and the pre-MLP
norm is `pre_feedforward_layernorm`; in Llama and Gemma 1, `post_attention_layernorm` IS the pre-MLP norm.
Parallel-residual GPT-NeoX (Pythia) has no `resid_mid`: attention and MLP both read `resid_pre`.

Hugging Face's `output_hidden_states`: `hidden_states[0]` is the embedding output = `resid_pre.0`, and
`hidden_states[i]` = `resid_pre.i` = `resid_post.(i-1)` for 0 < i < L; the last one, `hidden_states[L]`, is taken
after the final norm in most families, so it is NOT `resid_post.(L-1)` (reading it as such is the classic
off-by-one behind FVU > 1).

Names users already type are accepted as aliases (`canonical_hookpoint`):

- TransformerLens `blocks.L.hook_<kind>` (resid_pre, resid_mid, resid_post, attn_out, mlp_out) -> `<kind>.L`, and
  `blocks.L.ln2.hook_normalized` (the MLP's input) -> `mlp_in.L`;
- a block's module path, as sparsify names hookpoints (`layers.L`, `model.layers.L`, `gpt_neox.layers.L`,
  `transformer.h.L`, `h.L`) -> `resid_post.L`, the block's output;
- a sublayer's module path (`model.layers.L.mlp`, `transformer.h.L.attn`; the model must be at hand) -> the
  hookpoint whose tensor is that module's output, if there is one.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Literal

from torch import nn

from saelab.errors import HookpointError

logger = logging.getLogger(__name__)

# Forward order within a block; hooks.capture relies on nothing but the names.
KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")


@dataclasses.dataclass(frozen=True)
class HookSite:
    """Where a hookpoint's tensor lives: the input (first positional / `hidden_states`) or output of `module`."""

    name: str
    layer: int
    module: nn.Module
    io: Literal["input", "output"]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Submodule names inside one block of a family; `signature` must all exist for the layout to apply."""

    family: str
    blocks: str  # attribute of the decoder holding the ModuleList of blocks
    attn_out: str  # output = attention's contribution to the residual stream
    mlp: str  # input = mlp_in
    mlp_out: str  # output = MLP's contribution to the residual stream
    pre_mlp_norm: str  # input = resid_mid (sequential residual only)
    signature: tuple[str, ...]


_GPT2 = _Layout(
    family="GPT-2",
    blocks="h",
    attn_out="attn",
    mlp="mlp",
    mlp_out="mlp",
    pre_mlp_norm="ln_2",
    signature=("ln_1", "attn", "ln_2", "mlp"),
)
_NEOX = _Layout(
    family="GPT-NeoX",
    blocks="layers",
    attn_out="attention",
    mlp="mlp",
    mlp_out="mlp",
    pre_mlp_norm="post_attention_layernorm",
    signature=("input_layernorm", "attention", "post_attention_layernorm", "mlp"),
)
_LLAMA = _Layout(
    family="Llama",
    blocks="layers",
    attn_out="self_attn",
    mlp="mlp",
    mlp_out="mlp",
    pre_mlp_norm="post_attention_layernorm",
    signature=("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
)
# Gemma 2/3 sandwich norms: the sublayer outputs are normed before they join the residual stream.
_GEMMA2 = _Layout(
    family="Gemma2",
    blocks="layers",
    attn_out="post_attention_layernorm",
    mlp="mlp",
    mlp_out="post_feedforward_layernorm",
    pre_mlp_norm="pre_feedforward_layernorm",
    signature=(
        "input_layernorm",
        "self_attn",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "mlp",
        "post_feedforward_layernorm",
    ),
)
_LAYOUTS = (_GPT2, _NEOX, _LLAMA, _GEMMA2)

# model_type -> layout, for the families whose block code was read and tested.
_MODEL_TYPES = {
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
    "gemma3_text": _GEMMA2,
}

_NAME = re.compile(r"^([a-z_]+)\.(\d+)$")
_TL_NAME = re.compile(
    r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)|ln2\.hook_normalized)$"
)
_BLOCK_PATH = re.compile(r"^(?:\w+\.)*?(?:layers|h)\.(\d+)(?:\.([\w.]+))?$")


def canonical_hookpoint(name: str, model: nn.Module | None = None) -> str:
    """The canonical name of a hookpoint given by any accepted alias (see the module docstring); other names are
    returned as they are (`resolve_hookpoint` then says what is wrong with them). A sublayer's module path needs
    `model`, since which tensor a module outputs depends on the family (Gemma's MLP output is normed again)."""
    plain = _NAME.match(name)
    if plain and plain.group(1) in KINDS:
        return name
    match = _TL_NAME.match(name)
    if match:
        return f"{match.group(2) or 'mlp_in'}.{match.group(1)}"
    match = _BLOCK_PATH.match(name)
    if match is None:
        return name
    layer, path = int(match.group(1)), match.group(2)
    if path is None:
        return f"resid_post.{layer}"
    if model is None:
        return name
    layers = blocks(model)
    try:
        module = layers[layer].get_submodule(path) if layer < len(layers) else None
    except AttributeError:
        module = None
    for kind in ("attn_out", "mlp_out"):
        site = resolve_hookpoint(model, f"{kind}.{layer}")
        if module is not None and site.module is module:
            return site.name
    raise HookpointError(
        f"hookpoint {name!r}: that module's output is not one of saelab's hookpoints in this model; name the "
        f"tensor canonically instead (e.g. mlp_out.{layer}); valid names: {list_hookpoints(model)[:6]}..."
    )


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise HookpointError(
            f"{type(model).__name__} has no `config`; hookpoints need a Hugging Face model (PreTrainedModel)"
        )
    return config.get_text_config().model_type


def _decoder(model: nn.Module) -> nn.Module:
    """The module holding the blocks: the base model, or its language model for multimodal wrappers."""
    base = getattr(model, "base_model", model)
    return getattr(base, "language_model", base)


def _has(block: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(block, n, None), nn.Module) for n in names)


def _layout_and_blocks(model: nn.Module) -> tuple[_Layout, nn.ModuleList]:
    model_type = _model_type(model)
    decoder = _decoder(model)
    layout = _MODEL_TYPES.get(model_type)
    candidates = [layout] if layout is not None else sorted(_LAYOUTS, key=lambda lay: -len(lay.signature))
    for cand in candidates:
        blocks = getattr(decoder, cand.blocks, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and _has(blocks[0], cand.signature):
            if layout is None:
                logger.warning(
                    "model_type %r is not a tested family; its blocks look like %s, so hookpoints follow that "
                    "layout. Check that resid_post matches output_hidden_states before trusting results.",
                    model_type,
                    cand.family,
                )
            return cand, blocks
    supported = ", ".join(sorted(_MODEL_TYPES))
    if layout is not None:
        raise HookpointError(
            f"{type(model).__name__} (model_type {model_type!r}) does not have the {layout.family} block structure "
            f"this transformers version was expected to give ({', '.join(layout.signature)}); "
            "use the transformers version saelab was tested with"
        )
    raise HookpointError(
        f"{type(model).__name__} (model_type {model_type!r}) has no supported block structure; "
        f"hookpoints support the model types {supported} and architectures shaped like them"
    )


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in forward order."""
    return _layout_and_blocks(model)[1]


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def d_model(model: nn.Module) -> int:
    return int(model.config.get_text_config().hidden_size)


def _kinds(blocks: nn.ModuleList) -> tuple[str, ...]:
    """GPT-NeoX blocks carry `use_parallel_residual`; no other supported family has a parallel residual."""
    if getattr(blocks[0], "use_parallel_residual", False):
        return tuple(k for k in KINDS if k != "resid_mid")
    return KINDS


def list_hookpoints(model: nn.Module) -> list[str]:
    """Every valid name, layer by layer in forward order."""
    _, blocks = _layout_and_blocks(model)
    kinds = _kinds(blocks)
    return [f"{kind}.{layer}" for layer in range(len(blocks)) for kind in kinds]


def resolve_hookpoint(model: nn.Module, name: str) -> HookSite:
    """Where `name` (canonical, or an alias: `canonical_hookpoint`) lives in `model`; the site has the canonical
    name."""
    name = canonical_hookpoint(name, model)
    layout, blocks = _layout_and_blocks(model)
    kinds = _kinds(blocks)
    valid = f"valid names are <kind>.<layer> with kind in {list(kinds)} and layer in 0..{len(blocks) - 1}"
    match = _NAME.match(name)
    if match is None:
        raise HookpointError(f"hookpoint {name!r} is not of the form <kind>.<layer> (e.g. 'resid_post.3'); {valid}")
    kind, layer = match.group(1), int(match.group(2))
    if kind == "resid_mid" and kind not in kinds:
        raise HookpointError(
            f"hookpoint {name!r} does not exist: this {layout.family} model uses a parallel residual "
            "(attention and MLP both read resid_pre), so there is no residual stream between them; "
            f"use resid_pre, mlp_in or resid_post instead. {valid}"
        )
    if kind not in kinds:
        raise HookpointError(f"hookpoint {name!r}: unknown kind {kind!r}; {valid}")
    if layer >= len(blocks):
        raise HookpointError(f"hookpoint {name!r}: layer {layer} is out of range for this model; {valid}")
    block = blocks[layer]
    where: dict[str, tuple[nn.Module, Literal["input", "output"]]] = {
        "resid_pre": (block, "input"),
        "attn_out": (getattr(block, layout.attn_out), "output"),
        "resid_mid": (getattr(block, layout.pre_mlp_norm), "input"),
        "mlp_in": (getattr(block, layout.mlp), "input"),
        "mlp_out": (getattr(block, layout.mlp_out), "output"),
        "resid_post": (block, "output"),
    }
    module, io = where[kind]
    return HookSite(name=name, layer=layer, module=module, io=io)


def complete_blocks_before(model: nn.Module, name: str) -> int:
    """How many whole blocks have run when `name`'s tensor exists: its layer's blocks before it, plus its own block
    when the tensor is that block's output (`resid_post`). Sites inside a block count only the blocks before it."""
    site = resolve_hookpoint(model, name)
    return site.layer + (site.module is blocks(model)[site.layer] and site.io == "output")
