"""Exact selection: every fp32 selection on CPU is the top-k of the fixed-order exact scores, and bf16-exact selection
gives the same latents and the same values bit for bit, on random and real activations; tokens the filter cannot
certify (ties, near-ties) are recomputed, ties go to the lower latent, and training follows the fp32 run exactly.
bf16 is forced on machines without fast bf16 (the same result, slower)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saelab.activations.store import ActivationStore
from saelab.saes import certified, create_sae, load_sae, native
from saelab.saes.kernels import topk_encode
from saelab.training.config import TrainerConfig
from saelab.training.trainer import Trainer

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: exact selection needs the kernels")


def _dense(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], n).scatter(1, indices, values)


def _both(x, weight, bias, k):
    """(fp32 selection, bf16-exact selection, certified fraction) through the public top-k entry point."""
    with torch.no_grad():
        ref = topk_encode(x, weight, bias, k)
        with certified.selection_precision("bf16-exact", force=True), certified.counted() as selection:
            got = topk_encode(x, weight, bias, k)
    assert selection.tokens == x.shape[0]
    return ref, got, selection.certified / selection.tokens


def _definition(x, weight, bias, k):
    """The exact selection by its definition: every latent's exact score, the k best, clamped at 0."""
    values, indices, _ = native.rescore_topk(x, weight, bias, None, k)
    return values.clamp_min(0), indices


def _check_equal(ref, got, x, weight, bias, k):
    n = weight.shape[0]
    assert torch.equal(_dense(*ref, n), _dense(*got, n))  # same latents, same values, bit for bit
    assert torch.equal(_dense(*ref, n), _dense(*_definition(x, weight, bias, k), n))
    # and the exact scores are the real-number scores to within the fp32 bound (d + 2)·2^-24·(Σ|x_i w_i| + |b|)
    exact = (x.double() @ weight.double().t() + bias.double()).gather(1, got.indices)
    scale = (x.abs() @ weight.abs().t() + bias.abs()).gather(1, got.indices)
    kept = got.values > 0
    assert ((got.values.double() - exact).abs()[kept] <= (x.shape[1] + 2) * certified.FP32_UNIT * scale[kept]).all()


@pytest.mark.parametrize("k", [4, 32])
def test_random_activations_select_the_same_latents_and_values(k):
    torch.manual_seed(0)
    x = torch.randn(700, 64) * torch.rand(700, 1) * 5
    weight, bias = torch.randn(1024, 64) / 8, torch.randn(1024) / 10
    ref, got, fraction = _both(x, weight, bias, k)
    _check_equal(ref, got, x, weight, bias, k)
    assert fraction > 0.9


def test_real_activations_select_the_same_latents_and_values(saved_tiny_llama, tmp_path: Path):
    from saelab.cli import main

    model_dir, corpus = saved_tiny_llama()
    assert main(["harvest", "--model", str(model_dir), "--hookpoints", "resid_post.1", "--data.source", str(corpus),
                 "--data.context-length", "16", "--data.n-tokens", "800", "--out-dir", str(tmp_path / "store")]) == 0
    x = ActivationStore(tmp_path / "store").load("resid_post.1", normalize=True)
    torch.manual_seed(3)
    sae = create_sae("topk", d_in=x.shape[1], n_latents=256, k=8)
    sae.initialize_from_batch(x)
    xc = x - sae.b_dec.detach()
    ref, got, fraction = _both(xc, sae.W_enc.detach(), sae.b_enc.detach(), sae.k)
    _check_equal(ref, got, xc, sae.W_enc.detach(), sae.b_enc.detach(), sae.k)
    assert fraction > 0.9


def _ties_and_near_ties() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(1)
    d, n, k = 32, 256, 3
    weight = torch.randn(n, d)
    weight[1] = weight[0]
    weight[2:42] = weight[2] * (1 + 1e-7 * torch.arange(40.0)).unsqueeze(1)
    bias = torch.zeros(n)
    x = torch.randn(400, d)
    x[:150] += 4 * weight[2] / weight[2].norm()
    x[150:300] += torch.rand(150, 1) * 3 * weight[0] / weight[0].norm()
    return x, weight, bias, k


def test_the_fp32_retry_reuses_the_norms_of_the_bf16_pass(monkeypatch):
    """The tokens the bf16 filter leaves uncertified go through the fp32 filter with the row norms the bf16 pass
    already took: one pass over the weight per selection, and the same selection."""
    x, weight, bias, k = _ties_and_near_ties()
    calls = []
    split = native.bf16_split
    monkeypatch.setattr(native, "bf16_split", lambda *args: calls.append(args[1] is not None) or split(*args))
    ref, got, fraction = _both(x, weight, bias, k)
    _check_equal(ref, got, x, weight, bias, k)
    assert fraction < 0.8  # the retry ran
    assert calls == [False, True]  # the fp32 reference's own selection, then the bf16 one; none for the retry


def test_ties_and_near_ties_are_recomputed_and_ties_go_to_the_lower_latent():
    """Latents 0 and 1 share an encoder row (an exact tie for every token); latents 2-41 are latent 2 nudged by
    parts in 10^7 (near-ties no bf16 score can order, more of them than the candidates). Tokens leaning towards
    latent 2 cannot be certified and are recomputed; where only one of latents 0 and 1 fits, it is latent 0."""
    x, weight, bias, k = _ties_and_near_ties()
    ref, got, fraction = _both(x, weight, bias, k)
    _check_equal(ref, got, x, weight, bias, k)
    assert fraction < 0.8  # about 150 tokens lean towards the near-copies
    one_of_them = [row for row in got.indices.tolist() if len({0, 1} & set(row)) == 1]
    assert len(one_of_them) >= 3
    assert all(0 in row for row in one_of_them)


def test_only_positive_latents_are_compared():
    """Fewer than k positive scores: the positive ones are certified, the zeros (clamped) carry nothing."""
    torch.manual_seed(2)
    x = torch.randn(50, 16)
    weight, bias = torch.randn(128, 16), torch.full((128,), -9.0)
    ref, got, fraction = _both(x, weight, bias, 8)
    assert torch.equal(_dense(*ref, 128), _dense(*got, 128))
    assert sum(int((v > 0).sum()) < 8 for v in ref.values) > 40
    assert fraction > 0.5


def test_exact_scores_depend_on_nothing_but_the_two_vectors():
    """A token's score is the same alone, in a batch, among other candidates and on any number of threads."""
    torch.manual_seed(5)
    x, weight, bias = torch.randn(64, 100), torch.randn(300, 100), torch.randn(300)
    full, full_idx, _ = native.rescore_topk(x, weight, bias, None, 300)
    scores = _dense(full, full_idx, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cand = torch.randperm(300)[:50].expand(64, 50).contiguous()
        some, some_idx, kth = native.rescore_topk(x, weight, bias, cand, 7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(some, scores.gather(1, some_idx))
    assert torch.equal(kth, some.min(dim=1).values)
    alone, alone_idx, _ = native.rescore_topk(x[5:6], weight, bias, None, 300)
    assert torch.equal(_dense(alone, alone_idx, 300), scores[5:6])


def test_scores_are_the_same_across_the_kernels_token_blocks():
    """Inputs wider than the kernel's cache block (8 MiB of x) are scored block by block, candidates grouped by latent
    within each block: every score still equals the token's own, alone, and the k-th best is the least kept."""
    torch.manual_seed(8)
    x, weight, bias = torch.randn(1100, 2100), torch.randn(96, 2100), torch.randn(96)
    cand = torch.stack([torch.randperm(96)[:20] for _ in range(1100)])
    some, some_idx, kth = native.rescore_topk(x, weight, bias, cand, 5)
    full, full_idx, _ = native.rescore_topk(x, weight, bias, None, 96)
    scores = _dense(full, full_idx, 96)
    assert torch.equal(some, scores.gather(1, some_idx))
    assert torch.equal(kth, some.min(dim=1).values)
    assert torch.equal(some_idx, some_idx.sort(dim=1).values)  # slots in latent order
    best = scores.gather(1, cand).topk(5, dim=1).values.min(dim=1).values
    assert torch.equal(kth, best)
    for row in (0, 997, 998, 1099):  # either side of the block boundary (998 rows of 2,100 floats), alone
        alone, alone_idx, _ = native.rescore_topk(x[row:row + 1], weight, bias, None, 96)
        assert torch.equal(_dense(alone, alone_idx, 96), scores[row:row + 1])


def test_the_bf16_split_rounds_as_torch_and_bounds_the_norms():
    """One pass gives torch's bf16 rounding (ties to even, infinities, NaN) and the three norms of the bound."""
    torch.manual_seed(9)
    weight = torch.randn(300, 101) * torch.logspace(-3, 3, 300).unsqueeze(1)
    # exact ties between two bf16 values (the dropped half is 0x8000): one rounds down, one up, to the even one
    ties = [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000]
    weight[0, :4] = torch.tensor(ties, dtype=torch.int32).view(torch.float32)
    weight[1, 0] = float("inf")
    out = torch.empty(300 * 101, dtype=torch.bfloat16)
    finite = weight[2:]
    nu, rho, w_max = native.bf16_split(finite, out[: finite.numel()])
    w16 = finite.to(torch.bfloat16)
    assert torch.equal(out[: finite.numel()].view(torch.int16), w16.reshape(-1).view(torch.int16))
    as64 = finite.double()
    expect = (w16.double().norm(dim=1).max(), (as64 - w16.double()).norm(dim=1).max(), as64.norm(dim=1).max())
    for got, want in zip((nu, rho, w_max), expect, strict=True):
        assert abs(got - float(want)) <= 1e-5 * float(want)
    native.bf16_split(weight, out)
    assert torch.equal(out.view(torch.int16), weight.to(torch.bfloat16).reshape(-1).view(torch.int16))
    assert native.bf16_split(finite, None) == (nu, rho, w_max)  # the same norms without the copy
    rows = torch.empty(finite.shape[0], 3, dtype=torch.float64)
    native.bf16_split(finite, None, rows)  # and each row's squared norms
    per_row = torch.stack([w16.double().norm(dim=1), (as64 - w16.double()).norm(dim=1), as64.norm(dim=1)], dim=1)
    assert torch.allclose(rows.sqrt(), per_row, rtol=1e-5, atol=0)
    assert torch.equal(rows.sqrt().amax(dim=0), torch.tensor([nu, rho, w_max], dtype=torch.float64))
    finite[5, 7] = float("nan")
    assert all(v != v for v in native.bf16_split(finite, None))  # a NaN weight: NaN norms, never certified


def test_the_candidate_count_adapts_to_the_weights_and_never_changes_the_selection(monkeypatch):
    """A few encoder rows 3x longer than the rest loosen the bf16 bound (it uses the longest; here with the long-row
    tier off): the first batch is mostly uncertified, the candidate count then grows until nearly all are, and every
    selection is the definition's."""
    monkeypatch.setattr(certified, "LONG_ROW_RATIO", float("inf"))
    torch.manual_seed(11)
    d, n, k = 512, 4096, 16
    weight, bias = torch.randn(n, d) / d**0.5, torch.zeros(n)
    weight[:4] *= 3
    x = torch.randn(1024, d)
    certified._state.__dict__.pop("extra", None)  # this thread starts from the default
    fractions = []
    for _ in range(4):
        with torch.no_grad(), certified.selection_precision("bf16-exact", force=True), certified.counted() as c:
            got = topk_encode(x, weight, bias, k)
        fractions.append(c.certified / c.tokens)
        assert torch.equal(_dense(*got, n), _dense(*_definition(x, weight, bias, k), n))
    assert fractions[0] < 0.7 and max(fractions[1:]) > 0.95
    assert certified._learned_extra()[(n, d, k, True)] > certified.default_extra(k, n, d, True)


@pytest.mark.parametrize("precision", ["fp32", "bf16-exact"])
def test_the_longest_rows_are_every_tokens_candidates_and_the_bound_is_the_others(precision):
    """The same few 3x rows: they are rescored for every token and bound the others no more, so the first batch is
    nearly all certified at the default candidate count, and the selection is the definition's; rows of equal norms
    (as at initialisation) have no such tier."""
    torch.manual_seed(11)
    d, n, k = 512, 4096, 16
    weight, bias = torch.randn(n, d) / d**0.5, torch.zeros(n)
    weight[:4] *= 3
    x = torch.randn(1024, d)
    x[:100] += 2 * weight[:4].sum(0)  # tokens whose winners include the long rows
    certified._state.__dict__.pop("extra", None)
    with torch.no_grad(), certified.selection_precision(precision, force=True), certified.counted() as c:
        got = topk_encode(x, weight, bias, k)
    assert torch.equal(_dense(*got, n), _dense(*_definition(x, weight, bias, k), n))
    assert (got.indices[:100] < 4).any(dim=1).all()
    if precision == "bf16-exact":
        assert c.certified > 0.95 * c.tokens
    squared = weight.norm(dim=1).double().square()
    assert set(certified._long_rows(squared, k + 8, n).tolist()) == {0, 1, 2, 3}
    equal = torch.nn.functional.normalize(torch.randn(n, d), dim=1).norm(dim=1).double().square()
    assert certified._long_rows(equal, k + 8, n) is None
    assert certified._long_rows(squared, n - 4, n) is None  # no room beside the candidates


def test_a_candidate_outside_the_dictionary_is_refused():
    x, weight, bias = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(10)
    with pytest.raises(IndexError, match="outside"):
        native.rescore_topk(x, weight, bias, torch.tensor([[0, 1, 10]] * 4), 2)


def test_a_nan_input_gives_nan_values_not_a_hang():
    torch.manual_seed(6)
    x, weight, bias = torch.randn(20, 16), torch.randn(200, 16), torch.zeros(200)
    x[3, 2] = float("nan")
    with torch.no_grad():
        for precision in ("fp32", "bf16-exact"):
            with certified.selection_precision(precision, force=True):
                got = topk_encode(x, weight, bias, 4)
            assert got.values[3].isnan().all()
            assert got.values[torch.arange(20) != 3].isfinite().all()


def test_without_fast_bf16_the_fp32_path_runs(monkeypatch):
    monkeypatch.setattr(certified, "bf16_gemm_available", lambda device: False)
    monkeypatch.delenv(certified.FORCE_ENV, raising=False)
    x, weight, bias = torch.randn(20, 8), torch.randn(32, 8), torch.zeros(32)
    with certified.selection_precision("bf16-exact"), certified.counted() as selection:
        got = topk_encode(x, weight, bias, 4)
    assert selection.tokens == 0  # nothing ran on the bf16 path
    assert torch.equal(got.values, topk_encode(x, weight, bias, 4).values)
    with pytest.raises(ValueError, match="bf16-exact"), certified.selection_precision("bf16"):
        pass


def test_without_the_native_kernels_selections_are_the_gemms_top_k(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    torch.manual_seed(7)
    x, weight, bias = torch.randn(30, 16), torch.randn(256, 16), torch.randn(256)
    with torch.no_grad(), certified.selection_precision("bf16-exact", force=True), certified.counted() as selection:
        got = topk_encode(x, weight, bias, 5)
    assert selection.tokens == 0
    top = (x @ weight.t() + bias).topk(5, dim=1)
    assert torch.equal(got.indices.sort(1).values, top.indices.sort(1).values)


def test_training_follows_the_fp32_run_bit_for_bit(tmp_path: Path, monkeypatch):
    """Same latents and values at every step, so the same weights."""
    torch.manual_seed(4)
    data = [torch.randn(256, 32) for _ in range(6)]

    def run(precision: str, folder: str):
        torch.manual_seed(0)
        sae = create_sae("topk", d_in=32, n_latents=256, k=8)
        cfg = TrainerConfig(total_tokens=6 * 256, batch_size=256, progress=False, log_every_steps=1,
                            checkpoint_every_steps=None, lr=1e-3, precision=precision)
        Trainer(sae, cfg, tmp_path / folder).fit(data)
        return sae, (tmp_path / folder / "metrics.jsonl").read_text()

    fp32, _ = run("fp32", "fp32")
    # the default, "auto", as it runs on a CPU with bf16 hardware (emulated here where there is none)
    monkeypatch.setattr(certified, "bf16_gemm_available", lambda device: device.type == "cpu")
    assert TrainerConfig().precision == "auto"
    auto, auto_metrics = run("auto", "auto")
    monkeypatch.setenv(certified.FORCE_ENV, "1")
    exact, metrics = run("bf16-exact", "bf16")
    assert "certified_fraction" in metrics and "certified_fraction" in auto_metrics
    for a, b, c in zip(fp32.parameters(), exact.parameters(), auto.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("hardware", [True, False])
def test_auto_runs_bf16_exact_on_cpus_with_bf16_and_fp32_elsewhere(monkeypatch, hardware):
    """"auto" takes the bf16 filter only where it was measured faster: a CPU with bf16 GEMM hardware; never on CUDA
    (its certification kernels cost more there than the bf16 GEMM saves at small widths) and never a forced one."""
    monkeypatch.setattr(certified, "bf16_gemm_available", lambda device: hardware)
    monkeypatch.setenv(certified.FORCE_ENV, "1")  # forces bf16-exact only, not auto
    torch.manual_seed(3)
    x, weight, bias = torch.randn(40, 24), torch.randn(300, 24), torch.randn(300)
    with torch.no_grad(), certified.selection_precision("auto"), certified.counted() as selection:
        assert certified.active(torch.device("cpu")) is hardware
        assert not certified.active(torch.device("cuda"))
        got = topk_encode(x, weight, bias, 6)
    assert selection.tokens == (40 if hardware else 0)
    with torch.no_grad(), certified.selection_precision("fp32"):
        want = topk_encode(x, weight, bias, 6)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def test_precision_is_a_setting_a_run_may_change_on_resume(tmp_path: Path, monkeypatch):
    """bf16-exact gives fp32's numbers, so a run recorded before the setting existed, or in the other precision, is
    the same request: reused when finished, resumed from its checkpoint, with the same weights as never switching."""
    import json

    from saelab.training.entry import train

    monkeypatch.setenv(certified.FORCE_ENV, "1")
    data = [torch.randn(64, 8) for _ in range(4)]

    def cfg(precision: str, tokens: int = 256) -> TrainerConfig:
        return TrainerConfig(total_tokens=tokens, batch_size=64, progress=False, checkpoint_every_steps=2,
                             precision=precision)

    def sae():
        torch.manual_seed(0)
        return create_sae("topk", d_in=8, n_latents=32, k=2)

    straight = train(sae(), data, cfg("fp32"), tmp_path / "fp32")
    saved = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "precision" not in saved["trainer"]
    reused = train(sae(), data, cfg("bf16-exact"), tmp_path / "fp32")  # the finished run, reused
    assert reused.sae_dir == straight.sae_dir
    # half the run in bf16-exact (its batches run out after 2 steps: a checkpoint), the rest in fp32
    half = train(sae(), data[:2], cfg("bf16-exact"), tmp_path / "switched")
    assert not half.completed
    resumed = train(sae(), data, cfg("fp32"), tmp_path / "switched", resume=True)
    assert resumed.completed
    a, b = load_sae(straight.sae_dir).state_dict(), load_sae(resumed.sae_dir).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_reduced_fp32_matmul_precision_gets_the_bf16_bound(monkeypatch):
    """With torch's fp32 matmul precision below "highest" an fp32 GEMM may round through bf16 (oneDNN on CPUs with
    bf16): the fp32 filter is then bounded like a bf16 one, and the selection stays the definition's."""
    torch.manual_seed(8)
    x, weight, bias = torch.randn(300, 96), torch.randn(2048, 96) / 10, torch.randn(2048) / 10
    bounds: list[bool] = []
    error = certified._filter_error
    monkeypatch.setattr(certified, "_filter_error", lambda *args: bounds.append(args[-1]) or error(*args))
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            with torch.no_grad():
                got = topk_encode(x, weight, bias, 16)
            assert torch.equal(_dense(*got, 2048), _dense(*_definition(x, weight, bias, 16), 2048))
    finally:
        torch.set_float32_matmul_precision(before)
    assert bounds == [False, True]  # the fp32 bound at "highest", the bf16 one at "medium"
