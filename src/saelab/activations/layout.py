"""The on-disk format of an activation store, shared by its writer and its reader.

A store is a folder:

    manifest.json
    contexts.npy                      [n_contexts, context_length] int32  (the harvested token ids, optional)
    shard_00000/act.<hookpoint>.npy   [n_tokens_in_shard, d]  float16 or float32, one file per hookpoint
    shard_00000/token_ids.npy         [n_tokens_in_shard]     int32
    shard_00000/positions.npy         [n_tokens_in_shard]     int32  (position inside its context)
    shard_00000/context_index.npy     [n_tokens_in_shard]     int64  (row of the harvested contexts)
    shard_00001/...

Plain `.npy` files so readers memory-map them (`np.load(mmap_mode="r")`) and any tool can open them. The manifest
lists every shard with its token count, context range and the size and sha256 of every file; a shard exists for
readers only once the manifest names it, and the manifest is replaced atomically after each shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from saelab.errors import StoreError
from saelab.io import sha256_file

FORMAT = "saelab.activation_store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CONTEXTS_FILE = "contexts.npy"
STORAGE_DTYPES: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}
TOKEN_FIELDS: dict[str, type[np.integer]] = {"token_ids": np.int32, "positions": np.int32, "context_index": np.int64}
SHARD_FIX = "delete that shard folder and re-run harvest with --resume (the shards before it are kept)"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def activation_file(shard: str, hookpoint: str) -> str:
    return f"{shard}/act.{hookpoint}.npy"


def check_hookpoint_name(hookpoint: str) -> None:
    """Hookpoint names become file names, so they must not escape the shard folder."""
    if not hookpoint or "/" in hookpoint or "\\" in hookpoint or hookpoint.startswith(".") or "\0" in hookpoint:
        raise StoreError(
            f"hookpoint name {hookpoint!r} cannot be stored (it is empty, starts with '.', or contains a path "
            "separator); use a canonical hookpoint name such as 'resid_post.6'"
        )


def shard_files(shard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every file entry ({"file", "bytes", "sha256"}) of a manifest shard."""
    yield from shard["activations"].values()
    yield from shard["tokens"].values()


def file_problem(root: Path, entry: dict[str, Any], check_hash: bool) -> str | None:
    """Why a file does not match its manifest entry (missing, truncated, corrupted), or None if it does."""
    file = root / entry["file"]
    if not file.is_file():
        return f"{entry['file']} is missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        return f"{entry['file']} has {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
    if check_hash and sha256_file(file) != entry["sha256"]:
        return f"{entry['file']} does not match its sha256 checksum (corrupted)"
    return None


def shard_problem(root: Path, shard: dict[str, Any], check_hash: bool) -> str | None:
    """The first problem with any of a shard's files, or None."""
    problems = (file_problem(root, entry, check_hash) for entry in shard_files(shard))
    return next((problem for problem in problems if problem is not None), None)


def read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest of the store at `root`, or a StoreError saying why there is none."""
    file = root / MANIFEST_NAME
    if not root.exists():
        raise StoreError(f"activation store {root} does not exist; check the path or create it with `saelab harvest`")
    if not file.is_file():
        raise StoreError(
            f"{root} is not an activation store (no {MANIFEST_NAME}); check the path or create it with `saelab harvest`"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{file} is not valid JSON ({exc}); delete the store and harvest it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not an activation-store manifest; check the path")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{root} has store format version {manifest.get('format_version')}, this saelab reads version "
            f"{FORMAT_VERSION}; harvest the store again with this version of saelab"
        )
    return manifest


def library_versions() -> dict[str, str]:
    """Versions that produced the numbers, recorded so a store can be traced and reproduced."""
    versions = {}
    for name in ("saelab", "torch", "transformers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
