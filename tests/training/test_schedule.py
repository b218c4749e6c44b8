import pytest

from saelab.training.schedule import lr_factor


def test_warmup_constant_and_linear_decay() -> None:
    factors = [lr_factor(step, total_steps=10, warmup_steps=4, decay_fraction=0.4) for step in range(10)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_no_warmup_no_decay_is_constant() -> None:
    assert {lr_factor(step, 7, 0, 0.0) for step in range(7)} == {1.0}


def test_warmup_and_decay_overlap_take_the_smaller() -> None:
    assert lr_factor(3, total_steps=5, warmup_steps=5, decay_fraction=1.0) == pytest.approx(min(4 / 5, 2 / 5))
