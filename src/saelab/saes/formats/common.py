"""What every format reader and writer shares: reading JSON and tensors with clear errors, checking each tensor
against the shape its config implies, folding a fixed input scale into the weights, and writing a whole folder
atomically (into a temporary sibling, renamed into place only once complete)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from saelab.errors import CheckpointError, ConfigError
from saelab.saes.base import SparseAutoencoder


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; `what` names the format for the error when the file is absent."""
    if not path.exists():
        raise CheckpointError(f"{path.parent} holds no {path.name}; it is not a complete {what} folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return raw


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the SAE folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} cannot be read ({exc}); it is truncated or corrupted") from None


def positive_int(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def take(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], where: Path | str) -> Tensor:
    """Remove `name` from `tensors` and return it as float32, after checking it has the shape the config implies
    (so what is left over at the end is what the reader did not use)."""
    if name not in tensors:
        raise CheckpointError(f"{where} lacks {name!r}; its config implies a tensor of shape {shape}")
    tensor = tensors.pop(name)
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{where}: {name} has shape {tuple(tensor.shape)}, its config implies {shape}")
    if not tensor.is_floating_point():
        raise CheckpointError(f"{where}: {name} holds {tensor.dtype} values, not floating point")
    return tensor.float()


def refuse_leftovers(tensors: dict[str, Any], where: Path | str, what: str) -> None:
    """An unused tensor means the file computes something the reader does not: never drop it silently."""
    if tensors:
        raise CheckpointError(
            f"{where} holds tensors {sorted(tensors)} that a {what} does not use; loading without them would "
            "compute a different function"
        )


def unscaled_state(sae: SparseAutoencoder, target: str) -> dict[str, Tensor]:
    """The shallow SAE's weights acting on raw activations, for formats that store no input normalisation.

    With preprocessing "scale" (x_n = s·x, x̂ = x̂_n / s) the same function is W_enc·s, b_dec/s, W_dec/s (latents
    unchanged; a transcoder's output divides by its target scale instead, and its skip becomes W_skip·s/s_out),
    which is how SAELens folds its own `expected_average_only_in` factor; computed in float64, so it is exact up
    to float32 rounding. A per-token normalisation has no such folding and is refused.
    """
    check_preprocessing(sae, target)
    state = {name: t.detach().cpu().double() for name, t in sae.state_dict().items()}
    if "W_dec" not in state:  # a tied SAE: the formats store the decoder as its own matrix
        state["W_dec"] = state["W_enc"].clone()
    if sae.cfg.preprocessing == "scale":  # a transcoder's output has its own scale (s_out; s_in otherwise)
        s, s_out = float(sae.cfg.input_scale), float(sae.output_scale)
        state["W_enc"] = state["W_enc"] * s
        state["b_dec"] = state["b_dec"] / s_out
        state["W_dec"] = state["W_dec"] / s_out
        if "W_skip" in state:
            state["W_skip"] = state["W_skip"] * (s / s_out)
    return {name: t.float() for name, t in state.items()}


def check_preprocessing(sae: SparseAutoencoder, target: str) -> None:
    if sae.cfg.preprocessing not in ("none", "scale"):
        raise ConfigError(
            f"the SAE normalises each token ({sae.cfg.preprocessing!r}), which the {target} format cannot express; "
            "keep it in saelab's own format (--to saelab)"
        )


@contextlib.contextmanager
def folder_in_progress(folder: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; when the block succeeds it becomes `folder` by one rename,
    when it fails it is removed, so a failed write never leaves a half folder (nor harms an existing one)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ConfigError(f"{folder} already exists; remove it, choose another destination, or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        _replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _default_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) make private files; a written SAE gets the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_folder(new: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        os.replace(folder, old / folder.name)
    os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old)


def json_writer(obj: dict[str, Any]) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(obj, indent=2) + "\n")


def describe(sae: SparseAutoencoder) -> str:
    return f"{type(sae).__name__} ({sae.architecture!r})"
