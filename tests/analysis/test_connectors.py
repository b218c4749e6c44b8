import pytest
import torch
from torch import nn

from saelab.analysis.connectors import (
    ConnectorConfig,
    FeatureConnector,
    alive_features,
    connector_mse,
    count_large_weights,
    encode_features,
    evaluate_spans,
    network_feature_weights,
    per_feature_mse,
    simulate,
    smart_init_,
    top_connections,
    train_connector,
    weight_l1,
)
from saelab.errors import ConfigError, DataError
from saelab.models.mnist_mlp import MnistMLP, MnistMLPConfig
from saelab.saes.relu import ReluSAE, ReluSAEConfig


def perfect_sae(d: int, tied: bool = False, preprocessing: str = "none", scale: float = 1.0) -> ReluSAE:
    """2d latents ±q_i of an orthonormal basis: ReLU keeps either (q_i·x) or −(q_i·x), and decoding with the same ±q_i
    sums back to x exactly. A nonzero b_dec checks the subtract-before-encode / add-after-decode convention."""
    sae = ReluSAE(ReluSAEConfig(d_in=d, n_latents=2 * d, tied=tied, preprocessing=preprocessing, input_scale=scale))
    q = torch.linalg.qr(torch.randn(d, d)).Q
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([q, -q]))
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.randn(d))
        if not tied:
            sae.W_dec.copy_(torch.cat([q, -q]))
    x = torch.randn(50, d) * 3
    torch.testing.assert_close(sae.reconstruct(x), x, atol=1e-5, rtol=1e-5)
    return sae


def identity_connector(n: int) -> FeatureConnector:
    connector = FeatureConnector(n, n, form="linear")
    with torch.no_grad():
        connector.linears[0].weight.copy_(torch.eye(n))
        connector.linears[0].bias.zero_()
    return connector


@pytest.mark.parametrize(("tied", "preprocessing"), [(False, "none"), (True, "none"), (False, "scale")])
@torch.no_grad()
def test_smart_init_is_exact_for_a_linear_layer_with_perfect_saes(tied: bool, preprocessing: str) -> None:
    sae_in = perfect_sae(5, tied, preprocessing, scale=0.5)
    sae_out = perfect_sae(7, tied, preprocessing, scale=2.0)
    layer = nn.Linear(5, 7)
    h_in = torch.randn(64, 5) * 2
    f_in, f_out = encode_features(sae_in, h_in), encode_features(sae_out, layer(h_in))
    assert (f_out == 0).any() and (f_out > 0).any()  # the output ReLU is really exercised

    connector = FeatureConnector(10, 14, form="relu")
    smart_init_(connector, layer, sae_in, sae_out)
    torch.testing.assert_close(connector(f_in), f_out, atol=1e-5, rtol=1e-5)
    W2, b2 = network_feature_weights(layer, sae_in, sae_out)
    assert torch.equal(connector.linears[0].weight, W2) and torch.equal(connector.linears[0].bias, b2)


@torch.no_grad()
def test_smart_mlp_init_reproduces_a_relu_layer_exactly() -> None:
    sae_in, sae_out = perfect_sae(5), perfect_sae(6)
    layer = nn.Linear(5, 6)
    h_in = torch.randn(64, 5)
    f_out = encode_features(sae_out, torch.relu(layer(h_in)))
    connector = FeatureConnector(10, 12, form="mlp", mlp_hidden=6)
    smart_init_(connector, layer, sae_in, sae_out)
    torch.testing.assert_close(connector(encode_features(sae_in, h_in)), f_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="mlp_hidden must be 6"):
        smart_init_(FeatureConnector(10, 12, form="mlp", mlp_hidden=8), layer, sae_in, sae_out)


def _small_mlp() -> MnistMLP:
    return MnistMLP(MnistMLPConfig(d_in=10, hidden=6, n_layers=4, n_classes=3))


@torch.no_grad()
def test_identity_connectors_on_perfect_saes_reproduce_the_network() -> None:
    model = _small_mlp()
    for layer in model.layers[1:3]:  # hidden-to-hidden layers are the identity on non-negative states
        layer.weight.copy_(torch.eye(6))
        layer.bias.zero_()
    sae = perfect_sae(6)
    saes = {k: sae for k in (1, 2, 3)}
    connectors = {k: identity_connector(12) for k in (1, 2)}
    x = torch.rand(40, 10)
    for start in (1, 2, 3):
        for end in range(start, 4):
            torch.testing.assert_close(simulate(model, saes, connectors, x, start, end), model(x))
    labels = model(x).argmax(-1)
    spans = evaluate_spans(model, saes, connectors, x, labels)
    assert [(s.start, s.end, s.layers_replaced) for s in spans] == [
        (1, 1, 0), (1, 2, 1), (1, 3, 2), (2, 2, 0), (2, 3, 1), (3, 3, 0)
    ]
    assert all(s.accuracy == 1.0 for s in spans)


@torch.no_grad()
def test_smart_connectors_reproduce_a_network_whose_hidden_layers_never_clip() -> None:
    model = _small_mlp()
    for layer in model.layers[1:3]:  # non-negative weights and bias on non-negative inputs: ReLU is the identity
        layer.weight.abs_()
        layer.bias.abs_()
    saes = {k: perfect_sae(6, tied=k == 2) for k in (1, 2, 3)}
    connectors = {}
    for k in (1, 2):
        connectors[k] = FeatureConnector(12, 12, form="relu")
        smart_init_(connectors[k], model.layers[k], saes[k], saes[k + 1])
    x = torch.rand(40, 10)
    torch.testing.assert_close(simulate(model, saes, connectors, x, 1, 3), model(x), atol=1e-4, rtol=1e-4)


def test_simulation_needs_its_parts_and_a_foldable_preprocessing() -> None:
    model, sae = _small_mlp(), perfect_sae(6)
    x = torch.rand(4, 10)
    with pytest.raises(ConfigError, match=r"connector 2"):
        simulate(model, {1: sae, 3: sae}, {1: identity_connector(12)}, x, 1, 3)
    with pytest.raises(ConfigError, match=r"span \(2, 4\)"):
        simulate(model, {2: sae}, {}, x, 2, 4)
    l2 = ReluSAE(ReluSAEConfig(d_in=6, n_latents=12, preprocessing="token_l2"))
    with pytest.raises(ConfigError, match="token_l2"):
        simulate(model, {1: l2}, {}, x, 1, 1)
    with pytest.raises(ConfigError, match="per-token"):
        smart_init_(FeatureConnector(12, 12), model.layers[1], l2, sae)


def test_connector_forms() -> None:
    f = torch.rand(8, 4)
    linear, relu = FeatureConnector(4, 3, "linear"), FeatureConnector(4, 3, "relu")
    relu.load_state_dict(linear.state_dict())
    assert torch.equal(relu(f), torch.relu(linear(f))) and (linear(f) < 0).any()
    mlp = FeatureConnector(4, 3, "mlp", bias=False, mlp_hidden=5)
    assert [tuple(w.shape) for w in mlp.weight_matrices()] == [(5, 4), (3, 5)]
    assert all(linear.bias is None for linear in mlp.linears) and (mlp(f) >= 0).all()
    with pytest.raises(ConfigError, match="form 'conv'"):
        FeatureConnector(4, 3, "conv")
    with pytest.raises(ConfigError, match="sets a bias"):
        smart_init_(FeatureConnector(12, 12, bias=False), nn.Linear(6, 6), perfect_sae(6), perfect_sae(6))


def test_weight_l1_is_the_mean_row_l1_norm_summed_over_matrices() -> None:
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0], [0.0, 0.0]])  # row norms 3, 3, 0
    b = torch.tensor([[0.5, -0.5, 1.0]])  # one row, norm 2
    assert weight_l1([a]).item() == pytest.approx(2.0)
    assert weight_l1([a, b]).item() == pytest.approx(4.0)


def test_mse_over_alive_features_only() -> None:
    target = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    prediction = torch.tensor([[2.0, 5.0, 2.0], [0.0, 1.0, 2.0]])
    alive = alive_features(target)
    assert alive.tolist() == [True, False, True]
    assert connector_mse(prediction, target).item() == pytest.approx((1 + 25 + 0 + 0 + 1 + 4) / 6)
    assert connector_mse(prediction, target, alive).item() == pytest.approx((1 + 0 + 0 + 4) / 4)
    assert per_feature_mse(prediction, target).tolist() == pytest.approx([0.5, 13.0, 2.0])


def test_top_connections_are_ranked_by_magnitude_and_keep_their_sign() -> None:
    weight = torch.tensor([[0.0, 0.5, -0.9, 0.1], [1.0, 0.0, 0.0, 0.0]])
    assert top_connections(weight, 0, k=2) == [(2, pytest.approx(-0.9)), (1, pytest.approx(0.5))]
    assert top_connections(weight, 1, k=1) == [(0, 1.0)]


def test_count_large_weights_is_strict_and_sums_matrices() -> None:
    assert count_large_weights([torch.tensor([0.1, -0.1000001, 0.5, 0.0]), torch.tensor([[-3.0]])]) == 3
    assert count_large_weights([torch.tensor([0.3, 0.6])], threshold=0.5) == 1


def test_training_recovers_a_sparse_map_and_l1_prunes_the_rest() -> None:
    n, noise = 12, 0.5
    true_w = torch.zeros(n, n)
    true_w[torch.arange(n), torch.randperm(n)] = 1.5  # each output copies one input
    f_in = torch.relu(torch.randn(1500, n))
    f_out = f_in @ true_w.T + noise * torch.randn(1500, n)  # the noise gives an unpenalised fit small dense weights
    snapshots = []
    cfg = ConnectorConfig(form="linear", epochs=15, batch_size=64, lr=1e-2, l1_coefficient=0.0)
    plain = FeatureConnector.from_config(n, n, cfg)
    history = train_connector(plain, f_in, f_out, cfg,
                              on_epoch=lambda epoch, c: snapshots.append((epoch, c.linears[0].weight.clone())))
    assert [e for e, _ in snapshots] == list(range(15)) and not torch.equal(snapshots[0][1], snapshots[-1][1])
    assert history[0].mse > 2 * noise**2 and history[-1].mse < 1.1 * noise**2  # down to the noise floor
    sparse = FeatureConnector.from_config(n, n, cfg)
    history = train_connector(sparse, f_in, f_out, cfg.replace(l1_coefficient=0.05))
    assert history[-1].loss == pytest.approx(history[-1].mse + 0.05 * history[-1].l1)
    assert count_large_weights(sparse.weight_matrices(), 0.02) < count_large_weights(plain.weight_matrices(), 0.02) / 2
    assert torch.equal(sparse.linears[0].weight.abs() > 0.5, true_w > 0)  # the true connections survive


def test_training_rejects_unusable_feature_pairs() -> None:
    connector, cfg = FeatureConnector(3, 2), ConnectorConfig(epochs=1)
    with pytest.raises(DataError, match="paired"):
        train_connector(connector, torch.rand(5, 3), torch.rand(4, 2), cfg)
    with pytest.raises(DataError, match="no output feature fires"):
        train_connector(connector, torch.rand(5, 3), torch.zeros(5, 2), cfg)
