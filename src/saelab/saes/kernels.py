"""The fast top-k path: linear -> top-k -> clamp with a backward that touches only the selected latents.

A top-k training step cannot cost less than one dense encoder GEMM (2·d·n flops per token); everything else here is
arranged so that nothing else costs nearly as much:

- the forward never materialises the [B, n] pre-activations: one [rows, n] buffer serves every chunk of tokens, and
  is kept between calls (`workspace`);
- top-k runs on the raw pre-activations and the k winners are clamped at 0, which selects the same latents with the
  same values as ReLU-then-top-k but skips a dense ReLU pass;
- top-k on CPU reads latent-major pre-activations (`latent_major`): in one pass of a compiled kernel that also adds
  the encoder bias, so the GEMM skips it (`native`), or where that kernel cannot be built, in two exact torch stages
  over group maxima and then the winning groups (`_grouped_topk`);
- the backward is sparse. With g the gradient of the k selected pre-activations of each token, the selection is
  grouped by latent once (a counting sort, `group_by_latent`, shared with the decoder's backward:
  `shared_grouping`) and:
  the encoder weight gradient is a per-latent sum of g·x over the tokens that selected the latent, an
  `embedding_bag` forward with one bag per latent over the token rows (no [B·k, d] temporary); the input gradient
  is an `embedding_bag` gather-sum of encoder rows; the bias gradient is a per-latent sum of g; the pre-bias
  (b_dec) gradient is -(that sum) @ W_enc, one vector-matrix product instead of a per-token input gradient;
- the decoder is an `embedding_bag` gather-sum of W_dec rows; its weight gradient is the same per-latent sum, and
  its value gradient (one dot per selected latent) a CSR-sampled dense product that reads W_dec latent by latent,
  both over one grouping of the selection (on CPU 1.4-2.5x faster than `embedding_bag`'s per-sample-weight
  backward, measured at n = 4k-98k latents). On CPU in fp32 the two are one native pass (`native.latent_pass`)
  that reads each selected row of the output gradient once for both: 6 against 10.5 ms at n = 4,096, 9 against 14
  at 24,576 (4,096 tokens, k = 32, d = 768, 2-core Zen 4; also faster in AVX2-only and SSE2 builds).

Every sum here is taken in a fixed order, so a step is bit-for-bit repeatable at a given thread count: each
`embedding_bag` bag is summed by one thread in order, the grouping is a stable sort, and the per-latent sums of
scalars (the bias gradient, `take_latents`' backward) avoid both indexing's own backward and CUDA's atomic
`index_add_` (`latent_totals`).

Pure torch ops, so it runs on CPU and CUDA alike. Under autocast the encoder GEMM (an `out=` op, which autocast
itself would leave alone) runs in the autocast dtype on low-precision copies of x and the weight; the selected
values come back in the parameters' dtype and the sparse backward reads the full-precision x and weight, so
gradients and parameters stay full precision. Deep and multi-layer SAEs reuse `topk_encode` / `sparse_decode` for
their sparse layer.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes import certified, native

# Pre-activation buffer per chunk of tokens: bounded memory, but chunks under ~1,024 rows make the GEMM slower
# (measured at d = 768, 2 cores: 256 rows 93 GFLOP/s, 1,024 rows 111 at n = 98,304).
DEFAULT_CHUNK_BYTES = 256 << 20
CUDA_CHUNK_BYTES = 2 << 30  # a GPU has the memory, and each chunk costs launches and waits
MIN_CHUNK_ROWS = 1024
TOPK_GROUP = 8  # latents per group of the two-stage top-k (see `_grouped_topk`)
# On a GPU the grouped top-k pays on wide dictionaries (measured faster at 24,576 and 98,304 latents); at 4,096 the
# autocast training row, for which it was the only change, ran 24% slower with it on an H200, so torch.topk stays
# below this width
GPU_GROUPED_FROM = 16_384


_scratch = threading.local()


def workspace(numel: int, like: Tensor, purpose: str = "pre-activations") -> Tensor:
    """A flat scratch buffer of `numel` elements, kept per thread, purpose, device and dtype and grown on demand.
    Every training step asks for the same [rows, n] pre-activation buffer (and under bf16-exact selection the same
    bf16 copy of the weight); keeping one saves its allocation (and, on CPU, re-faulting its pages: 17 against 4 ms
    for the bf16 weight at 24,576 x 768) each step, and peak memory holds one buffer however many passes share it
    (training, evaluation, AuxK). Its contents are garbage between calls; `release_workspace()` frees it."""
    buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = _scratch.__dict__.setdefault("buffers", {})
    key = (purpose, like.device, like.dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # drop the smaller one before allocating the larger
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel]


def release_workspace() -> None:
    """Free this thread's scratch buffers and remembered grouping (e.g. after training, before other memory-hungry
    work)."""
    _scratch.__dict__.pop("buffers", None)
    _scratch.__dict__.pop("grouping", None)


class TopKSelection(NamedTuple):
    """The k selected latents per token: `values` [B, k] (>= 0) at `indices` [B, k] (int64)."""

    values: Tensor
    indices: Tensor


def default_chunk_rows(n_latents: int, itemsize: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(MIN_CHUNK_ROWS, budget_bytes // max(1, n_latents * itemsize))


def topk_encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    *,
    pre_bias: Tensor | None = None,
    chunk_rows: int | None = None,
) -> TopKSelection:
    """Top-k of `(x - pre_bias) @ weight.T + bias` per row of `x` [B, d], values clamped at 0.

    `weight` is [n, d] (row = one latent's encoder direction). Differentiable in x, weight, bias and pre_bias.
    """
    if x.dim() != 2:
        raise ValueError(f"topk_encode expects x of shape [tokens, d_in], got {tuple(x.shape)}")
    budget = CUDA_CHUNK_BYTES if weight.device.type == "cuda" else DEFAULT_CHUNK_BYTES
    rows = chunk_rows or default_chunk_rows(weight.shape[0], weight.element_size(), budget)
    return TopKSelection(*_TopKEncode.apply(x, weight, bias, pre_bias, k, rows))


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """Σ_j values[..., j] · weight[indices[..., j]]: a k-sparse gather-sum whose backward is sparse too.

    Differentiable in values and weight ([n, d_out], row = one latent's atom); any leading dims.
    """
    lead, k = values.shape[:-1], values.shape[-1]
    out = _SparseDecode.apply(values.reshape(lead.numel(), k), indices.reshape(lead.numel(), k), weight)
    return out.reshape(*lead, weight.shape[1])


def topk_encode_dense(x: Tensor, weight: Tensor, bias: Tensor, k: int, pre_bias: Tensor | None = None) -> Tensor:
    """The plain definition the fast path must match: ReLU, keep the k largest per token, dense [..., n]."""
    z = torch.relu(F.linear(x if pre_bias is None else x - pre_bias, weight, bias))
    top = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, top.indices, top.values)


def gemm_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the encoder GEMM runs in: autocast's where it is on for this device, else the tensors' own."""
    if torch.is_autocast_enabled(device.type) and dtype.is_floating_point:
        return torch.get_autocast_dtype(device.type)
    return dtype


def chunk_spans(n_tokens: int, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, stop) of the fewest equal chunks of at most `chunk_rows` rows covering `n_tokens` rows: no sliver
    of a chunk at the end (a GEMM over a few rows wastes most of its cost on packing the weight)."""
    if n_tokens <= 0:
        return []
    n_chunks = -(-n_tokens // max(1, chunk_rows))
    rows = -(-n_tokens // n_chunks)
    return [(start, min(start + rows, n_tokens)) for start in range(0, n_tokens, rows)]


def latent_major(device: torch.device, n_latents: int, k: int) -> bool:
    """Whether the encoder GEMM writes its pre-activations latent-major, [n, rows] = W @ x.T: on CPU, wherever the
    native top-k (`native`) or the grouped one (`_grouped_topk`) reads them. MKL runs that orientation up to 1.3x
    faster on wide dictionaries (measured at d = 768, 1,024-row chunks: n = 98,304 179 vs 140 GFLOP/s; equal at
    n = 4k-25k); the native kernel then streams each latent's row once, and the grouped one's group maxima are an
    elementwise max over contiguous slices. torch's plain top-k wants token-major rows."""
    return device.type == "cpu" and (native.library() is not None or _groupable(n_latents, k))


def _groupable(n_latents: int, k: int) -> bool:
    """Whether a grouped top-k stage pays: whole groups, and the k winning groups' entries at most a quarter of n."""
    return n_latents % TOPK_GROUP == 0 and 4 * k * TOPK_GROUP <= n_latents


def _select_chunked(x_c: Tensor, weight: Tensor, bias: Tensor, k: int, chunk_rows: int) -> TopKSelection:
    """The k best latents of every row: in fp32 on CPU and CUDA the exact selection (`certified`), its filter GEMM in
    bf16 where bf16-exact selection is on; elsewhere (autocast) the top-k of the GEMM's own scores."""
    low = gemm_dtype(x_c.device, weight.dtype)
    if low == weight.dtype == torch.float32 and certified.exact_available(x_c.device):
        bf16 = certified.active(x_c.device)
        buffer = workspace(weight.numel(), weight.new_empty(0, dtype=torch.bfloat16), "bf16 weight") if bf16 else None
        return TopKSelection(*certified.exact_topk(
            x_c, weight, bias, k, torch.bfloat16 if bf16 else torch.float32,
            lambda xs, c, w, b: _approx_topk(xs, w, b, c, chunk_rows, w.dtype, fp32_bias=True), bf16_buffer=buffer))
    values, indices = _approx_topk(x_c, weight, bias, k, chunk_rows, low)
    return TopKSelection(values.clamp_min_(0), indices)


def _approx_topk(x_c: Tensor, weight: Tensor, bias: Tensor, k: int, chunk_rows: int, dtype: torch.dtype,
                 fp32_bias: bool = False) -> tuple[Tensor, Tensor]:
    """(values, indices) [B, k], unsorted and not clamped: the k largest of x_c @ weight.T + bias per row, the GEMM
    in `dtype`, a chunk of rows at a time. A bf16 GEMM's output gets the bias in bf16 (autocast's scores), or with
    `fp32_bias` in fp32 as the native top-k reads it (the exact selection's filter, whose bounds assume that)."""
    n_tokens, n_latents = x_c.shape[0], weight.shape[0]
    x_c, weight = x_c.to(dtype), weight.to(dtype)
    by_latent = latent_major(x_c.device, n_latents, k)
    spans = chunk_spans(n_tokens, chunk_rows)
    # the native top-k adds the bias in fp32 as it reads
    fused_bias = by_latent and native.supports(x_c) and (dtype == torch.float32 or fp32_bias)
    rows = max((stop - start for start, stop in spans), default=0)
    buffer = gemm_buffer(rows, n_latents, x_c, bias_in_gemm=not fused_bias)
    bias_after = fp32_bias and not fused_bias and dtype != torch.float32  # added in fp32 to the low GEMM's output
    values = x_c.new_empty(n_tokens, k, dtype=torch.float32 if fused_bias or bias_after else dtype)
    indices = torch.empty(n_tokens, k, dtype=torch.long, device=x_c.device)
    bias_low = bias.to(dtype)
    for start, stop in spans:
        if bias_after:
            pre = _low_gemm_plus_bias(x_c[start:stop], weight, bias.float(), buffer, by_latent)
        else:
            pre = pre_activations(x_c[start:stop], weight, None if fused_bias else bias_low, buffer, by_latent)
        if fused_bias:
            if native.topk_latent_major(pre, bias, k, values[start:stop], indices[start:stop]):
                continue
            # it declined (a NaN or -inf column): torch.topk decides those, the bias added as the kernel would
            pre = pre.float().add_(bias.unsqueeze(1)) if fp32_bias else pre.add_(bias_low.unsqueeze(1))
        if by_latent:
            values[start:stop], indices[start:stop] = _grouped_topk(pre, k)
        elif pre.device.type == "cuda" and n_latents >= GPU_GROUPED_FROM:
            values[start:stop], indices[start:stop] = _grouped_topk_rows(pre, k)
        else:
            torch.topk(pre, k, dim=1, sorted=False, out=(values[start:stop], indices[start:stop]))
    return values, indices


def _low_gemm_plus_bias(x: Tensor, weight: Tensor, bias: Tensor, buffer: Tensor, by_latent: bool) -> Tensor:
    """x @ weight.T in their low dtype, accumulated in fp32, plus the fp32 bias, as fp32: on CUDA one cuBLAS call
    with an fp32 output (`out_dtype`, where this torch has it), else the low GEMM's output widened and the bias
    added. Either way the bf16 filter's bound holds (at most the two output roundings it allows, the bias in fp32)."""
    if x.device.type == "cuda" and not by_latent:
        try:
            return torch.addmm(bias, x, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without out_dtype
            pass
    pre = pre_activations(x, weight, None, buffer, by_latent).float()
    return pre.add_(bias.unsqueeze(1) if by_latent else bias)


def gemm_buffer(rows: int, n_latents: int, like: Tensor, bias_in_gemm: bool) -> Tensor:
    """The buffer `pre_activations` writes a chunk of `rows` tokens into: the kept workspace, or an empty tensor
    where the GEMM returns its own output (oneDNN fp32 without a bias), so no unused [rows, n] buffer stays in
    memory."""
    if not bias_in_gemm and like.dtype == torch.float32 and like.device.type == "cpu" and onednn_fp32():
        return like.new_empty(0)
    return workspace(rows * n_latents, like)


def pre_activations(x: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor, by_latent: bool) -> Tensor:
    """x @ weight.T (+ bias) for a chunk of tokens, written into the flat `buffer` (or, through oneDNN, a fresh
    tensor: `onednn_fp32`): [n, rows] if `by_latent`, else [rows, n]."""
    rows, n_latents = x.shape[0], weight.shape[0]
    out = buffer[: rows * n_latents]
    a, b, shape = (weight, x.t(), (n_latents, rows)) if by_latent else (x, weight.t(), (rows, n_latents))
    if bias is None and x.dtype == torch.float32 and x.device.type == "cpu" and onednn_fp32():
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    if bias is None:
        return torch.mm(a, b, out=out.view(shape))
    return torch.addmm(bias.unsqueeze(1) if by_latent else bias, a, b, out=out.view(shape))


def onednn_fp32() -> bool:
    """Whether fp32 GEMMs without a bias run through oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`) instead
    of torch.mm (MKL): 10-15% faster on an AVX-512 CPU (2-core Zen 4, 4,096 tokens x 768: 213-216 against 184-194
    GFLOP/s at n = 4,096-24,576). Only on AVX-512 CPUs, where it was measured (elsewhere MKL stays: no machine gets
    slower on an unmeasured path), while fp32 matmuls are held to full precision (oneDNN may otherwise round through
    bf16), and where the op exists and agrees with torch.mm (checked once)."""
    if "avx512f" not in certified.cpu_flags():
        return False
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if getattr(mkldnn_matmul, "fp32_precision", "none") not in ("none", "ieee"):
        return False
    return torch.get_float32_matmul_precision() == "highest" and _onednn_linear_works()


@functools.cache
def _onednn_linear_works() -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 48, generator=gen), torch.randn(40, 48, generator=gen)
        out = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return out.shape == (64, 40) and out.dtype == torch.float32 and bool(torch.allclose(out, a @ b.t(), atol=1e-4))


def _grouped_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [rows, k]: the k largest pre-activations of each token, a column of the latent-major `pre`
    [n, rows], unsorted, in exact stages.

    Split the n latents into groups of TOPK_GROUP: the k largest entries lie in the k groups with the largest maxima
    (a group holding one of them has a maximum at least the k-th largest value, and at most k groups do), so a top-k
    over the group maxima, then one over those groups' k·TOPK_GROUP entries, selects what a top-k over all n does
    (ties aside). Group g is the strided set {g, g + n/TOPK_GROUP, ...}, so the group maxima are an elementwise max
    of TOPK_GROUP contiguous slices, itself a latent-major [n/TOPK_GROUP, rows] matrix: the top-k over it recurses
    while it is wide enough. torch's CPU top-k walks every entry through a heap; against it this is 1.3-2.3x faster
    at n = 4k and up to 4x at 98k (k = 32, measured).
    """
    n, rows = pre.shape
    if not _groupable(n, k):
        return pre.t().contiguous().topk(k, dim=1, sorted=False)
    n_groups = n // TOPK_GROUP
    groups = _grouped_topk(pre.view(TOPK_GROUP, n_groups, rows).amax(0), k)[1]
    members = torch.arange(0, n, n_groups, device=pre.device)
    candidates = (groups.unsqueeze(-1) + members).view(rows, k * TOPK_GROUP)
    best, within = pre.t().gather(1, candidates).topk(k, dim=1, sorted=False)
    return best, candidates.gather(1, within)


def _grouped_topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`_grouped_topk` for token-major `pre` [rows, n] (the GPU's orientation): group g is {g, g + n/TOPK_GROUP, ...},
    its maxima one `amax` over a [rows, TOPK_GROUP, n/TOPK_GROUP] view; then a top-k over the maxima and one over the
    k winning groups' members. The same k entries as `torch.topk` (ties aside), 2-3x faster on an H200 (measured at
    4,096 x 24,576 and x 98,304, k = 41-81: 0.6 vs 1.35 ms and 1.4 vs 4.5 ms)."""
    rows, n = pre.shape
    if not _groupable(n, k):
        return pre.topk(k, dim=1, sorted=False)
    n_groups = n // TOPK_GROUP
    groups = pre.view(rows, TOPK_GROUP, n_groups).amax(1).topk(k, dim=1, sorted=False).indices
    candidates = (groups.unsqueeze(-1) + torch.arange(0, n, n_groups, device=pre.device)).view(rows, k * TOPK_GROUP)
    best, within = pre.gather(1, candidates).topk(k, dim=1, sorted=False)
    return best, candidates.gather(1, within)


def gather_sum(indices: Tensor, weight: Tensor, coefficients: Tensor) -> Tensor:
    """[B, d]: row b = Σ_j coefficients[b, j] · weight[indices[b, j]] (`embedding_bag`, which cannot take k = 0)."""
    if indices.shape[1] == 0:
        return weight.new_zeros(indices.shape[0], weight.shape[1])
    return F.embedding_bag(indices, weight, per_sample_weights=coefficients, mode="sum")


def stable_sort(values: Tensor) -> tuple[Tensor, Tensor]:
    """`torch.sort(values, stable=True)`; on CPU on one thread. The parallel CPU sort gains little at training sizes
    (32k indices: 1.1 ms on 2 threads, 1.5 ms on 1) and collapses when another process shares the cores (164 ms:
    its threads wait on each other's time slices), which made it the largest cost of a step on a busy machine."""
    if values.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.sort(values, stable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.sort(values, stable=True)
    finally:
        torch.set_num_threads(threads)


class LatentGroups(NamedTuple):
    """The selected (token, slot) pairs of a [B, k] index matrix grouped by latent: the CSR layout of the [n, B]
    selection pattern, which both sparse weight gradients and the decoder's value gradient walk latent by latent.

    `order` [B·k]: flat positions of the pairs, latent by latent (token order within a latent); `tokens` [B·k]: the
    token of each pair in that order; `starts` [n + 1]: where each latent's pairs begin; `k`: pairs per token.
    """

    order: Tensor
    tokens: Tensor
    starts: Tensor
    k: int


def group_by_latent(indices: Tensor, n_latents: int) -> LatentGroups:
    k = indices.shape[1]
    if indices.device.type == "cpu" and indices.dtype == torch.long and native.library() is not None:
        return LatentGroups(*native.group_by_latent(indices, n_latents), k)  # a counting sort, the same grouping
    sorted_latents, order = stable_sort(indices.reshape(-1))
    starts = torch.zeros(n_latents + 1, dtype=torch.long, device=indices.device)
    torch.cumsum(torch.bincount(sorted_latents, minlength=n_latents), 0, out=starts[1:])
    return LatentGroups(order, order // max(k, 1), starts, k)


def shared_grouping(indices: Tensor, n_latents: int) -> LatentGroups:
    """`group_by_latent`, remembering this thread's last result: the decoder's backward and then the encoder's group
    the same selection, so the second sort is skipped. The entry holds `indices` itself, so its memory cannot pass
    to another tensor while the entry lives, and an in-place write to it changes its version and misses."""
    key = (indices.device, indices.data_ptr(), indices.shape, indices.stride(), indices._version, n_latents)
    entry = getattr(_scratch, "grouping", None)
    if entry is not None and entry[0] == key:
        return entry[2]
    groups = group_by_latent(indices, n_latents)
    _scratch.grouping = (key, indices, groups)
    return groups


def per_latent_sum(rows: Tensor, groups: LatentGroups, coefficients: Tensor) -> Tensor:
    """[n_latents, d]: row i = Σ over the pairs (b, j) selecting latent i of coefficients[b, j] · rows[b].

    An `embedding_bag` forward with one bag per latent over the token rows: no [B·k, d] temporary, and on CPU 2-4x
    faster than `embedding_bag`'s own weight backward (which sorts the indices again on every call; measured at
    n = 4k-98k latents, d = 768, k = 32).
    """
    weights = coefficients.reshape(-1)[groups.order]
    return F.embedding_bag(groups.tokens, rows.contiguous(), groups.starts[:-1], mode="sum", per_sample_weights=weights)


def latent_totals(indices: Tensor, coefficients: Tensor, n_latents: int) -> Tensor:
    """[n_latents]: entry i = Σ of `coefficients` over the positions where `indices` (same shape, at least 1-D) is i,
    added in the same order on every run.

    Off CUDA this is `index_add_` on a vector, one serial pass (measured the same run to run and at any thread
    count), on CPU 30x faster than a segmented sum; advanced indexing's backward, which would otherwise compute it,
    adds duplicates in an order that changes between runs at 2+ threads. On CUDA `index_add_` accumulates with
    atomics, so there the positions grouped by latent are summed run by run without them (`segmented_totals`).
    """
    if indices.device.type != "cuda":
        return coefficients.new_zeros(n_latents).index_add_(0, indices.reshape(-1), coefficients.reshape(-1))
    return segmented_totals(shared_grouping(indices.reshape(-1, indices.shape[-1]), n_latents), coefficients)


def segmented_totals(groups: LatentGroups, coefficients: Tensor) -> Tensor:
    """`latent_totals` over a grouping: each latent's run of (token-ordered) coefficients reduced on its own."""
    return torch.segment_reduce(coefficients.reshape(-1)[groups.order], "sum", offsets=groups.starts)


def take_latents(per_latent: Tensor, indices: Tensor) -> Tensor:
    """`per_latent[indices]` for a [n_latents] vector (e.g. a per-latent bias or the decoder norms), differentiable in
    `per_latent` with a backward that is the same on every run (`latent_totals`), unlike indexing's own."""
    return _TakeLatents.apply(per_latent, indices)


def selected_dots(rows: Tensor, groups: LatentGroups, weight: Tensor) -> Tensor:
    """[B, k]: <rows[b], weight[indices[b, j]]> for every selected (b, j).

    A CSR-sampled product over the pattern grouped by latent (each weight row read once), put back in token order.
    """
    n_tokens = rows.shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        # Zeros, not uninitialised values: sampled_addmm computes beta·values + A@B even at beta = 0, so a NaN bit
        # pattern in an uninitialised buffer would leak into the gradient of random latents.
        pattern = torch.sparse_csr_tensor(
            groups.starts,
            groups.tokens,
            rows.new_zeros(groups.order.shape),
            (weight.shape[0], n_tokens),
            check_invariants=False,
        )
    dots = torch.sparse.sampled_addmm(pattern, weight, rows.t(), beta=0.0).values()
    return torch.empty_like(dots).index_put_((groups.order,), dots).view(n_tokens, groups.k)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        pre_bias: Tensor | None,
        k: int,
        chunk_rows: int,
    ) -> tuple[Tensor, Tensor]:
        # In the weight's dtype (an input from an autocast layer may be lower): the backward reads it at full precision.
        x_c = (x.contiguous() if pre_bias is None else x - pre_bias).to(weight.dtype)
        values, indices = _select_chunked(x_c, weight, bias, k, chunk_rows)
        values = values.to(weight.dtype)
        ctx.save_for_backward(x_c, weight, indices, values)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _grad_indices: Any) -> tuple[Any, ...]:
        x_c, weight, indices, values = ctx.saved_tensors
        need_x, need_weight, need_bias, need_pre_bias = ctx.needs_input_grad[:4]
        # Clamp gate: a latent clamped to 0 passes no gradient (ReLU semantics).
        grad_pre = grad_values * (values > 0)
        n_latents = weight.shape[0]
        grad_x = grad_weight = grad_bias = grad_pre_bias = None
        if need_x:
            grad_x = gather_sum(indices, weight, grad_pre)
        if need_weight:
            grad_weight = per_latent_sum(x_c, shared_grouping(indices, n_latents), grad_pre)
        if need_bias or need_pre_bias:
            per_latent = latent_totals(indices, grad_pre, n_latents)
            grad_bias = per_latent if need_bias else None
            grad_pre_bias = -(per_latent @ weight) if need_pre_bias else None
        return grad_x, grad_weight, grad_bias, grad_pre_bias, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, weight)
        return gather_sum(indices, weight, values)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        values, indices, weight = ctx.saved_tensors
        need_values, _, need_weight = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        groups = shared_grouping(indices, weight.shape[0])
        if need_values and need_weight and native.rows_supported(grad_out, weight, values):
            # one native pass reads each selected output-gradient row once for both
            grad_values, grad_weight = native.latent_pass(grad_out, groups.order, groups.starts, groups.k, weight,
                                                          values)
            return grad_values, None, grad_weight
        grad_values = selected_dots(grad_out, groups, weight) if need_values else None
        grad_weight = per_latent_sum(grad_out, groups, values) if need_weight else None
        return grad_values, None, grad_weight


class _TakeLatents(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, per_latent: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.n_latents = per_latent.shape[0]
        return per_latent[indices]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        (indices,) = ctx.saved_tensors
        return latent_totals(indices, grad.contiguous(), ctx.n_latents), None
