"""dictionary_learning (`dictionary-learning`): its `TopKTrainer` (`AutoEncoderTopK`) run by its own `trainSAE` loop.

Its TopK scheme as shipped apart from the shared settings: b_dec set to the geometric median of the first batch
(inside the first, warm-up step), summed squared error (mean over tokens) plus AuxK (1/32) once latents go dead
(never within these budgets: 10M tokens), decoder-parallel gradient removed, gradient norm clipped to 1, Adam,
decoder columns renormalised; no lr warm-up (its default 1,000 steps would exceed the budget) or decay, no
activation normalisation, W&B or intermediate checkpoints. `trainSAE` pulls the batches from the step clock, so
everything its loop does per step is timed; it returns nothing, so the trained dictionary is read back from its
final `ae.pt`.
"""

from __future__ import annotations  # noqa: I001 (common configures the process before torch loads)

from peerbench.workers.common import Activations, StepClock, fvu, parse_args, report

import tempfile  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer  # noqa: E402
from dictionary_learning.training import trainSAE  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    data = Activations(args)
    clock = StepClock(data, args)
    trainer = {
        "trainer": TopKTrainer, "steps": clock.count, "activation_dim": data.d, "dict_size": args.n, "k": args.k,
        "layer": 0, "lm_name": "peerbench", "lr": args.lr, "warmup_steps": 0, "seed": args.seed,
        "device": str(data.device),
    }
    with tempfile.TemporaryDirectory() as out:
        trainSAE(clock, [trainer], steps=clock.count, save_dir=out, device=str(data.device),
                 autocast_dtype=torch.float32)
        ae = AutoEncoderTopK.from_pretrained(Path(out) / "trainer_0" / "ae.pt", device=data.device)
    report("dictionary_learning", args, data, clock, fvu(ae, data), version=version("dictionary-learning"))


if __name__ == "__main__":
    main()
