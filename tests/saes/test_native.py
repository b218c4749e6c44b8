import warnings

import pytest
import torch

from saelab.saes import native


@pytest.fixture
def built() -> None:
    if native.library() is None:
        pytest.skip("no C compiler here: the native top-k kernel cannot be built")


def _select(pre: torch.Tensor, bias: torch.Tensor, k: int,
            threads: int | None = None) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """The native top-k of `pre`, run on `threads` threads (default: the current count)."""
    values = torch.full((pre.shape[1], k), float("nan"))
    indices = torch.full((pre.shape[1], k), -1, dtype=torch.long)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return native.topk_latent_major(pre, bias, k, values, indices), values, indices
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(("n", "rows", "k", "threads"), [(50, 37, 5, 1), (1000, 70, 32, 3), (7, 16, 7, 2),
                                                           (300, 5, 1, 4)])
def test_selects_what_torch_topk_does(built, n, rows, k, threads) -> None:
    pre, bias = torch.randn(n, rows), torch.randn(n)
    ok, values, indices = _select(pre, bias, k, threads)
    assert ok
    want = (pre + bias[:, None]).t().topk(k, dim=1)
    assert torch.equal(values.sort(1).values, want.values.sort(1).values)  # the same float32 sums, bit for bit
    assert torch.equal(indices.sort(1).values, want.indices.sort(1).values)
    assert torch.equal((pre + bias[:, None]).t().gather(1, indices), values)


def test_ties_keep_the_largest_values(built) -> None:
    pre = torch.zeros(40, 3)
    pre[[3, 9, 20, 33], 0] = 1.0  # four equal winners for a top-2
    pre[:, 1] = torch.arange(40.0) % 5  # many ties at the top
    ok, values, indices = _select(pre, torch.zeros(40), 2)
    assert ok
    assert torch.equal(values[0], torch.ones(2)) and set(indices[0].tolist()) <= {3, 9, 20, 33}
    assert torch.equal(values[1], torch.full((2,), 4.0))
    assert len(set(indices[1].tolist())) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1500, 9000])  # the two paths: lower-bound thresholds per tile; the head phase (wide)
def test_ties_go_to_the_lower_latent_across_buffer_cuts(built, dtype, threads, n) -> None:
    # Values on a coarse grid: many ties at every threshold, at the lower bounds too. More latents than the kernel
    # streams tile by tile first, more tokens than one tile, and k large enough that every token's buffer is cut back
    # many times.
    gen = torch.Generator().manual_seed(3)
    rows, k = 300, 40
    pre = ((torch.randn(n, rows, generator=gen) * 4).round() / 4).to(dtype)
    bias = (torch.randn(n, generator=gen) * 2).round() / 2
    ok, values, indices = _select(pre, bias, k, threads)
    assert ok
    scores = (pre.float() + bias[:, None]).t()
    # (value descending, latent ascending): a stable descending sort keeps equal values in latent order
    want = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(indices.sort(1).values, want.sort(1).values)
    assert torch.equal(scores.gather(1, indices), values)


@pytest.mark.parametrize("n", [60, 9000])
def test_a_nan_never_enters_but_the_finite_values_are_still_selected(built, n) -> None:
    gen = torch.Generator().manual_seed(4)
    pre = torch.randn(n, 50, generator=gen)
    pre[::3, 5] = float("nan")  # a third of a column; another column NaN in its largest latents
    pre[:, 9] = torch.arange(n, dtype=torch.float32)
    pre[n - 4 :, 9] = float("nan")
    ok, values, indices = _select(pre, torch.zeros(n), 7)
    assert ok
    finite = torch.nan_to_num(pre, nan=float("-inf")).t()
    want = finite.sort(dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(indices.sort(1).values, want.sort(1).values)
    assert not values.isnan().any()


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_declines_a_column_with_too_few_finite_candidates(built, bad) -> None:
    pre = torch.randn(10, 20)
    pre[:, 7] = bad
    pre[0, 7] = 1.0  # one finite candidate for a top-3
    assert not _select(pre, torch.zeros(10), 3)[0]


def test_declines_k_above_n_and_does_nothing_for_k_zero(built) -> None:
    assert not _select(torch.randn(4, 3), torch.zeros(4), 5)[0]
    assert _select(torch.randn(4, 3), torch.zeros(4), 0)[0]


def test_only_float32_on_cpu(built) -> None:
    assert native.supports(torch.empty(2, 2)) and not native.supports(torch.empty(2, 2, dtype=torch.float64))


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def test_builds_once_into_the_user_cache(built, fresh_build) -> None:
    assert native.library() is not None
    (library,) = (fresh_build / "native").glob("topk-*.so")
    stamp = library.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert library.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert list((fresh_build / "native").iterdir()) == [library]  # no temporary files left


def test_switched_off_or_unbuildable_means_the_torch_path(fresh_build, monkeypatch) -> None:
    monkeypatch.setenv("SAELAB_NATIVE", "0")
    assert native.library() is None
    monkeypatch.delenv("SAELAB_NATIVE")
    native.library.cache_clear()
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.library() is None
    assert any("C compiler" in str(w.message) for w in caught)
    assert list((fresh_build / "native").glob("*")) == []  # nothing half-written
    assert not native.topk_latent_major(torch.randn(4, 2), torch.zeros(4), 2, torch.empty(2, 2),
                                        torch.empty(2, 2, dtype=torch.long))


def test_builds_the_source_it_was_imported_with(built, fresh_build, monkeypatch, tmp_path) -> None:
    """The library is built lazily; a source file changed under a running process (an editable install updated
    mid-run) must not be built against the argument lists the process already declared."""
    changed = tmp_path / "changed.c"
    changed.write_text("this is not C")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native.library() is not None
    x, weight, bias = torch.randn(3, 20), torch.randn(10, 20), torch.zeros(10)
    assert native.rescore_topk(x, weight, bias, None, 2)[0].shape == (3, 2)


def test_latent_pass_is_exact_dots_and_fixed_order_sums(built) -> None:
    from saelab.saes.kernels import group_by_latent

    g = torch.Generator().manual_seed(1)
    rows, weight = torch.randn(23, 37, generator=g), torch.randn(11, 37, generator=g)
    indices = torch.randint(0, 10, (23, 6), generator=g)  # latent 10 never selected; repeats within a token count
    coefficients = torch.randn(23, 6, generator=g)
    groups = group_by_latent(indices, 11)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append(native.latent_pass(rows, groups.order, groups.starts, 6, weight, coefficients))
        only_dots = native.latent_pass(rows, groups.order, groups.starts, 6, weight)
        only_sums = native.latent_pass(rows, groups.order, groups.starts, 6, None, coefficients)
    finally:
        torch.set_num_threads(previous)
    (dots, sums), (dots3, sums3) = runs
    assert torch.equal(dots, dots3) and torch.equal(sums, sums3)  # whatever the thread count
    assert torch.equal(only_dots[0], dots) and only_dots[1] is None
    assert torch.equal(only_sums[1], sums) and only_sums[0] is None
    # the dots are the exact scores' fixed-order sums, bit for bit (a zero bias adds nothing)
    exact = native.rescore_topk(rows.repeat_interleave(6, 0), weight, torch.zeros(11), indices.reshape(-1, 1), 1)[0]
    assert torch.equal(dots, exact.view(23, 6))
    want = torch.zeros(11, 37, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), (coefficients[..., None] * rows[:, None, :]).reshape(-1, 37).double())
    torch.testing.assert_close(sums, want.float())
    assert torch.equal(sums[10], torch.zeros(37))  # written, though no token selected it


def test_latent_pass_refuses_what_it_cannot_take(built) -> None:
    order, starts = torch.arange(4), torch.tensor([0, 2, 4])
    with pytest.raises(ValueError, match="float32"):
        native.latent_pass(torch.randn(2, 3, dtype=torch.float64), order, starts, 2, None, torch.randn(2, 2))
    with pytest.raises(ValueError, match="weight must be"):
        native.latent_pass(torch.randn(2, 3), order, starts, 2, torch.randn(5, 3))


def test_grouping_by_latent_is_the_stable_sort(built) -> None:
    g = torch.Generator().manual_seed(2)
    indices = torch.randint(0, 9, (50, 4), generator=g)  # repeats within a token, and latent 9 never selected
    order, tokens, starts = native.group_by_latent(indices, 10)
    latents, want = torch.sort(indices.reshape(-1), stable=True)
    assert torch.equal(order, want) and torch.equal(tokens, want // 4)
    counts = torch.bincount(latents, minlength=10)
    assert torch.equal(starts, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    with pytest.raises(IndexError, match="outside"):
        native.group_by_latent(torch.tensor([[0, 10]]), 10)
