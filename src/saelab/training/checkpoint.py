"""Training checkpoints without pickle: the SAE via `sae.save`, every other tensor (optimiser moments, dead-latent
counters, RNG state) in one safetensors file, and the scalars (step, tokens seen, config) in JSON.

A checkpoint folder is written under a temporary name and renamed into place, then `latest.json` is replaced
atomically, so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.errors import CheckpointError
from saelab.io import atomic_write_json, atomic_write_with

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
SAE_DIR = "sae"
FORMAT_VERSION = 1


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None if it has none."""
    pointer = checkpoint_root(Path(out_dir)) / LATEST
    if not pointer.exists():
        return None
    folder = pointer.parent / json.loads(pointer.read_text())["name"]
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which is missing; delete {pointer} to start afresh")
    return folder


def checkpoint_steps(out_dir: str | Path) -> dict[int, Path]:
    """Every complete checkpoint of a run folder by step (the ones `keep_checkpoints` kept)."""
    root = checkpoint_root(Path(out_dir))
    folders = sorted(root.glob("step_*")) if root.is_dir() else []
    return {int(p.name.removeprefix("step_")): p for p in folders if p.is_dir() and (p / STATE_JSON).exists()}


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, transform: Callable[[int, Tensor], Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten the optimiser's per-parameter state into named tensors (and any non-tensor values, for JSON).
    Hyper-parameters are not saved: they come from the config, and the lr from the schedule. `transform(index,
    tensor)` maps each state tensor of parameter `index` first, in the same order on every process (a sharded
    SAE gathers its shards' rows with it, so the checkpoint is the unsharded SAE's)."""
    tensors, scalars = {}, {}
    for index, entry in sorted(optimizer.state_dict()["state"].items()):
        for key, value in sorted(entry.items()):
            name = f"optimizer.{index}.{key}"
            if isinstance(value, Tensor):
                value = value.detach() if transform is None else transform(index, value.detach())
                tensors[name] = value.contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, scalars


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], scalars: dict[str, Any], where: Path
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *scalars.items()]:
        if not name.startswith("optimizer."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    fresh = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape != params[index].shape:
                raise CheckpointError(
                    f"{where}: optimiser state {key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the SAE's parameter has {tuple(params[index].shape)}; the checkpoint is from another SAE"
                )
    optimizer.load_state_dict({"state": state, "param_groups": fresh["param_groups"]})


def write_checkpoint(
    out_dir: Path, step: int, save_sae: Any, state: dict[str, Any], tensors: dict[str, Tensor], keep: int
) -> Path:
    """Write `checkpoints/step_<step>/` atomically, point `latest.json` at it, keep the newest `keep`."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:09d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_sae(tmp / SAE_DIR)
    atomic_write_with(tmp / STATE_TENSORS, lambda path: save_file(tensors, str(path)))
    atomic_write_json(tmp / STATE_JSON, {"format": FORMAT_VERSION, **state})
    if final.exists():  # re-writing the same step (e.g. after a resume): the new copy replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / LATEST, {"name": name})
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(JSON state, tensors) of a checkpoint folder; the SAE weights are in `folder / SAE_DIR`."""
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    for path in (json_path, tensor_path, folder / SAE_DIR):
        if not path.exists():
            raise CheckpointError(f"{path} is missing; {folder} is not a complete trainer checkpoint")
    try:
        state = json.loads(json_path.read_text())
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # json and safetensors raise several types for a damaged file
        raise CheckpointError(f"{folder} cannot be read ({exc}); it is truncated or corrupted") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state, tensors
