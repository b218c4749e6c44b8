"""Scoring an explanation: detection and fuzzing, one yes/no question per test window, and their metrics.

Detection: shown the explanation and an unmarked window, does the latent fire in it? Activating windows are
positives, silent windows negatives. Fuzzing: shown an activating window with tokens marked `<<like this>>`, are the
marked tokens the ones the explanation describes? Each activating window is asked twice: marked correctly
(positive) and with as many non-activating tokens marked instead (negative), so the classes are balanced.

Metrics over a set of answers, positives = label True. A reply that is not a yes/no counts as invalid and as a
wrong answer (prediction = not label), so per-example correctness is always 0/1 and a model that ignores the
format is not rewarded. AUC uses P(yes) from the first token's log-probabilities where the client gives them
(Mann-Whitney U / (n_pos·n_neg), ties counted half), over the answers that have one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy.stats import mannwhitneyu

from saelab.interp.examples import Example, LatentExamples, TokenText, marked_text
from saelab.interp.llm import ChatReply, ChatRequest
from saelab.interp.prompts import DETECTION_SYSTEM, FUZZING_SYSTEM, parse_yes_no, yes_no_request, yes_probability

Scorer = Literal["detection", "fuzzing"]
SCORERS: tuple[Scorer, ...] = ("detection", "fuzzing")


@dataclasses.dataclass(frozen=True)
class Query:
    """One yes/no question about one window: `marks` are the marked tokens shown (fuzzing) or None (detection)."""

    scorer: Scorer
    example: Example
    label: bool
    marks: tuple[bool, ...] | None
    request: ChatRequest


@dataclasses.dataclass(frozen=True)
class Answer:
    """A query's outcome; `prediction` None = invalid reply, `probability` = P(yes) when the client gave it."""

    kind: str
    quantile: int | None
    context: int
    start: int
    label: bool
    prediction: bool | None
    probability: float | None

    @property
    def correct(self) -> bool:
        return self.prediction == self.label

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "correct": self.correct}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Answer:
        return cls(**{k: v for k, v in data.items() if k != "correct"})


def detection_queries(
    explanation: str, examples: LatentExamples, text: TokenText, top_logprobs: int = 10
) -> list[Query]:
    windows = [(e, True) for e in examples.test_activating] + [(e, False) for e in examples.test_non_activating]
    return [
        Query("detection", example, label, None,
              yes_no_request(DETECTION_SYSTEM, explanation, "".join(text.pieces(example.token_ids)), top_logprobs))
        for example, label in windows
    ]


def fuzzing_queries(
    explanation: str, examples: LatentExamples, text: TokenText, seed: int = 0, top_logprobs: int = 10
) -> list[Query]:
    queries = []
    for number, example in enumerate(examples.test_activating):
        pieces = text.pieces(example.token_ids)
        true_marks = tuple(a > 0 for a in example.activations)
        silent = [i for i, mark in enumerate(true_marks) if not mark]
        rng = np.random.default_rng([seed, example.latent, number])
        wrong = set(rng.choice(silent, size=min(sum(true_marks), len(silent)), replace=False).tolist())
        variants = [(true_marks, True)]
        if wrong:
            variants.append((tuple(i in wrong for i in range(len(pieces))), False))
        for marks, label in variants:
            excerpt = marked_text(pieces, marks)
            queries.append(Query("fuzzing", example, label, marks,
                                 yes_no_request(FUZZING_SYSTEM, explanation, excerpt, top_logprobs)))
    return queries


def answer(query: Query, reply: ChatReply) -> Answer:
    example = query.example
    return Answer(
        kind=example.kind,
        quantile=example.quantile,
        context=example.context,
        start=example.start,
        label=query.label,
        prediction=parse_yes_no(reply.text),
        probability=yes_probability(reply.first_token_logprobs),
    )


def binary_metrics(answers: Sequence[Answer]) -> dict[str, float | int | None]:
    """n, n_invalid, accuracy, balanced_accuracy, f1 and auc (None where undefined, e.g. one class only)."""
    labels = np.array([a.label for a in answers], dtype=bool)
    predicted = np.array([a.prediction if a.prediction is not None else not a.label for a in answers], dtype=bool)
    tp, fn = int((labels & predicted).sum()), int((labels & ~predicted).sum())
    tn, fp = int((~labels & ~predicted).sum()), int((~labels & predicted).sum())
    rates = [tp / (tp + fn)] if tp + fn else []
    rates += [tn / (tn + fp)] if tn + fp else []
    return {
        "n": len(answers),
        "n_invalid": sum(a.prediction is None for a in answers),
        "accuracy": (tp + tn) / len(answers) if answers else None,
        "balanced_accuracy": sum(rates) / len(rates) if rates else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None,
        "auc": auc([a.probability for a in answers if a.probability is not None],
                   [a.label for a in answers if a.probability is not None]),
    }


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counted half."""
    positives = [s for s, label in zip(scores, labels, strict=True) if label]
    negatives = [s for s, label in zip(scores, labels, strict=True) if not label]
    if not positives or not negatives:
        return None
    u = float(mannwhitneyu(positives, negatives, alternative="two-sided").statistic)
    value = u / (len(positives) * len(negatives))
    return value if math.isfinite(value) else None
