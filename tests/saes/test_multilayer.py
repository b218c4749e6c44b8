from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.evaluation import evaluate_reconstruction
from saelab.metrics import per_slice_fvu
from saelab.saes import MultiLayerSAE, MultiLayerSAEConfig, geometric_median, load_sae, to_dense
from saelab.saes.multilayer import layer_hookpoints, select_layers
from saelab.training.config import TrainerConfig
from saelab.training.trainer import Trainer

LAYERS = [0, 2, 5]
SCALES = [0.5, 2.0, 4.0]


def _fields(**changes) -> dict:
    fields = {"d_in": 12, "n_latents": 32, "k": 4, "layers": LAYERS, "hookpoints": layer_hookpoints(LAYERS),
              "slice_widths": [4, 4, 4], "normalization": "per_layer", "layer_scales": SCALES}
    return {**fields, **changes}


def _sae(**changes) -> MultiLayerSAE:
    return MultiLayerSAE(MultiLayerSAEConfig(**_fields(**changes)))


def _layered_batch(n: int = 256, seed: int = 0) -> torch.Tensor:
    """Raw activations whose three layers differ in offset and size, like residual streams of growing norm."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, 4, generator=gen) * s + s for s in (1.0, 3.0, 9.0)], dim=1)


@pytest.mark.parametrize("layers", [[2, 1], [1, 1], [-1, 2], []])
def test_bad_layer_lists_are_config_errors(layers) -> None:
    with pytest.raises(ConfigError, match="sorted|out of range|empty"):
        MultiLayerSAEConfig.from_dict(_fields(layers=layers))
    with pytest.raises(ConfigError, match="sorted|out of range|stride"):
        select_layers(6, layers, stride=None)


def test_layer_selection_by_stride_or_list_checked_against_the_model() -> None:
    assert select_layers(30, stride=6) == [0, 6, 12, 18, 24]
    assert select_layers(6, stride=1) == [0, 1, 2, 3, 4, 5]
    assert select_layers(6, [0, 1, 2, 3, 4, 5]) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match=r"out of range \(this model has layers 0..5\)"):
        select_layers(6, [0, 6])
    with pytest.raises(ConfigError, match="stride"):
        select_layers(6, stride=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hookpoints": ["resid_post.0", "resid_post.2", "resid_post.4"]}, "not of layer 5"),
        ({"slice_widths": [4, 4, 5]}, "sum to d_in"),
        ({"layer_scales": [1.0, 1.0]}, "one entry per layer"),
        ({"normalization": "layer"}, "unknown"),
        ({"normalization": "global"}, "one scale shared"),
        ({"normalization": "none"}, "to be 1.0"),
        ({"layer_scales": [1.0, 0.0, 1.0]}, "positive"),
        ({"preprocessing": "scale"}, "leave preprocessing"),
        ({"encoder_init_scale": 0.0}, "encoder_init_scale"),
    ],
)
def test_inconsistent_configs_are_config_errors(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MultiLayerSAEConfig.from_dict(_fields(**changes))


def test_per_layer_scales_are_built_in_and_reconstruct_is_raw_to_raw() -> None:
    sae = _sae()
    x = _layered_batch(8)
    x_n, _ = sae.normalize(x)
    for piece, s, sl in zip(x_n.split(4, dim=1), SCALES, sae.slices, strict=True):
        torch.testing.assert_close(piece, x[:, sl] * s)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), sae(x_n).x_hat / sae.feature_scale)
    assert sae.slices == [slice(0, 4), slice(4, 8), slice(8, 12)]


@pytest.mark.parametrize("c", [0.2, 0.5])
def test_encoder_scaling_gives_output_variance_c_squared_times_input_variance(c: float) -> None:
    sae = _sae(encoder_init_scale=c)
    x_n, _ = sae.normalize(_layered_batch())
    with torch.no_grad():
        sae.initialize_from_batch(x_n)
        out = sae(x_n).x_hat
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x_n))
    var_in = x_n.var(dim=0, unbiased=False).mean()
    var_out = out.var(dim=0, unbiased=False).mean()
    assert var_out.item() == pytest.approx(c**2 * var_in.item(), rel=1e-4)


def test_encoder_scaling_keeps_the_selection_and_scales_the_values() -> None:
    sae = _sae()
    x_n, _ = sae.normalize(_layered_batch())
    with torch.no_grad():
        sae.init_b_dec_geometric_median(x_n)
        plain = sae.encode(x_n)
        factor = sae.scale_encoder(x_n, 0.2)
        scaled = sae.encode(x_n)
    torch.testing.assert_close(to_dense(scaled), to_dense(plain) * factor)


def test_the_trainer_runs_the_first_batch_init(tmp_path) -> None:
    sae = _sae(encoder_init_scale=0.3)
    batches = [_layered_batch(64, seed=s) for s in range(2)]
    cfg = TrainerConfig(total_tokens=64, batch_size=64, lr=1e-12, warmup_steps=1, progress=False,
                        checkpoint_every_steps=None)
    Trainer(sae, cfg, tmp_path).fit(batches)
    x_n, _ = sae.normalize(batches[0])
    with torch.no_grad():
        torch.testing.assert_close(sae.b_dec, geometric_median(x_n), rtol=0, atol=1e-6)
        out = sae(x_n).x_hat
    ratio = out.var(dim=0, unbiased=False).mean() / x_n.var(dim=0, unbiased=False).mean()
    assert ratio.item() == pytest.approx(0.09, rel=1e-3)


def test_per_layer_fvu_combines_to_the_total() -> None:
    sae = _sae()
    batches = [_layered_batch(100, seed=s) for s in range(3)]
    with torch.no_grad():
        sae.initialize_from_batch(sae.normalize(batches[0])[0])
    metrics = evaluate_reconstruction(sae, batches, slices=sae.slices)
    x_n = sae.normalize(torch.cat(batches))[0]
    with torch.no_grad():
        x_hat = sae(x_n).x_hat
    per_layer = metrics["per_slice_fvu"]
    expected = per_slice_fvu(x_n, x_hat, sae.slices).double()
    torch.testing.assert_close(torch.tensor(per_layer, dtype=torch.float64), expected, rtol=1e-5, atol=0)
    variance = torch.stack([(x_n[:, s] - x_n[:, s].mean(0)).pow(2).sum() for s in sae.slices]).double()
    combined = (variance / variance.sum() * torch.tensor(per_layer)).sum().item()
    assert metrics["fvu"] == pytest.approx(combined, rel=1e-6)
    assert len(set(per_layer)) == 3 and min(per_layer) < metrics["fvu"] < max(per_layer)


def test_post_activation_bias_shifts_only_the_latents_that_fire() -> None:
    sae = _sae(post_act_bias=True)
    plain = _sae()
    plain.load_state_dict({k: v for k, v in sae.state_dict().items() if k != "post_act_bias"})
    bias = torch.full((32,), -100.0)
    bias[[3, 7]] = 100.0  # latents 3 and 7 always fire; the other two selected ones are clamped at 0
    with torch.no_grad():
        sae.post_act_bias.copy_(torch.arange(32.0))
        sae.b_enc.copy_(bias)
        plain.b_enc.copy_(bias)
    x_n = sae.normalize(_layered_batch(16))[0]
    z, z_plain = sae.encode(x_n), plain.encode(x_n)
    fired = z_plain.values > 0
    assert (fired.sum(1) == 2).all()
    torch.testing.assert_close(z.values, z_plain.values + torch.arange(32.0)[z.indices] * fired)
    sae(x_n).x_hat.sum().backward()
    assert sae.post_act_bias.grad is not None and sae.post_act_bias.grad.any()
    assert sae.latent_parameters()["post_act_bias"] == 0


def test_save_load_round_trip_and_mismatched_layer_set_or_normalisation(tmp_path) -> None:
    sae = _sae(post_act_bias=True)
    with torch.no_grad():
        sae.post_act_bias.normal_()
    sae.save(tmp_path)
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, MultiLayerSAE) and loaded.cfg == sae.cfg
    x = _layered_batch(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))
    with pytest.raises(ConfigError, match="normalization='per_layer' but 'global'"):
        load_sae(tmp_path, normalization="global")
    with pytest.raises(ConfigError, match="hookpoints"):
        load_sae(tmp_path, hookpoints=layer_hookpoints([0, 2]))


def test_activations_of_another_layer_set_or_normalisation_are_refused() -> None:
    sae = _sae()
    sae.check_input(layer_hookpoints(LAYERS), "per_layer", {hp: 4 for hp in layer_hookpoints(LAYERS)})
    with pytest.raises(ConfigError, match="reads .* but activations of"):
        sae.check_input(layer_hookpoints([0, 2, 4]))
    with pytest.raises(ConfigError, match="reads .* but activations of"):
        sae.check_input(layer_hookpoints([5, 2, 0]))
    with pytest.raises(ConfigError, match="normalization='per_layer' but 'global'"):
        sae.check_input(layer_hookpoints(LAYERS), "global")
    with pytest.raises(ConfigError, match="widths"):
        sae.check_input(layer_hookpoints(LAYERS), widths={hp: 8 for hp in layer_hookpoints(LAYERS)})
