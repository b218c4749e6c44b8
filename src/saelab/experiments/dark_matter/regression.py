"""Least squares with a bias column, fit on a random training split and scored on the held-out rest.

The dark-matter analyses regress hundreds of thousands of activations onto targets as wide as the activations, so
the fit is solved through the normal equations accumulated chunk by chunk in float64: memory stays at O(d²)
whatever the token count, and a store larger than memory can be streamed through `NormalEquations.update`.
Products of float32 inputs are exact in float64, so the accumulated system is as accurate as the data allows;
the rows are shifted by the first chunk's mean before accumulating, so a large common offset (activations have
one) costs no precision. The solve is a pseudo-inverse that drops directions the data cannot resolve, because
activations are often (nearly) rank deficient.

Scores, held out. For a vector target, R² is the mean over target dimensions of the per-dimension R² (what
"Decomposing The Dark Matter of Sparse Autoencoders" reports), while FVU is pooled: Σ||y − ŷ||² / Σ||y − mean(y)||²
(`saelab.metrics`). The two differ when dimensions have unequal variance. For a scalar target FVU = 1 − R² exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor

from saelab.config import Config
from saelab.errors import ConfigError, DataError
from saelab.metrics import fraction_of_variance_unexplained

# Rows per float64 block: ~37 MB for d = 576, large enough that the GEMM runs near peak.
CHUNK_ROWS = 8192
# Correlation-matrix eigenvalues below this fraction of the largest are treated as zero: a direction whose spread
# is under ~3e-5 of a typical dimension's is beyond what float32 activations with a sizeable mean resolve.
RCOND = 1e-9


@dataclasses.dataclass
class RegressionConfig(Config):
    """How every dark-matter regression is fit and scored."""

    # The write-up fit on 150k of 247k tokens (0.61).
    train_size: float = dataclasses.field(default=0.6, metadata={
        "help": "fraction of the tokens used to fit (<= 1) or their count (> 1); the rest are held out for the scores"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the random fit / held-out split"})
    ridge: float = dataclasses.field(default=0.0, metadata={
        "help": "penalty on the weights: minimises mean_t ||y_t − W x_t − b||² + ridge·||W||² (bias unpenalised)"})
    # The write-up's regressions include a bias column; its published code has none.
    bias: bool = dataclasses.field(default=True, metadata={
        "help": "fit a bias column, as the write-up's regressions do (false: as its published code does)"})

    def validate(self) -> None:
        if self.train_size <= 0:
            raise ConfigError(f"train_size must be positive (a fraction <= 1 or a count > 1), got {self.train_size}")
        if self.ridge < 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")


def _as_matrix(t: Tensor) -> Tensor:
    """[N] (a scalar per token) -> [N, 1]; [N, d] unchanged."""
    if t.dim() == 1:
        return t[:, None]
    if t.dim() != 2:
        raise DataError(f"expected [tokens] or [tokens, dims], got shape {tuple(t.shape)}")
    return t


@dataclasses.dataclass
class LinearFit:
    """ŷ = x @ weight + bias, solved in float64. `scalar_target` fits return [N] predictions, like their target."""

    weight: Tensor  # [d_in, d_out], float64
    bias: Tensor  # [d_out], float64 (zeros when fit without a bias column)
    scalar_target: bool

    def predict(self, x: Tensor) -> Tensor:
        """Predictions in float32 (float64 for float64 inputs): plenty for residuals, twice as fast as float64."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = torch.addmm(self.bias.to(x.device, dtype), _as_matrix(x).to(dtype), self.weight.to(x.device, dtype))
        return out[:, 0] if self.scalar_target else out


class NormalEquations:
    """Streaming accumulator of the least-squares system over chunks of (x, y) rows; `solve` gives the fit.

    Equal to the one-shot fit on the concatenated rows, whatever the chunking.
    """

    def __init__(self, bias: bool = True) -> None:
        self.bias = bias
        self.n = 0
        self.scalar_target: bool | None = None
        self._shift_x = self._shift_y = self._xtx = self._xty = self._sum_x = self._sum_y = torch.empty(0)

    def update(self, x: Tensor, y: Tensor) -> None:
        x2, y2 = _as_matrix(x), _as_matrix(y)
        if x2.shape[0] != y2.shape[0]:
            raise DataError(f"x has {x2.shape[0]} rows but y has {y2.shape[0]}; they must pair token by token")
        if self.n == 0:
            self._start(x2, y2, scalar=y.dim() == 1)
        elif (x2.shape[1], y2.shape[1], y.dim() == 1) != (self._xtx.shape[0], self._xty.shape[1], self.scalar_target):
            raise DataError(
                f"chunk shapes x {tuple(x.shape)}, y {tuple(y.shape)} differ from the first chunk's "
                f"(d_in={self._xtx.shape[0]}, d_out={self._xty.shape[1]})"
            )
        for start in range(0, x2.shape[0], CHUNK_ROWS):
            xc = x2[start : start + CHUNK_ROWS].to(torch.float64) - self._shift_x
            yc = y2[start : start + CHUNK_ROWS].to(torch.float64) - self._shift_y
            self._xtx.addmm_(xc.T, xc)
            self._xty.addmm_(xc.T, yc)
            self._sum_x += xc.sum(0)
            self._sum_y += yc.sum(0)
        self.n += x2.shape[0]

    def _start(self, x: Tensor, y: Tensor, scalar: bool) -> None:
        f64 = dict(dtype=torch.float64, device=x.device)
        d_in, d_out = x.shape[1], y.shape[1]
        # Centring on an early estimate of the mean is exact (the bias absorbs any shift) and keeps the
        # accumulated sums small; without a bias column the data must stay as they are.
        self._shift_x = x.mean(0, dtype=torch.float64) if self.bias else torch.zeros(d_in, **f64)
        self._shift_y = y.mean(0, dtype=torch.float64) if self.bias else torch.zeros(d_out, **f64)
        self._xtx, self._xty = torch.zeros(d_in, d_in, **f64), torch.zeros(d_in, d_out, **f64)
        self._sum_x, self._sum_y = torch.zeros(d_in, **f64), torch.zeros(d_out, **f64)
        self.scalar_target = scalar

    def solve(self, ridge: float = 0.0) -> LinearFit:
        if self.n == 0:
            raise DataError("no rows were accumulated; call update() with at least one chunk before solve()")
        a, b = self._xtx.clone(), self._xty.clone()
        mean_x = self._sum_x / self.n
        mean_y = self._sum_y / self.n
        if self.bias:
            a -= self.n * torch.outer(mean_x, mean_x)
            b -= self.n * torch.outer(mean_x, mean_y)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise DataError("the regression inputs contain NaN or infinite values; filter those tokens first")
        a.diagonal().add_(ridge * self.n)
        weight = _pseudo_solve(a, b)
        bias = self._shift_y + mean_y - (self._shift_x + mean_x) @ weight if self.bias else torch.zeros_like(mean_y)
        return LinearFit(weight, bias, bool(self.scalar_target))


def _pseudo_solve(a: Tensor, b: Tensor) -> Tensor:
    """W with a W = b for a symmetric PSD `a`, dropping the directions that the data cannot resolve.

    Activations are often rank deficient (constant dimensions, inputs confined to a subspace) or nearly so, and an
    exact solve then fits float32 rounding noise with enormous weights that wreck held-out predictions. So `a` is
    first scaled to unit diagonal (a dimension with 10⁴ times the spread of the others must not hide theirs), and
    eigen-directions of that correlation matrix below RCOND of the largest are left out, as in a pseudo-inverse.
    """
    scale = a.diagonal().sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant dimension: all-zero row, dropped
    values, vectors = torch.linalg.eigh(a / torch.outer(scale, scale))
    inverse = torch.where(values > RCOND * values.max(), 1 / values, torch.zeros_like(values))
    return (vectors * inverse) @ (vectors.T @ (b / scale[:, None])) / scale[:, None]


def fit_linear(x: Tensor, y: Tensor, *, ridge: float = 0.0, bias: bool = True, rows: Tensor | None = None) -> LinearFit:
    """Least-squares fit of y [N] or [N, d_out] on x [N, d_in]; `rows` restricts it to those token indices
    without copying the whole subset."""
    equations = NormalEquations(bias=bias)
    n = x.shape[0] if rows is None else rows.numel()
    for start in range(0, n, CHUNK_ROWS):
        if rows is None:
            equations.update(x[start : start + CHUNK_ROWS], y[start : start + CHUNK_ROWS])
        else:
            idx = rows[start : start + CHUNK_ROWS]
            equations.update(x[idx], y[idx])
    return equations.solve(ridge)


def fit_linear_chunks(chunks: Iterable[tuple[Tensor, Tensor]], *, ridge: float = 0.0, bias: bool = True) -> LinearFit:
    """The same fit streamed from (x_chunk, y_chunk) pairs, e.g. read from an activation store."""
    equations = NormalEquations(bias=bias)
    for x_chunk, y_chunk in chunks:
        equations.update(x_chunk, y_chunk)
    return equations.solve(ridge)


def random_split(n: int, train_size: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint random (train, held-out) token indices, each sorted so that gathers read memory in order."""
    n_train = round(train_size * n) if train_size <= 1 else int(train_size)
    if not 0 < n_train < n:
        raise ValueError(f"train_size={train_size} leaves {n_train} of {n} tokens for training; both parts need some")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_train].sort().values, order[n_train:].sort().values


def r2_per_dimension(y: Tensor, y_pred: Tensor) -> Tensor:
    """1 − SS_res / SS_tot for each target dimension, float64 `[d_out]`; NaN where the target is constant."""
    y2, p2 = _as_matrix(y), _as_matrix(y_pred).to(y.dtype)
    ss_res = (y2 - p2).pow(2).sum(0, dtype=torch.float64)
    ss_tot = (y2 - y2.mean(0)).pow(2).sum(0, dtype=torch.float64)
    return torch.where(ss_tot > 0, 1 - ss_res / ss_tot, torch.nan)


def r2_score(y: Tensor, y_pred: Tensor) -> float:
    """Mean over target dimensions of the per-dimension R² (constant dimensions, where R² is undefined, left out)."""
    r2 = r2_per_dimension(y, y_pred)
    if torch.isnan(r2).all():
        raise DataError("every target dimension is constant on these tokens, so R² is undefined")
    return r2.nanmean().item()


@dataclasses.dataclass
class RegressionResult:
    """A fit and its held-out scores. `predictions` are for the held-out tokens `test_idx`, in that order."""

    r2: float  # mean per-dimension R² on the held-out tokens
    fvu: float  # pooled FVU on the held-out tokens
    fit: LinearFit
    train_idx: Tensor
    test_idx: Tensor
    predictions: Tensor


def heldout_scores(y: Tensor, y_pred: Tensor) -> tuple[float, float]:
    """(mean per-dimension R², pooled FVU) of predictions for a target."""
    return r2_score(y, y_pred), fraction_of_variance_unexplained(_as_matrix(y), _as_matrix(y_pred)).item()


def heldout_regression(x: Tensor, y: Tensor, cfg: RegressionConfig | None = None) -> RegressionResult:
    """Fit y on x over a random training split and score on the held-out tokens."""
    cfg = cfg or RegressionConfig()
    if x.shape[0] != y.shape[0]:
        raise DataError(f"x has {x.shape[0]} tokens but y has {y.shape[0]}; they must pair token by token")
    train_idx, test_idx = random_split(x.shape[0], cfg.train_size, cfg.seed)
    fit = fit_linear(x, y, ridge=cfg.ridge, bias=cfg.bias, rows=train_idx)
    predictions = fit.predict(x[test_idx])
    r2, fvu = heldout_scores(y[test_idx], predictions)
    return RegressionResult(r2, fvu, fit, train_idx, test_idx, predictions)
