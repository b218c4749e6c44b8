"""The one training loop for every SAE, with its losses, decoder constraint, dead-latent handling and checkpoints."""

from saelab.training.checkpoint import latest_checkpoint
from saelab.training.config import TrainerConfig, default_lr
from saelab.training.dead import DeadLatentTracker, resample_latents
from saelab.training.optim import MaskedAdam
from saelab.training.trainer import Trainer, TrainResult

__all__ = [
    "DeadLatentTracker",
    "MaskedAdam",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "default_lr",
    "latest_checkpoint",
    "resample_latents",
]
