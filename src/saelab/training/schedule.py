"""Learning-rate schedule as a pure function of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Multiplier on the base lr for the 0-based `step`: linear warm-up over the first `warmup_steps` steps
    (reaching 1 at step warmup_steps − 1), constant, then linear decay over the last `decay_fraction` of
    `total_steps` (1 at its first step, 1/decay_steps at the last, never 0 so every step still learns)."""
    factor = 1.0
    if step < warmup_steps:
        factor = (step + 1) / warmup_steps
    decay_steps = round(decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        factor = min(factor, max(total_steps - step, 1) / decay_steps)
    return factor
