"""Exact selection on a trained SAE and real activations: fp32 against bf16-exact, the certified fraction, and
whether both selected the same latents and values (they must).

Training moves the encoder away from its initialisation (a few rows grow long), which is where the bf16 filter's
bound is tested; synthetic benchmarks at initialisation never see it. Prints one JSON line per repetition.

Usage: python bench/selection.py --sae RUN/train/sae --store RUN/activations/eval [--tokens 2048] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saelab.activations.store import ActivationStore
from saelab.saes import SparseAutoencoder, certified, load_sae


def compare(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float | bool]:
    """One fp32 and one bf16-exact encode of `x` (raw activations, normalised as the SAE normalises its input):
    seconds, certified fraction, equality."""
    with torch.no_grad():
        x = sae.normalize(x)[0]
        start = time.perf_counter()
        ref = sae.encode(x)
        fp32_s = time.perf_counter() - start
        with certified.selection_precision("bf16-exact"), certified.counted() as counted:
            start = time.perf_counter()
            got = sae.encode(x)
            bf16_s = time.perf_counter() - start
    same = torch.equal(ref.indices, got.indices) and torch.equal(ref.values, got.values)
    return {"fp32_s": round(fp32_s, 3), "bf16_exact_s": round(bf16_s, 3), "same_selection": same,
            "bf16_path_ran": counted.tokens > 0,
            "certified_fraction": round(counted.certified / counted.tokens, 4) if counted.tokens else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, help="a saved SAE folder")
    parser.add_argument("--store", required=True, help="an activation store holding the SAE's hookpoints")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    sae = load_sae(args.sae)
    hookpoints = getattr(sae, "hookpoints", None) or sae.cfg.hookpoint  # a multi-layer SAE's, or the one
    if not hookpoints:
        raise SystemExit(f"{args.sae} records no hookpoint: this benchmark needs to know which activations it reads")
    store = ActivationStore(args.store)
    x = store.load(hookpoints, 0, min(args.tokens, store.n_tokens))
    for _ in range(args.repeat):
        print(json.dumps({**compare(sae, x), "tokens": x.shape[0], "n_latents": sae.n_latents, "k": sae.k,
                          "d_in": sae.d_in, "threads": torch.get_num_threads(),
                          "isa": torch.backends.cpu.get_cpu_capability()}), flush=True)


if __name__ == "__main__":
    main()
