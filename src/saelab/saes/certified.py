"""Exact top-k selection, found cheaply: what every fp32 top-k selection on CPU and CUDA means, and how bf16 runs it.

The selection is defined exactly: the k latents with the largest *exact scores* R_j = x · w_j + b_j, each an fp32
dot product summed in one fixed order that depends only on the two vectors (`native.rescore_topk`; on CUDA the same
bits from torch ops, `exact_scores`, so a CUDA selection is the CPU's), ties to the
lower latent, values clamped at 0. An fp32 GEMM cannot define it: its rounding depends on the batch, the blocking
and the thread count, and at training sizes the k-th and (k+1)-th scores of a token are closer than that rounding
can move them in about a third of tokens, so "the fp32 top-k" would otherwise be a matter of summation order.

Finding it costs one dense filter GEMM and a few exact dot products per token:

1. a filter score a_j for every latent (the encoder GEMM, in fp32 or, where the hardware multiplies bf16 much
   faster, in bf16), and each token's top (c + 1) of it: the first c = k + m are its candidates, the last, a_out,
   bounds every other latent's filter score from above;
2. the candidates' exact scores, and the k best of them (values, indices, and the k-th best R_k);
3. the token is *certified* when no latent outside the candidates can score above R_k (or, if R_k <= 0, above 0):
   R_j <= a_out + e_a + e_R for every non-candidate, with rigorous bounds e_a on |a_j - s_j| and e_R on |R_j - s_j|
   (s_j the real-number score). Tokens that are not certified are scored exactly against every latent.

The bounds, with u = 2^-24, γ = (d + 2)·u, u16 = 2^-8/(1 - 2^-8) (bf16 rounding, relative to the rounded value):

- e_R = γ·(‖x‖·max_j ‖w_j‖ + max_j |b_j|) (a dot product of d terms plus a bias, in any order);
- fp32 filter: e_a = e_R + u·|a_out| (the bias added to the GEMM's output once more);
- bf16 filter (x = x̃ + r_x and w_j = w̃_j + r_j split into their bf16 parts and exact remainders, the GEMM
  accumulating exact products in fp32 and rounding its output to bf16 up to twice, the bias added in fp32):
  e_a = ‖x̃‖·ρ + ‖r_x‖·ν + ‖r_x‖·ρ + γ·‖x̃‖·ν + u16·(2 + u16)·(|a_out| + β)·(1 + u) + u·|a_out|, with
  ν = max_j ‖w̃_j‖, ρ = max_j ‖r_j‖, β = max_j |b_j|;
- both: plus d·2^-126·(1 + ‖x‖ + max_j ‖w_j‖) for products flushed to zero.

Each bound is monotone in a_j, so a_out's bounds every non-candidate. The norms are maxima over rows, so training,
which lengthens a few encoder rows well beyond the rest, would loosen every token's bound; once the longest row is
clearly longer than the rest, the few longest rows are candidates of every token, the filter ranks only the others,
and the norms are the others' maxima (`_long_rows`). The bounds are computed from fp32 norms (the
weight's in the same pass that rounds it to bf16: `native.bf16_split`), inflated by 2^-10 (far more than that
arithmetic's own rounding) and compared in float64. Where torch's fp32 matmul precision is
set below "highest" (an fp32 GEMM may then round through bf16), the fp32 filter gets the bf16 bound. The fp32 filter
needs few extra candidates (its error is ~10^-3 of a score's spread: m = 8, k/4 for large k); the bf16 one m = k,
1.5k on wide dictionaries or inputs (`default_extra`). Both paths give the same latents and the same values, bit
for bit: the values are the exact scores. On CPU the exact scores need the native kernels (`native`); without
them, and on devices other than CPU and CUDA, selections keep the plain fp32 GEMM's top-k and bf16-exact runs fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import types
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from saelab.saes import exact_scores, native

BF16_UNIT = 2.0**-8
FP32_UNIT = 2.0**-24
PRECISIONS = ("auto", "fp32", "bf16-exact")
FORCE_ENV = "SAELAB_FORCE_BF16_EXACT"
# Candidates beyond k per token (m), chosen for speed only: any m gives the same selection. The gap a token needs
# between its k-th exact score and its (k + m + 1)-th filter score grows with k (the k-th score sits among more
# neighbours) and, for the bf16 filter, with sqrt(d) (its error is a sum over d products). Measured on random rows,
# 4,096 tokens: the fp32 filter with m = 8 certifies all at d = 768, k = 32, but only 37% at d = 3,456, k = 128 (the
# rest were scored against every latent, 6 s per 2,048 tokens), and 100% with m = k/4 = 32. The bf16 filter with
# m = k: 0.9985 at n = 24,576, d = 768, where 1.5k is no faster, and 0.988 at n = 98,304, where 1.5k certifies all;
# at d = 3,456, k = 128 only 0.57 with m = k, and all with 1.5k (1.6 s against fp32's 2.1 s per 2,048 tokens).
FP32_EXTRA = 8  # the fp32 filter's m for k up to 32; k/4 above
WIDE_DICTIONARY = 1 << 15  # from this many latents, or from WIDE_INPUT dimensions, the bf16 filter's m is 1.5k
WIDE_INPUT = 1536
GROW_BELOW, SHRINK_FROM = 0.9, 0.995  # certified fractions at which m doubles or shrinks (`_learn_extra`)
# The longest encoder rows, once training has spread the norms (`_long_rows`): always candidates, so the bound of the
# others uses the others' norms. On the multi-layer full run's final SAE (d = 3,456, k = 128, n = 24,576; row norms
# median 0.80, p99 1.20, max 2.95), 1,024 real tokens with m = 1.5k: certified 0.51 without, 0.97 with the 16
# longest rows (0.94 took m = 6k without).
LONG_ROWS_PER, LONG_ROWS_MIN, LONG_ROW_RATIO = 1024, 4, 1.1
MAX_EXTRA_PER_K = 8
LEARN_MIN_TOKENS = 256  # smaller batches (e.g. the fp32 filter's retries) do not move m
FLUSHED = 2.0**-126  # below this, a bf16 GEMM may flush a product to zero
SAFETY = 2.0**-10  # the bounds are computed in fp32 (norms to ~(d + 1)·2^-24 relative): inflated by this margin

_state = threading.local()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo), empty where they cannot be read."""
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
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
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
    """Run the top-k selections of this thread in `precision`: "fp32", "bf16-exact", or "auto" (bf16-exact on a CPU
    with fast bf16, fp32 elsewhere: `auto_bf16`). bf16-exact falls back to fp32 on devices without fast bf16
    (`bf16_gemm_available`) unless `force` (default: the environment variable SAELAB_FORCE_BF16_EXACT=1), for tests
    and benchmarks on such machines: the same result, slower. Every choice selects the same latents and values."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown selection precision {precision!r}; use one of {list(PRECISIONS)}")
    before = getattr(_state, "mode", None)
    _state.mode = (precision, os.environ.get(FORCE_ENV) == "1" if force is None else force)
    try:
        yield
    finally:
        _state.mode = before


def exact_available(device: torch.device) -> bool:
    """Whether fp32 selections on `device` are exact selections: on CPU with the native kernels built, and on CUDA
    (the same scores in torch ops, `exact_scores`)."""
    return device.type == "cuda" or (device.type == "cpu" and native.library() is not None)


def _kernels(device: torch.device) -> types.ModuleType:
    """What computes the exact scores and the bf16 split on `device`: the native kernels on CPU, torch ops on CUDA
    (the same scores, bit for bit)."""
    return native if device.type == "cpu" else exact_scores


def auto_bf16(device: torch.device) -> bool:
    """Whether "auto" runs bf16-exact on `device`: on CPUs with bf16 GEMM hardware, where it was measured faster at
    every dictionary width (2-core Zen 4 with AVX512-BF16, 4,096 tokens, k = 32: 1.5x the fp32 step at 4,096 latents,
    1.7x at 24,576 and 98,304). Not on CUDA, where its certification's extra kernels made the step slower at 4,096
    latents (H200: 0.44 against 0.47 of sparsify's speed), so there "auto" keeps fp32."""
    return device.type == "cpu" and bf16_gemm_available(device)


def active(device: torch.device) -> bool:
    """Whether selections on `device` run their filter GEMM in bf16 now."""
    mode = getattr(_state, "mode", None)
    if mode is None or mode[0] == "fp32" or not exact_available(device):
        return False
    if mode[0] == "auto":
        return auto_bf16(device)
    return mode[1] or bf16_gemm_available(device)


ApproxTopk = Callable[[Tensor, int, Tensor, Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
def exact_topk(x: Tensor, weight: Tensor, bias: Tensor, k: int, filter_dtype: torch.dtype,
               approx_topk: ApproxTopk, extra: int | None = None,
               bf16_buffer: Tensor | None = None, row_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) [B, k]: the exact selection of every row of x (see the module docstring), values clamped at
    0. `approx_topk(x, c, w, b)` gives each row's c largest filter scores and their latents (unsorted) from a GEMM
    with `w`, the weight in the filter's dtype, plus the bias `b`; the filter runs in `filter_dtype` (float32 or
    bfloat16), `extra` (m) candidates beyond k (default: `default_extra`, then as `_learn_extra` adapts it). The
    longest rows may join every token's candidates (`_long_rows`). The bf16 filter's weight is
    written into `bf16_buffer` (a flat bfloat16 tensor of at least n·d elements, e.g. a kept workspace) or a fresh
    one. Tokens the bf16 filter cannot certify go through the fp32 one, and those the fp32 one cannot (exact ties,
    NaN) are scored against every latent. `row_norms` ([n, 3] float64, as `bf16_split` writes them for this weight)
    spares the fp32 filter that pass over the weight: the bf16 filter hands its own to its retry."""
    x, weight, bias = x.detach().float(), weight.detach(), bias.detach()
    kernels = _kernels(x.device)
    n_latents, d = weight.shape
    low = filter_dtype == torch.bfloat16
    learned = (n_latents, d, k, low)
    m = extra if extra is not None else _learned_extra().get(learned, default_extra(k, n_latents, d, low))
    c = k + m
    if c + 1 > n_latents:  # the candidates would be every latent: score them all
        values, indices, _ = kernels.rescore_topk(x, weight, bias, None, k)
        _count(low, x.shape[0], x.shape[0])
        return values.clamp_min_(0), indices
    # one pass over the weight: the bf16 filter's operand and the norms either bound needs
    w16 = None
    if low:
        w16 = (weight.new_empty(weight.numel(), dtype=torch.bfloat16) if bf16_buffer is None
               else bf16_buffer[: weight.numel()]).view(n_latents, d)
    if w16 is None and row_norms is not None:
        rows = row_norms
        norms = WeightNorms(*rows.amax(dim=0).sqrt())
    else:
        rows = torch.empty(n_latents, 3, dtype=torch.float64, device=weight.device)  # each row's squared norms
        norms = WeightNorms(*kernels.bf16_split(weight, w16, rows))
    long_rows, filter_bias = _long_rows(rows[:, 2], c, n_latents), bias
    if long_rows is not None:  # always candidates; the bound covers the other rows, with their own norms
        norms = WeightNorms(*rows.index_fill(0, long_rows, 0.0).amax(dim=0).sqrt())  # no mask: no wait on a GPU
        filter_bias = bias.index_fill(0, long_rows, float("-inf"))  # the filter ranks the others only
    approx, leaders = approx_topk(x, c + 1, weight if w16 is None else w16, filter_bias)
    last = approx.argmin(dim=1, keepdim=True)
    a_out = approx.gather(1, last).squeeze(1)
    # the other c, in any order (the rescoring's result does not depend on it): the last column moved into a_out's
    candidates = leaders.scatter(1, last, leaders[:, -1:])[:, :c]
    if long_rows is not None:
        candidates = torch.cat([candidates, long_rows.expand(x.shape[0], -1)], dim=1)
    values, indices, kth = kernels.rescore_topk(x, weight, bias, candidates, k)
    # a matmul precision below "highest" lets an fp32 GEMM round through bf16 or tf32: bound it like bf16
    reduced = low or torch.get_float32_matmul_precision() != "highest"
    ceiling = a_out.double() + _filter_error(x, bias, a_out, norms, reduced) * (1 + SAFETY)
    certified = torch.where(kth > 0, kth.double() > ceiling, ceiling <= 0)
    redo = (~certified).nonzero().squeeze(1)
    _count(low, x.shape[0], x.shape[0] - redo.numel())
    if extra is None:
        _learn_extra(learned, m, x.shape[0] - redo.numel(), x.shape[0])
    if redo.numel() and low:
        values[redo], indices[redo] = exact_topk(x[redo], weight, bias, k, torch.float32, approx_topk,
                                                 row_norms=rows)
    elif redo.numel():
        values[redo], indices[redo], _ = kernels.rescore_topk(x[redo], weight, bias, None, k)
    return values.clamp_min_(0), indices


def _long_rows(squared_norms: Tensor, c: int, n_latents: int) -> Tensor | None:
    """The q = max(LONG_ROWS_MIN, n / LONG_ROWS_PER) longest encoder rows, when the longest is more than
    LONG_ROW_RATIO times the (q + 1)-th (else None: no tail worth separating, as at initialisation)."""
    q = max(LONG_ROWS_MIN, n_latents // LONG_ROWS_PER)
    if c + q + 1 > n_latents:
        return None
    top = squared_norms.topk(q + 1)
    if not bool(top.values[0] > LONG_ROW_RATIO**2 * top.values[q]):  # NaN: no
        return None
    return top.indices[:q]


def default_extra(k: int, n_latents: int, d: int, low: bool) -> int:
    """m, the candidates beyond k a filter keeps per token at first (see FP32_EXTRA; `_learn_extra` adapts it): a
    speed setting, never a result one."""
    if not low:
        return max(FP32_EXTRA, k // 4)
    return k if n_latents < WIDE_DICTIONARY and d < WIDE_INPUT else (3 * k + 1) // 2


def _learned_extra() -> dict[tuple[int, int, int, bool], int]:
    """This thread's m per (latents, d, k, bf16 filter), as `_learn_extra` has adapted it."""
    return _state.__dict__.setdefault("extra", {})


def _learn_extra(key: tuple[int, int, int, bool], m: int, certified: int, tokens: int) -> None:
    """Adapt m to the weights as training changes them (`certified` of the `tokens` just selected): double it while
    fewer than GROW_BELOW of a batch's tokens are certified (up to MAX_EXTRA_PER_K·k and a quarter of the latents),
    shrink it by a third once nearly all are. Training spreads the encoder rows' norms, and the bounds use the
    largest: on a multi-layer SAE (d = 3,456, k = 128, n = 24,576) after 200 steps the bf16 filter certified 0.41 of
    real tokens with m = 1.5k, 0.91 with 3k and 0.97 with 6k; an uncertified token costs an fp32 GEMM row, a
    candidate an exact dot."""
    n_latents, d, k, low = key
    if tokens < LEARN_MIN_TOKENS:  # too few to judge (and none at all on an empty batch)
        return
    if certified < GROW_BELOW * tokens:
        grown = min(2 * m, MAX_EXTRA_PER_K * k, n_latents // 4 - k - 1)
        if grown > m:
            _learned_extra()[key] = grown
    elif certified >= SHRINK_FROM * tokens:
        _learned_extra()[key] = max(m * 2 // 3, default_extra(k, n_latents, d, low))


def _count(low: bool, tokens: int, certified: int) -> None:
    if low:
        counters = stats()
        counters.tokens += tokens
        counters.certified += certified


class WeightNorms(NamedTuple):
    """The weight's norms the bounds need (module docstring): ν = max_j ‖w̃_j‖, ρ = max_j ‖w_j - w̃_j‖ (w̃ its bf16
    rounding) and max_j ‖w_j‖ (floats from the native kernel, float64 scalars on the device from `exact_scores`)."""

    nu: float | Tensor
    rho: float | Tensor
    w_max: float | Tensor


def _filter_error(x: Tensor, bias: Tensor, a_out: Tensor, norms: WeightNorms, low: bool) -> Tensor:
    """[B] float64: e_a + e_R at a_out, the most a non-candidate's exact score can exceed a_out (module docstring)."""
    d = x.shape[1]
    gamma = (d + 2) * FP32_UNIT
    nu, rho, w_max = norms
    b_max = bias.abs().max().double()  # a device scalar: no wait for the device
    x_norm = x.norm(dim=1).double()
    a = a_out.double().abs()
    e_r = gamma * (x_norm * w_max + b_max)
    flushed = d * FLUSHED * (1 + x_norm + w_max)  # a norm bounds every element
    if not low:
        return 2 * e_r + FP32_UNIT * a + flushed
    u16 = BF16_UNIT / (1 - BF16_UNIT)
    x16 = x.to(torch.bfloat16).float()
    xn = x16.norm(dim=1).double()
    rn = x16.sub_(x).norm(dim=1).double()
    e_a = (xn * rho + rn * nu + rn * rho + gamma * xn * nu + u16 * (2 + u16) * (a + b_max) * (1 + FP32_UNIT)
           + FP32_UNIT * a)
    return e_a + e_r + flushed
