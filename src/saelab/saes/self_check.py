"""The load-time self-check: before a command spends minutes on an SAE, run it on a small reference batch of the
command's own activations at the SAE's hookpoint and stop when the SAE plainly does not fit them.

The worst format and hookpoint mix-ups are silent: a TopK SAE loaded as ReLU, a BatchTopK threshold dropped, an SAE
applied one layer off (HF's `hidden_states[i]` is `resid_post.(i-1)`), a norm scaling factor missing. Each shows on a
few hundred tokens as one of

- FVU >= 1: the reconstruction is worse than predicting the mean (another layer or hookpoint kind);
- mean L0 far from what the config implies: a top-k SAE (k) between 0.9k and k, one with a learned inference
  threshold (BatchTopK, Matryoshka) between k/2 and 2k (another architecture, a dropped threshold, another layer);
- the normalised input's mean norm more than 10x from sqrt(d_in), the norm a fixed input scale (saelab's
  `input_scale`, SAELens's norm_scaling_factor, a multi-layer SAE's layer scales) is meant to give (a missing or
  wrong scaling factor).

FVU and L0 are `evaluate_reconstruction`'s, in the SAE's own (preprocessed) space.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.topk import TopKSAEConfig

logger = logging.getLogger(__name__)

REFERENCE_TOKENS = 512
NORM_FACTOR = 10.0
FLAG = "--self-check false"
SELF_CHECK_HELP = ("first run the SAE on a few hundred tokens of this command's data and stop when it does not fit "
                   "them (FVU >= 1, L0 far from its k, input norm 10x off its scale)")


def expected_l0(sae: SparseAutoencoder) -> tuple[float, float] | None:
    """The mean L0 range the SAE's config implies, or None when it implies none (ReLU, JumpReLU)."""
    if not isinstance(sae.cfg, TopKSAEConfig):
        return None
    k = sae.cfg.k
    thresholded = isinstance(sae, BatchTopKSAE) and not sae.training  # its inference threshold only averages k
    return (k / 2, 2 * k) if thresholded else (0.9 * k, k)


def expects_unit_scale(sae: SparseAutoencoder) -> bool:
    """Whether the SAE's preprocessing is a fixed scale meant to bring E||x|| to sqrt(d_in)."""
    return sae.cfg.preprocessing == "scale" or getattr(sae.cfg, "normalization", "none") not in ("none", None)


@torch.no_grad()
def self_check(sae: SparseAutoencoder, x: Tensor, target: Tensor | None = None, *, source: str,
               hookpoint: str | None = None) -> dict[str, Any]:
    """The reference batch's FVU, L0 and normalised input norm; a ConfigError naming each failed check, its likely
    causes and the fixes when the SAE does not fit `x` (raw `[n, d_in]` activations, with a transcoder's target)."""
    from saelab.evaluation import evaluate_reconstruction  # evaluation imports the saes package

    x = x.reshape(-1, x.shape[-1])
    batch = x if target is None else (x, target.reshape(-1, target.shape[-1]))
    metrics = evaluate_reconstruction(sae, [batch])
    norm = float(sae.normalize(x.to(sae.device, next(sae.parameters()).dtype))[0].norm(dim=-1).mean())
    found = {"tokens": metrics["n_tokens"], "fvu": metrics["fvu"], "l0": metrics["l0"], "input_norm": norm}
    problems = []
    if expects_unit_scale(sae):
        want = math.sqrt(sae.d_in)
        ratio = norm / want
        found["expected_input_norm"] = want
        if not 1 / NORM_FACTOR <= ratio <= NORM_FACTOR:
            problems.append(
                f"its normalised input has mean norm {norm:.4g}, {max(ratio, 1 / max(ratio, 1e-30)):.3g}x off the "
                f"sqrt(d_in) = {want:.4g} its input scale is meant to give: a missing or wrong scaling factor "
                "(SAELens: pass the norm_scaling_factor it was trained with), or activations of another layer/model")
    bounds = expected_l0(sae)
    if bounds is not None:
        found["expected_l0"] = list(bounds)
        if not bounds[0] <= metrics["l0"] <= bounds[1]:
            problems.append(
                f"its mean L0 is {metrics['l0']:.4g}, outside [{bounds[0]:g}, {bounds[1]:g}] that k={sae.cfg.k} "
                "implies: another architecture than it was saved as (e.g. a BatchTopK threshold dropped or k "
                "misread), or inputs from another layer or hookpoint kind")
    if not metrics["fvu"] < 1:
        problems.append(
            f"FVU = {metrics['fvu']:.4g} >= 1, a reconstruction worse than the mean: the wrong layer (HF "
            "hidden_states[i] is resid_post.(i-1)), the wrong hookpoint kind (e.g. mlp_out for resid_post), the "
            "wrong model, or the wrong architecture")
    where = f" at {hookpoint}" if hookpoint else ""
    logger.info("self-check of %s%s: %s", source, where, found)
    if problems:
        raise ConfigError(
            f"{source} does not fit the activations it was loaded for ({found['tokens']} reference tokens{where}, "
            f"the SAE names hookpoint {sae.cfg.hookpoint!r}): " + "; ".join(problems) + ". Fix: point it at the "
            "model and hookpoint it was trained on (and give its scaling factor); if the SAE is meant to be as it "
            f"is (e.g. untrained), turn this check off with {FLAG}"
        )
    return found


__all__ = ["FLAG", "REFERENCE_TOKENS", "SELF_CHECK_HELP", "expected_l0", "self_check"]
