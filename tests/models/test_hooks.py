import pytest
import torch

from saelab.errors import HookpointError
from saelab.models.hookpoints import list_hookpoints, resolve_hookpoint
from saelab.models.hooks import capture, forward_with, spliced


def _hook_count(model) -> int:
    """Hooks installed on the model (transformers may keep its own output-capturing ones: compare, not zero)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _counting(module, counter: dict, key: str):
    def hook(*_):
        counter[key] = counter.get(key, 0) + 1

    return module.register_forward_hook(hook)


def _last_block_and_head(model):
    return resolve_hookpoint(model, "resid_post.2").module, model.get_output_embeddings()


@pytest.mark.parametrize("hookpoints", [["attn_out.0", "mlp_out.1"], ["resid_post.1", "resid_pre.2"]])
def test_capture_stops_after_the_deepest_hookpoint_and_matches_a_full_pass(tiny_model, tokens, hookpoints):
    calls: dict[str, int] = {}
    hooks_before = _hook_count(tiny_model)
    block, head = _last_block_and_head(tiny_model)
    handles = [_counting(block, calls, "last_block"), _counting(head, calls, "head")]
    try:
        early = capture(tiny_model, tokens, hookpoints)
        assert calls == {}  # neither the last block nor the LM head ran
        full = capture(tiny_model, tokens, hookpoints, stop_early=False, attention_mask=torch.ones_like(tokens))
        assert calls == {"last_block": 1, "head": 1}
    finally:
        for handle in handles:
            handle.remove()
    assert list(early) == hookpoints
    for name in hookpoints:
        assert early[name].shape == (*tokens.shape, 32)
        assert not early[name].requires_grad
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)
    assert _hook_count(tiny_model) == hooks_before


def test_capture_needs_a_hookpoint_and_installs_nothing_for_a_bad_one(make_tiny_model, tokens):
    model = make_tiny_model("gpt2")
    hooks_before = _hook_count(model)
    with pytest.raises(HookpointError, match="no hookpoints"):
        capture(model, tokens, [])
    with pytest.raises(HookpointError, match="mlp_out.7"):
        capture(model, tokens, ["resid_post.0", "mlp_out.7"])
    assert _hook_count(model) == hooks_before


def test_identity_splice_everywhere_leaves_logits_unchanged(tiny_model, tokens):
    hooks_before = _hook_count(tiny_model)
    with torch.no_grad():
        clean = tiny_model(tokens).logits
        with spliced(tiny_model, {name: lambda x: x.clone() for name in list_hookpoints(tiny_model)}):
            same = tiny_model(tokens).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert _hook_count(tiny_model) == hooks_before


def test_every_site_is_replaced_and_captured_after_the_replacement(tiny_model, tokens):
    names = list_hookpoints(tiny_model)[-6:]  # every kind of the last layer, input and output sides
    seen = {}

    def replacement(name):
        def fn(x):
            seen[name] = x
            return 2 * x + 1

        return fn

    clean = capture(tiny_model, tokens, names, stop_early=False)
    with torch.no_grad():
        _, got = forward_with(tiny_model, tokens, {name: replacement(name) for name in names}, capture=names)
    for name in names:
        torch.testing.assert_close(got[name], 2 * seen[name] + 1)
    torch.testing.assert_close(seen[names[0]], clean[names[0]])  # upstream of every replacement
    assert not torch.allclose(seen[names[-1]], clean[names[-1]])  # downstream of the others


def test_zeroing_mlp_out_changes_logits_as_a_skipped_mlp_would(tiny_model, tokens):
    parallel = "resid_mid.1" not in list_hookpoints(tiny_model)
    clean = capture(tiny_model, tokens, ["resid_pre.1", "attn_out.1"] + ([] if parallel else ["resid_mid.1"]))
    expected = clean["resid_pre.1"] + clean["attn_out.1"] if parallel else clean["resid_mid.1"]
    with torch.no_grad():
        clean_logits = tiny_model(tokens).logits
        logits, got = forward_with(tiny_model, tokens, {"mlp_out.1": torch.zeros_like}, capture=["resid_post.1"])
        manual, _ = forward_with(tiny_model, tokens, {"resid_post.1": lambda x: expected})
    torch.testing.assert_close(got["resid_post.1"], expected)
    torch.testing.assert_close(logits, manual)
    assert not torch.allclose(logits, clean_logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zeroing_the_last_mlp_equals_the_head_applied_to_resid_mid(make_tiny_model, tokens, family):
    model = make_tiny_model(family)
    final_norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    resid_mid = capture(model, tokens, ["resid_mid.2"])["resid_mid.2"]
    with torch.no_grad():
        logits, _ = forward_with(model, tokens, {"mlp_out.2": torch.zeros_like})
        manual = model.lm_head(final_norm(resid_mid))
    torch.testing.assert_close(logits, manual)


def test_splices_pass_gradients_to_the_replacement(make_tiny_model, tokens):
    model = make_tiny_model("llama")
    scale = torch.ones(32, requires_grad=True)
    logits, acts = forward_with(model, tokens, {"resid_post.0": lambda x: x * scale}, capture=["mlp_in.1"])
    (logits.square().mean() + acts["mlp_in.1"].square().mean()).backward()
    assert scale.grad is not None and torch.isfinite(scale.grad).all() and scale.grad.abs().sum() > 0
    with spliced(model, {"attn_out.1": lambda x: x * scale}):
        model(tokens).logits.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_hooks_are_removed_when_the_forward_pass_fails(make_tiny_model, tokens):
    model = make_tiny_model("gemma2")
    hooks_before = _hook_count(model)

    def explode(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), spliced(model, {"mlp_in.1": explode, "resid_post.0": torch.neg}):
        model(tokens)
    assert _hook_count(model) == hooks_before
    with pytest.raises(HookpointError, match=r"resid_post.0.*\(2, 7, 16\).*\(2, 7, 32\)"):
        forward_with(model, tokens, {"resid_post.0": lambda x: x[..., :16]})
    assert _hook_count(model) == hooks_before
