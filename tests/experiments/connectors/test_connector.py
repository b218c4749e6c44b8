from pathlib import Path

import pytest
import torch
from torch import nn

from saelab.errors import CheckpointError, ConfigError, DataError
from saelab.experiments.connectors.connector import (
    ConnectorConfig,
    FeatureConnector,
    InputMajorLinear,
    LinearMap,
    alive_features,
    connector_mse,
    count_large_weights,
    encode_features,
    evaluate_spans,
    heldout_feature_mse,
    least_squares_map,
    linear_features,
    load_connector,
    network_feature_weights,
    per_feature_mse,
    residual_from_linear,
    save_connector,
    set_first_layer_,
    simulate,
    smart_init_,
    take_rows,
    top_connections,
    train_connector,
    trained_connector,
    weight_l1,
)
from saelab.models.mnist_mlp import MnistMLP, MnistMLPConfig
from saelab.run_folder import RunFolder
from saelab.saes.base import SparseLatents, to_dense
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.training.optim import adam


def identity_connector(n: int) -> FeatureConnector:
    connector = FeatureConnector(n, n, form="linear")
    with torch.no_grad():
        connector.linears[0].weight.copy_(torch.eye(n))
        connector.linears[0].bias.zero_()
    return connector


@pytest.mark.parametrize(("tied", "preprocessing"), [(False, "none"), (True, "none"), (False, "scale")])
@torch.no_grad()
def test_smart_init_is_exact_for_a_linear_layer_with_perfect_saes(tied: bool, preprocessing: str, perfect_sae) -> None:
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
def test_smart_mlp_init_reproduces_a_relu_layer_exactly(perfect_sae) -> None:
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
def test_identity_connectors_on_perfect_saes_reproduce_the_network(perfect_sae) -> None:
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
def test_smart_connectors_reproduce_a_network_whose_hidden_layers_never_clip(perfect_sae) -> None:
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


def test_simulation_needs_its_parts_and_a_foldable_preprocessing(perfect_sae) -> None:
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


def test_connector_forms(perfect_sae) -> None:
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
    # its gradient is the one autograd takes of the definition: sign(W) / rows, and 0 where W is 0
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    (2.5 * weight_l1(leaves)).backward()
    assert torch.equal(leaves[0].grad, 2.5 * torch.sign(a) / 3) and torch.equal(leaves[1].grad, 2.5 * torch.sign(b))


def test_input_major_linear_is_an_nn_linear_with_its_weight_stored_transposed() -> None:
    torch.manual_seed(3)
    reference = nn.Linear(7, 5)
    torch.manual_seed(3)
    linear = InputMajorLinear(7, 5)
    assert torch.equal(linear.weight, reference.weight) and torch.equal(linear.bias, reference.bias)  # same init
    assert linear.weight_t.shape == (7, 5) and linear.weight_t.is_contiguous()
    state = linear.state_dict()
    assert list(state) == ["weight", "bias"] and state["weight"].shape == (5, 7)  # nn.Linear's state dict
    x = torch.randn(4, 7)
    (linear(x) ** 2).sum().backward()
    (reference(x) ** 2).sum().backward()
    torch.testing.assert_close(linear.weight_t.grad.t(), reference.weight.grad)
    assert linear.weight_t.grad.is_contiguous()  # the gradient, and so Adam's moments, keep the layout
    other = nn.Linear(7, 5)
    linear.load_state_dict(other.state_dict())
    assert torch.equal(linear.weight, other.weight) and linear.weight_t.is_contiguous()
    other.load_state_dict(linear.state_dict())  # and back into a plain nn.Linear
    with torch.no_grad():
        linear.weight.fill_(2.0)  # writes through the view land in the parameter
    assert (linear.weight_t == 2.0).all()


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


def random_sparse(n_rows: int, n_latents: int, k: int) -> SparseLatents:
    indices = torch.stack([torch.randperm(n_latents)[:k] for _ in range(n_rows)])
    values = torch.rand(n_rows, k) * (torch.rand(n_rows, k) > 0.2)  # some selected values are exactly zero
    return SparseLatents(values, indices, n_latents)


@pytest.mark.parametrize("form", ["linear", "relu", "mlp", "residual"])
def test_sparse_features_give_the_dense_output_and_gradients(form: str) -> None:
    connector = FeatureConnector(40, 24, form=form, mlp_hidden=16)
    sparse = random_sparse(12, 40, 5)
    outputs, grads = [], []
    for features in (sparse, sparse.to_dense()):
        out = connector(features)
        outputs.append(out)
        grads.append(torch.autograd.grad((out * torch.arange(24.0)).sum(), list(connector.parameters())))
    torch.testing.assert_close(outputs[0], outputs[1])
    for sparse_grad, dense_grad in zip(*grads, strict=True):
        torch.testing.assert_close(sparse_grad, dense_grad)


def test_alive_features_and_heldout_mse_agree_between_sparse_and_dense() -> None:
    f_in, f_out = random_sparse(50, 30, 4), random_sparse(50, 20, 3)
    assert torch.equal(alive_features(f_out), alive_features(f_out.to_dense()))
    assert not alive_features(SparseLatents(torch.zeros(3, 2), torch.tensor([[0, 1]] * 3), 5)).any()
    connector = FeatureConnector(30, 20, form="relu")
    expected = ((connector(f_in.to_dense()) - f_out.to_dense()) ** 2).mean(dim=0)
    torch.testing.assert_close(heldout_feature_mse(connector, f_in, f_out, chunk=7), expected.detach())
    torch.testing.assert_close(heldout_feature_mse(connector, f_in.to_dense(), f_out.to_dense()), expected.detach())


def test_train_connector_learns_from_sparse_features() -> None:
    f_in = random_sparse(400, 30, 3)
    target_map = torch.randn(30, 10).relu()
    f_out = f_in.to_dense() @ target_map
    cfg = ConnectorConfig(form="linear", epochs=40, batch_size=50, lr=1e-2, l1_coefficient=0.0)
    connector = FeatureConnector.from_config(30, 10, cfg)
    history = train_connector(connector, f_in, f_out, cfg)
    assert history[-1].mse < 0.05 * history[0].mse


def test_linear_features_by_absolute_and_relative_tolerance() -> None:
    mse_linear = torch.tensor([0.10, 0.20, 0.5, 0.0])
    mse_mlp = torch.tensor([0.0995, 0.10, 0.5, 0.1])
    assert linear_features(mse_linear, mse_mlp, 1e-3).tolist() == [True, False, True, True]
    variance = torch.tensor([1.0, 10.0, 1.0, 1.0])  # gaps 0.0005, 0.1, 0, -0.1 -> relative 0.0005, 0.01, 0, -0.1
    assert linear_features(mse_linear, mse_mlp, 0.005, scale=variance).tolist() == [True, False, True, True]
    assert linear_features(mse_linear, mse_mlp, 0.02, scale=variance).tolist() == [True, True, True, True]


@pytest.mark.parametrize(("form", "bias"), [("linear", True), ("relu", False), ("mlp", True), ("residual", True),
                                            ("residual", False)])
def test_a_saved_connector_loads_with_its_form_widths_and_weights(form: str, bias: bool, tmp_path: Path) -> None:
    connector = FeatureConnector(6, 4, form=form, bias=bias, mlp_hidden=5)
    loaded = load_connector(save_connector(connector, tmp_path / "c.safetensors"))
    assert loaded.form == form and [w.shape for w in loaded.weight_matrices()] == [
        w.shape for w in connector.weight_matrices()]
    f = torch.rand(3, 6)
    assert torch.equal(loaded(f), connector(f))
    with pytest.raises(CheckpointError, match="missing"):
        load_connector(tmp_path / "absent.safetensors")


def test_trained_connector_trains_once_per_request(tmp_path: Path) -> None:
    folder, calls = RunFolder(tmp_path), []

    def fit(connector: FeatureConnector) -> list[dict[str, float]]:
        calls.append(connector)
        with torch.no_grad():
            connector.linears[0].weight.fill_(len(calls))
        return [{"loss": float(len(calls))}]

    first, curve = trained_connector(folder, "connectors/a", FeatureConnector(3, 2), {"l1": 1e-3}, fit)
    assert curve == [{"loss": 1.0}] and (tmp_path / "connectors" / "a.safetensors").exists()
    again, curve = trained_connector(folder, "connectors/a", FeatureConnector(3, 2), {"l1": 1e-3}, fit)
    assert len(calls) == 1 and curve == [{"loss": 1.0}]
    assert torch.equal(again.linears[0].weight, first.linears[0].weight)
    other, curve = trained_connector(folder, "connectors/a", FeatureConnector(3, 2), {"l1": 1e-2}, fit)
    assert len(calls) == 2 and curve == [{"loss": 2.0}] and (other.linears[0].weight == 2).all()


def test_residual_connector_starts_as_its_linear_connector_and_corrects_it() -> None:
    linear = FeatureConnector(8, 5, form="linear")
    residual = residual_from_linear(linear, hidden=6)
    f = torch.rand(20, 8)
    assert torch.equal(residual(f), linear(f))  # the correction's output layer is zero
    weight = residual.linears[0].weight
    assert torch.equal(weight, linear.linears[0].weight) and weight.data_ptr() != linear.linears[0].weight.data_ptr()
    by_hand = linear(f) + residual.linears[2](torch.relu(residual.linears[1](f)))
    torch.nn.init.normal_(residual.linears[2].weight)
    torch.testing.assert_close(residual(f), linear(f) + residual.linears[2](torch.relu(residual.linears[1](f))))
    assert not torch.allclose(residual(f), by_hand)
    with pytest.raises(ConfigError, match="starts from a linear connector"):
        residual_from_linear(FeatureConnector(8, 5, form="mlp"), hidden=6)


def test_early_stopping_keeps_the_best_weights_which_may_be_the_start() -> None:
    g = torch.Generator().manual_seed(0)
    f_in = torch.rand(600, 6, generator=g)
    f_out = torch.relu(f_in @ torch.randn(6, 4, generator=g)) + 0.1 * torch.randn(600, 4, generator=g)
    train, valid = (f_in[:500], f_out[:500]), (f_in[500:], f_out[500:])
    cfg = ConnectorConfig(form="linear", epochs=30, batch_size=50, lr=1e-2, l1_coefficient=0.0)
    linear = FeatureConnector.from_config(6, 4, cfg)
    train_connector(linear, *train, cfg)
    start = heldout_feature_mse(linear, *valid).mean()
    residual = residual_from_linear(linear, hidden=16)
    history = train_connector(residual, *train, cfg.replace(form="residual", patience=3), validation=valid)
    scores = [e.validation_mse for e in history]
    end = heldout_feature_mse(residual, *valid).mean()
    assert float(end) == pytest.approx(min([float(start), *scores]))  # the best weights, never worse than the start
    assert float(end) < 0.9 * float(start)  # the nonlinear part of the target is learnt
    if len(history) < 30:  # stopped early: the last `patience` epochs did not beat the best
        assert min(scores[-3:]) >= min([float(start), *scores[:-3]])
    # a start that cannot be improved (lr 0 leaves it unchanged) stops after `patience` epochs at the start
    frozen = residual_from_linear(linear, hidden=16)
    history = train_connector(frozen, *train, cfg.replace(form="residual", lr=1e-12, patience=2), validation=valid)
    assert len(history) == 2 and torch.equal(frozen(valid[0]), linear(valid[0]))


def seeded_sparse(n_rows: int, width: int, k: int, seed: int) -> SparseLatents:
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_rows, width, generator=g).argsort(dim=1)[:, :k]
    return SparseLatents(torch.rand(n_rows, k, generator=g), indices, width)


@pytest.mark.parametrize("dense", [False, True])
def test_least_squares_map_is_the_normal_equations_solution(dense: bool) -> None:
    f_in, f_out = seeded_sparse(400, 12, 3, seed=0), seeded_sparse(400, 7, 2, seed=1)
    x, y = (to_dense(f).double() for f in (f_in, f_out))
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], 1), y).solution
    fitted = least_squares_map(to_dense(f_in) if dense else f_in, to_dense(f_out) if dense else f_out, ridge=0.0,
                               chunk=64)
    torch.testing.assert_close(fitted.weight, solution[:12].T.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fitted.bias, solution[12].float(), rtol=1e-5, atol=1e-5)
    # no linear map does better on the pairs: a perturbed one has a higher MSE
    connector = FeatureConnector(12, 7, form="linear")
    set_first_layer_(connector, fitted)
    best = connector_mse(connector(f_in), to_dense(f_out))
    with torch.no_grad():
        connector.linears[0].weight.add_(1e-3 * torch.randn(7, 12))
    assert connector_mse(connector(f_in), to_dense(f_out)) > best


def test_least_squares_gives_inputs_that_never_fire_zero_weights() -> None:
    f_in = seeded_sparse(300, 10, 2, seed=2)
    f_in.values[f_in.indices == 9] = 0.0  # input 9 never fires
    fitted = least_squares_map(f_in, seeded_sparse(300, 4, 2, seed=3))
    assert torch.isfinite(fitted.weight).all() and (fitted.weight[:, 9] == 0).all()


def test_a_relu_connector_starts_at_a_linear_map_and_other_forms_refuse() -> None:
    linear_map = LinearMap(torch.randn(4, 6), torch.randn(4))
    relu = FeatureConnector(6, 4, form="relu")
    set_first_layer_(relu, linear_map)
    f = torch.rand(5, 6)
    torch.testing.assert_close(relu(f), torch.relu(f @ linear_map.weight.T + linear_map.bias))
    with pytest.raises(ConfigError, match="only linear and relu"):
        set_first_layer_(FeatureConnector(6, 4, form="mlp"), linear_map)
    with pytest.raises(ConfigError, match="does not fit"):
        set_first_layer_(FeatureConnector(6, 4, form="linear", bias=False), linear_map)


def test_early_stopping_counts_only_improvements_of_the_minimum_fraction() -> None:
    g = torch.Generator().manual_seed(0)
    f_in = torch.rand(600, 6, generator=g)
    f_out = torch.relu(f_in @ torch.randn(6, 4, generator=g)) + 0.1 * torch.randn(600, 4, generator=g)
    train, valid = (f_in[:500], f_out[:500]), (f_in[500:], f_out[500:])
    cfg = ConnectorConfig(form="linear", epochs=40, batch_size=50, lr=1e-2, l1_coefficient=0.0, patience=2)

    def run(min_improvement: float) -> tuple[list[float], float]:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            connector = FeatureConnector.from_config(6, 4, cfg)
        history = train_connector(connector, *train, cfg.replace(min_improvement=min_improvement), validation=valid)
        return [e.validation_mse for e in history], float(heldout_feature_mse(connector, *valid).mean())

    plain, _ = run(0.0)
    scores, end = run(0.05)
    assert scores == plain[:len(scores)] and len(scores) < len(plain)  # same epochs, stopped sooner
    assert end == pytest.approx(min(scores))  # still the best weights seen
    # the stop: the last two epochs did not go 5% below the MSE of the last epoch that did
    marks = []
    mark = None
    for score in scores:
        if mark is None or score < mark * 0.95:
            mark = score
        marks.append(mark)
    assert all(score >= marks[-3] * 0.95 for score in scores[-2:])
    with pytest.raises(ConfigError, match="min_improvement"):
        ConnectorConfig(min_improvement=1.0).validate()


@pytest.mark.parametrize("form", ["relu", "residual"])
def test_training_without_l1_is_training_with_a_zero_l1_term(form: str) -> None:
    f_in, f_out = seeded_sparse(300, 16, 3, seed=4), seeded_sparse(300, 12, 3, seed=5)
    cfg = ConnectorConfig(form=form, epochs=2, batch_size=64, l1_coefficient=0.0, mlp_hidden=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        trained, by_hand = FeatureConnector.from_config(16, 12, cfg), FeatureConnector.from_config(16, 12, cfg)
    by_hand.load_state_dict(trained.state_dict())
    history = train_connector(trained, f_in, f_out, cfg)
    # the plain loop with the penalty term times zero, in the same batch order
    generator, optimizer = torch.Generator().manual_seed(cfg.seed), adam(by_hand.parameters(), cfg.lr)
    alive = alive_features(f_out)
    for _ in range(cfg.epochs):
        for batch in torch.randperm(300, generator=generator).split(cfg.batch_size):
            mse = connector_mse(by_hand(take_rows(f_in, batch)), to_dense(take_rows(f_out, batch)), alive)
            loss = mse + 0.0 * weight_l1(by_hand.weight_matrices())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for name, value in by_hand.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name
    assert history[-1].l1 > 0  # the curve still records the weights' L1
