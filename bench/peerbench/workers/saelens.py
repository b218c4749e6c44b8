"""SAELens (`sae-lens`): its `TopKTrainingSAE` trained by its own `SAETrainer.fit` loop over the shared batches.

Default TopK training config apart from the shared settings: dense top-k activations (the sparse-activation mode
crashes on CPU with the default `rescale_acts_by_decoder_norm=True`), decoder rows initialised to norm 0.1, b_dec
zero, loss = summed squared error (mean over tokens) plus AuxK once latents go dead (never within these budgets:
its dead window is 1,000 steps), gradient norm clipped to 1, Adam with a constant lr, no activation normalisation,
no checkpoints or W&B. `fit` pulls the batches from the step clock, so everything its loop does per step is timed.
"""

from __future__ import annotations  # noqa: I001 (common configures the process before torch loads)

from peerbench.workers.common import Activations, StepClock, fvu, parse_args, report

import torch  # noqa: E402
from sae_lens import __version__  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    data = Activations(args)
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.d, d_sae=args.n, k=args.k, dtype="float32",
                                                device=str(data.device)))
    clock = StepClock(data, args)
    cfg = SAETrainerConfig(total_training_samples=clock.count * args.batch, train_batch_size_samples=args.batch,
                           lr=args.lr, lr_end=args.lr / 10, device=str(data.device))  # runner's default lr_end
    SAETrainer(cfg, sae, iter(clock)).fit()
    sae.eval()
    report("saelens", args, data, clock, fvu(sae, data), version=__version__)


if __name__ == "__main__":
    main()
