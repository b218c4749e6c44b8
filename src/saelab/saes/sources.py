"""`open_sae`: an SAE from wherever users keep one, a local folder or a Hugging Face hub repository.

A source is a folder in any format `saelab.saes.formats.load_any` reads, or `hf:OWNER/REPO[/SUBFOLDER]` (the
subfolder may have several parts, e.g. `hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`). Hub
sources are fetched with `huggingface_hub.snapshot_download` into the normal Hugging Face cache, only the subfolder
asked for, so a second use needs no network: with `HF_HUB_OFFLINE=1`, or when the hub cannot be reached,
huggingface_hub answers from the cache (the snapshot that `refs/main` names).
"""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.errors import CheckpointError
from saelab.saes.base import SparseAutoencoder

HF_PREFIX = "hf:"
# Without a subfolder the SAE's files sit at the repository's top level: fetch those, not every other folder.
TOP_LEVEL_FILES = ("cfg.json", "config.json", "sae_weights.safetensors", "sae.safetensors", "ae.pt", "params.npz")
SOURCE_HELP = "folder or hf:OWNER/REPO[/SUBFOLDER]"


def parse_hf_source(source: str) -> tuple[str, str]:
    """`hf:OWNER/REPO[/SUBFOLDER]` -> (repo id, subfolder or "")."""
    parts = source[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise CheckpointError(f"{source!r} is not a hub source; write hf:OWNER/REPO or hf:OWNER/REPO/SUBFOLDER, e.g. "
                              "hf:EleutherAI/sae-pythia-70m-32k/layers.3")
    return "/".join(parts[:2]), "/".join(parts[2:])


def source_folder(source: str | Path) -> Path:
    """The local folder holding `source`'s files (fetched into the Hugging Face cache first for `hf:` sources)."""
    text = str(source)
    if not text.startswith(HF_PREFIX):
        return Path(source)
    repo_id, subfolder = parse_hf_source(text)
    snapshot = Path(_snapshot(repo_id, subfolder, text))
    folder = snapshot / subfolder if subfolder else snapshot
    if not folder.is_dir():
        found = sorted(p.name for p in snapshot.iterdir()) if snapshot.is_dir() else []
        raise CheckpointError(
            f"{text}: the snapshot of {repo_id} at {snapshot} has no subfolder {subfolder!r} (it holds "
            f"{found or 'nothing'}): either the repository has no such subfolder (check the path on "
            f"https://huggingface.co/{repo_id}), or the hub was not reachable and that subfolder was never "
            "downloaded (run once with network access and HF_HUB_OFFLINE unset)"
        )
    return folder


def open_sae(source: str | Path, device: str | torch.device = "cpu",
             norm_scaling_factor: float | None = None) -> SparseAutoencoder:
    """The SAE at `source` (a folder in any known format, or `hf:OWNER/REPO[/SUBFOLDER]`), on `device`, with the
    hook name its files record (see `saelab.models.hookpoints.canonical_hookpoint` for the canonical one).
    `norm_scaling_factor`: SAELens's dataset constant, see `saelab.saes.formats.saelens.read`."""
    from saelab.saes.formats import load_any  # imported on use: the formats import the saes package

    return load_any(source_folder(source), device, norm_scaling_factor)


def _snapshot(repo_id: str, subfolder: str, source: str) -> str:
    """snapshot_download of the files `source` needs, its failures as CheckpointErrors naming the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [f"{subfolder}/*"] if subfolder else list(TOP_LEVEL_FILES)
    what = f"{repo_id} (subfolder {subfolder!r})" if subfolder else repo_id
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{source}: {what} is not in the Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE=1 or "
            "no network); download it once with network access (HF_HUB_OFFLINE unset), or pass a local folder"
        ) from None
    except GatedRepoError:
        raise CheckpointError(
            f"{source}: {repo_id} is gated; accept its terms on https://huggingface.co/{repo_id} and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{source}: there is no hub repository {repo_id!r} (or it is private: log in with `hf auth login` or "
            "HF_TOKEN); check OWNER/REPO"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source}: {repo_id} has no main branch; check the repository name") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{source}: fetching {what} failed ({exc}); retry, or pass a local folder") from None


__all__ = ["HF_PREFIX", "SOURCE_HELP", "open_sae", "parse_hf_source", "source_folder"]
