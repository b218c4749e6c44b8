import math

import pytest

from saelab.interp.examples import Example, LatentExamples, TokenText
from saelab.interp.llm import ChatReply
from saelab.interp.scorers import Answer, answer, auc, binary_metrics, detection_queries, fuzzing_queries


def _example(word_tokenizer, words: str, activations: list[float], kind: str = "quantile", quantile=0) -> Example:
    ids = tuple(word_tokenizer(words)["input_ids"])
    return Example(3, kind, 0, 0, ids, tuple(activations), quantile if kind == "quantile" else None)


@pytest.fixture
def examples(word_tokenizer) -> LatentExamples:
    active = [_example(word_tokenizer, "w1 w7 w2 w3", [0, 2.0, 0, 0]),
              _example(word_tokenizer, "w7 w7 w5 w6", [1.0, 4.0, 0, 0], quantile=1)]
    silent = [_example(word_tokenizer, "w1 w2 w3 w4", [0, 0, 0, 0], kind="non_activating")]
    return LatentExamples(3, 4.0, [], active, silent)


def test_detection_asks_about_unmarked_windows(examples, word_tokenizer) -> None:
    queries = detection_queries("the token w7", examples, TokenText(word_tokenizer), top_logprobs=4)
    assert [q.label for q in queries] == [True, True, False]
    user = queries[0].request.messages[-1][1]
    assert user == "Explanation: the token w7\nExcerpt: w1 w7 w2 w3\nAnswer Yes or No."
    assert queries[0].request.max_tokens == 1 and queries[0].request.top_logprobs == 4


def test_fuzzing_marks_true_tokens_or_as_many_wrong_ones(examples, word_tokenizer) -> None:
    queries = fuzzing_queries("the token w7", examples, TokenText(word_tokenizer), seed=0)
    assert [q.label for q in queries] == [True, False, True, False]
    assert queries[0].marks == (False, True, False, False)
    assert "Excerpt: w1 <<w7>> w2 w3\n" in queries[0].request.messages[-1][1]
    for correct, wrong in [(queries[0], queries[1]), (queries[2], queries[3])]:
        assert sum(wrong.marks) == sum(correct.marks)
        assert not any(a and b for a, b in zip(correct.marks, wrong.marks, strict=True))
    assert queries[2].marks == (True, True, False, False)
    assert "Excerpt: <<w7 w7>> w5 w6\n" in queries[2].request.messages[-1][1]
    assert fuzzing_queries("the token w7", examples, TokenText(word_tokenizer), seed=0) == queries  # reproducible


def test_metrics_on_fixed_replies(examples, word_tokenizer) -> None:
    queries = detection_queries("w7", examples, TokenText(word_tokenizer))
    queries = queries + fuzzing_queries("w7", examples, TokenText(word_tokenizer))[:3]  # labels T T F | T F T
    texts = ["Yes", "garbage", "Yes", "Yes", "No", "No"]  # right, invalid, wrong | right, right, wrong
    answers = [answer(q, ChatReply(t, 10, 1)) for q, t in zip(queries, texts, strict=True)]
    assert [a.correct for a in answers] == [True, False, False, True, True, False]
    assert answers[1].prediction is None
    metrics = binary_metrics(answers)
    # positives 0, 1, 3, 5: TP 2, FN 2 (one of them the invalid reply); negatives 2, 4: FP 1, TN 1
    assert metrics["n"] == 6 and metrics["n_invalid"] == 1
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert metrics["auc"] is None  # no probabilities


def test_auc_from_yes_probabilities(examples, word_tokenizer) -> None:
    queries = detection_queries("w7", examples, TokenText(word_tokenizer))  # labels T, T, F
    p_yes = [0.9, 0.3, 0.6]
    replies = [ChatReply("Yes", 1, 1, {"Yes": math.log(p), "No": math.log(1 - p)}) for p in p_yes]
    answers = [answer(q, r) for q, r in zip(queries, replies, strict=True)]
    assert [a.probability for a in answers] == pytest.approx(p_yes)
    assert binary_metrics(answers)["auc"] == pytest.approx(0.5)  # 0.9 > 0.6 but 0.3 < 0.6


def test_auc_hand_examples() -> None:
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)  # ties count half
    assert auc([0.5, 0.7], [True, True]) is None


def test_metrics_of_one_class_and_of_nothing() -> None:
    only_negatives = [Answer("non_activating", None, 0, 0, False, False, None)] * 3
    metrics = binary_metrics(only_negatives)
    assert metrics["accuracy"] == 1.0 and metrics["balanced_accuracy"] == 1.0
    assert metrics["f1"] is None and metrics["auc"] is None
    assert binary_metrics([])["accuracy"] is None
    assert Answer.from_dict(only_negatives[0].to_dict()) == only_negatives[0]
