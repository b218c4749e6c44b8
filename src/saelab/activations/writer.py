"""Streaming writes into an activation store: buffer whole contexts, write a shard, then publish it in the manifest.

Crash safety comes from ordering: each shard file is written atomically, and only then is the manifest (also
atomic) rewritten to name the shard. An interruption therefore leaves a valid partial store whose manifest says how
many contexts it holds, and a resumed writer continues with the next context. Shards end on append boundaries (whole
batches of contexts), so a resumed harvest sees the same batches as an uninterrupted one and writes identical files.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.activations.layout import (
    CONTEXTS_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_FIX,
    STORAGE_DTYPES,
    TOKEN_FIELDS,
    activation_file,
    check_hookpoint_name,
    file_problem,
    library_versions,
    read_manifest,
    shard_name,
    shard_problem,
)
from saelab.activations.normalize import estimate_norm_stats
from saelab.activations.store import ActivationStore
from saelab.errors import DataError, StoreError
from saelab.io import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

_IDENTITY_KEYS = ("model", "hookpoints", "dtype", "context_length", "source")


class StoreWriter:
    """Appends activations to the store folder `path`, one shard per `shard_tokens` (or slightly more) tokens.

    `config` is recorded in the manifest; on resume it must equal the recorded one except for the `volatile` keys
    (settings such as batch size or device that do not change the data). `source` identifies the input (e.g. the
    sha256 of the token contexts) and must match exactly on resume. `contexts[N, T]`, the token ids harvested, are
    kept as `contexts.npy` so feature pages can show every token around an activation, dropped positions included.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model: str,
        hookpoints: Sequence[str],
        dtype: str,
        context_length: int,
        shard_tokens: int,
        config: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        resume: bool = False,
        volatile: Collection[str] = (),
        contexts: Tensor | None = None,
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise StoreError(f"store dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
        if not hookpoints:
            raise StoreError("no hookpoints given; name at least one hookpoint to store")
        if len(set(hookpoints)) != len(hookpoints):
            raise StoreError(f"hookpoints {list(hookpoints)} contain duplicates; list each hookpoint once")
        for hookpoint in hookpoints:
            check_hookpoint_name(hookpoint)
        if shard_tokens <= 0:
            raise StoreError(f"shard_tokens must be positive, got {shard_tokens}")
        self.path = Path(path)
        self.shard_tokens = shard_tokens
        self._np_dtype = STORAGE_DTYPES[dtype]
        self._torch_dtype = getattr(torch, dtype)
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered_tokens = 0
        self._buffered_contexts = 0
        fresh = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model,
            "hookpoints": list(hookpoints),
            "dims": {},
            "dtype": dtype,
            "context_length": int(context_length),
            "source": dict(source or {}),
            "config": copy.deepcopy(dict(config or {})),
            "versions": library_versions(),
            "contexts": None,
            "normalization": None,
            "n_tokens": 0,
            "n_contexts": 0,
            "complete": False,
            "shards": [],
        }
        if (self.path / MANIFEST_NAME).exists():
            self._manifest = self._resume(fresh, resume, set(volatile))
            entry = self._manifest["contexts"]
            if contexts is not None and (entry is None or file_problem(self.path, entry, check_hash=True)):
                self._manifest["contexts"] = self._write_contexts(contexts)
                self._publish()
        else:
            self._check_empty_folder()
            self._manifest = fresh
            if contexts is not None:
                self._manifest["contexts"] = self._write_contexts(contexts)
            self._publish()

    @property
    def n_contexts(self) -> int:
        """Contexts already in written shards: where a harvest continues."""
        return int(self._manifest["n_contexts"])

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._manifest["dims"])

    def append(
        self,
        activations: Mapping[str, Tensor],
        token_ids: Tensor,
        positions: Tensor,
        context_index: Tensor,
        n_contexts: int,
    ) -> None:
        """Buffer the kept tokens of the next `n_contexts` contexts; write a shard once the buffer is full.

        `activations[hookpoint]` is `[n, d]` (any device); the token tensors are `[n]`. Values that are not finite
        after conversion to the store dtype raise a DataError and are never written.
        """
        if self.complete:
            raise StoreError(f"store {self.path} is complete; harvest into a new folder to add activations")
        hookpoints = self._manifest["hookpoints"]
        if set(activations) != set(hookpoints):
            raise DataError(
                f"activations for {sorted(activations)} given, the store holds {hookpoints}; pass exactly those"
            )
        tokens = {"token_ids": token_ids, "positions": positions, "context_index": context_index}
        n = int(token_ids.shape[0])
        for name, values in tokens.items():
            if values.shape != (n,):
                raise DataError(f"{name} has shape {tuple(values.shape)}, expected ({n},) like token_ids")
        row: dict[str, np.ndarray] = {
            name: values.detach().cpu().numpy().astype(TOKEN_FIELDS[name]) for name, values in tokens.items()
        }
        dims = self._manifest["dims"]
        for hookpoint in hookpoints:
            x = activations[hookpoint]
            if x.ndim != 2 or x.shape[0] != n:
                raise DataError(
                    f"activations of {hookpoint} have shape {tuple(x.shape)}, expected [{n}, d] (one row per token)"
                )
            expected = dims.get(hookpoint)
            if expected is not None and x.shape[1] != expected:
                raise DataError(
                    f"activations of {hookpoint} have dimension {x.shape[1]}, the store holds dimension {expected}; "
                    "harvest each hookpoint from the same model into one store"
                )
            stored = x.detach().to(self._torch_dtype)
            self._check_finite(hookpoint, x, stored, row)
            row[hookpoint] = stored.cpu().numpy()
        for hookpoint in hookpoints:
            dims.setdefault(hookpoint, int(row[hookpoint].shape[1]))
        self._buffer.append(row)
        self._buffered_tokens += n
        self._buffered_contexts += n_contexts
        if self._buffered_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tokens as a shard and publish it (no-op when nothing is buffered)."""
        if self._buffered_tokens == 0:
            if self._buffered_contexts:
                self._manifest["n_contexts"] += self._buffered_contexts
                self._buffered_contexts = 0
                self._buffer = []
                self._publish()
            return
        arrays = {key: np.concatenate([row[key] for row in self._buffer]) for key in self._buffer[0]}
        hookpoints = self._manifest["hookpoints"]
        name = shard_name(len(self._manifest["shards"]))
        start = self._manifest["n_contexts"]
        shard = {
            "name": name,
            "n_tokens": self._buffered_tokens,
            "contexts": [start, start + self._buffered_contexts],
            "activations": {hp: self._write(activation_file(name, hp), arrays[hp]) for hp in hookpoints},
            "tokens": {key: self._write(f"{name}/{key}.npy", arrays[key]) for key in TOKEN_FIELDS},
        }
        if self._manifest["normalization"] is None:
            self._manifest["normalization"] = {hp: estimate_norm_stats(arrays[hp]).to_dict() for hp in hookpoints}
        self._manifest["shards"].append(shard)
        self._manifest["n_tokens"] += self._buffered_tokens
        self._manifest["n_contexts"] += self._buffered_contexts
        self._buffer, self._buffered_tokens, self._buffered_contexts = [], 0, 0
        self._publish()

    def finish(self) -> ActivationStore:
        """Flush, mark the store complete, and open it for reading."""
        if not self.complete:
            self.flush()
            if self._manifest["n_tokens"] == 0:
                raise DataError(
                    f"no tokens were kept for store {self.path}; give more contexts or drop fewer positions"
                )
            self._manifest["complete"] = True
            self._publish()
        return ActivationStore(self.path)

    def _write(self, relative: str, array: np.ndarray) -> dict[str, Any]:
        file = self.path / relative
        with atomic_path(file) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        return {"file": relative, "bytes": file.stat().st_size, "sha256": sha256_file(file)}

    def _write_contexts(self, contexts: Tensor) -> dict[str, Any]:
        length = self._manifest["context_length"]
        if contexts.ndim != 2 or contexts.shape[1] != length:
            raise DataError(f"contexts have shape {tuple(contexts.shape)}, expected [n_contexts, {length}]")
        return self._write(CONTEXTS_FILE, contexts.detach().cpu().numpy().astype(np.int32))

    def _publish(self) -> None:
        atomic_write_json(self.path / MANIFEST_NAME, self._manifest)

    def _check_finite(self, hookpoint: str, raw: Tensor, stored: Tensor, row: dict[str, np.ndarray]) -> None:
        bad = ~torch.isfinite(stored).all(dim=1)
        if not bool(bad.any()):
            return
        first = int(bad.nonzero()[0, 0])
        where = (
            f"{int(bad.sum())} token(s) of {hookpoint} are NaN/inf, first at context {int(row['context_index'][first])}"
            f" position {int(row['positions'][first])}"
        )
        if bool(torch.isfinite(raw[first]).all()):
            fix = f"the values exceed the {self._np_dtype.__name__} range; harvest with --dtype float32"
        else:
            fix = "the model produced them; load the model in float32 (or bfloat16) rather than float16 and check it"
        raise DataError(
            f"{where}. Nothing of this batch was written; the {len(self._manifest['shards'])} shard(s) already in "
            f"{self.path} are intact. Fix: {fix}, then re-run harvest with --resume"
        )

    def _check_empty_folder(self) -> None:
        if self.path.exists() and any(not p.name.startswith(".") for p in self.path.iterdir()):
            raise StoreError(
                f"{self.path} exists, is not empty and holds no {MANIFEST_NAME}; choose an empty or new output folder"
            )

    def _resume(self, fresh: dict[str, Any], resume: bool, volatile: set[str]) -> dict[str, Any]:
        manifest = read_manifest(self.path)
        state = "complete" if manifest["complete"] else f"partial, {manifest['n_contexts']} contexts"
        if not resume:
            raise StoreError(
                f"{self.path} already holds an activation store ({state}); pass --resume to continue or reuse it, "
                "or choose another output folder (or delete this one) to start over"
            )
        differences = [key for key in _IDENTITY_KEYS if manifest[key] != fresh[key]]
        old_config = {k: v for k, v in manifest["config"].items() if k not in volatile}
        new_config = {k: v for k, v in fresh["config"].items() if k not in volatile}
        changed = sorted(k for k in old_config.keys() | new_config.keys() if old_config.get(k) != new_config.get(k))
        differences += [f"config.{k}" for k in changed]
        if differences:
            raise StoreError(
                f"cannot resume {self.path}: it was harvested with different settings ({', '.join(differences)}). "
                "Re-run with the original settings, or choose another output folder (or delete this one) to start over"
            )
        self._keep_valid_prefix(manifest)
        return manifest

    def _keep_valid_prefix(self, manifest: dict[str, Any]) -> None:
        """Drop a deleted shard and everything after it; refuse to resume over a corrupted one."""
        shards = manifest["shards"]
        for index, shard in enumerate(shards):
            if not (self.path / shard["name"]).is_dir():
                dropped = shards[index:]
                log.warning("shard %s is gone: re-harvesting from context %d", shard["name"], shard["contexts"][0])
                for later in dropped:
                    shutil.rmtree(self.path / later["name"], ignore_errors=True)
                manifest["shards"] = shards[:index]
                manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
                manifest["n_contexts"] = shard["contexts"][0]
                manifest["complete"] = False
                if index == 0:
                    manifest["normalization"] = None
                    manifest["dims"] = {}
                atomic_write_json(self.path / MANIFEST_NAME, manifest)
                return
            problem = shard_problem(self.path, shard, check_hash=True)
            if problem is not None:
                raise StoreError(f"cannot resume {self.path}: shard {shard['name']}: {problem}. Fix: {SHARD_FIX}")
