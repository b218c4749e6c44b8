import dataclasses

import pytest
import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from saelab.errors import ConfigError, DataError
from saelab.evaluation import ALL_SITES, evaluate_downstream, evaluate_downstream_together, evaluate_reconstruction
from saelab.metrics import cross_entropy, fraction_of_variance_unexplained, per_dimension_fvu, per_slice_fvu
from saelab.models.hooks import forward_with
from saelab.saes.base import SAEConfig, SparseAutoencoder


@dataclasses.dataclass
class ScaleConfig(SAEConfig):
    factor: float = 1.0


class ScaleSAE(SparseAutoencoder):
    """Latents = the input itself (dense, n_latents = d_in); x_hat = factor · latents. factor 1 = identity."""

    architecture = "scale_test"
    config_class = ScaleConfig

    def __init__(self, cfg: ScaleConfig) -> None:
        super().__init__(cfg)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, latents: Tensor) -> Tensor:
        return self.cfg.factor * latents + self.b_dec

    def flops_per_token(self) -> int:
        return self.d_in


def scale_sae(d: int, factor: float, preprocessing: str = "none") -> ScaleSAE:
    return ScaleSAE(ScaleConfig(d_in=d, n_latents=d, factor=factor, preprocessing=preprocessing))


def test_reconstruction_metrics_pool_over_batches() -> None:
    torch.manual_seed(0)
    x = torch.randn(30, 6) + 2.0
    x[:, 5] = 0.0  # latent 5 never fires
    x[0, 0] = 0.0
    result = evaluate_reconstruction(scale_sae(6, 0.5), x.split([7, 13, 10]), slices=[(0, 2), (2, 6)])
    x_hat = 0.5 * x
    assert result["fvu"] == pytest.approx(fraction_of_variance_unexplained(x, x_hat).item(), rel=1e-6)
    assert result["fvu_raw"] == pytest.approx(result["fvu"], rel=1e-9)
    assert result["mse"] == pytest.approx((x - x_hat).pow(2).mean().item(), rel=1e-6)
    assert result["cosine"] == pytest.approx(1.0)
    assert result["l0"] == pytest.approx((30 * 5 - 1) / 30)
    assert result["dead_fraction"] == pytest.approx(1 / 6)
    assert result["n_tokens"] == 30
    assert result["per_slice_fvu"] == pytest.approx(per_slice_fvu(x, x_hat, [(0, 2), (2, 6)]).tolist(), rel=1e-6)
    assert result["fvu_per_dim"] == pytest.approx(per_dimension_fvu(x, x_hat).item(), rel=1e-6)
    assert result["fvu_per_dim"] != pytest.approx(result["fvu"])  # a mean of ratios, not the pooled ratio
    assert result["per_slice_fvu_per_dim"] == pytest.approx(
        per_dimension_fvu(x, x_hat, [(0, 2), (2, 6)]).tolist(), rel=1e-6)


def test_reconstruction_metrics_are_in_the_sae_space_and_raw() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 5) * 3 + 1
    sae = scale_sae(5, 0.8, preprocessing="token_l2")
    result = evaluate_reconstruction(sae, [x])
    x_n, stats = sae.normalize(x)
    assert result["fvu"] == pytest.approx(fraction_of_variance_unexplained(x_n, 0.8 * x_n).item(), rel=1e-5)
    raw = fraction_of_variance_unexplained(x, sae.denormalize(0.8 * x_n, stats)).item()
    assert result["fvu_raw"] == pytest.approx(raw, rel=1e-5)
    assert result["fvu_raw"] != pytest.approx(result["fvu"], rel=1e-2)


def test_reconstruction_rejects_wrong_width_and_no_data() -> None:
    with pytest.raises(DataError, match=r"shape \[B, 4\]"):
        evaluate_reconstruction(scale_sae(4, 1.0), [torch.randn(3, 5)])
    with pytest.raises(DataError, match="no activations"):
        evaluate_reconstruction(scale_sae(4, 1.0), [])


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)).eval()


@pytest.fixture
def contexts() -> Tensor:
    return torch.randint(0, 100, (5, 12), generator=torch.Generator().manual_seed(1))


def test_identity_sae_recovers_everything(gpt2, contexts) -> None:
    result = evaluate_downstream(gpt2, scale_sae(32, 1.0), "resid_post.0", contexts, batch_size=2, drop_first=1)
    assert result["ce_spliced"] == result["ce_clean"]
    assert result["kl_divergence"] == 0.0 and result["ce_delta"] == 0.0
    assert result["ce_loss_recovered"] == 1.0 and result["ce_loss_recovered_mean_ablation"] == 1.0
    assert result["ce_zero_ablated"] > result["ce_clean"] and result["kl_zero_ablated"] > 0
    assert result["ce_mean_ablated"] != result["ce_clean"]


def test_splicing_goes_through_the_sae_preprocessing(gpt2, contexts) -> None:
    # reconstruct() normalises and denormalises: an identity in the normalised space is an identity raw -> raw.
    result = evaluate_downstream(gpt2, scale_sae(32, 1.0, "token_l2"), "resid_post.0", contexts, zero_ablation=False,
                                 mean_ablation=False)
    assert result["ce_spliced"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert result["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert "ce_zero_ablated" not in result and "ce_mean_ablated" not in result


def test_masked_positions_pass_through_and_match_a_manual_splice(gpt2, contexts) -> None:
    drop, exclude = 3, (contexts[0, 5].item(),)
    mask = torch.ones_like(contexts, dtype=torch.bool)
    mask[:, :drop] = False
    mask &= contexts != exclude[0]
    result = evaluate_downstream(gpt2, scale_sae(32, 0.0), "resid_post.1", contexts, batch_size=2,
                                 drop_first=drop, exclude_token_ids=exclude)

    def zero_masked(act: Tensor) -> Tensor:
        return act.masked_fill(mask[..., None], 0.0)

    clean, captured = forward_with(gpt2, contexts, capture=("resid_post.1",))
    zeroed, _ = forward_with(gpt2, contexts, {"resid_post.1": zero_masked})
    mean = captured["resid_post.1"][mask].mean(0)
    mean_ablated, _ = forward_with(gpt2, contexts, {"resid_post.1": lambda a: torch.where(mask[..., None], mean, a)})
    assert result["ce_clean"] == pytest.approx(cross_entropy(clean, contexts, mask).item(), rel=1e-6)
    assert result["ce_spliced"] == pytest.approx(cross_entropy(zeroed, contexts, mask).item(), rel=1e-6)
    assert result["ce_mean_ablated"] == pytest.approx(cross_entropy(mean_ablated, contexts, mask).item(), rel=1e-5)
    # an SAE that outputs zeros is exactly zero ablation: nothing recovered
    assert result["ce_spliced"] == result["ce_zero_ablated"] and result["ce_loss_recovered"] == 0.0
    assert result["kl_divergence"] == result["kl_zero_ablated"] > 0


def test_downstream_rejects_bad_contexts(gpt2) -> None:
    with pytest.raises(DataError, match=r"token ids \[N, T\]"):
        evaluate_downstream(gpt2, scale_sae(32, 1.0), "resid_post.0", torch.zeros(4, dtype=torch.long))


def test_replaced_passes_run_only_the_layers_from_the_hookpoint_on(gpt2, contexts) -> None:
    calls = {0: 0, 1: 0}
    handles = [gpt2.transformer.h[i].attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in calls]
    try:
        evaluate_downstream(gpt2, scale_sae(32, 0.5), "resid_pre.1", contexts, batch_size=2, mean_ablation=False)
    finally:
        for handle in handles:
            handle.remove()
    n_batches = 3
    assert calls == {0: n_batches, 1: 3 * n_batches}  # block 0 only in the clean pass; block 1 clean, spliced, zeroed


def test_several_saes_spliced_alone_and_together(gpt2, contexts) -> None:
    saes = {"resid_post.0": scale_sae(32, 0.5), "resid_post.1": scale_sae(32, 0.8)}
    rows = evaluate_downstream_together(gpt2, saes, contexts, batch_size=2, drop_first=1)
    assert list(rows) == ["resid_post.0", "resid_post.1", ALL_SITES]
    for hookpoint, sae in saes.items():  # each alone is exactly the one-SAE evaluation
        alone = evaluate_downstream(gpt2, sae, hookpoint, contexts, batch_size=2, drop_first=1, mean_ablation=False)
        assert rows[hookpoint] == pytest.approx(alone, rel=1e-6)
    mask = torch.ones_like(contexts, dtype=torch.bool)
    mask[:, :1] = False

    def scaled(factor: float):
        return lambda act: torch.where(mask[..., None], factor * act, act)

    clean, _ = forward_with(gpt2, contexts)
    both, _ = forward_with(gpt2, contexts, {"resid_post.0": scaled(0.5), "resid_post.1": scaled(0.8)})
    zeroed, _ = forward_with(gpt2, contexts, {"resid_post.0": scaled(0.0), "resid_post.1": scaled(0.0)})
    together = rows[ALL_SITES]
    ce_clean, ce_both, ce_zero = (cross_entropy(logits, contexts, mask).item() for logits in (clean, both, zeroed))
    assert together["ce_clean"] == pytest.approx(ce_clean, rel=1e-6)
    assert together["ce_spliced"] == pytest.approx(ce_both, rel=1e-6)
    assert together["ce_zero_ablated"] == pytest.approx(ce_zero, rel=1e-6)
    assert together["ce_loss_recovered"] == pytest.approx((ce_zero - ce_both) / (ce_zero - ce_clean), rel=1e-5)
    assert together["ce_spliced"] > max(rows["resid_post.0"]["ce_spliced"], rows["resid_post.1"]["ce_spliced"])
    with pytest.raises(ConfigError, match="keyed by their hookpoints"):
        evaluate_downstream_together(gpt2, {}, contexts)


def test_evaluate_command_splices_several_saes(saved_tiny_llama, tmp_path) -> None:
    import json

    from saelab.cli import main
    from saelab.saes import create_sae

    model_dir, corpus = saved_tiny_llama()
    data = ["--data.source", str(corpus), "--data.context-length", "16"]
    assert main(["harvest", "--model", str(model_dir), "--hookpoints", "resid_post.0", *data,
                 "--data.n-tokens", "300", "--out-dir", str(tmp_path / "store")]) == 0
    dirs = []
    for layer in (0, 2):
        sae = create_sae("topk", d_in=32, n_latents=64, k=8, hookpoint=f"resid_post.{layer}")
        sae.save(tmp_path / f"sae{layer}")
        dirs.append(str(tmp_path / f"sae{layer}"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--sae-dirs", ",".join(dirs), "--store", str(tmp_path / "store"), "--model",
                 str(model_dir), *data, "--data.n-tokens", "120", "--out-dir", str(out), "--device", "cpu"]) == 0
    rows = json.loads((out / "summary.json").read_text())["saes"]
    assert list(rows) == ["resid_post.0", "resid_post.2", ALL_SITES]
    assert "fvu" in rows["resid_post.0"] and "fvu" not in rows["resid_post.2"]  # the store holds only layer 0
    for row in rows.values():
        assert row["ce_spliced"] != row["ce_clean"] and row["kl_divergence"] > 0
    assert rows[ALL_SITES]["ce_zero_ablated"] >= max(rows[hp]["ce_zero_ablated"] for hp in ("resid_post.0",
                                                                                           "resid_post.2")) - 1e-6
    assert main(["evaluate", "--sae-dirs", f"{dirs[0]},{dirs[0]}", "--store", str(tmp_path / "store"),
                 "--out-dir", str(tmp_path / "twice"), "--downstream", "false"]) != 0


def _transcoder(layer: int, seed: int):
    from saelab.saes.initialization import seeded
    from saelab.saes.transcoder import TopKTranscoder, TopKTranscoderConfig

    with seeded(seed):
        tc = TopKTranscoder(TopKTranscoderConfig(d_in=32, n_latents=48, k=6, skip_connection=True,
                                                 preprocessing="scale", input_scale=0.7, target_scale=1.3,
                                                 hookpoint=f"mlp_in.{layer}", target_hookpoint=f"mlp_out.{layer}"))
        with torch.no_grad():
            tc.W_skip.normal_(std=0.1)
            tc.b_enc.normal_(std=0.1)
    return tc


def test_transcoder_reconstruction_is_measured_against_the_target() -> None:
    tc = _transcoder(0, 0)
    x, y = torch.randn(40, 32), torch.randn(40, 32)
    result = evaluate_reconstruction(tc, [(x[:25], y[:25]), (x[25:], y[25:])])
    with torch.no_grad():
        assert result["fvu_raw"] == pytest.approx(fraction_of_variance_unexplained(y, tc.reconstruct(x)).item(),
                                                  rel=1e-5)
        want = fraction_of_variance_unexplained(1.3 * y, tc(0.7 * x).x_hat).item()
    assert result["fvu"] == pytest.approx(want, rel=1e-5) and result["n_tokens"] == 40


def test_transcoders_and_saes_spliced_alone_and_together_match_hand_built_hooks(gpt2, contexts) -> None:
    # every MLP replaced by its transcoder (output predicted from the MLP's input), plus an SAE on resid_post.0
    # in between them
    saes = {"mlp_out.0": _transcoder(0, 0), "resid_post.0": scale_sae(32, 0.8), "mlp_out.1": _transcoder(1, 1)}
    rows = evaluate_downstream_together(gpt2, saes, contexts, batch_size=2, drop_first=1)
    assert list(rows) == [*saes, ALL_SITES]
    for hookpoint, sae in saes.items():  # each alone is exactly the one-SAE evaluation
        alone = evaluate_downstream(gpt2, sae, hookpoint, contexts, batch_size=2, drop_first=1, mean_ablation=False)
        assert rows[hookpoint] == pytest.approx(alone, rel=1e-6)
    mask = torch.ones_like(contexts, dtype=torch.bool)
    mask[:, :1] = False

    def hand_built(transcoders: dict[int, SparseAutoencoder], resid_factor: float | None) -> Tensor:
        """Logits with the MLP modules' outputs replaced by hooks of our own, at the counted positions."""
        handles = [gpt2.transformer.h[layer].mlp.register_forward_hook(
            lambda module, args, out, tc=tc: torch.where(mask[..., None], tc.reconstruct(args[0]), out))
            for layer, tc in transcoders.items()]
        try:
            with torch.no_grad():
                edits = {} if resid_factor is None else {
                    "resid_post.0": lambda act: torch.where(mask[..., None], resid_factor * act, act)}
                return forward_with(gpt2, contexts, edits)[0]
        finally:
            for handle in handles:
                handle.remove()

    clean = hand_built({}, None)
    ce = {name: cross_entropy(logits, contexts, mask).item() for name, logits in {
        "clean": clean,
        "mlp_out.0": hand_built({0: saes["mlp_out.0"]}, None),
        "mlp_out.1": hand_built({1: saes["mlp_out.1"]}, None),
        ALL_SITES: hand_built({0: saes["mlp_out.0"], 1: saes["mlp_out.1"]}, 0.8),
    }.items()}
    for name in ("mlp_out.0", "mlp_out.1", ALL_SITES):
        assert rows[name]["ce_clean"] == pytest.approx(ce["clean"], rel=1e-6)
        assert rows[name]["ce_spliced"] == pytest.approx(ce[name], rel=1e-5)
        assert rows[name]["ce_spliced"] != pytest.approx(ce["clean"], rel=1e-4)
    zeroed, _ = forward_with(gpt2, contexts, {"mlp_out.0": lambda a: a.masked_fill(mask[..., None], 0.0)})
    assert rows["mlp_out.0"]["ce_zero_ablated"] == pytest.approx(cross_entropy(zeroed, contexts, mask).item(),
                                                                rel=1e-6)


def test_evaluate_command_splices_transcoders(saved_tiny_llama, tmp_path) -> None:
    import json

    from saelab.cli import main
    from saelab.saes.transcoder import TopKTranscoder, TopKTranscoderConfig

    model_dir, corpus = saved_tiny_llama()
    data = ["--data.source", str(corpus), "--data.context-length", "16"]
    assert main(["harvest", "--model", str(model_dir), "--hookpoints", "mlp_in.0,mlp_out.0", *data,
                 "--data.n-tokens", "300", "--out-dir", str(tmp_path / "store")]) == 0
    dirs = []
    for layer in (0, 2):
        TopKTranscoder(TopKTranscoderConfig(d_in=32, n_latents=64, k=8, hookpoint=f"mlp_in.{layer}",
                                            target_hookpoint=f"mlp_out.{layer}")).save(tmp_path / f"tc{layer}")
        dirs.append(str(tmp_path / f"tc{layer}"))
    common = ["--store", str(tmp_path / "store"), "--model", str(model_dir), *data, "--data.n-tokens", "120",
              "--device", "cpu", "--self-check", "false"]  # untrained transcoders predict nothing
    assert main(["evaluate", "--sae-dirs", ",".join(dirs), *common, "--out-dir", str(tmp_path / "all")]) == 0
    rows = json.loads((tmp_path / "all" / "summary.json").read_text())["saes"]
    assert list(rows) == ["mlp_out.0", "mlp_out.2", ALL_SITES]
    assert "fvu" in rows["mlp_out.0"] and "fvu" not in rows["mlp_out.2"]  # the store holds only layer 0's pair
    assert all(row["kl_divergence"] > 0 for row in rows.values())
    assert main(["evaluate", "--sae-dir", dirs[0], *common, "--out-dir", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert (one["hookpoint"], one["target_hookpoint"]) == ("mlp_in.0", "mlp_out.0")
    assert one["fvu"] == pytest.approx(rows["mlp_out.0"]["fvu"]) and one["ce_spliced"] == pytest.approx(
        rows["mlp_out.0"]["ce_spliced"], rel=1e-6)
