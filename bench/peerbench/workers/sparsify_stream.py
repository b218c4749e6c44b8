"""EleutherAI sparsify end to end: its own `sparsify.Trainer(cfg, dataset, model).fit()` loop (forward hooks on the
model's layers, one SparseCoder per hookpoint, trained from each forward pass), built by hand because its CLI pins
`cuda:{rank}`: the model is loaded on CPU in fp32 and the dataset is the driver's contexts (`--contexts`, an
int64 `.npy` of `[n_contexts, context_length]`) as a `datasets.Dataset` with an `input_ids` column, in order.

Settings matched to the ours worker: `SparseCoderConfig(num_latents=--n, k=--k)`, `batch_size` = --batch-tokens /
--context-length sequences, `optimizer="adam"` at --lr (`lr_warmup_steps=0`; its scheduler still decays the lr
linearly over the budget, which costs nothing measurable), FVU loss, no AuxK, `exclude_tokens=[]` (every
position trained on, as ours with `exclude_special_tokens=False`), hookpoints `layers.L` (= our `resid_post.L`),
no W&B, no checkpoint before the end (`save_every` past the budget; the final save comes after the last timed
step).

What runs differently from sparsify's CUDA setup, and nothing else is patched:
- `SPARSIFY_DISABLE_TRITON=1` (set here when unset): the eager `embedding_bag` decoder instead of the Triton one;
  without a CUDA device Triton cannot run (the driver sets it too).
- `sparsify.trainer.tqdm` is replaced by a silent subclass whose `update()` (called once at the end of each
  step of `fit`) stamps the step's end: the benchmark's clock, no change to the work done.
- Its prints go to stderr, so the JSON row is stdout's last line.
"""

from __future__ import annotations  # noqa: I001 (e2e_common configures the process before torch loads)

import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

from peerbench.workers.e2e_common import StepClock, layers, parse_args, report  # noqa: E402, I001

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from importlib.metadata import version  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], {
        "--contexts": {"required": True, "help": "int64 .npy [n_contexts, context_length] written by the driver"},
    })
    clock = StepClock()
    with contextlib.redirect_stdout(sys.stderr):
        import sparsify.trainer as sparsify_trainer
        from datasets import Dataset
        from sparsify import SparseCoderConfig, TrainConfig, Trainer
        from transformers import AutoModelForCausalLM

        class StepStamps(sparsify_trainer.tqdm):  # type: ignore[misc, name-defined]
            def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
                super().__init__(*a, **{**kw, "disable": True})

            def update(self, n: int = 1) -> bool | None:
                clock.tick()
                return super().update(n)

        sparsify_trainer.tqdm = StepStamps
        contexts = np.load(args.contexts)
        if contexts.shape[1] != args.context_length or contexts.shape[0] * args.context_length != args.tokens:
            raise SystemExit(f"{args.contexts}: shape {contexts.shape} is not --tokens/--context-length contexts "
                             f"of {args.context_length}")
        sha = hashlib.sha256(np.ascontiguousarray(contexts, dtype=np.int64).tobytes()).hexdigest()
        dataset = Dataset.from_dict({"input_ids": contexts.tolist()}).with_format("torch")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.eval()
        hookpoints = [f"layers.{layer}" for layer in layers(args)]
        with tempfile.TemporaryDirectory() as save_dir:
            cfg = TrainConfig(
                SparseCoderConfig(num_latents=args.n, k=args.k), batch_size=args.batch_tokens // args.context_length,
                loss_fn="fvu", optimizer="adam", lr=args.lr, lr_warmup_steps=0, auxk_alpha=0.0, exclude_tokens=[],
                hookpoints=hookpoints, init_seeds=[args.seed], log_to_wandb=False,
                save_every=args.tokens // args.batch_tokens + 1, save_dir=save_dir,
            )
            trainer = Trainer(cfg, dataset, model)
            trainer.fit()
        d = next(iter(trainer.saes.values())).d_in
    report("sparsify", args, clock, d, hookpoints, contexts_sha256=sha, version=version("eai-sparsify"),
           float32_matmul_precision=torch.get_float32_matmul_precision())


if __name__ == "__main__":
    main()
