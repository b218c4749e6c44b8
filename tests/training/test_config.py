import pytest

from saelab.errors import ConfigError
from saelab.training.config import TrainerConfig, default_lr


def test_default_lr_scales_with_width() -> None:
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(4 * 2**14) == pytest.approx(1e-4)


def test_roundtrip_and_cli_style_values(tmp_path) -> None:
    cfg = TrainerConfig.from_dict(
        {"betas": "0.9,0.99", "lr": "none", "optimizer": "masked_adam", "total_tokens": "1e6"}
    )
    assert cfg.betas == (0.9, 0.99) and cfg.lr is None and cfg.total_tokens == 1_000_000
    cfg.save(tmp_path / "t.json")
    assert TrainerConfig.load(tmp_path / "t.json") == cfg
    assert cfg.total_steps == 245  # ceil(1e6 / 4096)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"l1_coefficient": -0.1}, "l1_coefficient must be >= 0"),
        ({"decay_fraction": 1.5}, r"decay_fraction must be in \[0, 1\]"),
        ({"decoder_norm_axis": "per_column"}, "decoder_norm_axis='per_column' is unknown"),
        ({"loss": "l2"}, "loss='l2' is unknown"),
        ({"total_tokens": 10, "batch_size": 64}, "less than one batch"),
    ],
)
def test_bad_values_are_named(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainerConfig().replace(**changes)
