"""Feature connectors: sparse maps between the SAE features of consecutive layers, and the network run through them
(after the write-up "Learning Interpretable Features with Sparse Auto-Encoders", called "the write-up" below).

A connector C_k predicts the features of hidden state k+1 from those of hidden state k, F_{k+1} ≈ C_k(F_k), so a
span of network layers can be replaced by encode → connectors → decode. Forms:

- ``linear``: W F + b;
- ``relu``:   ReLU(W F + b) (the write-up's form: features are non-negative);
- ``mlp``:    ReLU(W_b ReLU(W_a F + b_a) + b_b), the write-up's reference a linear connector is compared against;
- ``residual``: W F + b + W_b ReLU(W_a F + b_a) + b_b, a linear connector plus an MLP correction. Built from a
  trained linear connector with W_b = 0 (`residual_from_linear`), it starts as that connector and, trained with
  early stopping on held-out MSE (`train_connector(..., validation=...)`, whose best state includes the start), it
  can only end at least as good as linear on held-out data: the nonlinear reference the linearity test needs (an
  independently trained mlp connector can end worse than linear, which calls features linear for the wrong reason).

Training loss = MSE (mean over examples and over output features, optionally only the alive ones: those that
fire at least once in the training targets, so dead features do not dilute the mean) + l1_coefficient × L1, where
L1 of a weight matrix is the mean over its rows (output units) of the row's L1 norm, summed over the connector's
weight matrices; biases are not penalised.

Conventions (row vectors, as in the code): network layer h' = ReLU(h Wᵀ + b) with W `[d_out, d_in]`; SAE with
preprocessing "none" or "scale" (x_n = s·x) encodes F = ReLU((x_n − c) Eᵀ + e) and decodes x̂_n = F D + c, with
E = W_enc, e = b_enc, D = decoder rows `[n_latents, d_in]`, c = b_dec. Per-token preprocessing (token_l2) cannot
be used for the SAE that decodes: the statistics of a layer the connectors skip are never computed.

Features may be dense `[N, n]` or top-k `SparseLatents`; with sparse inputs the first weight matrix is applied as a
k-sparse gather-sum (forward and backward), so a connector between 3k-latent SAEs trains at the cost of its k active
inputs instead of a dense GEMM.

A trained connector is saved as safetensors (its form in the metadata, its shape in its weights), and
`trained_connector` trains one once per run folder: a rerun with the same request loads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.config import Config
from saelab.errors import CheckpointError, ConfigError, DataError
from saelab.io import atomic_write_with
from saelab.models.mnist_mlp import ClassificationScores, MnistMLP, classification_scores
from saelab.run_folder import RunFolder
from saelab.saes.base import Latents, SparseAutoencoder, SparseLatents, to_dense
from saelab.saes.initialization import seeded
from saelab.saes.kernels import sparse_decode
from saelab.saes.shallow import ShallowSAE
from saelab.training.optim import adam

log = logging.getLogger(__name__)

ConnectorForm = Literal["linear", "relu", "mlp", "residual"]
ConnectorInit = Literal["random", "smart"]
FORMS: tuple[ConnectorForm, ...] = ("linear", "relu", "mlp", "residual")
INITS: tuple[ConnectorInit, ...] = ("random", "smart")


@dataclasses.dataclass
class ConnectorConfig(Config):
    form: ConnectorForm = dataclasses.field(default="relu", metadata={"help": "linear | relu | mlp | residual"})
    bias: bool = dataclasses.field(default=True, metadata={"help": "learn a bias per output (and hidden) unit"})
    mlp_hidden: int = dataclasses.field(
        default=256, metadata={"help": "hidden width of the mlp and residual forms; the smart init needs the network "
                                         "layer's width"}
    )
    init: ConnectorInit = dataclasses.field(
        default="random",
        metadata={"help": "random (nn.Linear's default) | smart (from the network layer and the SAEs)"},
    )
    epochs: int = dataclasses.field(default=10, metadata={"help": "passes over the stored feature pairs"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "feature pairs per step"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "Adam learning rate"})
    l1_coefficient: float = dataclasses.field(default=1e-3, metadata={"help": "× the weights' mean row L1 norm"})
    alive_only: bool = dataclasses.field(
        default=True, metadata={"help": "MSE over the output features that fire in the training targets only"}
    )
    patience: int = dataclasses.field(
        default=2, metadata={"help": "with validation data: stop after this many epochs without a better held-out "
                                     "MSE, keeping the best weights (epochs is then the maximum)"}
    )
    min_improvement: float = dataclasses.field(
        default=0.0, metadata={"help": "with validation data: an epoch counts as better only when it lowers the best "
                                       "held-out MSE by at least this fraction (the best weights are kept anyway)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the initial weights and the batch order"})

    def validate(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"connector form {self.form!r} is unknown; use one of {list(FORMS)}")
        if self.init not in INITS:
            raise ConfigError(f"connector init {self.init!r} is unknown; use one of {list(INITS)}")
        if min(self.mlp_hidden, self.epochs, self.batch_size, self.patience) <= 0 or self.lr <= 0:
            raise ConfigError("mlp_hidden, epochs, batch_size, patience and lr must be positive")
        if self.l1_coefficient < 0:
            raise ConfigError(f"l1_coefficient must be >= 0 (got {self.l1_coefficient})")
        if not 0 <= self.min_improvement < 1:
            raise ConfigError(f"min_improvement must be in [0, 1) (got {self.min_improvement})")


class FeatureConnector(nn.Module):
    def __init__(self, n_in: int, n_out: int, form: str = "relu", bias: bool = True, mlp_hidden: int = 256):
        super().__init__()
        if form not in FORMS:
            raise ConfigError(f"connector form {form!r} is unknown; use one of {list(FORMS)}")
        self.form = form
        shapes = {"mlp": [(n_in, mlp_hidden), (mlp_hidden, n_out)],
                  "residual": [(n_in, n_out), (n_in, mlp_hidden), (mlp_hidden, n_out)]}.get(form, [(n_in, n_out)])
        fed = 2 if form == "residual" else 1  # the layers the features feed
        self.linears = nn.ModuleList((InputMajorLinear if i < fed else nn.Linear)(a, b, bias=bias)
                                     for i, (a, b) in enumerate(shapes))

    @classmethod
    def from_config(cls, n_in: int, n_out: int, cfg: ConnectorConfig) -> FeatureConnector:
        return cls(n_in, n_out, cfg.form, cfg.bias, cfg.mlp_hidden)

    def forward(self, features: Latents) -> Tensor:
        if self.form == "residual":
            linear, inner, outer = self.linears
            return _apply(linear, features) + outer(F.relu(_apply(inner, features)))
        hidden = _apply(self.linears[0], features)
        if self.form == "linear":
            return hidden
        hidden = F.relu(hidden)
        for linear in self.linears[1:]:
            hidden = F.relu(linear(hidden))
        return hidden

    def weight_matrices(self) -> list[Tensor]:
        """`[out, in]` weights, input side first (what L1 penalises and what the large-weight count counts)."""
        return [linear.weight for linear in self.linears]


class InputMajorLinear(nn.Module):
    """`nn.Linear` (same init, same `weight` [out, in], same state-dict keys) whose parameter is the weight's
    transpose `weight_t` [in, out], contiguous: the rows a sparse input's gather-sum reads.

    With nn.Linear's row-major weight, each step of a connector on sparse features paid a transposed copy in the
    forward and a strided add of the gradient in the backward, 5x the gather-sum itself at 3,072 x 3,072 (33 and 66
    ms); a strided parameter instead would make the fused Adam copy it in and out (43 against 9 ms)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        init = nn.Linear(in_features, out_features, bias=bias)  # nn.Linear's draws, in its order
        self.in_features, self.out_features = in_features, out_features
        self.weight_t = nn.Parameter(init.weight.detach().t().contiguous())
        self.bias = init.bias

    @property
    def weight(self) -> Tensor:
        """[out, in], a view of `weight_t`: writes to it land in the parameter."""
        return self.weight_t.t()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight_t"] = state_dict.pop(prefix + "weight").t()
        super()._load_from_state_dict(state_dict, prefix, *args)


def _apply(linear: nn.Module, features: Latents) -> Tensor:
    """`linear(features)`, as a k-sparse gather-sum when the features are top-k `SparseLatents`."""
    if not isinstance(features, SparseLatents):
        return linear(features)
    # embedding_bag gathers [in, out] rows: an InputMajorLinear holds them, so nothing is copied
    out = sparse_decode(features.values, features.indices, linear.weight.t().contiguous())
    return out if linear.bias is None else out + linear.bias


@torch.no_grad()
def residual_from_linear(linear: FeatureConnector, hidden: int, seed: int = 0) -> FeatureConnector:
    """A ``residual`` connector that computes exactly what the trained ``linear`` one does: its linear part is a copy,
    its correction's input layer random (seeded) and its output layer zero, so training starts from linear."""
    if linear.form != "linear":
        raise ConfigError(f"a residual connector starts from a linear connector, not a {linear.form} one")
    first = linear.linears[0]
    with seeded(seed):
        residual = FeatureConnector(first.in_features, first.out_features, "residual", first.bias is not None, hidden)
    residual.linears[0].load_state_dict(first.state_dict())
    outer = residual.linears[2]
    outer.weight.zero_()
    if outer.bias is not None:
        outer.bias.zero_()
    return residual


class LinearMap(NamedTuple):
    weight: Tensor  # [n_out, n_in]
    bias: Tensor  # [n_out]


@torch.no_grad()
def least_squares_map(f_in: Latents, f_out: Latents, ridge: float = 1e-6, chunk: int = 8192) -> LinearMap:
    """The linear map W F + b of least mean squared error on the pairs: the exact minimum a linear connector
    without L1 can reach on them, where Adam from a random start needs many epochs over 3k x 3k weights fed by
    k-sparse inputs (an input's row only moves when it fires).

    Normal equations in float64 over the features with a column of ones: [FᵀF Fᵀ1; 1ᵀF N] [Wᵀ; bᵀ] = [FᵀY; 1ᵀY],
    with `ridge` × the mean diagonal of FᵀF added to the weight block (not the bias), so inputs that never fire get
    zero weights. Sparse features enter by scattering each example's k x k outer products, never densely."""
    n_in, n_out, n = _width(f_in), _width(f_out), n_rows(f_in)
    if n != n_rows(f_out) or n == 0:
        raise DataError(f"need paired non-empty features for least squares, got {n} and {n_rows(f_out)} examples")
    gram = torch.zeros((n_in + 1) * (n_in + 1), dtype=torch.float64)
    cross = torch.zeros((n_in + 1) * n_out, dtype=torch.float64)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        x_values, x_index = _with_one(take_rows(f_in, rows), n_in)
        y_values, y_index = _sparse_rows(take_rows(f_out, rows))
        _scatter_outer(gram, x_values, x_index, x_values, x_index, n_in + 1)
        _scatter_outer(cross, x_values, x_index, y_values, y_index, n_out)
    gram = gram.view(n_in + 1, n_in + 1)
    diagonal = gram.diagonal()[:n_in]
    diagonal += ridge * max(float(diagonal.mean()), 1e-12)
    solution = torch.linalg.solve(gram, cross.view(n_in + 1, n_out))  # [n_in + 1, n_out]
    return LinearMap(solution[:n_in].T.float().contiguous(), solution[n_in].float().contiguous())


@torch.no_grad()
def set_first_layer_(connector: FeatureConnector, linear_map: LinearMap) -> None:
    """Start a linear or relu connector at `linear_map` (e.g. the least-squares one)."""
    if connector.form not in ("linear", "relu"):
        raise ConfigError(f"only linear and relu connectors start at a linear map, not {connector.form} ones")
    first = connector.linears[0]
    if first.weight.shape != linear_map.weight.shape or first.bias is None:
        raise ConfigError(f"a linear map {tuple(linear_map.weight.shape)} with bias does not fit a connector "
                          f"{tuple(first.weight.shape)} (bias: {first.bias is not None})")
    first.weight.copy_(linear_map.weight)
    first.bias.copy_(linear_map.bias)


def _width(features: Latents) -> int:
    return features.n_latents if isinstance(features, SparseLatents) else features.shape[1]


def _sparse_rows(features: Latents) -> tuple[Tensor, Tensor]:
    """(values, indices) `[N, k]` of sparse features; dense ones as all their columns."""
    if isinstance(features, SparseLatents):
        return features.values.double(), features.indices.long()
    dense = features.double()
    return dense, torch.arange(dense.shape[1]).expand(len(dense), -1)


def _with_one(features: Latents, width: int) -> tuple[Tensor, Tensor]:
    """The rows' (values, indices) with a constant 1 at column `width` appended (the bias's input)."""
    values, indices = _sparse_rows(features)
    ones = torch.ones(len(values), 1, dtype=values.dtype)
    return torch.cat([values, ones], dim=1), torch.cat([indices, torch.full_like(ones, width, dtype=torch.long)], 1)


def _scatter_outer(out: Tensor, a_values: Tensor, a_index: Tensor, b_values: Tensor, b_index: Tensor,
                   b_width: int) -> None:
    """out.view(-1, b_width)[a_index[r, i], b_index[r, j]] += a_values[r, i] * b_values[r, j] over every row r."""
    products = a_values[:, :, None] * b_values[:, None, :]
    positions = a_index[:, :, None] * b_width + b_index[:, None, :]
    out.index_add_(0, positions.reshape(-1), products.reshape(-1))


# ---- saved connectors ----------------------------------------------------------------------------------------


def save_connector(connector: FeatureConnector, path: str | Path) -> Path:
    """Weights as safetensors with the form in the metadata: all `load_connector` needs to rebuild it."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in connector.state_dict().items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"form": connector.form}))
    return path


def load_connector(path: str | Path) -> FeatureConnector:
    """A connector written by `save_connector`, its widths and bias read off its weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is missing; it is written when the connector is trained")
    with safe_open(str(path), framework="pt") as handle:
        form = (handle.metadata() or {}).get("form")
    state = load_file(str(path))
    weights = [state[f"linears.{i}.weight"] for i in range(sum(name.endswith(".weight") for name in state))]
    if form not in FORMS or not weights:
        raise CheckpointError(f"{path} is not a saved feature connector (form {form!r})")
    hidden = weights[1 if form == "residual" else 0].shape[0]
    connector = FeatureConnector(weights[0].shape[1], weights[-1].shape[0], form, bias="linears.0.bias" in state,
                                 mlp_hidden=hidden)
    connector.load_state_dict(state)
    return connector.eval()


def trained_connector(
    folder: RunFolder,
    stage: str,
    connector: FeatureConnector,
    request: Mapping[str, Any],
    fit: Callable[[FeatureConnector], list[dict[str, float]]],
) -> tuple[FeatureConnector, list[dict[str, float]]]:
    """`fit(connector)` (which trains it and returns its training curve) once per run folder: the weights go to
    `<stage>.safetensors` in the folder and the curve with `request` (what the connector was trained from: its
    settings and the SAEs' fingerprints) to the stage's done-marker. A rerun with the same request loads the saved
    connector and curve instead of training (so it only redoes the cheap analyses); another request retrains."""
    weights = folder.file(f"{stage}.safetensors")
    request = json.loads(json.dumps(request))
    done = folder.result(stage)
    if done is not None and done["request"] == request and weights.exists():
        connector.load_state_dict(load_connector(weights).state_dict())
        return connector.eval(), done["train_curve"]
    curve = fit(connector)
    save_connector(connector, weights)
    folder.mark_done(stage, {"request": request, "train_curve": curve})
    return connector.eval(), curve


# ---- loss ---------------------------------------------------------------------------------------------------


def weight_l1(weights: Iterable[Tensor]) -> Tensor:
    """Σ over matrices of mean_i Σ_j |W_ij|: the mean row L1 norm, so the penalty does not grow with n_out."""
    return torch.stack([_MeanRowL1.apply(w) for w in weights]).sum()


class _MeanRowL1(torch.autograd.Function):
    """Σ|W| / rows in one fused reduction, its gradient sign(W) / rows in two passes: autograd's abs -> sum -> mean
    takes five passes with three temporaries, a third of a connector's step at 3,072 x 3,072 (measured)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return torch.linalg.vector_norm(weight, ord=1) / weight.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (weight,) = ctx.saved_tensors
        return torch.sign(weight).mul_(grad / weight.shape[0])


def n_rows(features: Latents) -> int:
    return len(features.values) if isinstance(features, SparseLatents) else len(features)


def take_rows(features: Latents, rows: Tensor | slice) -> Latents:
    """The examples `rows` of dense or sparse features, in the same representation."""
    if isinstance(features, SparseLatents):
        return SparseLatents(features.values[rows], features.indices[rows], features.n_latents)
    return features[rows]


def alive_features(features: Latents) -> Tensor:
    """Boolean `[n]`: which features are nonzero on at least one example."""
    if not isinstance(features, SparseLatents):
        return (features != 0).any(dim=0)
    alive = torch.zeros(features.n_latents, dtype=torch.bool, device=features.values.device)
    alive[features.indices[features.values != 0]] = True
    return alive


def per_feature_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """`[n_out]` mean squared error of each output feature over the examples (e.g. to call a feature linear when
    the linear connector's error is within a tolerance of the mlp connector's)."""
    return (prediction - target).pow(2).mean(dim=0)


def connector_mse(prediction: Tensor, target: Tensor, alive: Tensor | None = None) -> Tensor:
    """Mean squared error over examples × output features, restricted to `alive` features when given."""
    errors = per_feature_mse(prediction, target)
    return errors.mean() if alive is None else errors[alive].mean()


@torch.no_grad()
def heldout_feature_mse(connector: nn.Module, f_in: Latents, f_out: Latents, chunk: int = 4096) -> Tensor:
    """`[n_out]` per-feature MSE of the connector's prediction over all examples, in chunks so the dense
    prediction of a large held-out set never exists at once."""
    total = None
    for start in range(0, n_rows(f_in), chunk):
        rows = slice(start, start + chunk)
        error = (connector(take_rows(f_in, rows)) - to_dense(take_rows(f_out, rows))).double().pow(2).sum(dim=0)
        total = error if total is None else total + error
    if total is None:
        raise DataError("no held-out examples to score the connector on")
    return (total / n_rows(f_in)).float()


def linear_features(mse_linear: Tensor, mse_reference: Tensor, tolerance: float, scale: Tensor | None = None) -> Tensor:
    """Boolean `[n_out]`: output features the linear connector predicts within `tolerance` of a more expressive
    reference (the mlp connector): (mse_linear − mse_reference) / scale <= tolerance. The write-up's test is absolute
    (scale None, tolerance 1e-3); with scale = each feature's variance it reads "loses at most this share of the
    variance by being linear", which does not depend on the features' units."""
    gap = mse_linear - mse_reference
    return (gap if scale is None else gap / scale.clamp_min(1e-12)) <= tolerance


class ConnectorEpoch(NamedTuple):
    mse: float
    l1: float
    loss: float
    validation_mse: float | None = None  # with validation data: the held-out MSE after the epoch


def train_connector(
    connector: FeatureConnector,
    f_in: Latents,
    f_out: Latents,
    cfg: ConnectorConfig,
    on_epoch: Callable[[int, FeatureConnector], None] | None = None,
    validation: tuple[Latents, Latents] | None = None,
) -> list[ConnectorEpoch]:
    """Adam on shuffled minibatches of stored feature pairs; `on_epoch(epoch, connector)` runs after each epoch
    (e.g. to snapshot weights). Returns each epoch's mean training MSE, L1 and loss.

    With `validation` (held-out input and output features): early stopping. The held-out MSE (over the alive
    features when `alive_only`) is measured before training and after each epoch; training stops after
    `cfg.patience` epochs without one lower by `cfg.min_improvement` (relative), and the connector ends with the
    weights of the lowest, which may be its starting weights: a connector that starts as another never ends worse
    than it on the validation data."""
    shapes = [tuple(f.values.shape if isinstance(f, SparseLatents) else f.shape) for f in (f_in, f_out)]
    if any(len(shape) != 2 for shape in shapes) or n_rows(f_in) != n_rows(f_out) or n_rows(f_in) == 0:
        raise DataError(f"need paired non-empty [N, n] (or [N, k] sparse) features, got {shapes[0]} and {shapes[1]}")
    alive = alive_features(f_out) if cfg.alive_only else None
    if alive is not None and not alive.any():
        raise DataError("no output feature fires on the training data; the next layer's SAE is dead")
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = adam(connector.parameters(), cfg.lr)
    history = []
    best = None if validation is None else _Best(connector, validation, alive, cfg.min_improvement)
    for epoch in range(cfg.epochs):
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in torch.randperm(n_rows(f_in), generator=generator).split(cfg.batch_size):
            mse = connector_mse(connector(take_rows(f_in, batch)), to_dense(take_rows(f_out, batch)), alive)
            if cfg.l1_coefficient:
                l1 = weight_l1(connector.weight_matrices())
                loss = mse + cfg.l1_coefficient * l1
            else:  # the same loss and gradients, without the penalty's backward (a third of a relu step at 3k x 3k)
                with torch.no_grad():
                    l1 = weight_l1(connector.weight_matrices())
                loss = mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([mse.detach(), l1.detach(), loss.detach()]).double() * len(batch)
        history.append(ConnectorEpoch(*(sums / n_rows(f_in)).tolist(),
                                      validation_mse=None if best is None else best.update(connector)))
        held_out = "" if best is None else f", held-out MSE {history[-1].validation_mse:.6g}"
        log.info("%s connector: epoch %d/%d, training MSE %.6g%s", connector.form, epoch + 1, cfg.epochs,
                 history[-1].mse, held_out)  # a long run's only sign of life between its files
        if on_epoch is not None:
            on_epoch(epoch, connector)
        if best is not None and best.epochs_since_best >= cfg.patience:
            break
    if best is not None:
        connector.load_state_dict(best.state)
    return history


class _Best:
    """The connector's weights at its lowest validation MSE so far (starting with its initial weights), and the
    epochs since the MSE last fell by at least `min_improvement` (relative) below the MSE of that epoch."""

    def __init__(self, connector: nn.Module, validation: tuple[Latents, Latents], alive: Tensor | None,
                 min_improvement: float = 0.0):
        self.validation, self.alive, self.min_improvement = validation, alive, min_improvement
        self.mse = self.mark = self._mse(connector)
        self.state = _copy_state(connector)
        self.epochs_since_best = 0

    def _mse(self, connector: nn.Module) -> float:
        errors = heldout_feature_mse(connector, *self.validation)
        return float((errors if self.alive is None else errors[self.alive]).mean())

    def update(self, connector: nn.Module) -> float:
        """Score the connector's current weights, keep them if best; return their validation MSE."""
        mse = self._mse(connector)
        if mse < self.mse:
            self.mse, self.state = mse, _copy_state(connector)
        if mse < self.mark * (1 - self.min_improvement):
            self.mark, self.epochs_since_best = mse, 0
        else:
            self.epochs_since_best += 1
        return mse


def _copy_state(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


# ---- initialisation from the network -----------------------------------------------------------------------


class RawAffine(NamedTuple):
    """An SAE's maps in the network's raw activation space: pre-activation x Eᵀ + e and decoder F D + c."""

    E: Tensor  # [n_latents, d]
    e: Tensor  # [n_latents]
    D: Tensor  # [n_latents, d]
    c: Tensor  # [d]


def raw_affine(sae: SparseAutoencoder) -> RawAffine:
    """Fold the SAE's preprocessing into its weights. With x_n = s·x: pre = (s·x − c) Eᵀ + e = x (s·E)ᵀ + (e − c Eᵀ)
    and x̂ = (F D + c) / s = F (D / s) + c / s."""
    if not isinstance(sae, ShallowSAE):
        raise ConfigError(f"{type(sae).__name__} has no single encoder/decoder matrix; use a ReLU or top-k SAE")
    if sae.cfg.preprocessing not in ("none", "scale"):
        raise ConfigError(
            f"preprocessing={sae.cfg.preprocessing!r} is per-token and cannot be folded into a connector; "
            "train the SAEs with preprocessing 'none' or 'scale'"
        )
    s = sae.cfg.input_scale if sae.cfg.preprocessing == "scale" else 1.0
    E, c = sae.W_enc.detach(), sae.b_dec.detach()
    return RawAffine(E=s * E, e=sae.b_enc.detach() - E @ c, D=sae.decoder_weight.detach() / s, c=c / s)


def network_feature_weights(
    layer: nn.Linear, sae_in: SparseAutoencoder, sae_out: SparseAutoencoder
) -> tuple[Tensor, Tensor]:
    """The write-up's "smart" connector (W2, b2) = (E2 W D1, E2 b + e2), with our conventions made exact.

    In raw space (see `raw_affine`), h1 ≈ F1 D1 + c1 and F2 = ReLU(h2 E2ᵀ + e2) with h2 = ReLU(h1 Wᵀ + b).
    Dropping the inner ReLU, h2 ≈ F1 D1 Wᵀ + c1 Wᵀ + b, hence
        F2 ≈ ReLU(F1 (E2 W D1ᵀ)ᵀ + E2 (W c1 + b) + e2),
    i.e. W2 = E2 W D1ᵀ `[n_out, n_in]` and b2 = E2 (W c1 + b) + e2 (E2, e2, D1, c1 raw-space, so e2 already holds
    −E2 c2 and c1 is b_dec1). Without preprocessing, in the SAEs' own parameters:
        W2 = W_enc2 · W · W_dec1ᵀ,    b2 = W_enc2 · (W · b_dec1 + b − b_dec2) + b_enc2.
    The write-up's D1 is our W_dec1ᵀ (atoms as columns) and its SAEs had no b_dec, hence its shorter b2 = E2 b + e2.
    Exact when the layer's pre-activations are non-negative (or the layer is linear) and SAE 1 reconstructs
    perfectly; for a top-k SAE it approximates the pre-activation only (top-k is not a ReLU).
    """
    enc_out, dec_in = raw_affine(sae_out), raw_affine(sae_in)
    W, b = layer.weight.detach(), layer.bias.detach()
    return enc_out.E @ W @ dec_in.D.T, enc_out.E @ (W @ dec_in.c + b) + enc_out.e


@torch.no_grad()
def smart_init_(
    connector: FeatureConnector, layer: nn.Linear, sae_in: SparseAutoencoder, sae_out: SparseAutoencoder
) -> None:
    """Initialise from the network. linear/relu: (W2, b2) of `network_feature_weights`. mlp: the exact composition
    decode → layer → encode, W_a = W D1ᵀ, b_a = W c1 + b, W_b = E2, b_b = e2, which needs mlp_hidden = the
    layer's width and then reproduces F2 whenever SAE 1 reconstructs perfectly (no ReLU dropped)."""
    if connector.form == "mlp":
        dec_in, enc_out = raw_affine(sae_in), raw_affine(sae_out)
        first, second = connector.linears
        if first.out_features != layer.out_features:
            raise ConfigError(
                f"the smart mlp init composes the network layer, so mlp_hidden must be {layer.out_features} "
                f"(got {first.out_features})"
            )
        W, b = layer.weight.detach(), layer.bias.detach()
        pairs = [(first, W @ dec_in.D.T, W @ dec_in.c + b), (second, enc_out.E, enc_out.e)]
    else:
        pairs = [(connector.linears[0], *network_feature_weights(layer, sae_in, sae_out))]
    for linear, weight, bias in pairs:
        if linear.weight.shape != weight.shape:
            raise ConfigError(
                f"connector weight {tuple(linear.weight.shape)} does not fit the SAEs and layer ({tuple(weight.shape)})"
            )
        if linear.bias is None:
            raise ConfigError("the smart init sets a bias; build the connector with bias=True")
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


# ---- running the network through features -------------------------------------------------------------------


def encode_latents(sae: SparseAutoencoder, activations: Tensor) -> Latents:
    """Features of raw activations in the SAE's own representation (sparse for top-k SAEs)."""
    x_n, _ = sae.normalize(activations)
    return sae.encode(x_n)


def encode_features(sae: SparseAutoencoder, activations: Tensor) -> Tensor:
    """Dense features of raw activations (the connectors' inputs and targets)."""
    return to_dense(encode_latents(sae, activations))


def through_features(
    sae_in: SparseAutoencoder, connectors: Sequence[nn.Module], sae_out: SparseAutoencoder
) -> Callable[[Tensor], Tensor]:
    """raw activations at the first site → encode with `sae_in` → each connector in turn → decode with `sae_out`
    → raw activations at the last site: what replaces the network between the two sites. No connectors splices
    the SAE alone (then sae_in is sae_out)."""
    if sae_out.cfg.preprocessing == "token_l2":
        raise ConfigError("token_l2 SAEs normalise per token; their statistics are lost across replaced layers, "
                          "so the SAE that decodes must use preprocessing 'none' or 'scale'")

    def apply(activations: Tensor) -> Tensor:
        features = encode_latents(sae_in, activations)
        for connector in connectors:
            features = connector(features)
        return sae_out.denormalize(sae_out.decode(features), None)

    return apply


def simulate(
    model: MnistMLP,
    saes: Mapping[int, SparseAutoencoder],
    connectors: Mapping[int, nn.Module],
    images: Tensor,
    start: int,
    end: int,
) -> Tensor:
    """Logits with network layers start+1..end replaced: encode hidden state `start` with saes[start], apply
    connectors[start], ..., connectors[end-1], decode with saes[end], run the rest of the network. start == end
    splices the SAE alone. Keys are hidden-state indices (1..n_hidden); connectors[k] maps features k → k+1."""
    if not 1 <= start <= end <= model.n_hidden:
        raise ConfigError(f"span ({start}, {end}) is not within hidden states 1..{model.n_hidden}")
    missing = [k for k in (start, end) if k not in saes] + [
        f"connector {k}" for k in range(start, end) if k not in connectors
    ]
    if missing:
        raise ConfigError(f"span ({start}, {end}) needs SAEs/connectors that were not given: {missing}")
    replace = through_features(saes[start], [connectors[k] for k in range(start, end)], saes[end])
    return model.run_from(replace(model.run_to(images, start)), end)


class SpanScores(NamedTuple):
    start: int
    end: int
    layers_replaced: int
    accuracy: float
    loss: float


@torch.no_grad()
def evaluate_spans(
    model: MnistMLP,
    saes: Mapping[int, SparseAutoencoder],
    connectors: Mapping[int, nn.Module],
    images: Tensor,
    labels: Tensor,
) -> list[SpanScores]:
    """Accuracy and cross-entropy of every span start <= end that the given SAEs and connectors cover."""
    results = []
    for start in range(1, model.n_hidden + 1):
        for end in range(start, model.n_hidden + 1):
            if start in saes and end in saes and all(k in connectors for k in range(start, end)):
                scores: ClassificationScores = classification_scores(
                    simulate(model, saes, connectors, images, start, end), labels
                )
                results.append(SpanScores(start, end, end - start, scores.accuracy, scores.loss))
    return results


def top_connections(weight: Tensor, output: int, k: int = 5) -> list[tuple[int, float]]:
    """The `k` inputs with the largest |weight| into output feature `output` of a `[n_out, n_in]` matrix, as
    (input index, signed weight), largest first: the readable relations (OF = 0.26·IF_a + 0.23·IF_b − ...)."""
    row = weight[output].detach()
    order = row.abs().argsort(descending=True)[:k]
    return [(int(i), row[i].item()) for i in order]


def count_large_weights(weights: Iterable[Tensor], threshold: float = 0.1) -> int:
    """How many entries have |w| > threshold (the write-up's sparsity measure for neuron vs feature weights)."""
    return sum(int((w.detach().abs() > threshold).sum().item()) for w in weights)
