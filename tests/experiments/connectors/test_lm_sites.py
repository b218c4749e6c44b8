"""The MLP of a tiny random Llama replaced through SAE features, and single-feature ablation, against hand
computations."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.errors import ConfigError, HookpointError
from saelab.evaluation import splice_losses
from saelab.experiments.connectors.connector import encode_features, through_features
from saelab.experiments.connectors.lm_sites import feature_ablation_effects, mlp_replacement, mlp_sites
from saelab.models.hooks import forward_with
from saelab.saes.base import SparseAutoencoder

D = 16


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # at the default init scale the MLP hardly moves the loss; make it matter
        for linear in (model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj,
                       model.model.layers[1].mlp.down_proj):
            linear.weight.mul_(8)
    return model


class ExactConnector(nn.Module):
    """Input features → decode → the block's own MLP → encode: the connector a perfect fit would learn."""

    def __init__(self, sae_in: SparseAutoencoder, mlp: nn.Module, sae_out: SparseAutoencoder) -> None:
        super().__init__()
        self.sae_in, self.mlp, self.sae_out = sae_in, mlp, sae_out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # .forward, not __call__: the MLP module carries the splice's own hooks while this runs inside them.
        hidden = self.sae_in.denormalize(self.sae_in.decode(features), None)
        return encode_features(self.sae_out, self.mlp.forward(hidden))


def test_an_exact_connector_in_place_of_the_mlp_reproduces_clean_cross_entropy(perfect_sae) -> None:
    model = tiny_llama()
    site_in, site_out = mlp_sites(model, 1)
    assert (site_in, site_out) == ("mlp_in.1", "mlp_out.1")
    sae_in, sae_out = perfect_sae(D, preprocessing="scale", scale=0.5), perfect_sae(D, preprocessing="scale", scale=3.0)
    exact = ExactConnector(sae_in, model.model.layers[1].mlp, sae_out)
    contexts = torch.randint(2, 50, (6, 12))
    losses = splice_losses(model, site_out, contexts, {
        "exact": mlp_replacement(site_in, site_out, through_features(sae_in, [exact], sae_out)),
        "through_zero": mlp_replacement(site_in, site_out, torch.zeros_like),
        "zero_ablated": {site_out: torch.zeros_like},
        "input_zeroed": {site_in: torch.zeros_like},
    }, batch_size=4, drop_first=1)
    assert losses.ce["exact"] == pytest.approx(losses.ce["clean"], abs=1e-5)
    assert losses.kl["exact"] == pytest.approx(0.0, abs=1e-6)
    # The replacement really discards the MLP's own output: through zeros is exactly zero-ablation ...
    assert losses.ce["through_zero"] == pytest.approx(losses.ce["zero_ablated"], abs=1e-6)
    assert losses.ce["zero_ablated"] != pytest.approx(losses.ce["clean"], abs=1e-3)
    # ... and several sites in one pass act together (a zeroed MLP input still gives the MLP's bias-free output 0).
    assert losses.ce["input_zeroed"] == pytest.approx(losses.ce["zero_ablated"], abs=1e-6)


def test_mlp_sites_name_an_existing_block() -> None:
    with pytest.raises(HookpointError):
        mlp_sites(tiny_llama(), 5)


def test_feature_ablation_removes_exactly_that_features_share(perfect_sae) -> None:
    model, site, feature = tiny_llama(), "mlp_out.1", 3
    sae = perfect_sae(D)
    contexts = torch.randint(2, 50, (5, 10))
    effects = feature_ablation_effects(model, site, sae, feature, contexts, batch_size=2, drop_first=1)

    # By hand: latent 3 is relu(q·(x − b_dec)) along its unit atom q; removing it subtracts that times q.
    q, c = sae.W_enc[feature].detach(), sae.b_dec.detach()
    with torch.no_grad():
        clean, captured = forward_with(model, contexts, capture=[site])
        activation = torch.relu((captured[site] - c) @ q)
        ablated, _ = forward_with(model, contexts, {site: lambda x: x - torch.relu((x - c) @ q)[..., None] * q})
    expected = []
    for row, position in (activation[:, 1:-1] > 0).nonzero().tolist():
        position += 1
        following = int(contexts[row, position + 1])
        drop = (clean[row, position, following] - ablated[row, position, following]).item()
        expected.append((row, position, activation[row, position].item(), following, drop))
    assert len(expected) > 3
    assert len(effects) == len(expected)
    for effect, (row, position, value, following, drop) in zip(effects, expected, strict=True):
        assert (effect.context, effect.position, effect.next_token) == (row, position, following)
        assert effect.activation == pytest.approx(value, abs=1e-5)
        assert effect.logit_drop == pytest.approx(drop, abs=1e-4)
    assert any(abs(e.logit_drop) > 1e-4 for e in effects)
    with pytest.raises(ConfigError, match="out of range"):
        feature_ablation_effects(model, site, sae, 2 * D, contexts)
