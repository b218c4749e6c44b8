"""Shared test settings: deterministic, few threads (CI has 2 cores), tiny random models built from configs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


torch.set_num_threads(2)
