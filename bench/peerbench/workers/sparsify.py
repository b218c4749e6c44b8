"""EleutherAI sparsify (`eai-sparsify`): its `SparseCoder` and the step its trainer takes, without AuxK.

Per step, as `sparsify.Trainer` does: b_dec set to the first batch's mean, FVU loss from the coder's forward,
backward, the gradient component parallel to each decoder row removed, Adam, decoder rows renormalised.
"""

from __future__ import annotations  # noqa: I001 (common configures the process before torch loads)

from peerbench.workers.common import Activations, StepClock, drive, fvu, parse_args, report

from importlib.metadata import version  # noqa: E402

import torch  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from torch import Tensor  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    data = Activations(args)
    torch.manual_seed(args.seed)
    coder = SparseCoder(data.d, SparseCoderConfig(num_latents=args.n, k=args.k), device=data.device,
                        dtype=torch.float32)
    optimizer = torch.optim.Adam(coder.parameters(), lr=args.lr)
    with torch.no_grad():
        coder.b_dec.copy_(data[0].mean(0))

    def step(x: Tensor) -> None:
        coder(x).fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()

    clock = StepClock(data, args)
    drive(step, clock)
    report("sparsify", args, data, clock, fvu(lambda x: coder(x).sae_out, data),
           version=version("eai-sparsify"))


if __name__ == "__main__":
    main()
