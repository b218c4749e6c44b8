"""Per-layer transcoders in the layout circuit-tracer loads as a "transcoder_set" (its `load_transcoders` /
`load_transcoder_set` / `load_relu_transcoder`, as of circuit-tracer 0.5): a folder holding

- `config.yaml`: `model_name`, `model_kind: transcoder_set`, `feature_input_hook` and `feature_output_hook`
  (TransformerLens hook names inside block L: `mlp.hook_in` / `mlp.hook_out` are the MLP's input and output, what
  saelab calls mlp_in.L / mlp_out.L in every family but Gemma 2/3, whose mlp_out is the post-feedforward norm's
  output, TransformerLens `hook_mlp_out`); no `transcoders` list, so on the hub the loader takes
  `layer_0.safetensors`, `layer_1.safetensors`, ... from the folder itself;
- `layer_{L}.safetensors` for every layer from 0 to the last (the loader refuses gaps): `W_enc [n, d]`,
  `W_dec [n, d]`, `b_enc [n]`, `b_dec [d]`, `W_skip [d, d]` with a skip connection (output gains
  input @ W_skip.T), and `activation_function.threshold [n]`, which makes the loader use its JumpReLU
  (f(a) = a·[a > θ]) instead of a plain ReLU.

circuit-tracer has no top-k activation for these files, so a top-k transcoder is written as JumpReLU with one
threshold for all latents: the (k·N)-th largest ReLU pre-activation over N calibration inputs, i.e. BatchTopK's
selection over them, so the mean L0 there is k (per token it varies, as BatchTopK's inference does). Input and
target scales are folded into the weights (the files hold no normalisation): W_enc·s_in, W_dec/s_out, b_dec/s_out,
W_skip·s_in/s_out. The folder is written in a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelab.config import Config
from saelab.errors import ConfigError
from saelab.io import atomic_write_json
from saelab.metrics import fraction_of_variance_unexplained
from saelab.saes.formats.common import folder_in_progress, unscaled_state
from saelab.saes.transcoder import TopKTranscoder

CONFIG = "config.yaml"
STATS = "saelab_export.json"
MODEL_KIND = "transcoder_set"
THRESHOLD = "activation_function.threshold"
# saelab hookpoint kind -> circuit-tracer's TransformerLens hook name inside block L
INPUT_HOOKS = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid"}
OUTPUT_HOOKS = {"mlp_out": "mlp.hook_out"}


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


@torch.no_grad()
def jumprelu_threshold(tc: TopKTranscoder, inputs: Tensor) -> float:
    """The threshold on the ReLU pre-activations that keeps as many activations over the raw `inputs` [N, d_in] as
    top-k does (k·N): midway between the (k·N)-th and the next largest one, since the JumpReLU keeps a > θ (0 when
    fewer are positive: then it is a ReLU)."""
    x_n, _ = tc.normalize(inputs.to(tc.W_enc))
    pre = torch.relu(x_n @ tc.W_enc.T + tc.b_enc).reshape(-1)
    kept = tc.k * inputs.shape[0]
    if kept >= pre.numel():
        return 0.0
    last, first_dropped = pre.topk(kept + 1).values[-2:].tolist()
    return max((last + first_dropped) / 2, 0.0)


def layer_tensors(tc: TopKTranscoder, threshold: float) -> dict[str, Tensor]:
    """One layer's file: the transcoder's raw-space weights under circuit-tracer's names."""
    state = unscaled_state(tc, "circuit-tracer")
    tensors = {"W_enc": state["W_enc"], "W_dec": state["W_dec"], "b_enc": state["b_enc"], "b_dec": state["b_dec"],
               THRESHOLD: torch.full((tc.n_latents,), threshold)}
    if tc.W_skip is not None:
        tensors["W_skip"] = state["W_skip"]
    return {name: t.float().contiguous() for name, t in tensors.items()}


def apply_layer(tensors: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """What circuit-tracer computes from a layer file (`SingleLayerTranscoder.forward` with JumpReLU): (output,
    activations) of raw inputs x."""
    pre = x @ tensors["W_enc"].T + tensors["b_enc"]
    acts = pre * (pre > tensors[THRESHOLD])
    out = acts @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        out = out + x @ tensors["W_skip"].T
    return out, acts


def check(transcoders: Mapping[int, TopKTranscoder]) -> tuple[str, str]:
    """Refuse, before writing, what circuit-tracer's transcoder set cannot hold; returns the input and output
    hookpoint kinds."""
    if not transcoders:
        raise ConfigError("no transcoders to export; train them with saelab train --target-hookpoint")
    layers = sorted(transcoders)
    if layers != list(range(layers[-1] + 1)):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise ConfigError(f"circuit-tracer needs a transcoder for every layer from 0 to {layers[-1]}; missing layers "
                          f"{missing}")
    kinds: set[tuple[str, str]] = set()
    for layer, tc in transcoders.items():
        if not isinstance(tc, TopKTranscoder) or not tc.cfg.transcode:
            raise ConfigError(f"layer {layer}: {type(tc).__name__} is not a transcoder; circuit-tracer loads "
                              "transcoders (saelab train --target-hookpoint)")
        if tc.d_out != tc.d_in:
            raise ConfigError(f"layer {layer}: circuit-tracer's transcoders read and write d_model features, but this "
                              f"one maps {tc.d_in} to {tc.d_out}")
        source, target = str(tc.cfg.hookpoint), str(tc.target_hookpoint)
        kind_in, _, layer_in = source.rpartition(".")
        kind_out, _, layer_out = target.rpartition(".")
        if kind_in not in INPUT_HOOKS or kind_out not in OUTPUT_HOOKS or {layer_in, layer_out} != {str(layer)}:
            raise ConfigError(
                f"layer {layer}: the transcoder maps {source} to {target}; circuit-tracer's per-layer transcoders "
                f"read one of {[f'{k}.{layer}' for k in INPUT_HOOKS]} and write mlp_out.{layer}"
            )
        kinds.add((kind_in, kind_out))
    widths = {tc.n_latents for tc in transcoders.values()}
    if len(kinds) != 1 or len(widths) != 1:
        raise ConfigError(f"a transcoder set needs one hook pair and one width for every layer; got {sorted(kinds)} "
                          f"and n_latents {sorted(widths)}")
    return kinds.pop()


def config_yaml(fields: Mapping[str, str]) -> str:
    """Flat string keys, each value JSON-quoted (valid YAML: YAML reads JSON strings)."""
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in fields.items())


def write_transcoder_set(
    transcoders: Mapping[int, TopKTranscoder],
    folder: str | Path,
    calibration: Mapping[int, Tensor],
    model_name: str | None = None,
    feature_input_hook: str | None = None,
    feature_output_hook: str | None = None,
    overwrite: bool = False,
) -> dict[int, dict[str, Any]]:
    """Write {layer: transcoder} as a circuit-tracer transcoder set in `folder`, each layer's JumpReLU threshold
    from its raw calibration inputs `calibration[layer]` [N, d_in]. Returns, per layer, the threshold and, on the
    calibration inputs, the exported layer's mean L0 and its FVU against the top-k transcoder's own output (how
    much the threshold changes it); they are also written to `saelab_export.json`."""
    kind_in, kind_out = check(transcoders)
    absent = sorted(set(transcoders) - set(calibration))
    if absent:
        raise ConfigError(f"no calibration inputs for layers {absent}; give each layer's input activations")
    names = {tc.cfg.model_name for tc in transcoders.values()}
    model_name = model_name or (names.pop() if len(names) == 1 else None)
    if not model_name:
        raise ConfigError("the transcoders name no single model; give the model name circuit-tracer should load")
    stats: dict[int, dict[str, Any]] = {}
    with folder_in_progress(Path(folder), overwrite) as tmp:
        for layer, tc in sorted(transcoders.items()):
            x = calibration[layer].float()
            threshold = jumprelu_threshold(tc, x)
            tensors = layer_tensors(tc, threshold)
            save_file(tensors, str(tmp / layer_file(layer)))
            with torch.no_grad():
                out, acts = apply_layer(tensors, x)
                reference = tc.reconstruct(x)
            stats[layer] = {"threshold": threshold, "calibration_tokens": x.shape[0],
                            "l0": float((acts != 0).sum(-1).float().mean()),
                            "fvu_vs_topk": float(fraction_of_variance_unexplained(reference, out))}
        (tmp / CONFIG).write_text(config_yaml({
            "model_name": model_name, "model_kind": MODEL_KIND,
            "feature_input_hook": feature_input_hook or INPUT_HOOKS[kind_in],
            "feature_output_hook": feature_output_hook or OUTPUT_HOOKS[kind_out],
        }))
        atomic_write_json(tmp / STATS, {"layers": {str(k): v for k, v in stats.items()}, "k": {
            str(layer): tc.k for layer, tc in transcoders.items()}})
    return stats


# ---- `saelab export-transcoders` -------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportTranscodersConfig(Config):
    """`saelab export-transcoders RUN_DIR OUT --to circuit-tracer --store STORE`: every transcoder of a run (a
    streamed `saelab train --target-hookpoint` run: one folder per layer) written as one circuit-tracer transcoder
    set, its JumpReLU thresholds calibrated on the store's inputs."""

    run_dir: str = dataclasses.field(metadata={"positional": True, "help": "run folder holding one transcoder per "
                                               "layer (<sub>/sae/ or <sub>/ written by saelab train)"})
    out: str = dataclasses.field(metadata={"positional": True, "help": "folder to write (config.yaml + layer files)"})
    to: Literal["circuit-tracer"] | None = dataclasses.field(
        default=None, metadata={"help": "format to write: circuit-tracer (required)"})
    store: str | None = dataclasses.field(
        default=None, metadata={"help": "activation store with every layer's input hookpoint (calibrates the "
                                        "top-k -> JumpReLU threshold)"})
    calibration_tokens: int = dataclasses.field(default=65_536, metadata={"help": "store tokens used to calibrate"})
    model_name: str | None = dataclasses.field(default=None, metadata={"help": "default: the transcoders' model"})
    feature_input_hook: str | None = dataclasses.field(
        default=None, metadata={"help": "circuit-tracer input hook; default from the input hookpoint (mlp.hook_in)"})
    feature_output_hook: str | None = dataclasses.field(
        default=None, metadata={"help": "circuit-tracer output hook; default mlp.hook_out (Gemma 2/3: hook_mlp_out)"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an existing OUT (atomically)"})

    def validate(self) -> None:
        if self.to is None:
            raise ConfigError("export-transcoders needs the format to write: --to circuit-tracer")
        if self.store is None:
            raise ConfigError("export-transcoders needs --store: activations of every layer's input hookpoint, to "
                              "calibrate the JumpReLU threshold circuit-tracer applies instead of top-k")
        if self.calibration_tokens < 1:
            raise ConfigError("--calibration-tokens must be at least 1")


def transcoders_in(run_dir: str | Path) -> dict[int, TopKTranscoder]:
    """{layer: transcoder} of every saelab transcoder folder in `run_dir` (`<sub>/sae/` or `<sub>/`), the layer
    being its target hookpoint's."""
    from saelab.saes.base import load_sae

    found: dict[int, TopKTranscoder] = {}
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder; give the run folder of saelab train --target-hookpoint")
    for sub in sorted(root.iterdir()):
        folder = sub / "sae" if (sub / "sae" / "cfg.json").exists() else sub
        if not (folder / "cfg.json").exists():
            continue
        sae = load_sae(folder)
        if not isinstance(sae, TopKTranscoder) or sae.target_hookpoint is None:
            continue
        layer = int(sae.target_hookpoint.rpartition(".")[2])
        if layer in found:
            raise ConfigError(f"{root} holds two transcoders into {sae.target_hookpoint}; keep one per layer")
        found[layer] = sae
    if not found:
        raise ConfigError(f"{root} holds no transcoders (folders with sae/cfg.json of architecture topk_transcoder)")
    return found


def export_transcoders(cfg: ExportTranscodersConfig) -> str:
    """The command: read the run's transcoders and the calibration inputs, write the set, say what was written."""
    from saelab.activations.store import ActivationStore

    transcoders = transcoders_in(cfg.run_dir)
    check(transcoders)
    store = ActivationStore(str(cfg.store))
    calibration = {}
    for layer, tc in transcoders.items():
        hookpoint = str(tc.cfg.hookpoint)
        if hookpoint not in store.hookpoints:
            raise ConfigError(f"the store holds {store.hookpoints}, not layer {layer}'s input {hookpoint}; harvest "
                              "every layer's input hookpoint")
        calibration[layer] = store.load(hookpoint, 0, min(cfg.calibration_tokens, store.n_tokens))
    stats = write_transcoder_set(transcoders, cfg.out, calibration, cfg.model_name, cfg.feature_input_hook,
                                 cfg.feature_output_hook, cfg.overwrite)
    summary = ", ".join(f"L{layer}: L0 {s['l0']:.1f}, FVU vs top-k {s['fvu_vs_topk']:.3g}"
                        for layer, s in stats.items())
    return f"{cfg.run_dir} -> {cfg.out} (circuit-tracer transcoder set, {len(stats)} layers; {summary})"
