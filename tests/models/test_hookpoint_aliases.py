"""Hookpoint aliases (TransformerLens names, module paths) and the `hidden_states[i]` convention, on every family."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import HookpointError
from saelab.models.hookpoints import blocks, canonical_hookpoint, list_hookpoints, resolve_hookpoint
from saelab.models.hooks import capture


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("blocks.3.hook_resid_post", "resid_post.3"),
        ("blocks.0.hook_resid_pre", "resid_pre.0"),
        ("blocks.2.hook_resid_mid", "resid_mid.2"),
        ("blocks.1.hook_mlp_out", "mlp_out.1"),
        ("blocks.1.hook_attn_out", "attn_out.1"),
        ("blocks.4.ln2.hook_normalized", "mlp_in.4"),
        ("layers.3", "resid_post.3"),
        ("model.layers.3", "resid_post.3"),
        ("gpt_neox.layers.5", "resid_post.5"),
        ("transformer.h.2", "resid_post.2"),
        ("resid_post.7", "resid_post.7"),
        ("blocks.3.hook_z", "blocks.3.hook_z"),  # not an alias: left for resolve_hookpoint to refuse
    ],
)
def test_names_users_type_map_to_canonical_ones(alias: str, canonical: str) -> None:
    assert canonical_hookpoint(alias) == canonical


def test_aliases_resolve_to_the_canonical_site_on_every_family(tiny_model) -> None:
    layers = blocks(tiny_model)
    block_path = next(name for name, module in tiny_model.named_modules() if module is layers[1])
    for alias, canonical in ((block_path, "resid_post.1"), ("blocks.1.hook_mlp_out", "mlp_out.1"),
                             ("layers.1", "resid_post.1")):
        site = resolve_hookpoint(tiny_model, alias)
        assert site.name == canonical
        assert site.module is resolve_hookpoint(tiny_model, canonical).module
    mlp_out = resolve_hookpoint(tiny_model, "mlp_out.1").module
    mlp_path = next(name for name, module in tiny_model.named_modules() if module is mlp_out)
    if mlp_path.startswith(block_path + "."):  # the module whose output is mlp_out, by its path
        assert resolve_hookpoint(tiny_model, mlp_path).name == "mlp_out.1"
    with pytest.raises(HookpointError):
        resolve_hookpoint(tiny_model, "blocks.1.hook_z")


def test_hidden_states_are_resid_pre_and_the_last_is_after_the_final_norm(tiny_model, tokens) -> None:
    """hidden_states[i] == resid_pre.i == resid_post.(i-1) for i < L; hidden_states[L] differs from
    resid_post.(L-1) exactly where the family applies its final norm there."""
    n = len(blocks(tiny_model))
    names = [f"resid_pre.{i}" for i in range(n)] + [f"resid_post.{i}" for i in range(n)]
    with torch.no_grad():
        hidden = tiny_model(tokens, output_hidden_states=True).hidden_states
        acts = capture(tiny_model, tokens, names, stop_early=False)
    assert len(hidden) == n + 1
    for i in range(n):
        torch.testing.assert_close(hidden[i], acts[f"resid_pre.{i}"])
        if i > 0:
            torch.testing.assert_close(hidden[i], acts[f"resid_post.{i - 1}"])
    norms = [m for name, m in tiny_model.named_modules() if name.split(".")[-1] in
             ("norm", "ln_f", "final_layer_norm")]
    assert norms, "no final norm found"
    with torch.no_grad():
        torch.testing.assert_close(hidden[n], norms[-1](acts[f"resid_post.{n - 1}"]))
    assert not torch.allclose(hidden[n], acts[f"resid_post.{n - 1}"])
    assert "resid_post.0" in list_hookpoints(tiny_model)


def test_harvest_stores_aliases_by_canonical_names_and_evaluation_reads_imported_hook_names(
        saved_tiny_llama, tmp_path) -> None:
    from saelab.activations.store import ActivationStore
    from saelab.cli import main
    from saelab.evaluation import check_compatible
    from saelab.saes import create_sae

    model_dir, corpus = saved_tiny_llama()
    assert main(["harvest", "--model", str(model_dir), "--hookpoints", "model.layers.0,blocks.1.hook_mlp_out",
                 "--data.source", str(corpus), "--data.context-length", "16", "--data.n-tokens", "100",
                 "--out-dir", str(tmp_path / "store")]) == 0
    store = ActivationStore(tmp_path / "store")
    assert store.hookpoints == ["resid_post.0", "mlp_out.1"]
    imported = create_sae("topk", d_in=32, n_latents=16, k=2, hookpoint="blocks.0.hook_resid_post")  # SAELens's
    assert check_compatible(imported, store) == "resid_post.0"
    sparsify_named = create_sae("topk", d_in=32, n_latents=16, k=2, hookpoint="layers.0")
    assert check_compatible(sparsify_named, store) == "resid_post.0"
