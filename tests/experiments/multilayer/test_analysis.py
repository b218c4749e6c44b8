from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from saelab.experiments.multilayer.analysis import (
    ActivationRates,
    activation_rates,
    banding,
    decoder_cosines,
    information_flow,
    pair_stats,
    plot_activation_rates,
    plot_banding,
    plot_bucket_counts,
    plot_by_gap,
    plot_decoder_cosines,
    plot_flow,
    trigger_layers,
)
from saelab.metrics import fire_counts
from saelab.models.hooks import forward_with
from saelab.saes import MultiLayerSAE, MultiLayerSAEConfig
from saelab.saes.multilayer import layer_hookpoints

D = 4  # width of each layer in the handcrafted SAEs


def _sae(n_latents: int, layers: list[int], d: int = D, scales: list[float] | None = None) -> MultiLayerSAE:
    cfg = MultiLayerSAEConfig(d_in=d * len(layers), n_latents=n_latents, k=min(4, n_latents), layers=layers,
                              hookpoints=layer_hookpoints(layers), slice_widths=[d] * len(layers),
                              layer_scales=scales or [1.0] * len(layers))
    return MultiLayerSAE(cfg)


def _rows(segment_norms: list[list[float]]) -> torch.Tensor:
    """Rows whose segment of layer l is segment_norms[f][l] times a unit vector."""
    return torch.cat([torch.tensor(norms).repeat_interleave(D)[None] / 2.0 for norms in segment_norms])


@pytest.fixture
def handcrafted() -> tuple[MultiLayerSAE, ActivationRates]:
    sae = _sae(6, [0, 3, 5])
    with torch.no_grad():
        # latent:        0 (L0)     1 (L3, dead)  2 (L3)     3 (L5)     4 (L0)     5 (L0)
        sae.W_enc.copy_(_rows([[3, 1, 1], [1, 3, 1], [0, 2, 1], [1, 1, 4], [5, 0, 0], [2, 1, 1]]))
        sae.W_dec.copy_(_rows([[1, 2, 1], [1, 1, 1], [0, 1, 3], [0, 0, 1], [3, 1, 0], [1, 1, 2]]))
    return sae, ActivationRates(torch.tensor([5, 0, 3, 1, 2, 7]), n_tokens=10)


def test_trigger_layers_and_bucket_counts_of_active_latents(handcrafted) -> None:
    sae, rates = handcrafted
    triggers = trigger_layers(sae, rates)
    assert triggers.trigger("encoder").tolist() == [0, 1, 1, 2, 0, 0]
    assert triggers.trigger("decoder").tolist() == [1, 0, 2, 2, 0, 2]
    assert triggers.bucket_counts("encoder") == [3, 1, 1]  # latent 1 never fired: not counted
    assert triggers.bucket_counts("decoder") == [1, 1, 3]
    assert triggers.bucket(0).tolist() == [True, False, False, False, True, True]
    torch.testing.assert_close(triggers.encoder_norms[2], torch.tensor([0.0, 2.0, 1.0]))


def test_banding_sorts_by_rate_and_groups_by_trigger_bucket(handcrafted) -> None:
    sae, rates = handcrafted
    triggers = trigger_layers(sae, rates)
    plain = banding(triggers, rates)
    assert plain.latents.tolist() == [3, 4, 2, 0, 5] and plain.bucket_starts == []
    grouped = banding(triggers, rates, group_by_bucket=True)
    assert grouped.latents.tolist() == [4, 0, 5, 2, 3] and grouped.bucket_starts == [0, 3, 4]
    torch.testing.assert_close(grouped.encoder_share.sum(0), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(grouped.encoder_share[:, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(plain.decoder_share[:, 0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_activation_rates_count_firing_tokens(handcrafted) -> None:
    sae, _ = handcrafted
    batches = [torch.randn(7, 12), torch.randn(5, 12)]
    rates = activation_rates(sae, batches)
    with torch.no_grad():
        expected = sum(fire_counts(sae.encode(b)) for b in batches)
    assert rates.n_tokens == 12 and torch.equal(rates.counts, expected)
    counts = ActivationRates(torch.tensor([5, 0, 3, 1, 2, 7]), n_tokens=10)
    assert counts.most_active(3).tolist() == [5, 0, 2]
    assert counts.most_active(9, among=torch.tensor([0, 1, 1, 0, 1, 0]).bool()).tolist() == [2, 4]


def test_decoder_cosines_mean_and_sd_per_pair_of_layers() -> None:
    sae = _sae(2, [0, 1, 2])
    e1, e2 = torch.eye(D)[0], torch.eye(D)[1]
    with torch.no_grad():
        sae.W_dec.copy_(torch.stack([torch.cat([e1, e1, e2]), torch.cat([e1, -e1, 2 * e1])]))
    stats = decoder_cosines(sae, torch.tensor([0, 1]))
    expected_mean = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [0.5, -0.5, 1.0]], dtype=torch.float64)
    expected_sd = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [0.5, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(stats.mean, expected_mean)
    torch.testing.assert_close(stats.sd, expected_sd)
    assert stats.by_gap() == {1: pytest.approx(-0.25), 2: pytest.approx(0.5)}
    assert stats.adjacent() == [pytest.approx(0.0), pytest.approx(-0.5)]


def test_pair_stats_ignore_missing_values() -> None:
    nan = math.nan
    values = torch.tensor([[[nan, 1.0], [nan, nan]], [[nan, 3.0], [nan, nan]], [[nan, nan], [nan, nan]]])
    stats = pair_stats([0, 1], values)
    assert stats.n_latents == 2 and stats.mean[0, 1].item() == 2.0 and stats.sd[0, 1].item() == 1.0
    assert stats.mean[1, 0].isnan() and stats.to_dict()["mean"][1] == [None, None]


class LinearBlock(nn.Module):
    """A block that maps each token's hidden state by a fixed matrix (Llama's submodule names, so hookpoints
    resolve); it takes and ignores every argument the model passes to its blocks."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = nn.Identity(), nn.Identity()
        self.post_attention_layernorm, self.mlp = nn.Identity(), nn.Identity()
        self.register_buffer("matrix", matrix)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states @ self.matrix


def test_flow_on_linear_blocks_is_exact_for_decoders_that_follow_the_block_maps() -> None:
    d, scales = 8, [0.5, 2.0, 3.0]
    config = LlamaConfig(hidden_size=d, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(config).eval()
    maps = [torch.randn(d, d) / d**0.5 for _ in range(3)]
    model.model.layers = nn.ModuleList(LinearBlock(m) for m in maps)
    sae = _sae(5, [0, 1, 2], d=d, scales=scales)
    with torch.no_grad():
        first = torch.randn(5, d)
        second = first * scales[1] / scales[0] @ maps[1]  # what the model makes of the layer-0 write, normalised
        third = second * scales[2] / scales[1] @ maps[2]
        third[4] = torch.randn(d)  # latent 4 writes something unrelated to layer 2
        sae.W_dec.copy_(torch.cat([first, second, third], dim=1))
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([9.0, 8.0, -1.0, 7.0, 6.0]))  # latents 0, 1, 3, 4 fire at every token
    contexts = torch.randint(0, 50, (3, 6))
    positions = torch.ones_like(contexts, dtype=torch.bool)
    positions[:, 0] = False
    latents = torch.tensor([0, 2, 3, 4])
    flow = information_flow(model, sae, contexts, latents, positions, tokens_per_latent=5, rows_per_pass=4)

    assert set(flow.latent.tolist()) == {0, 3, 4} and not (flow.position == 0).any()
    assert len(flow.latent) == 3 * 5 * 3  # latents x tokens x (source, target) pairs
    exact = flow.latent != 4
    torch.testing.assert_close(flow.cosine[exact], torch.ones(int(exact.sum()), dtype=torch.float64))
    torch.testing.assert_close(flow.strength[exact], torch.ones(int(exact.sum()), dtype=torch.float64))
    into_layer_1 = (flow.latent == 4) & (flow.target == 1)
    torch.testing.assert_close(flow.cosine[into_layer_1], torch.ones(5, dtype=torch.float64))
    assert (flow.cosine[(flow.latent == 4) & (flow.target == 2)] < 0.99).all()

    summary = flow.summary(torch.tensor([0, 3]))
    assert summary["cosine"].n_latents == 2
    torch.testing.assert_close(summary["cosine"].mean[0, 1:], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(summary["strength"].sd[0, 1:], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert summary["cosine"].mean[2, 0].isnan()


def test_plots_are_written(handcrafted, tmp_path) -> None:
    sae, rates = handcrafted
    triggers = trigger_layers(sae, rates)
    stats = decoder_cosines(sae, rates.most_active(4))
    paths = [
        plot_activation_rates(rates, tmp_path / "rates.png"),
        plot_bucket_counts(triggers, tmp_path / "buckets.png"),
        plot_banding(banding(triggers, rates, group_by_bucket=True), tmp_path / "band.png", which="decoder"),
        plot_decoder_cosines(stats, tmp_path / "cos.png"),
        plot_by_gap({"all": stats}, tmp_path / "gap.png", ylabel="cosine"),
        plot_flow(stats, tmp_path / "flow.png", quantity="cosine"),
    ]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_flow_samples_match_finite_differences_of_the_model_on_each_rows_own_sequence() -> None:
    # A real (random) GPT-2 in float64, several contexts mixed in one pass: each sample's cosine and strength must
    # be those of perturbing its own sequence at its own position inside the model's forward pass.
    config = GPT2Config(n_layer=3, n_embd=8, n_head=2, vocab_size=50, n_positions=16)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    scales = [0.5, 2.0]
    sae = _sae(3, [0, 2], d=8, scales=scales)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([5.0, 4.0, -1.0]))
    contexts = torch.randint(0, 50, (3, 6))
    flow = information_flow(model, sae, contexts, torch.tensor([0, 1]), tokens_per_latent=3, rows_per_pass=4)
    assert len(flow.latent) == 6 and len(set(flow.context.tolist())) > 1
    eps = 1e-6
    for f, c, p, cos, strength in zip(flow.latent, flow.context, flow.position, flow.cosine, flow.strength,
                                      strict=True):
        d = torch.zeros(1, 6, 8, dtype=torch.float64)
        d[0, p] = sae.W_dec[f, :8].double() / scales[0]

        def pushed(sign: float, d: torch.Tensor = d, c: torch.Tensor = c) -> torch.Tensor:
            replace = {"resid_post.0": lambda h: h + sign * eps * d}
            return forward_with(model, contexts[c : c + 1], replace, capture=["resid_post.2"])[1]["resid_post.2"]

        with torch.no_grad():
            moved = (pushed(1.0) - pushed(-1.0))[0, p] / (2 * eps) * scales[1]
        target = sae.W_dec[f, 8:].double().detach()
        assert cos.item() == pytest.approx(F.cosine_similarity(moved, target, dim=0).item(), abs=1e-6)
        assert strength.item() == pytest.approx((moved @ target / target.pow(2).sum()).item(), rel=1e-5)
