"""`saelab harvest`: a model's activations at hookpoints into an on-disk store (the store records its config)."""

from __future__ import annotations

from saelab.activations.harvest import HarvestConfig, harvest_from_config
from saelab.activations.store import ActivationStore

CONFIG = HarvestConfig


def run(cfg: HarvestConfig) -> ActivationStore:
    return harvest_from_config(cfg)
