"""Activation stores: harvesting a model's activations to disk and reading them back in shuffled batches.

`harvest` (in `saelab.activations.harvest`) is not imported here, so reading a store does not load transformers.
"""

from saelab.activations.normalize import NormStats, estimate_norm_stats
from saelab.activations.shuffle import BatchStream
from saelab.activations.store import ActivationStore
from saelab.activations.writer import StoreWriter

__all__ = ["ActivationStore", "BatchStream", "NormStats", "StoreWriter", "estimate_norm_stats"]
