"""The small ReLU MLP on MNIST whose hidden layers the feature-connector analysis unwraps into SAE features.

Layers are numbered the way the analysis needs them: hidden state 0 is the input image, hidden state k
(1 <= k <= n_layers - 1) is the ReLU output of linear layer k, and the last linear layer gives the logits. The
network can be entered and left at any hidden state (`run_to`, `run_from`), which is what splicing encode →
connectors → decode over a span of layers needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.config import Config
from saelab.data.mnist import N_CLASSES, N_PIXELS, MnistSplit
from saelab.errors import CheckpointError, ConfigError
from saelab.io import atomic_write_json, atomic_write_with

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclasses.dataclass
class MnistMLPConfig(Config):
    d_in: int = N_PIXELS
    hidden: int = 64
    n_layers: int = 4  # linear layers, so n_layers - 1 hidden ReLU layers
    n_classes: int = N_CLASSES

    def validate(self) -> None:
        if self.n_layers < 2:
            raise ConfigError(f"n_layers={self.n_layers}: need at least 2 linear layers to have a hidden layer")
        if min(self.d_in, self.hidden, self.n_classes) <= 0:
            raise ConfigError("d_in, hidden and n_classes must be positive")


@dataclasses.dataclass
class MnistTrainConfig(Config):
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3  # peak; cosine decay to 0 over the run (constant lr stalls below 97.5% test accuracy)
    seed: int = 0

    def validate(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")


class ClassificationScores(NamedTuple):
    accuracy: float
    loss: float  # mean cross-entropy in nats


def classification_scores(logits: Tensor, labels: Tensor) -> ClassificationScores:
    return ClassificationScores(
        accuracy=(logits.argmax(-1) == labels).float().mean().item(),
        loss=F.cross_entropy(logits, labels).item(),
    )


class MnistMLP(nn.Module):
    def __init__(self, cfg: MnistMLPConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        widths = [cfg.d_in] + [cfg.hidden] * (cfg.n_layers - 1) + [cfg.n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    @property
    def n_hidden(self) -> int:
        return self.cfg.n_layers - 1

    def _check_state(self, k: int) -> None:
        if not 0 <= k <= self.n_hidden:
            raise ConfigError(f"hidden state {k} does not exist; this network has states 0..{self.n_hidden}")

    def run_to(self, x: Tensor, k: int) -> Tensor:
        """Hidden state k (0 = the input itself)."""
        self._check_state(k)
        for layer in self.layers[:k]:
            x = F.relu(layer(x))
        return x

    def run_from(self, h: Tensor, k: int) -> Tensor:
        """Logits from hidden state k."""
        self._check_state(k)
        for layer in self.layers[k:-1]:
            h = F.relu(layer(h))
        return self.layers[-1](h)

    def forward(self, x: Tensor) -> Tensor:
        return self.run_from(x, 0)

    def hidden_states(self, x: Tensor) -> list[Tensor]:
        """Hidden states 1..n_hidden of one batch, in one pass."""
        states = []
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
            states.append(x)
        return states

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        atomic_write_with(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_json(folder / CONFIG_FILE, self.cfg.to_dict())

    @classmethod
    def load(cls, folder: str | Path) -> MnistMLP:
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).exists():
                raise CheckpointError(f"{folder / name} is missing; point at a folder written by MnistMLP.save")
        try:
            raw = json.loads((folder / CONFIG_FILE).read_text())
            state = load_file(str(folder / WEIGHTS_FILE))
        except Exception as exc:  # json and safetensors raise several types for a damaged file
            raise CheckpointError(f"{folder}: the saved model cannot be read ({exc}); retrain it") from None
        model = cls(MnistMLPConfig.from_dict(raw, where=str(folder / CONFIG_FILE)))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: weights do not match {CONFIG_FILE} ({exc})") from None
        return model


def train_mnist_mlp(model: MnistMLP, data: MnistSplit, cfg: MnistTrainConfig) -> list[float]:
    """Adam with cosine lr decay on shuffled minibatches; returns the mean training loss of each epoch."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    total_steps = cfg.epochs * math.ceil(len(data.labels) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    model.train()
    epoch_losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data.labels), generator=generator)
        total = 0.0
        for batch in order.split(cfg.batch_size):
            loss = F.cross_entropy(model(data.images[batch]), data.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        epoch_losses.append(total / len(order))
    model.eval()
    return epoch_losses


@torch.no_grad()
def evaluate_mnist_mlp(model: MnistMLP, data: MnistSplit) -> ClassificationScores:
    return classification_scores(model(data.images), data.labels)
