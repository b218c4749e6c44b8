"""The exact scores in torch ops (what CUDA selections use) are the native kernel's, bit for bit: candidates and
every latent, ragged widths, ties, zeros and NaN; the bf16 split gives torch's rounding and the bound's norms;
and the whole exact selection run the CUDA way (torch kernels, a token-major filter, the bias added after a bf16
GEMM) selects what the CPU way does. On a machine with CUDA, the CUDA selection is compared with the CPU's."""

from __future__ import annotations

import pytest
import torch

from saelab.saes import certified, exact_scores, kernels, native
from saelab.saes.kernels import topk_encode

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the reference is the native kernel")


def _problem(seed: int, rows: int, n: int, d: int, c: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    weight, bias = torch.randn(n, d, generator=gen) / 8, torch.randn(n, generator=gen) / 10
    cand = torch.stack([torch.randperm(n, generator=gen)[:c] for _ in range(rows)])
    return x, weight, bias, cand


@needs_native
@pytest.mark.parametrize(("rows", "n", "d", "c", "k"), [(300, 2000, 64, 40, 32), (257, 3001, 771, 70, 32),
                                                        (64, 512, 3, 20, 5), (33, 1024, 17, 1024, 8)])
def test_the_torch_scores_are_the_native_ones_bit_for_bit(rows, n, d, c, k):
    """Widths below, at and off a multiple of the 16 lanes; candidates and every latent."""
    x, weight, bias, cand = _problem(rows + d, rows, n, d, c)
    for got, want in zip(exact_scores.rescore_topk(x, weight, bias, cand, k),
                         native.rescore_topk(x, weight, bias, cand, k), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(exact_scores.rescore_topk(x[:9], weight, bias, None, k),
                         native.rescore_topk(x[:9], weight, bias, None, k), strict=True):
        assert torch.equal(got, want)


@needs_native
def test_ties_zeros_and_nan_are_ranked_as_the_native_kernel_ranks_them():
    """Latents 3 and 7 share a row (exact ties go to the lower latent); four zero rows with ±0 biases tie at zero in
    every token's top 8; a NaN input gives NaN values and kth and the indices 0..k-1."""
    x, weight, bias, _ = _problem(5, 40, 64, 24, 8)
    weight[7] = weight[3]
    weight[10:14] = 0.0
    bias[10:14] = torch.tensor([0.0, -0.0, -0.0, 0.0])
    bias[:10], bias[14:] = -50.0, -50.0  # so the four zeros make every token's top 8
    x[4, 1] = float("nan")
    cand = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(r)) for r in range(40)])
    for candidates in (cand, None):
        got = exact_scores.rescore_topk(x, weight, bias, candidates, 8)
        want = native.rescore_topk(x, weight, bias, candidates, 8)
        for g, w in zip(got, want, strict=True):  # bit patterns: the sign of a zero and NaN too
            assert torch.equal(g.view(torch.int32), w.view(torch.int32)) if g.is_floating_point() else torch.equal(g, w)
        assert got[0][4].isnan().all() and torch.equal(got[1][4], torch.arange(8))
        assert all({10, 11, 12, 13} <= set(row) for i, row in enumerate(got[1].tolist()) if i != 4)


def test_a_candidate_outside_the_dictionary_is_refused():
    x, weight, bias = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(10)
    for bad in (10, -1):
        with pytest.raises(IndexError, match="outside"):
            exact_scores.rescore_topk(x, weight, bias, torch.tensor([[0, 1, bad]] * 4), 2)


def test_the_scores_are_the_real_dot_products_to_within_the_fp32_bound():
    """Against float64, each score is within (d + 2)·2^-24·(Σ|x_i w_i| + |b|): true of the torch ops on their own,
    with or without the native kernel."""
    x, weight, bias, cand = _problem(2, 50, 300, 200, 30)
    got = exact_scores.scores(x, weight, bias, cand)
    real = (x.double().unsqueeze(1) * weight.double()[cand]).sum(-1) + bias.double()[cand]
    scale = (x.abs().double().unsqueeze(1) * weight.abs().double()[cand]).sum(-1) + bias.abs().double()[cand]
    assert ((got.double() - real).abs() <= 202 * certified.FP32_UNIT * scale).all()


def test_the_bf16_split_rounds_as_torch_and_bounds_the_norms():
    torch.manual_seed(9)
    weight = torch.randn(300, 101) * torch.logspace(-3, 3, 300).unsqueeze(1)
    out = torch.empty(300 * 101, dtype=torch.bfloat16)
    nu, rho, w_max = exact_scores.bf16_split(weight, out)
    w16 = weight.to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), w16.reshape(-1).view(torch.int16))
    as64 = weight.double()
    expect = (w16.double().norm(dim=1).max(), (as64 - w16.double()).norm(dim=1).max(), as64.norm(dim=1).max())
    for got, want in zip((nu, rho, w_max), expect, strict=True):
        assert abs(got - float(want)) <= 1e-5 * float(want)
    assert exact_scores.bf16_split(weight, None) == (nu, rho, w_max)
    rows = torch.empty(300, 3, dtype=torch.float64)
    exact_scores.bf16_split(weight, None, rows)
    per_row = torch.stack([w16.double().norm(dim=1), (as64 - w16.double()).norm(dim=1), as64.norm(dim=1)], dim=1)
    assert torch.allclose(rows.sqrt(), per_row, rtol=1e-5, atol=0)
    weight[5, 7] = float("nan")
    assert all(v != v for v in exact_scores.bf16_split(weight, None))
    with pytest.raises(ValueError, match="bfloat16"):
        exact_scores.bf16_split(weight, out[:10])


@needs_native
@pytest.mark.parametrize("precision", ["fp32", "bf16-exact"])
def test_the_cuda_way_selects_what_the_cpu_way_does(monkeypatch, precision):
    """The selection with the torch kernels, a token-major filter and torch's top-k (what runs on CUDA), on CPU:
    the same latents and values as the native path, bit for bit, and the filter certifies most tokens."""
    torch.manual_seed(3)
    x = torch.randn(600, 96) * torch.rand(600, 1) * 4
    weight, bias = torch.randn(2048, 96) / 10, torch.randn(2048) / 10
    weight[1] = weight[0]  # exact ties, which no filter certifies
    with torch.no_grad(), certified.selection_precision(precision, force=True):
        want = topk_encode(x, weight, bias, 16)
        monkeypatch.setattr(certified, "_kernels", lambda device: exact_scores)
        monkeypatch.setattr(kernels, "latent_major", lambda device, n, k: False)
        with certified.counted() as selection:
            got = topk_encode(x, weight, bias, 16)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    if precision == "bf16-exact":
        assert selection.tokens == 600 and selection.certified > 0.9 * 600


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16-exact"])
def test_a_cuda_selection_is_the_cpu_selection(precision):
    torch.manual_seed(12)
    x = torch.randn(2048, 768) * torch.rand(2048, 1) * 3
    weight, bias = torch.randn(8192, 768) / 28, torch.randn(8192) / 10
    with torch.no_grad(), certified.selection_precision(precision, force=True):
        want = topk_encode(x, weight, bias, 32)
        got = topk_encode(x.cuda(), weight.cuda(), bias.cuda(), 32)
    assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.values.cpu(), want.values)
