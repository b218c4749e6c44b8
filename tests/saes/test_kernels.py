"""The fast top-k path against its definition: gradchecks of the custom autograd function and the sparse decoder,
and forward/gradient equality with a plain dense implementation."""

from __future__ import annotations

import pytest
import torch

from saelab.saes import kernels, native
from saelab.saes.kernels import (
    default_chunk_rows,
    group_by_latent,
    per_latent_sum,
    selected_dots,
    shared_grouping,
    sparse_decode,
    topk_encode,
    topk_encode_dense,
)

F64 = torch.float64


def _params(d: int = 4, n: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(n, d, generator=g, dtype=F64),
        "b_enc": 0.3 * torch.randn(n, generator=g, dtype=F64),
        "W_dec": torch.randn(n, d, generator=g, dtype=F64),
        "b_dec": 0.5 * torch.randn(d, generator=g, dtype=F64),
    }


def _leaves(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone().requires_grad_() for name, t in tensors.items()}


def test_gradcheck_topk_encode_with_pre_bias() -> None:
    p = _leaves(_params())
    x = torch.randn(7, 4, dtype=F64, requires_grad=True)

    def values(x, w, b, pb):
        return topk_encode(x, w, b, 4, pre_bias=pb, chunk_rows=4).values

    assert torch.autograd.gradcheck(values, (x, p["W_enc"], p["b_enc"], p["b_dec"]))


def test_gradcheck_topk_encode_without_pre_bias() -> None:
    """The deep SAE's sparse layer: no b_dec, and the input gradient flows on to the dense layers below."""
    p = _leaves(_params())
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: topk_encode(x, w, b, 3).values, (x, p["W_enc"], p["b_enc"]))


def test_gradcheck_sparse_decode() -> None:
    w = torch.randn(12, 5, dtype=F64, requires_grad=True)
    values = torch.rand(4, 3, dtype=F64, requires_grad=True)
    indices = torch.tensor([[0, 5, 11], [2, 2, 7], [1, 3, 4], [9, 10, 0]])
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, indices, w), (values, w))


def test_gradcheck_encode_then_decode_sharing_b_dec() -> None:
    """b_dec enters twice (subtracted before encoding, added after decoding); its gradient uses the s·W_enc trick."""
    p = _leaves(_params())
    x = torch.randn(6, 4, dtype=F64)

    def sae(w_enc, b_enc, w_dec, b_dec):
        sel = topk_encode(x, w_enc, b_enc, 3, pre_bias=b_dec, chunk_rows=3)
        return sparse_decode(sel.values, sel.indices, w_dec) + b_dec

    assert torch.autograd.gradcheck(sae, (p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]))


def _loss(x_hat: torch.Tensor, x: torch.Tensor, z_values: torch.Tensor) -> torch.Tensor:
    # reconstruction plus a term on the latent values themselves (like activation decay)
    return (x_hat - x).pow(2).sum() + 0.1 * z_values.pow(2).sum()


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("b_enc_shift", [0.0, -2.5], ids=["mostly_positive", "fewer_than_k_positive"])
def test_fast_path_equals_dense_reference(b_enc_shift: float, dtype: torch.dtype, topk_path: str) -> None:
    """float32 on CPU goes through the native top-k where it is built; float64 always through torch."""
    base = {name: t.to(dtype) for name, t in _params(d=8, n=40, seed=1).items()}
    base["b_enc"] = base["b_enc"] + b_enc_shift
    x = torch.randn(37, 8, dtype=F64, generator=torch.Generator().manual_seed(2)).to(dtype)
    close = {} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5}
    k = 6

    fast, dense = _leaves(base), _leaves(base)
    x_fast, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    sel = topk_encode(x_fast, fast["W_enc"], fast["b_enc"], k, pre_bias=fast["b_dec"], chunk_rows=5)
    x_hat_fast = sparse_decode(sel.values, sel.indices, fast["W_dec"]) + fast["b_dec"]
    _loss(x_hat_fast, x_fast, sel.values).backward()

    z = topk_encode_dense(x_dense, dense["W_enc"], dense["b_enc"], k, pre_bias=dense["b_dec"])
    x_hat_dense = z @ dense["W_dec"] + dense["b_dec"]
    _loss(x_hat_dense, x_dense, z).backward()

    z_fast = torch.zeros_like(z).scatter(-1, sel.indices, sel.values)
    if b_enc_shift:
        assert ((z > 0).sum(-1) < k).any(), "the case under test needs tokens with fewer than k positive latents"
    torch.testing.assert_close(z_fast, z.detach(), **close)
    torch.testing.assert_close(x_hat_fast, x_hat_dense, **close)
    for name in base:
        torch.testing.assert_close(fast[name].grad, dense[name].grad, msg=f"gradient of {name}", **close)
    torch.testing.assert_close(x_fast.grad, x_dense.grad, **close)


def test_topk_on_raw_preactivations_then_clamp_is_relu_then_topk() -> None:
    pre = torch.tensor([[3.0, -1.0, 2.0, -5.0, 0.5], [-1.0, -2.0, 4.0, -0.5, -3.0]])
    w = torch.eye(5)
    sel = topk_encode(pre, w, torch.zeros(5), 3)
    dense = torch.zeros(2, 5).scatter(-1, sel.indices, sel.values)
    assert torch.equal(dense, torch.tensor([[3.0, 0.0, 2.0, 0.0, 0.5], [0.0, 0.0, 4.0, 0.0, 0.0]]))
    assert (sel.values >= 0).all()


def test_clamped_latents_pass_no_gradient() -> None:
    x = torch.tensor([[-1.0, -2.0, 4.0, -0.5]])
    w = torch.eye(4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    sel = topk_encode(x, w, b, 3)
    sel.values.sum().backward()
    assert torch.equal(b.grad, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(w.grad[2], x[0]) and not w.grad[[0, 1, 3]].any()


def test_result_does_not_depend_on_chunking() -> None:
    p = _params(d=5, n=30)
    x = torch.randn(50, 5, dtype=F64)
    whole = topk_encode(x, p["W_enc"], p["b_enc"], 4, pre_bias=p["b_dec"], chunk_rows=50)
    chunks = topk_encode(x, p["W_enc"], p["b_enc"], 4, pre_bias=p["b_dec"], chunk_rows=7)
    order_w, order_c = whole.indices.argsort(-1), chunks.indices.argsort(-1)
    assert torch.equal(whole.indices.gather(-1, order_w), chunks.indices.gather(-1, order_c))
    torch.testing.assert_close(whole.values.gather(-1, order_w), chunks.values.gather(-1, order_c))


def test_under_autocast_the_gemm_runs_in_bfloat16_and_gradients_stay_float32() -> None:
    p = {name: t.float() for name, t in _params(d=16, n=40).items()}
    x = torch.randn(64, 16)
    leaves = _leaves(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = topk_encode(x, leaves["W_enc"], leaves["b_enc"], 3, pre_bias=leaves["b_dec"], chunk_rows=9)
    full = _leaves(p)
    ref = topk_encode(x, full["W_enc"], full["b_enc"], 3, pre_bias=full["b_dec"])
    assert low.values.dtype == torch.float32
    assert torch.equal(low.values, low.values.bfloat16().float())  # bf16 GEMM output, upcast
    order_l, order_r = low.indices.argsort(-1), ref.indices.argsort(-1)
    assert torch.equal(low.indices.gather(-1, order_l), ref.indices.gather(-1, order_r))
    torch.testing.assert_close(low.values.gather(-1, order_l), ref.values.gather(-1, order_r), atol=0.05, rtol=0.02)
    # With the same selection, the sparse backward reads full-precision x and weights: identical gradients.
    upstream = torch.randn(64, 40)  # one weight per (token, latent): the same loss whatever order top-k returns
    (low.values * upstream.gather(-1, low.indices)).sum().backward()
    (ref.values * upstream.gather(-1, ref.indices)).sum().backward()
    for name in ("W_enc", "b_enc", "b_dec"):
        assert leaves[name].grad.dtype == torch.float32
        torch.testing.assert_close(leaves[name].grad, full[name].grad, atol=1e-5, rtol=1e-5)


def _sorted_selection(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = indices.argsort(-1)
    return values.gather(-1, order), indices.gather(-1, order)


@pytest.mark.parametrize("levels", [1, 2], ids=["one_level", "recursive"])
def test_grouped_topk_selects_what_one_topk_does(levels: int, monkeypatch) -> None:
    monkeypatch.setattr(native, "library", lambda: None)  # where the native kernel cannot be built
    k = 4
    n = 4 * k * kernels.TOPK_GROUP ** levels * 3
    stride = n // kernels.TOPK_GROUP  # group g holds latents g, g + stride, ...
    pre = torch.randn(6, n)
    pre[1, 5 : 5 + 4 * stride : stride] = 50.0 + torch.arange(4.0)  # all of the winners in one group
    pre[2, :: n // 12] = 40.0  # one winner in each of many groups
    pre[2, 7] = 45.0
    pre[3, 10:14] = 60.0 + torch.arange(4.0)  # winners in four neighbouring groups
    assert kernels.latent_major(pre.device, n, k) and not kernels.latent_major(pre.device, n + 1, k)
    values, indices = kernels._grouped_topk(pre.t().contiguous(), k)
    ref = pre.topk(k, dim=1)
    assert torch.equal(values.sort(-1).values, ref.values.sort(-1).values)
    got_i, want_i = _sorted_selection(values, indices)[1], _sorted_selection(ref.values, ref.indices)[1]
    assert torch.equal(got_i[[0, 1, 3, 4, 5]], want_i[[0, 1, 3, 4, 5]])  # row 2 has ties among the 40s
    assert torch.equal(pre.gather(1, indices), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_token_major_grouped_topk_selects_what_one_topk_does(dtype) -> None:
    """The GPU's orientation: winners bunched in one group, spread one per group, and in neighbouring groups."""
    k = 5
    n = 4 * k * kernels.TOPK_GROUP * 3
    stride = n // kernels.TOPK_GROUP
    pre = torch.randn(5, n)
    pre[1, 5 : 5 + 5 * stride : stride] = 50.0 + torch.arange(5.0)
    pre[2, 3 :: n // 20] = 40.0 + torch.arange(20.0)
    pre[3, 10:15] = 60.0 + torch.arange(5.0)
    pre = pre.to(dtype)
    values, indices = kernels._grouped_topk_rows(pre, k)
    ref = pre.topk(k, dim=1)
    assert torch.equal(_sorted_selection(values, indices)[1], _sorted_selection(ref.values, ref.indices)[1])
    assert torch.equal(pre.gather(1, indices), values)
    odd = pre[:, :-1]  # not whole groups: one plain top-k
    assert torch.equal(kernels._grouped_topk_rows(odd.contiguous(), k)[0].sort(-1).values,
                       odd.topk(k, dim=1).values.sort(-1).values)


@pytest.mark.parametrize("n", [4 * 3 * kernels.TOPK_GROUP * 5, 4 * 3 * kernels.TOPK_GROUP * 5 + 1],
                         ids=["groupable", "not_groupable"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_wide_fast_path_equals_dense_reference(n: int, dtype: torch.dtype, topk_path: str) -> None:
    p = {name: t.to(dtype) for name, t in _params(d=8, n=n, seed=3).items()}
    x = torch.randn(40, 8, dtype=dtype)
    fast = topk_encode(x, p["W_enc"], p["b_enc"], 3, pre_bias=p["b_dec"], chunk_rows=15)  # chunks of 14, 14, 12
    dense = topk_encode_dense(x, p["W_enc"], p["b_enc"], 3, pre_bias=p["b_dec"])
    close = {} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.zeros_like(dense).scatter(-1, fast.indices, fast.values), dense, **close)


def test_a_nan_pre_activation_goes_to_torch_topk_like_everywhere_else(topk_path: str) -> None:
    w = torch.eye(4)
    x = torch.tensor([[1.0, float("nan"), 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    sel = topk_encode(x, w, torch.zeros(4), 2)
    want = x.topk(2, dim=1)
    assert torch.equal(sel.indices[1].sort().values, want.indices[1].sort().values)
    assert torch.isnan(sel.values[0]).any()  # torch.topk ranks NaN first; the loss then reports it


def test_per_latent_sum_and_selected_dots_match_their_definitions() -> None:
    rows = torch.randn(10, 4, dtype=F64)
    indices = torch.randint(0, 7, (10, 3))  # repeats within a token allowed: each (b, j) counts once
    coefficients = torch.randn(10, 3, dtype=F64)
    expected_sum = torch.zeros(7, 4, dtype=F64).index_add_(
        0, indices.reshape(-1), (coefficients[..., None] * rows[:, None, :]).reshape(-1, 4)
    )
    groups = group_by_latent(indices, 7)
    torch.testing.assert_close(per_latent_sum(rows, groups, coefficients), expected_sum)
    weight = torch.randn(7, 4, dtype=F64)
    torch.testing.assert_close(selected_dots(rows, groups, weight), (weight[indices] * rows[:, None, :]).sum(-1))


def test_the_decoder_backward_in_one_native_pass_is_the_torch_one(monkeypatch) -> None:
    if native.library() is None:
        pytest.skip("no C compiler here: the native kernels cannot be built")
    g = torch.Generator().manual_seed(3)
    values, weight = torch.rand(40, 5, generator=g), torch.randn(30, 37, generator=g)  # d = 37: a partial lane block
    indices = torch.stack([torch.randperm(29, generator=g)[:5] for _ in range(40)])  # latent 29: none
    indices[:, 0] = 0  # one latent in every token: many groups of four pairs
    grad_out = torch.randn(40, 37, generator=g)

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        v, w = values.clone().requires_grad_(), weight.clone().requires_grad_()
        (sparse_decode(v, indices, w) * grad_out).sum().backward()
        return v.grad, w.grad

    calls = []
    monkeypatch.setattr(native, "latent_pass", lambda *a, f=native.latent_pass: calls.append(1) or f(*a))
    fast = grads()
    monkeypatch.setattr(native, "rows_supported", lambda *_: False)
    slow = grads()
    assert calls == [1]
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.equal(fast[1][29], torch.zeros(37))  # a latent no token selected: a zero row, written


def test_selected_dots_ignore_whatever_fresh_buffers_hold(monkeypatch) -> None:
    # sampled_addmm adds beta·values even at beta = 0: a NaN in an uninitialised pattern buffer once leaked into the
    # gradients of random latents (nondeterministically). Poison every fresh buffer to make that visible.
    rows, weight = torch.randn(6, 4), torch.randn(5, 4)
    indices = torch.randint(0, 5, (6, 2))
    groups = group_by_latent(indices, 5)
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *size, **kw: torch.full(*size, float("nan"), **kw))
    torch.testing.assert_close(selected_dots(rows, groups, weight), (weight[indices] * rows[:, None, :]).sum(-1))


def test_sparse_decode_keeps_leading_dims() -> None:
    w = torch.randn(9, 4)
    values, indices = torch.rand(2, 3, 5), torch.randint(0, 9, (2, 3, 5))
    dense = torch.zeros(2, 3, 9).scatter_add(-1, indices, values)
    torch.testing.assert_close(sparse_decode(values, indices, w), dense @ w)


def test_empty_batch() -> None:
    p = _params()
    sel = topk_encode(torch.empty(0, 4, dtype=F64), p["W_enc"], p["b_enc"], 3)
    assert sel.values.shape == (0, 3) and sel.indices.shape == (0, 3)


def test_k_zero_selects_nothing_and_passes_zero_gradients() -> None:
    """AuxK with no dead latents asks for k = 0."""
    p = _leaves(_params())
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    sel = topk_encode(x, p["W_enc"], p["b_enc"], 0, pre_bias=p["b_dec"])
    (sparse_decode(sel.values, sel.indices, p["W_dec"]).sum() + sel.values.sum()).backward()
    assert sel.values.shape == (5, 0)
    assert not x.grad.any() and not p["W_enc"].grad.any() and not p["b_dec"].grad.any()


@pytest.mark.parametrize("shape", [(3, 0), (0, 2)], ids=["no_latents_per_token", "no_tokens"])
def test_sparse_decode_of_nothing_is_zero_with_zero_gradient(shape: tuple[int, int]) -> None:
    weight = torch.randn(5, 4, requires_grad=True)
    values = torch.zeros(shape, requires_grad=True)
    out = sparse_decode(values, torch.zeros(shape, dtype=torch.long), weight)
    out.sum().backward()
    assert out.shape == (shape[0], 4) and not out.any()
    assert not weight.grad.any() and values.grad.shape == shape


@pytest.mark.parametrize(("n_tokens", "rows", "spans"), [
    (4096, 2730, [(0, 2048), (2048, 4096)]), (10, 4, [(0, 4), (4, 8), (8, 10)]), (5, 10, [(0, 5)]), (0, 4, []),
])
def test_chunks_are_equal_and_cover_every_row(n_tokens: int, rows: int, spans: list[tuple[int, int]]) -> None:
    assert kernels.chunk_spans(n_tokens, rows) == spans


def test_default_chunk_rows_bounds_memory_but_not_below_gemm_efficiency() -> None:
    assert default_chunk_rows(24_576, 4) * 24_576 * 4 <= 256 << 20
    assert default_chunk_rows(10**7, 4) == 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    p = _params(d=16, n=64)
    x = torch.randn(40, 16, dtype=F64)
    grads = []
    for device in ("cpu", "cuda"):
        leaves = {k: v.to(device).requires_grad_() for k, v in p.items()}
        sel = topk_encode(x.to(device), leaves["W_enc"], leaves["b_enc"], 5, pre_bias=leaves["b_dec"])
        x_hat = sparse_decode(sel.values, sel.indices, leaves["W_dec"]) + leaves["b_dec"]
        _loss(x_hat, x.to(device), sel.values).backward()
        grads.append({k: v.grad.cpu() for k, v in leaves.items()})
    for name in p:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_workspace_is_reused_grown_and_released() -> None:
    kernels.release_workspace()
    like = torch.empty(0)
    first = kernels.workspace(10, like)
    assert kernels.workspace(6, like).data_ptr() == first.data_ptr()  # same storage, trimmed view
    assert kernels.workspace(6, like).numel() == 6
    assert kernels.workspace(20, like).numel() == 20  # grown
    assert kernels.workspace(4, like.double()).dtype == torch.float64  # one buffer per dtype
    kernels.release_workspace()
    assert "buffers" not in kernels._scratch.__dict__


def test_encoding_twice_through_the_shared_workspace_gives_the_same_selection() -> None:
    p = _params(d=8, n=4 * 3 * kernels.TOPK_GROUP * 5, seed=4)
    x, y = torch.randn(30, 8, dtype=F64), torch.randn(50, 8, dtype=F64)
    first = topk_encode(x, p["W_enc"], p["b_enc"], 3, chunk_rows=7)
    topk_encode(y, p["W_enc"], p["b_enc"], 3, chunk_rows=50)  # overwrites the buffer in between
    again = topk_encode(x, p["W_enc"], p["b_enc"], 3, chunk_rows=7)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.values, again.values)


def test_shared_grouping_reuses_only_the_same_unchanged_selection() -> None:
    kernels.release_workspace()
    indices = torch.tensor([[2, 0], [1, 2], [0, 3]])
    first = shared_grouping(indices, 4)
    for got, want in zip(first, group_by_latent(indices, 4), strict=True):
        assert torch.equal(got, want) if isinstance(got, torch.Tensor) else got == want
    assert shared_grouping(indices.view(3, 2), 4) is first  # a view of the same memory
    assert shared_grouping(indices, 5) is not first  # another dictionary width
    assert shared_grouping(indices.clone(), 4) is not first  # other memory
    again = shared_grouping(indices, 4)
    indices[0, 0] = 3  # an in-place write changes the version
    changed = shared_grouping(indices, 4)
    assert changed is not again and torch.equal(changed.starts, group_by_latent(indices, 4).starts)
    kernels.release_workspace()
    assert "grouping" not in kernels._scratch.__dict__


@pytest.mark.parametrize("by_latent", [True, False])
def test_pre_activations_through_onednn_are_the_fp32_gemm(by_latent: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(70, 48, generator=gen), torch.randn(130, 48, generator=gen)
    buffer = torch.empty(70 * 130)
    out = kernels.pre_activations(x, weight, None, buffer, by_latent)
    want = (weight @ x.t()) if by_latent else (x @ weight.t())
    assert out.shape == want.shape and out.is_contiguous()
    assert torch.allclose(out, want, atol=1e-4)
    if kernels.onednn_fp32():  # held to full precision only: below "highest" torch.mm (and its bound) takes over
        try:
            torch.set_float32_matmul_precision("medium")
            assert not kernels.onednn_fp32()
        finally:
            torch.set_float32_matmul_precision("highest")
