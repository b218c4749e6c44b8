import pytest

from saelab.interp.compare import compare_results, example_correctness, mann_whitney


def test_mann_whitney_against_a_hand_example() -> None:
    # Every a below every b: U = 0; exact two-sided p = 2 · 1 / C(6, 3) = 0.1.
    result = mann_whitney([1, 2, 3], [4, 5, 6])
    assert result["u"] == 0.0 and result["p_value"] == pytest.approx(0.1)
    assert (result["mean_a"], result["mean_b"], result["n_a"], result["n_b"]) == (2.0, 5.0, 3, 3)
    # U counts pairs with a > b, ties half: (4>2, 4>3) + two ties 2=2 -> 3.
    assert mann_whitney([1, 2, 2, 4], [2, 3])["u"] == pytest.approx(3.0)


def test_identical_samples_and_empty_ones() -> None:
    assert mann_whitney([1, 1, 1], [1, 1])["p_value"] == 1.0
    assert mann_whitney([], [1.0])["p_value"] is None


def _result(correct: list[bool], accuracy: float) -> dict:
    answers = [{"correct": c} for c in correct]
    block = {"metrics": {"accuracy": accuracy}, "answers": answers}
    return {"scores": {"llm": {"detection": block, "fuzzing": block}}}


def test_compare_results_pools_examples_and_latents() -> None:
    a = [_result([True, True, False], 0.9), _result([True], 0.8)]
    b = [_result([False, False], 0.2), _result([False, True], 0.3), {"scores": {}}]  # the last: invalid explanation
    assert example_correctness(a, "llm", "detection") == [1.0, 1.0, 0.0, 1.0]
    tests = compare_results(a, b, "llm", ["detection", "fuzzing"])
    assert tests["detection"]["per_example"]["n_a"] == 4 and tests["detection"]["per_example"]["n_b"] == 4
    # a = [1, 1, 0, 1], b = [0, 0, 0, 1]: a's ones beat b's zeros (9 pairs); 3 + 3 tied pairs count half -> 12.
    assert tests["detection"]["per_example"]["u"] == pytest.approx(12.0)
    assert tests["fuzzing"]["per_latent"]["u"] == 4.0 and tests["fuzzing"]["per_latent"]["n_b"] == 2
