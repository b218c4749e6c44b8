"""sparsify (EleutherAI) folders: one folder per hookpoint, named after it (`layers.3`), holding `cfg.json` and
`sae.safetensors` with `encoder.weight [n, d]`, `encoder.bias [n]`, `W_dec [n, d]`, `b_dec [d]` and, with a skip
connection, `W_skip [d, d]`.

sparsify computes z = top_k(ReLU(enc(x − b_dec))) (x itself for a transcoder), x̂ = Σ z_i W_dec[i] + b_dec
(+ x @ W_skip.T): a `TopKSAE`, or a `TopKTranscoder` for transcoders and skip connections, exactly (ReLU before
or after the top-k selects the same values). normalize_decoder, multi_topk and expansion_factor (when num_latents
is set) only shape training. The "groupmax" activation and any cfg field this reader does not know set to a true
value are refused rather than ignored. The hookpoint is the folder's name, as sparsify names it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from saelab.errors import CheckpointError, ConfigError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.formats.common import (
    check_preprocessing,
    describe,
    json_writer,
    positive_int,
    read_json,
    read_safetensors,
    refuse_leftovers,
    take,
    unscaled_state,
)
from saelab.saes.topk import TopKSAE, TopKSAEConfig
from saelab.saes.transcoder import TopKTranscoder, TopKTranscoderConfig

NAME = "sparsify"
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
FILES = f"{CFG} + {WEIGHTS}"
RUN_CONFIG = "config.json"  # sparsify's training config, in the folder above the hookpoint folders
_TRAINING_ONLY = {"expansion_factor", "normalize_decoder", "multi_topk"}
_KNOWN = {"activation", "num_latents", "k", "skip_connection", "transcode", "d_in", *_TRAINING_ONLY}
_MODULE_PATH = re.compile(r"(^|\.)\d+(\.|$)")  # layers.3, gpt_neox.layers.3.mlp, ...


def detect(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def read(folder: Path) -> TopKSAE:
    where = folder / CFG
    cfg = read_json(where, "sparsify")
    unknown = sorted(key for key in set(cfg) - _KNOWN if cfg[key])
    if unknown:
        raise CheckpointError(f"{where}: fields {unknown} are set but unknown to saelab's sparsify reader; "
                              "loading without them could compute a different function")
    if cfg.get("activation", "topk") != "topk":
        raise CheckpointError(f"{where}: activation {cfg['activation']!r} has no saelab equivalent (only topk)")
    d = positive_int(cfg, "d_in", str(where))
    n = cfg.get("num_latents") or d * cfg.get("expansion_factor", 32)
    k = positive_int(cfg, "k", str(where))
    weights = folder / WEIGHTS
    tensors = read_safetensors(weights)
    state = {
        "W_enc": take(tensors, "encoder.weight", (n, d), weights),
        "b_enc": take(tensors, "encoder.bias", (n,), weights),
        "W_dec": take(tensors, "W_dec", (n, d), weights),
        "b_dec": take(tensors, "b_dec", (d,), weights),
    }
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if skip:
        state["W_skip"] = take(tensors, "W_skip", (d, d), weights)
    refuse_leftovers(tensors, weights, "sparsify sparse coder with this cfg.json")
    fields: dict[str, Any] = dict(d_in=d, n_latents=n, k=k, hookpoint=_hookpoint(folder),
                                  model_name=_model_name(folder))
    if transcode or skip:
        sae: TopKSAE = TopKTranscoder(TopKTranscoderConfig(**fields, transcode=transcode, skip_connection=skip))
    else:
        sae = TopKSAE(TopKSAEConfig(**fields))
    sae.load_state_dict(state)
    return sae


def check(sae: SparseAutoencoder) -> None:
    if type(sae) not in (TopKSAE, TopKTranscoder):
        elsewhere = "--to saelens or --to saelab" if sae.architecture in ("relu", "jumprelu") else "--to saelab"
        raise ConfigError(
            f"{describe(sae)} has no sparsify equivalent (sparsify holds top-k SAEs and transcoders only); write "
            f"it {elsewhere}"
        )
    if sae.d_out != sae.d_in:
        raise ConfigError(f"{describe(sae)} maps {sae.d_in} features to {sae.d_out}; sparsify's transcoders keep the "
                          "width, so write it --to saelab")
    check_preprocessing(sae, NAME)


def write(sae: SparseAutoencoder, folder: Path) -> None:
    """Write `sae` into the (empty, in-progress) `folder` as `SparseCoder.save_to_disk` does."""
    check(sae)
    state = unscaled_state(sae, NAME)
    tensors = {"encoder.weight": state["W_enc"], "encoder.bias": state["b_enc"], "W_dec": state["W_dec"],
               "b_dec": state["b_dec"]}
    transcode = skip = False
    if isinstance(sae, TopKTranscoder):
        transcode, skip = sae.cfg.transcode, sae.cfg.skip_connection
        if skip:
            tensors["W_skip"] = state["W_skip"]
    d, n = sae.d_in, sae.n_latents
    cfg = {"activation": "topk", "expansion_factor": max(1, n // d), "normalize_decoder": True, "num_latents": n,
           "k": sae.cfg.k, "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": d}  # type: ignore[attr-defined]
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / WEIGHTS))
    json_writer(cfg)(folder / CFG)


def hookpoint_folders(folder: Path) -> list[str]:
    """The sparsify hookpoint folders inside a sparsify run folder (what to point at instead of the run)."""
    return sorted(sub.name for sub in folder.iterdir() if sub.is_dir() and detect(sub)) if folder.is_dir() else []


def _hookpoint(folder: Path) -> str | None:
    name = folder.resolve().name
    return name if _MODULE_PATH.search(name) else None


def _model_name(folder: Path) -> str | None:
    run_config = folder.resolve().parent / RUN_CONFIG
    try:
        model = read_json(run_config, "sparsify run").get("model") if run_config.is_file() else None
    except CheckpointError:
        return None
    return model if isinstance(model, str) else None
