"""Bit-for-bit reproducibility of SAE construction and of the sparse kernels, at the thread count training uses.

The suite runs single-threaded (tests/conftest.py); the kernels' accumulation order only matters with several
threads, so the kernel tests run at two, the default on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from saelab.saes import (
    DeepSAE,
    DeepSAEConfig,
    MultiLayerSAE,
    MultiLayerSAEConfig,
    ReluSAE,
    ReluSAEConfig,
    SparseAutoencoder,
    TopKSAE,
    TopKSAEConfig,
    native,
    seeded,
    sparse_decode,
    topk_encode,
)
from saelab.saes.initialization import init_dictionary
from saelab.saes.kernels import group_by_latent, latent_totals, segmented_totals, take_latents


def bits(t: Tensor) -> Tensor:
    """The tensor's raw bits, so that equality means bit-for-bit (-0.0 != 0.0)."""
    t = t.detach().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@pytest.fixture
def two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def skewed_indices(n_tokens: int, k: int, n_latents: int, seed: int = 0) -> Tensor:
    """[n_tokens, k] distinct latents per token, a few latents chosen by most tokens: the most duplicates per latent,
    where the order of accumulation matters most."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_tokens, n_latents, generator=gen) + 4 * torch.rand(n_latents, generator=gen) ** 8
    return scores.topk(k, dim=1).indices


SAE_BUILDERS: dict[str, Callable[[], SparseAutoencoder]] = {
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=16, n_latents=64, k=4)),
    "relu_tied": lambda: ReluSAE(ReluSAEConfig(d_in=16, n_latents=64, tied=True)),
    "deep_untied": lambda: DeepSAE(DeepSAEConfig(d_in=16, n_latents=64, k=4, encoder_multiples=[2.0],
                                                 tied_init=False)),
    "multilayer": lambda: MultiLayerSAE(MultiLayerSAEConfig(
        d_in=16, n_latents=64, k=4, layers=[0, 3], hookpoints=["resid_post.0", "resid_post.3"], slice_widths=[8, 8],
        layer_scales=[1.0, 1.0], post_act_bias=True)),
}


@pytest.mark.parametrize("architecture", sorted(SAE_BUILDERS))
def test_construction_under_seeded_is_reproducible_and_leaves_the_global_stream_alone(architecture: str) -> None:
    build = SAE_BUILDERS[architecture]
    torch.manual_seed(123)
    with seeded(7):
        first = build()
    after_first = torch.rand(4)  # the caller's stream continues where it was, whatever the block drew
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.rand(1000)  # global state differs now: the seeded block must not depend on it
    with seeded(7):
        second = build()
    with seeded(8):
        other = build()
    assert same_bits(after_first, expected)
    for name, value in first.state_dict().items():
        assert same_bits(value, second.state_dict()[name]), name
    assert any(not torch.equal(v, other.state_dict()[n]) for n, v in first.state_dict().items() if v.ndim == 2)


def test_init_dictionary_draws_from_the_generator_given() -> None:
    def draw(seed: int) -> tuple[Tensor, Tensor]:
        w_enc, w_dec = torch.empty(32, 8), torch.empty(32, 8)
        init_dictionary(w_enc, w_dec, torch.Generator().manual_seed(seed))
        return w_enc, w_dec

    torch.manual_seed(0)
    a = draw(5)
    torch.manual_seed(1)  # the global generator plays no part
    b = draw(5)
    assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
    assert not torch.equal(a[0], draw(6)[0])


def _fast_path_step(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor, k: int) -> list[Tensor]:
    params = [p.detach().clone().requires_grad_() for p in (w_enc, b_enc, b_dec, w_dec)]
    w_e, b_e, b_d, w_d = params
    values, indices = topk_encode(x, w_e, b_e, k, pre_bias=b_d)
    x_hat = sparse_decode(values, indices, w_d) + b_d
    (x_hat - x).pow(2).sum().backward()
    return [values.detach(), indices, x_hat.detach(), *(p.grad for p in params)]


@pytest.mark.parametrize("use_native", [True, False])
def test_fast_path_forward_and_backward_are_bitwise_repeatable(two_threads, monkeypatch, use_native: bool) -> None:
    if use_native and native.library() is None:
        pytest.skip("no C compiler here: the native top-k kernel cannot be built")
    if not use_native:
        monkeypatch.setattr(native, "library", lambda: None)
    gen = torch.Generator().manual_seed(0)
    n, d, k, tokens = 2048, 64, 16, 1024
    w_enc = torch.randn(n, d, generator=gen) / d**0.5
    b_enc, b_dec = 0.1 * torch.randn(n, generator=gen), 0.1 * torch.randn(d, generator=gen)
    w_dec = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    x = torch.randn(tokens, d, generator=gen) + 2 * w_enc[:8].sum(0)  # shared direction: popular latents
    first = _fast_path_step(x, w_enc, b_enc, b_dec, w_dec, k)
    for _ in range(5):
        again = _fast_path_step(x, w_enc, b_enc, b_dec, w_dec, k)
        assert all(same_bits(a, b) for a, b in zip(first, again, strict=True))


def test_take_latents_gradient_is_bitwise_repeatable(two_threads) -> None:
    """Indexing's own backward adds a latent's duplicates in a different order from run to run at 2 threads."""
    n = 4096
    indices = skewed_indices(4096, 32, n)
    upstream = torch.randn(indices.shape, generator=torch.Generator().manual_seed(1))

    def grad() -> Tensor:
        per_latent = torch.rand(n, generator=torch.Generator().manual_seed(2)).requires_grad_()
        (take_latents(per_latent, indices) * upstream).sum().backward()
        return per_latent.grad

    first = grad()
    assert all(same_bits(first, grad()) for _ in range(20))
    exact = torch.zeros(n, dtype=torch.float64).index_put_((indices,), upstream.double(), accumulate=True)
    torch.testing.assert_close(first.double(), exact, rtol=1e-5, atol=1e-4)
    per_latent = torch.rand(n)
    assert same_bits(take_latents(per_latent, indices), per_latent[indices])


def test_latent_totals_and_their_segmented_form_agree_bitwise(two_threads) -> None:
    """The segmented sum (what CUDA runs) adds each latent's terms in token order, as the CPU pass does."""
    n = 1000
    indices = skewed_indices(512, 8, n, seed=3)
    coefficients = torch.randn(indices.shape, generator=torch.Generator().manual_seed(4))
    direct = latent_totals(indices, coefficients, n)
    assert same_bits(direct, segmented_totals(group_by_latent(indices, n), coefficients))
    assert same_bits(direct, latent_totals(indices, coefficients, n))


def test_native_topk_breaks_ties_by_lower_latent_whatever_the_thread_count() -> None:
    if native.library() is None:
        pytest.skip("no C compiler here: the native top-k kernel cannot be built")
    n, rows, k = 300, 48, 8
    pre = torch.randint(0, 4, (n, rows), generator=torch.Generator().manual_seed(0)).float()  # ties everywhere
    bias = torch.zeros(n)
    # The k best under (value descending, latent ascending): a stable sort of the negated values.
    lowest = torch.sort(-pre.t(), dim=1, stable=True).indices[:, :k].sort(1).values
    selections = []
    for threads in (1, 2, 3):
        values = torch.empty(rows, k)
        indices = torch.empty(rows, k, dtype=torch.long)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert native.topk_latent_major(pre, bias, k, values, indices)
        finally:
            torch.set_num_threads(previous)
        selections.append((values, indices))
    assert torch.equal(selections[0][1].sort(1).values, lowest)
    for values, indices in selections[1:]:  # the same set in the same order
        assert same_bits(values, selections[0][0]) and torch.equal(indices, selections[0][1])
