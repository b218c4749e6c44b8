"""Ours end to end: `saelab.training.entry.train_streamed` (what `saelab train --model M --hookpoints ...` runs),
one forward pass per batch of contexts feeding one top-k SAE per hookpoint through the bounded shuffle buffer.

The run is configured like the sparsify worker's: the same contexts (`--source` packed by
`saelab.data.tokenize.build_contexts` into `--tokens / --context-length` contexts of `--context-length` tokens,
every position trained on, BOS included, exactly one epoch), k, latents, batch in tokens, Adam at a constant lr
with no warm-up, decay, clipping, AuxK or checkpoints. `--expect-sha256` checks that the contexts the run recorded
are the ones the driver tokenised for sparsify. Step ends are stamped by wrapping `Trainer.train_on` (the last SAE's
step of each batch ends the step).
"""

from __future__ import annotations  # noqa: I001 (e2e_common configures the process before torch loads)

from peerbench.workers.e2e_common import StepClock, layers, parse_args, report

import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from saelab.data.tokenize import DataConfig  # noqa: E402
from saelab.saes.spec import SAESpec  # noqa: E402
from saelab.training import trainer as trainer_module  # noqa: E402
from saelab.training.config import TrainerConfig  # noqa: E402
from saelab.training.entry import TrainConfig, train_streamed  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], {
        "--source": {"default": "kjv", "help": "corpus (saelab.data.corpora)"},
        "--buffer-tokens": {"type": int, "default": 2048, "help": "shuffle buffer per hookpoint, in tokens"},
        "--expect-sha256": {"default": None, "help": "sha256 of the driver's contexts (int64 bytes)"},
    })
    hookpoints = [f"resid_post.{layer}" for layer in layers(args)]
    clock = StepClock()
    original = trainer_module.Trainer.train_on
    calls = 0

    def train_on(self, batch):  # type: ignore[no-untyped-def]
        nonlocal calls
        original(self, batch)
        calls += 1
        if calls % len(hookpoints) == 0:
            clock.tick()

    trainer_module.Trainer.train_on = train_on  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=args.model, hookpoints=hookpoints, out_dir=out, buffer_tokens=args.buffer_tokens,
            contexts_per_forward=args.batch_tokens // args.context_length,
            data=DataConfig(source=args.source, context_length=args.context_length, n_tokens=args.tokens,
                            prepend_bos=True, exclude_special_tokens=False),
            sae=SAESpec(architecture="topk", n_latents=args.n, k=args.k),
            trainer=TrainerConfig(total_tokens=args.tokens, batch_size=args.batch_tokens, lr=args.lr, warmup_steps=0,
                                  decay_fraction=0.0, grad_clip_norm=None, checkpoint_every_steps=None,
                                  log_every_steps=10**9, progress=False, seed=args.seed),
        )
        results = train_streamed(cfg)
        request = json.loads((Path(out) / hookpoints[0] / "config.json").read_text())
        sha = _find(request, "contexts_sha256")
        sae = results[hookpoints[0]][0]
        if args.expect_sha256 is not None and sha != args.expect_sha256:
            raise SystemExit(f"our run's contexts (sha256 {sha}) differ from the driver's ({args.expect_sha256})")
        fvu = {hp: r.final.get("fvu") for hp, (_, r) in results.items()}
    report("ours", args, clock, sae.d_in, hookpoints, buffer_tokens=args.buffer_tokens, contexts_sha256=sha,
           final_fvu_mean=round(sum(fvu.values()) / len(fvu), 4) if all(v is not None for v in fvu.values())
           else None)


def _find(tree: object, key: str) -> object:
    """The first value of `key` anywhere in a nested JSON object (None when absent)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, key)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    main()
