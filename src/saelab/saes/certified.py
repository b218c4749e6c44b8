"""Exact top-k selection at bf16 speed: the encoder GEMM in bf16, the choice certified equal to the fp32 path's.

Where the hardware multiplies bf16 much faster than fp32 (AVX512-BF16/AMX CPUs, every recent GPU), the top-k's
one dense cost, the encoder GEMM, runs in bf16 and only a few candidates per token are scored in fp32:

1. ŝ = bf16(x) @ bf16(W).T + bf16(b) for a chunk of tokens, and each token's top (k + m + 1) of ŝ: the first k + m
   are its candidates, the last bounds every non-candidate from above (`ŝ_out`);
2. the candidates are rescored in fp32 (s̄ = x · w_j + b_j, one fixed-order dot each) and the k largest kept;
3. the token is *certified* when no latent outside that choice can be in the fp32 path's top-k whatever order its
   GEMM sums in, from rigorous bounds (below); every token that is not certified is recomputed by the fp32 path.

The bounds, with u = 2⁻⁸ (bf16 unit roundoff), u' = u/(1 − u), γ = (d + 1)·2⁻²⁴ (an fp32 dot product of d terms plus
a bias, in any order), and x = x̃ + r_x, w_j = w̃_j + r_j split into their bf16 parts and exact remainders:

- bf16 score vs the exact pre-activation s_j: |ŝ_j − s_j| ≤ ‖x̃‖·ρ + ‖r_x‖·ν + ‖r_x‖·ρ + γ·‖x̃‖·ν + u'·β + β_r
  + u'(2 + u')·|ŝ_j|, with ν = max_j ‖w̃_j‖, ρ = max_j ‖r_j‖, β = max_j |b̃_j|, β_r = max_j |b_j − b̃_j| (input
  rounding by Cauchy-Schwarz, fp32 accumulation, the bias's rounding, and up to two bf16 roundings of the output,
  bounded through the rounded value itself). Monotone in ŝ_j, so at ŝ_out it bounds every non-candidate;
- fp32 vs exact, for the fp32 path's GEMM and the rescoring alike: |g_j − s_j| ≤ γ·(Σ_i |x_i w_j,i| + |b_j|), which
  the rescoring computes per candidate (`slack` = twice that separates any two fp32 evaluations), and bounds by
  γ·(‖x‖·max_j ‖w_j‖ + max_j |b_j|) for non-candidates.

Certified when every kept latent (among the k best rescores, positive) is surely positive and, if all k are kept,
surely above every other candidate and every non-candidate; or, if fewer than k are positive, when every other
latent is surely ≤ 0 (then the fp32 path's positive latents are the same ones). A selection is compared by its
positive latents: the fp32 path clamps the others to 0, where they carry no value and no gradient.

The values are the fp32 rescores: equal to the fp32 path's to within `slack` (its GEMM sums in another order), so a
bf16-exact run trains on the same latents with values that differ from an fp32 run's in the last bits only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

BF16_UNIT = 2.0**-8
FP32_UNIT = 2.0**-24
PRECISIONS = ("fp32", "bf16-exact")
FORCE_ENV = "SAELAB_FORCE_BF16_EXACT"
RESCORE_ROWS = 256  # tokens whose candidates are gathered at once in the rescoring (bounded temporary memory)

_state = threading.local()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_gemm_available(device: torch.device) -> bool:
    """Whether this device multiplies bf16 faster than fp32: CUDA with bf16 support, or a CPU with AVX512-BF16 or
    AMX-BF16. Elsewhere bf16 GEMMs are emulated and slower than fp32 (5x on an AVX2 Zen 3), so bf16-exact selection
    runs the fp32 path there."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


@dataclasses.dataclass
class CertificationStats:
    """Tokens selected on the bf16 path by this thread so far, and how many of them were certified (callers take
    differences)."""

    tokens: int = 0
    certified: int = 0


def stats() -> CertificationStats:
    """This thread's counters (shared by every bf16-exact selection it runs)."""
    return _state.__dict__.setdefault("stats", CertificationStats())


@contextlib.contextmanager
def counted() -> Iterator[CertificationStats]:
    """The tokens this thread selects on the bf16 path inside the block, and how many were certified (filled in
    when the block exits; `tokens` stays 0 where the fp32 path ran)."""
    before = dataclasses.replace(stats())
    block = CertificationStats()
    try:
        yield block
    finally:
        block.tokens, block.certified = stats().tokens - before.tokens, stats().certified - before.certified


@contextlib.contextmanager
def selection_precision(precision: str, force: bool | None = None) -> Iterator[None]:
    """Run the top-k selections of this thread in `precision` ("fp32" or "bf16-exact"). bf16-exact falls back to
    fp32 on devices without fast bf16 (`bf16_gemm_available`) unless `force` (default: the environment variable
    SAELAB_FORCE_BF16_EXACT=1), for tests and benchmarks on such machines: the same result, slower."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown selection precision {precision!r}; use one of {list(PRECISIONS)}")
    before = getattr(_state, "mode", None)
    _state.mode = (precision, os.environ.get(FORCE_ENV) == "1" if force is None else force)
    try:
        yield
    finally:
        _state.mode = before


def active(device: torch.device) -> bool:
    """Whether selections on `device` run the certified bf16 path now."""
    mode = getattr(_state, "mode", None)
    if mode is None or mode[0] != "bf16-exact":
        return False
    return mode[1] or bf16_gemm_available(device)


Fp32Select = Callable[[Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
def certified_topk(x: Tensor, weight: Tensor, bias: Tensor, k: int, spans: list[tuple[int, int]],
                   fp32_select: Fp32Select, extra: int | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) [B, k] of the top-k of x @ weight.T + bias per row, values clamped at 0, with the same
    positive latents as `fp32_select` (the fp32 path on a block of rows) would give; see the module docstring.
    `extra` (m) candidates beyond k per token: k by default."""
    n_tokens, n_latents = x.shape[0], weight.shape[0]
    m = k if extra is None else extra
    c = min(n_latents, k + m)
    w16, b16 = weight.to(torch.bfloat16), bias.to(torch.bfloat16)
    w16f = w16.float()
    nu = w16f.norm(dim=1).max()
    rho = (weight - w16f).norm(dim=1).max()
    beta, beta_r = b16.float().abs().max(), (bias - b16.float()).abs().max()
    w_max, b_max = weight.norm(dim=1).max(), bias.abs().max()
    d = x.shape[1]
    gamma = (d + 1) * FP32_UNIT
    u1 = BF16_UNIT / (1 - BF16_UNIT)  # |fl(z) - z| <= u1·|fl(z)| for a bf16 rounding to nearest

    values = x.new_empty(n_tokens, k)
    indices = torch.empty(n_tokens, k, dtype=torch.long, device=x.device)
    certified = torch.zeros(n_tokens, dtype=torch.bool, device=x.device)
    for start, stop in spans:
        xs = x[start:stop]
        x16 = xs.to(torch.bfloat16)
        x16f = x16.float()
        xn, rn = x16f.norm(dim=1), (xs - x16f).norm(dim=1)
        big_e = xn * rho + rn * nu + rn * rho + gamma * xn * nu + u1 * beta + beta_r  # + u1(2 + u1)|ŝ_out|, below
        small_e = gamma * (xs.norm(dim=1) * w_max + b_max)

        approx = torch.addmm(b16, x16, w16.t())  # [rows, n] bf16
        top = approx.topk(min(n_latents, c + 1), dim=1, sorted=False)
        if c < n_latents:
            # the best excluded: the smallest of the c + 1 leaders; the c others are the candidates
            leaders = top.values.float()
            last = leaders.argmin(dim=1, keepdim=True)
            out_bound = leaders.gather(1, last).squeeze(1)
            keep = torch.ones_like(top.indices, dtype=torch.bool).scatter_(1, last, False)
            cand = top.indices[keep].view(-1, c)
        else:
            out_bound = torch.full((stop - start,), float("-inf"), device=x.device)
            cand = top.indices
        scores, scale = _rescore(xs, weight, bias, cand)
        best = scores.topk(k, dim=1, sorted=False)
        slack = 2 * gamma * scale  # |any fp32 evaluation − the rescore|, per candidate
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best.indices, True) & (scores > 0)
        floor = torch.where(kept, scores - slack, torch.full_like(scores, float("inf"))).min(dim=1).values
        others = torch.where(kept, torch.full_like(scores, float("-inf")), scores + slack).max(dim=1).values
        # every latent outside the candidates: its fp32 score is at most ŝ_out plus the bf16 and fp32 errors
        outside = out_bound + u1 * (2 + u1) * out_bound.abs() + big_e + small_e if c < n_latents else out_bound
        ceiling = torch.maximum(others, outside)
        full = kept.sum(dim=1) == k
        ok = (floor > 0) & torch.where(full, floor > ceiling, ceiling <= 0)
        certified[start:stop] = ok
        values[start:stop] = best.values
        indices[start:stop] = cand.gather(1, best.indices)

    redo = (~certified).nonzero().squeeze(1)
    if redo.numel():
        v, i = fp32_select(redo)
        values[redo], indices[redo] = v, i
    counters = stats()
    counters.tokens += n_tokens
    counters.certified += int(certified.sum())
    return values.clamp_min_(0), indices


def _rescore(x: Tensor, weight: Tensor, bias: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
    """[rows, c] twice: x[b] · w_j + b_j for j = cand[b, :] in fp32, and Σ_i |x[b, i]·w_j,i| + |b_j| (the scale of
    that dot product's rounding error), a bounded number of rows at a time."""
    out, scale = x.new_empty(cand.shape), x.new_empty(cand.shape)
    for lo in range(0, x.shape[0], RESCORE_ROWS):
        hi = min(lo + RESCORE_ROWS, x.shape[0])
        rows, b = weight[cand[lo:hi]], bias[cand[lo:hi]]  # [r, c, d], [r, c]
        xs = x[lo:hi].unsqueeze(2)
        out[lo:hi] = torch.bmm(rows, xs).squeeze(2) + b
        scale[lo:hi] = torch.bmm(rows.abs_(), xs.abs()).squeeze(2) + b.abs()
    return out, scale
