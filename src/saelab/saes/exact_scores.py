"""The exact scores and the bf16 split in torch ops, for devices without the native kernels (CUDA): the same
functions as `native.rescore_topk` and `native.bf16_split`, and for the scores the same bits.

An exact score is x · w_j + b_j summed in one fixed order: LANES partial sums, lane l taking the products
x_i·w_ji with i ≡ l (mod LANES) in increasing i, the d mod LANES leftover products added to the first lanes, the
lanes then folded pairwise (lane l += lane l + width, width = LANES/2 .. 1), and the bias added last. Each product
and each sum is rounded to fp32 on its own (the native kernel is built with contraction off, so no fused
multiply-add merges them). Elementwise fp32 multiplication and addition are correctly rounded in torch on CPU and
CUDA alike, so spelling that order out as elementwise ops over [tokens, candidates, LANES] gives every score's bits
on any device: a CUDA selection is the CPU's.

Cost: the candidates' weight rows are gathered (tokens × c × d floats, in chunks of CHUNK_BYTES), multiplied, and
summed lane by lane: in one `cumsum` over the d / LANES blocks where the device's scan adds in sequence (CUDA; checked
once per process, `_scan_is_sequential`), else in d / LANES elementwise adds. No step waits for the device. On CPU
the native kernel is far faster, so there this module is the reference the native one is tested against.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

LANES = 16  # topk_native.c's LANES
CHUNK_BYTES = 256 << 20  # gathered weight rows per chunk of tokens
CUDA_CHUNK_BYTES = 1 << 30  # on a GPU: fewer chunks, fewer launches


def _chunk_bytes(device: torch.device) -> int:
    return CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES


@functools.cache
def _scan_is_sequential(device_type: str) -> bool:
    """Whether `cumsum` over a middle dimension of float32 on this device type adds in sequence in fp32 (acc = 0;
    acc += each element in order), as CUDA's outer-dimension scan does: then one scan replaces d / LANES separate
    adds. Checked on random data, where any other order or a wider accumulator differs in some bit (CPU's cumsum
    accumulates in float64: the loop runs there)."""
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(64, 48, LANES, generator=gen) * torch.logspace(-3, 3, 48).view(1, 48, 1)).to(device_type)
    folded = torch.zeros_like(probe[:, 0])
    for block in range(probe.shape[1]):
        folded.add_(probe[:, block])
    return torch.equal(probe.cumsum(1)[:, -1], folded)


def scores(x: Tensor, weight: Tensor, bias: Tensor, latents: Tensor) -> Tensor:
    """[R, c] fp32: the exact score of each row of `x` [R, d] against each of its latents [R, c] (module docstring).
    The latents must lie in [0, n)."""
    rows, c = latents.shape
    d = x.shape[1]
    out = x.new_empty(rows, c)
    full, tail = divmod(d, LANES)
    step = max(1, _chunk_bytes(x.device) // max(1, 4 * c * d))
    scan = full > 1 and _scan_is_sequential(x.device.type)
    for start in range(0, rows, step):
        latent = latents[start : start + step]
        products = weight[latent].mul_(x[start : start + step].unsqueeze(1))  # [r, c, d], each product rounded
        blocks = products[..., : full * LANES].unflatten(-1, (full, LANES))
        if scan:  # 0 + p_0 + p_1 + ... in sequence, in one launch
            acc = blocks.cumsum(-2)[..., -1, :]
        else:
            acc = products.new_zeros(*latent.shape, LANES)
            for block in range(full):
                acc.add_(blocks[..., block, :])
        if tail:
            acc[..., :tail].add_(products[..., full * LANES :])
        width = LANES // 2
        while width:
            acc[..., :width].add_(acc[..., width : 2 * width])
            width //= 2
        torch.add(acc[..., 0], bias[latent], out=out[start : start + step])
    return out


def rescore_topk(x: Tensor, weight: Tensor, bias: Tensor, candidates: Tensor | None, k: int) -> tuple[Tensor, ...]:
    """`native.rescore_topk` in torch ops: (values, indices [R, k], k-th best [R]), the k best exact scores of each
    row's candidates (None: every latent) under (score descending, latent ascending), in latent order; a row with a
    NaN score gets NaN values and kth and indices 0..k-1."""
    x, weight, bias = x.detach().float(), weight.detach().float(), bias.detach().float()
    n = weight.shape[0]
    if candidates is None:  # every latent, already in ascending order
        latent, score = torch.arange(n, device=x.device).expand(x.shape[0], n), _score_all(x, weight, bias)
    else:
        if candidates.numel():
            low, high = torch.aminmax(candidates)  # one wait for the device, not two
            if int(low) < 0 or int(high) >= n:
                raise IndexError(f"rescore_topk: a candidate latent is outside [0, {n})")
        latent, order = candidates.sort(dim=1)  # latent ascending: a stable sort by score puts ties lower-latent first
        score = scores(x, weight, bias, candidates).gather(1, order)
    rank = (score + 0.0).sort(dim=1, descending=True, stable=True).indices[:, :k]  # + 0.0: -0 ties with +0
    kept_latent, by_latent = latent.gather(1, rank).sort(dim=1)
    kept = score.gather(1, rank).gather(1, by_latent)
    nan = score.isnan().any(dim=1, keepdim=True)  # no host round trip to ask whether any is
    kept = kept.masked_fill(nan, float("nan"))
    kept_latent = torch.where(nan, torch.arange(k, device=x.device), kept_latent)
    return kept, kept_latent, kept.amin(dim=1)


def _score_all(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """[r, n]: every latent's exact score, a block of latents at a time (`scores` splits the rows further)."""
    n, d = weight.shape
    per_block = max(1, _chunk_bytes(x.device) // max(1, 4 * d * max(1, x.shape[0])))
    latents = torch.arange(n, device=x.device)
    return torch.cat([scores(x, weight, bias, latents[s : s + per_block].expand(x.shape[0], -1))
                      for s in range(0, n, per_block)], dim=1)


def bf16_split(weight: Tensor, out: Tensor | None, rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`native.bf16_split` in torch ops: (max_j ||w16_j||, max_j ||w_j - w16_j||, max_j ||w_j||) of a float32 [n, d]
    weight and its bfloat16 rounding w16 (round to nearest even, as torch casts), written into `out` (n·d bfloat16
    elements) unless None. The norms are torch's fp32 reductions (relative error far under the bounds' 2^-10
    margin), returned as float64 scalars on the weight's device (no wait for it); a NaN weight makes them NaN. With
    `rows` ([n, 3] float64) each row's three squared norms are written there too."""
    weight = weight.detach()
    n, d = weight.shape
    if out is not None and not (out.dtype == torch.bfloat16 and out.is_contiguous() and out.numel() == n * d):
        raise ValueError(f"bf16_split: out must be a contiguous bfloat16 tensor of {n * d} elements")
    w16 = weight.to(torch.bfloat16) if out is None else out.view(n, d).copy_(weight)
    back = w16.float()
    per_row = torch.stack([back.norm(dim=1), back.sub_(weight).norm(dim=1), weight.norm(dim=1)], dim=1)
    if rows is not None:
        rows.copy_(per_row.double().square())
    nu, rho, w_max = per_row.max(dim=0).values.double()
    return nu, rho, w_max
