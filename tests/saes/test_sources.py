"""open_sae: local folders and `hf:` sources resolved by the real huggingface_hub from a cache laid out exactly as
its downloads leave it (blobs, snapshot symlinks, refs/main), offline, so nothing downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saelab.errors import CheckpointError
from saelab.saes.formats import load_any
from saelab.saes.sources import open_sae, parse_hf_source

FIXTURES = Path(__file__).parent / "formats" / "fixtures"


def _same(a, b) -> None:
    x = torch.randn(16, a.d_in, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.reconstruct(x), a.reconstruct(x))


def test_a_local_folder_opens_in_any_format() -> None:
    folder = FIXTURES / "sparsify_topk" / "layers.1"
    _same(load_any(folder), open_sae(folder))
    _same(load_any(folder), open_sae(str(folder)))


def test_hub_subfolders_of_several_parts_open_from_the_cache_offline(hub_cache) -> None:
    sparsify = FIXTURES / "sparsify_topk" / "layers.1"
    hub_cache.add("EleutherAI/sae-pythia-70m-32k", hub_cache.files(sparsify, "layers.1"))
    sae = open_sae("hf:EleutherAI/sae-pythia-70m-32k/layers.1")
    _same(load_any(sparsify), sae)
    assert sae.cfg.hookpoint == "layers.1"

    saelens = FIXTURES / "saelens_jumprelu"
    nested = "layer_20/width_16k/average_l0_71"
    hub_cache.add("google/gemma-scope-2b-pt-res",
                {**hub_cache.files(saelens, nested), **hub_cache.files(FIXTURES / "saelens_topk", "layer_3/other")})
    _same(load_any(saelens), open_sae(f"hf:google/gemma-scope-2b-pt-res/{nested}"))


def test_a_repository_without_subfolder_opens_its_top_level(hub_cache) -> None:
    hub_cache.add("someone/one-sae", hub_cache.files(FIXTURES / "saelens_topk", ""))
    _same(load_any(FIXTURES / "saelens_topk"), open_sae("hf:someone/one-sae"))


def test_uncached_repositories_and_subfolders_name_the_repo_and_the_fix(hub_cache) -> None:
    with pytest.raises(CheckpointError, match=r"someone/absent \(subfolder 'layers.3'\) is not in the Hugging Face "
                                              r"cache.*HF_HUB_OFFLINE"):
        open_sae("hf:someone/absent/layers.3")
    hub_cache.add("EleutherAI/sae-pythia-70m-32k",
                hub_cache.files(FIXTURES / "sparsify_topk" / "layers.1", "layers.1"))
    with pytest.raises(CheckpointError, match=r"no subfolder 'layers.3' \(it holds \['layers.1'\]\).*"
                                              r"huggingface.co/EleutherAI/sae-pythia-70m-32k"):
        open_sae("hf:EleutherAI/sae-pythia-70m-32k/layers.3")


def test_malformed_hub_sources_are_refused() -> None:
    assert parse_hf_source("hf:a/b") == ("a/b", "")
    assert parse_hf_source("hf:a/b/c/d/") == ("a/b", "c/d")
    for bad in ("hf:a", "hf:a//b", "hf:"):
        with pytest.raises(CheckpointError, match="hf:OWNER/REPO"):
            parse_hf_source(bad)
