"""Examples of a latent: token windows around activating tokens, sampled from a latent record.

A window is `before` tokens, the sampled token, and `after` tokens of the token's harvested context (shifted to
stay inside it). Activations are those of the record (0 at positions the store did not keep, e.g. BOS). Windows of
one latent never overlap, so no text is shown twice and training and test examples stay disjoint.

Activation quantiles: a latent's activating tokens sorted by value and cut into equal-count groups, quantile 0 the
weakest. Training examples come from the top, from every quantile, or at random; test examples are `per_quantile`
from each of `n_quantiles` groups plus random windows on which the latent is silent throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.errors import ConfigError
from saelab.interp.record import LatentRecord

if TYPE_CHECKING:  # only for annotations: reading examples needs no transformers import
    from transformers import PreTrainedTokenizerBase

Kind = Literal["top", "quantile", "random", "non_activating"]


@dataclasses.dataclass(frozen=True)
class Example:
    """One window of a latent's context. `quantile` is set for quantile samples only."""

    latent: int
    kind: Kind
    context: int
    start: int  # position of the window's first token in its context
    token_ids: tuple[int, ...]
    activations: tuple[float, ...]
    quantile: int | None = None

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    def scaled(self, max_activation: float) -> list[int]:
        """Activations as integers 0-10 relative to the latent's maximum (rounded half up); a nonzero activation is
        at least 1, so "scaled >= 1" marks exactly the activating tokens."""
        if max_activation <= 0:
            return [0] * len(self.activations)
        return [0 if a <= 0 else max(1, min(10, int(10 * a / max_activation + 0.5))) for a in self.activations]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ExampleConfig(Config):
    """Window length and how many examples of each kind a latent gets (defaults: the deep-SAE write-up's scorer
    setting of 2 examples per quartile plus 10 silent windows; fewer explainer examples than its 100, for small
    local explainers)."""

    window_before: int = dataclasses.field(default=24, metadata={"help": "tokens shown before the sampled token"})
    window_after: int = dataclasses.field(default=7, metadata={"help": "tokens shown after the sampled token"})
    train_sampling: Literal["quantiles", "top", "random"] = dataclasses.field(
        default="quantiles", metadata={"help": "how explainer examples are drawn"}
    )
    n_train: int = dataclasses.field(default=20, metadata={"help": "explainer examples per latent"})
    train_quantiles: int = dataclasses.field(default=10, metadata={"help": "quantiles the explainer examples span"})
    test_quantiles: int = dataclasses.field(default=4, metadata={"help": "quantiles of activating test examples"})
    test_per_quantile: int = dataclasses.field(default=2, metadata={"help": "test examples per quantile"})
    test_non_activating: int = dataclasses.field(default=10, metadata={"help": "silent test windows per latent"})
    seed: int = 0

    def validate(self) -> None:
        if self.window_before < 0 or self.window_after < 0:
            raise ConfigError("window_before and window_after must be >= 0")
        if min(self.n_train, self.train_quantiles, self.test_quantiles) < 1:
            raise ConfigError("n_train, train_quantiles and test_quantiles must be at least 1")
        if self.test_per_quantile < 0 or self.test_non_activating < 0:
            raise ConfigError("test_per_quantile and test_non_activating must be >= 0")

    @property
    def min_activations(self) -> int:
        """Activating tokens a latent needs so that every test quantile holds its examples and training gets some."""
        return self.test_quantiles * self.test_per_quantile + 1


@dataclasses.dataclass(frozen=True)
class LatentExamples:
    latent: int
    max_activation: float  # over the whole record: the scale of every example's 0-10 values
    train: list[Example]
    test_activating: list[Example]
    test_non_activating: list[Example]


class _Taken:
    """Windows already used for one latent, so new ones do not overlap them."""

    def __init__(self, length: int) -> None:
        self.length = length
        self._starts: dict[int, list[int]] = {}

    def free(self, context: int, start: int) -> bool:
        return all(abs(start - other) >= self.length for other in self._starts.get(context, ()))

    def add(self, context: int, start: int) -> None:
        self._starts.setdefault(context, []).append(start)


class ExampleSampler:
    """Builds windows of a record's latents from the store's contexts and token positions."""

    def __init__(self, record: LatentRecord, store: ActivationStore, window_before: int, window_after: int) -> None:
        self.record = record
        self._contexts = store.contexts().numpy()
        self._context_length = self._contexts.shape[1]
        self.length = min(window_before + window_after + 1, self._context_length)
        self._before = min(window_before, self.length - 1)
        n = record.n_tokens
        context_index, positions = store.context_index(0, n).numpy(), store.positions(0, n).numpy()
        self._keys = context_index * self._context_length + positions  # ascending: stores are context-major
        self._covered = np.unique(context_index)

    def examples(self, latent: int, cfg: ExampleConfig) -> LatentExamples:
        """Training and test examples of `latent`, disjoint and reproducible for a given `cfg.seed`."""
        rng = np.random.default_rng([cfg.seed, latent])
        keys, values = self._activations(latent)
        taken = _Taken(self.length)
        if cfg.train_sampling == "top":
            train = self._pick(latent, keys, values, np.argsort(-values, kind="stable"), cfg.n_train, taken, "top")
        elif cfg.train_sampling == "random":
            train = self._pick(latent, keys, values, rng.permutation(len(values)), cfg.n_train, taken, "random")
        else:
            train = self._quantiles(latent, keys, values, cfg.train_quantiles, cfg.n_train, rng, taken)
        test = self._quantiles(
            latent, keys, values, cfg.test_quantiles, cfg.test_quantiles * cfg.test_per_quantile, rng, taken
        )
        silent = self._non_activating(latent, keys, cfg.test_non_activating, rng, taken)
        return LatentExamples(latent, float(values.max(initial=0.0)), train, test, silent)

    def top(self, latent: int, n: int, exclude: Sequence[Example] = ()) -> list[Example]:
        """The `n` strongest activations of `latent`, one window each, overlapping neither each other nor
        `exclude`."""
        keys, values = self._activations(latent)
        order = np.argsort(-values, kind="stable")
        return self._pick(latent, keys, values, order, n, self._taken(exclude), "top")

    def random_activating(self, latent: int, n: int, seed: int = 0, exclude: Sequence[Example] = ()) -> list[Example]:
        """`n` windows around uniformly drawn activating tokens of `latent`."""
        keys, values = self._activations(latent)
        order = np.random.default_rng([seed, latent]).permutation(len(values))
        return self._pick(latent, keys, values, order, n, self._taken(exclude), "random")

    def quantile_examples(
        self, latent: int, n_quantiles: int, per_quantile: int, seed: int = 0, exclude: Sequence[Example] = ()
    ) -> list[Example]:
        """`per_quantile` random windows from each of `n_quantiles` activation quantiles (weakest first)."""
        keys, values = self._activations(latent)
        rng = np.random.default_rng([seed, latent])
        return self._quantiles(latent, keys, values, n_quantiles, n_quantiles * per_quantile, rng, self._taken(exclude))

    def activating_token_ids(self, latent: int) -> np.ndarray:
        """The token id at every token where `latent` fires (one entry per activation)."""
        keys, _ = self._activations(latent)
        return self._contexts.reshape(-1)[keys]

    # ------------------------------------------------------------------------------------------- internals

    def _taken(self, exclude: Sequence[Example]) -> _Taken:
        taken = _Taken(self.length)
        for example in exclude:
            taken.add(example.context, example.start)
        return taken

    def _activations(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(context * context_length + position, value) of every activating token, ascending by key."""
        tokens, values = self.record.activations(latent)
        keys = self._keys[tokens]
        order = np.argsort(keys, kind="stable")
        return keys[order], values[order]

    def _quantiles(
        self, latent: int, keys: np.ndarray, values: np.ndarray, n_quantiles: int, n: int, rng: np.random.Generator,
        taken: _Taken,
    ) -> list[Example]:
        """`n` examples spread evenly over `n_quantiles` equal-count groups of the sorted activations."""
        by_value = np.argsort(values, kind="stable")
        groups = np.array_split(by_value, n_quantiles)
        per_group = [n // n_quantiles + (1 if q < n % n_quantiles else 0) for q in range(n_quantiles)]
        picked = []
        for quantile, (group, wanted) in enumerate(zip(groups, per_group, strict=True)):
            examples = self._pick(latent, keys, values, rng.permutation(group), wanted, taken, "quantile")
            picked += [dataclasses.replace(example, quantile=quantile) for example in examples]
        return picked

    def _pick(
        self, latent: int, keys: np.ndarray, values: np.ndarray, candidates: Sequence[int], n: int, taken: _Taken,
        kind: Kind,
    ) -> list[Example]:
        picked: list[Example] = []
        for index in candidates:
            if len(picked) >= n:
                break
            context, position = divmod(int(keys[index]), self._context_length)
            start = min(max(position - self._before, 0), self._context_length - self.length)
            if taken.free(context, start):
                taken.add(context, start)
                picked.append(self._window(latent, keys, values, context, start, kind))
        return picked

    def _non_activating(
        self, latent: int, keys: np.ndarray, n: int, rng: np.random.Generator, taken: _Taken
    ) -> list[Example]:
        """Random windows of recorded contexts in which `latent` is zero at every position."""
        picked: list[Example] = []
        for _ in range(50 * n):
            if len(picked) >= n:
                break
            context = int(rng.choice(self._covered))
            start = int(rng.integers(0, self._context_length - self.length + 1))
            first = context * self._context_length + start
            silent = np.searchsorted(keys, first) == np.searchsorted(keys, first + self.length)
            if silent and taken.free(context, start):
                taken.add(context, start)
                picked.append(self._window(latent, keys, np.zeros(0, np.float32), context, start, "non_activating"))
        return picked

    def _window(
        self, latent: int, keys: np.ndarray, values: np.ndarray, context: int, start: int, kind: Kind
    ) -> Example:
        first = context * self._context_length + start
        lo, hi = np.searchsorted(keys, [first, first + self.length])
        activations = np.zeros(self.length, dtype=np.float64)
        activations[keys[lo:hi] - first] = values[lo:hi]
        return Example(
            latent=latent,
            kind=kind,
            context=context,
            start=start,
            token_ids=tuple(self._contexts[context, start : start + self.length].tolist()),
            activations=tuple(activations.tolist()),
        )


class TokenText:
    """Each token's own piece of text, so windows can be shown with marks and joined back into readable text.

    A piece is what the token adds to the decoded text before it (a leading space included), found by decoding
    growing prefixes; that works for byte-level BPE and for tokenizers whose decoder joins tokens with spaces.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def piece(self, token_id: int) -> str:
        """One token decoded on its own."""
        return self.tokenizer.decode([token_id])

    def pieces(self, token_ids: Sequence[int]) -> list[str]:
        pieces, previous = [], ""
        for end in range(1, len(token_ids) + 1):
            text = self.tokenizer.decode(list(token_ids[:end]))
            grown = text.startswith(previous)
            pieces.append(text[len(previous) :] if grown else self.piece(token_ids[end - 1]))
            previous = text
        return pieces


def marked_text(pieces: Sequence[str], marks: Sequence[bool]) -> str:
    """Join `pieces`, wrapping each run of marked pieces in `<<` `>>` (a run's leading whitespace stays outside)."""
    out: list[str] = []
    for i, (piece, mark) in enumerate(zip(pieces, marks, strict=True)):
        opens = mark and (i == 0 or not marks[i - 1])
        closes = mark and (i == len(pieces) - 1 or not marks[i + 1])
        if opens:
            body = piece.lstrip()
            piece = piece[: len(piece) - len(body)] + "<<" + body
        out.append(piece + (">>" if closes else ""))
    return "".join(out)
