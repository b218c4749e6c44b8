"""Harvesting and evaluation cost on SmolLM2, relative to a clean full forward measured alternately in this run.

Harvesting: `capture(..., stop_early=True)` at resid_post.{0,7,15,29}; the early stop should make its cost
proportional to the deepest hooked layer. Evaluation: `evaluate_downstream` at resid_post.15 with no ablations: one
clean pass per batch, then a spliced pass that replays the clean pass's first 16 blocks and runs the last 14 (the
target is at most two forwards; about 1.5 is expected). Random token ids: cost does not depend on them.
Prints one JSON line: a list of {name, tokens_per_s, relative, load_average_1min}.
"""

from __future__ import annotations

from saelab.runtime import configure_process

configure_process()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from saelab.evaluation import evaluate_downstream  # noqa: E402
from saelab.models.hooks import capture  # noqa: E402
from saelab.models.loading import load_model  # noqa: E402
from saelab.saes import TopKSAE, TopKSAEConfig  # noqa: E402

DEPTHS = (0, 7, 15, 29)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _ = load_model(args.model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context))
    sae = TopKSAE(TopKSAEConfig(d_in=model.config.hidden_size, n_latents=4096, k=32))
    runs: dict[str, Callable[[], object]] = {"full forward": lambda: capture(model, ids, ["resid_post.29"],
                                                                             stop_early=False)}
    for depth in DEPTHS:
        runs[f"harvest resid_post.{depth} (early stop)"] = lambda d=depth: capture(model, ids, [f"resid_post.{d}"])
    runs["evaluate_downstream (clean + spliced)"] = lambda: evaluate_downstream(
        model, sae, "resid_post.15", ids, batch_size=args.batch, zero_ablation=False, mean_ablation=False)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    loads: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped below
        for name, fn in runs.items():  # alternating: every measurement once per round
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
            loads[name].append(os.getloadavg()[0])
    median = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    tokens = args.batch * args.context
    print(json.dumps([
        {"name": name, "tokens_per_s": round(tokens / median[name], 1),
         "relative": round(median[name] / median["full forward"], 3),
         "load_average_1min": round(statistics.mean(loads[name][1:]), 2)}
        for name in runs
    ]))


if __name__ == "__main__":
    main()
