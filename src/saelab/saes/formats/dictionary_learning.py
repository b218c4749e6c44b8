"""dictionary_learning folders (`ae.pt` + `config.json`, as its `trainSAE` writes them): read only.

`ae.pt` is a torch state dict, read with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only and never runs code from the file. `config.json`'s `trainer.dict_class` says which class wrote it
(the state dicts of AutoEncoderTopK and BatchTopKSAE have the same keys). Each class's default forward, exactly:

- AutoEncoder: z = ReLU(enc(x − bias)), x̂ = dec(z) + bias -> `ReluSAE`;
- AutoEncoderTopK: z = top_k(ReLU(enc(x − b_dec))) -> `TopKSAE` (its `threshold` only serves an optional
  threshold inference, not the default one, and is not kept);
- BatchTopKSAE and MatryoshkaBatchTopKSAE: inference keeps ReLU(pre) where it exceeds the scalar `threshold` ->
  `JumpReLUSAE` with that threshold for every latent, b_dec subtracted first;
- JumpReluAutoEncoder: ReLU(pre · [pre > threshold]) with pre = x @ W_enc + b_enc -> `JumpReLUSAE`.

The saved ae.pt already works on raw activations (trainSAE scales the biases back by its norm_factor before
saving), so no normalisation is applied. Gated and other classes are refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import CheckpointError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.formats.common import positive_int, read_json, refuse_leftovers, take
from saelab.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.saes.topk import TopKSAE, TopKSAEConfig

NAME = "dictionary_learning"
WEIGHTS = "ae.pt"
CFG = "config.json"
FILES = f"{WEIGHTS} + {CFG}"
CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder")


def detect(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file()


def read(folder: Path) -> SparseAutoencoder:
    trainer = read_json(folder / CFG, "dictionary_learning").get("trainer")
    where = f"{folder / CFG}: trainer"
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{folder / CFG} has no 'trainer' object; it was not written by dictionary_learning")
    dict_class = trainer.get("dict_class")
    if dict_class not in CLASSES:
        raise CheckpointError(f"{where}.dict_class {dict_class!r} is not supported; supported: {list(CLASSES)}")
    d, n = positive_int(trainer, "activation_dim", where), positive_int(trainer, "dict_size", where)
    weights = folder / WEIGHTS
    tensors = _load_state(weights)
    fields: dict[str, Any] = dict(d_in=d, n_latents=n, model_name=_str_or_none(trainer.get("lm_name")),
                                  hookpoint=_str_or_none(trainer.get("submodule_name")))
    sae: SparseAutoencoder
    if dict_class == "AutoEncoder":
        state = {"W_enc": take(tensors, "encoder.weight", (n, d), weights),
                 "b_enc": take(tensors, "encoder.bias", (n,), weights),
                 "W_dec": take(tensors, "decoder.weight", (d, n), weights).T.contiguous(),
                 "b_dec": take(tensors, "bias", (d,), weights)}
        sae = ReluSAE(ReluSAEConfig(**fields))
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = {"W_enc": take(tensors, "encoder.weight", (n, d), weights),
                 "b_enc": take(tensors, "encoder.bias", (n,), weights),
                 "W_dec": take(tensors, "decoder.weight", (d, n), weights).T.contiguous(),
                 "b_dec": take(tensors, "b_dec", (d,), weights)}
        k = _int_buffer(tensors, "k", weights)
        threshold = take(tensors, "threshold", (), weights)
        if dict_class == "AutoEncoderTopK":
            sae = TopKSAE(TopKSAEConfig(**fields, k=k))
        else:
            state["threshold"] = threshold.expand(n).clone()
            sae = JumpReLUSAE(JumpReLUSAEConfig(**fields, apply_b_dec_to_input=True))
    else:  # MatryoshkaBatchTopKSAE, JumpReluAutoEncoder: SAELens's layout
        state = {"W_enc": take(tensors, "W_enc", (d, n), weights).T.contiguous(),
                 "b_enc": take(tensors, "b_enc", (n,), weights),
                 "W_dec": take(tensors, "W_dec", (n, d), weights),
                 "b_dec": take(tensors, "b_dec", (d,), weights)}
        matryoshka = dict_class == "MatryoshkaBatchTopKSAE"
        if matryoshka:
            _int_buffer(tensors, "k", weights)
            tensors.pop("group_sizes", None)  # groups shape training only; inference is the threshold
        state["threshold"] = take(tensors, "threshold", () if matryoshka else (n,), weights).expand(n).clone()
        sae = JumpReLUSAE(JumpReLUSAEConfig(**fields, apply_b_dec_to_input=matryoshka))
    refuse_leftovers(tensors, weights, f"dictionary_learning {dict_class}")
    sae.load_state_dict(state)
    return sae


def _load_state(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(
            f"{path} cannot be read as a plain state dict ({str(exc).splitlines()[0]}); saelab loads dictionary_"
            "learning files with torch.load(weights_only=True) only, never arbitrary pickles"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _int_buffer(tensors: dict[str, Tensor], name: str, where: Path) -> int:
    if name not in tensors or tensors[name].numel() != 1:
        raise CheckpointError(f"{where} lacks the scalar {name!r}")
    return int(tensors.pop(name).item())


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
