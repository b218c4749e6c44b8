import math

import pytest

from saelab.interp.prompts import explainer_request, parse_explanation, parse_yes_no, yes_probability


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Explanation: words about kings", "words about kings"),
        ("Let me think.\nThe tokens are names.\nexplanation:  \"royal titles\" ", "royal titles"),
        ("Explanation: first\nExplanation: second", "second"),
        ("\n\n  biblical names\nmore text", "biblical names"),
        ("The latent detects the word \"Sarai\", e.g. in Genesis. This is a common phenomenon.",
         "The latent detects the word \"Sarai\", e.g. in Genesis."),
        ("Explanation: kings. They rule", "kings."),
        ("   \n", None),
        ("", None),
    ],
)
def test_parse_explanation(reply: str, expected: str | None) -> None:
    assert parse_explanation(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("Yes", True), (" yes.", True), ("NO", False), ("No, because", False), ("**Yes**", True), ("Maybe", None),
     ("", None), ("Yesterday", None), ("42", None)],
)
def test_parse_yes_no(reply: str, expected: bool | None) -> None:
    assert parse_yes_no(reply) is expected


def test_yes_probability_sums_the_answer_variants() -> None:
    logprobs = {"Yes": math.log(0.3), " yes": math.log(0.1), "No": math.log(0.2), "The": math.log(0.4)}
    assert yes_probability(logprobs) == pytest.approx(0.4 / 0.6)
    assert yes_probability({"The": 0.0}) is None
    assert yes_probability(None) is None


def test_explainer_prompt_lists_marked_text_and_strengths() -> None:
    request = explainer_request([("the <<king>> said", [(" king", 10)]), ("<<a>> <<b>>", [("a", 3), (" b", 1)])], 40)
    (role, system), (_, user) = request.messages
    assert role == "system" and "<<like this>>" in system and "Explanation:" in system
    assert user.startswith("Excerpt 1: the <<king>> said\nActivating tokens: 'king' (10)\n\nExcerpt 2: <<a>> <<b>>")
    assert "Activating tokens: 'a' (3), 'b' (1)" in user
    assert request.max_tokens == 40
