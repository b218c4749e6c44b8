import json

import pytest
import torch

from saelab.data.mnist import load_mnist
from saelab.errors import CheckpointError, ConfigError
from saelab.models.mnist_mlp import (
    MnistMLP,
    MnistMLPConfig,
    MnistTrainConfig,
    classification_scores,
    evaluate_mnist_mlp,
    train_mnist_mlp,
)


def test_entering_and_leaving_at_any_hidden_state_composes_to_forward() -> None:
    model = MnistMLP(MnistMLPConfig(d_in=12, hidden=8, n_layers=4, n_classes=3))
    x = torch.rand(5, 12)
    states = model.hidden_states(x)
    assert model.n_hidden == 3 and [s.shape for s in states] == [(5, 8)] * 3
    for k in range(model.n_hidden + 1):
        h = model.run_to(x, k)
        assert torch.equal(h, x if k == 0 else states[k - 1])
        torch.testing.assert_close(model.run_from(h, k), model(x))
    with pytest.raises(ConfigError, match="hidden state 4 does not exist"):
        model.run_to(x, 4)


def test_save_load_roundtrip_and_damage(tmp_path) -> None:
    model = MnistMLP(MnistMLPConfig(hidden=16, n_layers=3))
    model.save(tmp_path / "m")
    loaded = MnistMLP.load(tmp_path / "m")
    x = torch.rand(4, 784)
    assert loaded.cfg == model.cfg and torch.equal(loaded(x), model(x))

    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**model.cfg.to_dict(), "hidden": 32}))
    with pytest.raises(CheckpointError, match="weights do not match"):
        MnistMLP.load(tmp_path / "m")
    config.unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        MnistMLP.load(tmp_path / "m")


def test_classification_scores() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    scores = classification_scores(logits, torch.tensor([0, 1, 0]))
    assert scores.accuracy == pytest.approx(1 / 3)  # the tie at row 2 goes to class 0
    expected = -(torch.log_softmax(logits, -1)[[0, 1, 2], [0, 1, 0]]).mean().item()
    assert scores.loss == pytest.approx(expected)


def test_training_on_a_subset_learns_digits() -> None:
    train, val = load_mnist("train", limit=3000), load_mnist("val", limit=1000)
    model = MnistMLP(MnistMLPConfig(hidden=32))
    losses = train_mnist_mlp(model, train, MnistTrainConfig(epochs=3, batch_size=64))
    assert losses[-1] < losses[0]
    assert evaluate_mnist_mlp(model, val).accuracy > 0.8  # chance is 0.1
