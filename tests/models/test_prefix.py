import pytest
import torch

from saelab.errors import HookpointError
from saelab.models.hookpoints import blocks, list_hookpoints
from saelab.models.hooks import forward_with
from saelab.models.prefix import SharedPrefix


def _shift(act: torch.Tensor) -> torch.Tensor:
    return 0.5 * act + 1.0


def _submodule_calls(modules) -> tuple[dict, list]:
    """Forward hooks on every submodule INSIDE `modules` (their own hooks still fire when replayed)."""
    calls: dict[str, int] = {}

    def count(module, *_):
        calls[type(module).__name__] = calls.get(type(module).__name__, 0) + 1

    handles = [sub.register_forward_hook(count) for block in modules for sub in list(block.modules())[1:]]
    return calls, handles


def test_replayed_passes_match_full_passes_and_skip_the_prefix(tiny_model, tokens) -> None:
    for hookpoint in list_hookpoints(tiny_model):
        prefix = SharedPrefix(tiny_model, [hookpoint])
        with prefix.recording():
            clean, _ = forward_with(tiny_model, tokens)
        full, _ = forward_with(tiny_model, tokens, {hookpoint: _shift})
        calls, handles = _submodule_calls(blocks(tiny_model)[: prefix.n_skipped])
        try:
            with prefix.replaying():
                replayed, _ = forward_with(tiny_model, tokens, {hookpoint: _shift})
        finally:
            for handle in handles:
                handle.remove()
        assert calls == {}, hookpoint
        torch.testing.assert_close(replayed, full, rtol=0, atol=1e-6, msg=hookpoint)
        assert not torch.allclose(replayed, clean)
        again, _ = forward_with(tiny_model, tokens, {hookpoint: _shift})  # forwards restored: computes again
        torch.testing.assert_close(again, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("hookpoints", "n_skipped"),
    [(["resid_pre.0"], 0), (["resid_post.0"], 1), (["resid_pre.1"], 1), (["mlp_in.1"], 1), (["mlp_out.1"], 1),
     (["resid_post.1"], 2), (["resid_post.2", "attn_out.1"], 1), ([], 0)],
)
def test_skips_the_blocks_before_the_earliest_site(make_tiny_model, hookpoints, n_skipped) -> None:
    assert SharedPrefix(make_tiny_model("llama"), hookpoints).n_skipped == n_skipped


def test_nothing_to_skip_runs_the_full_model(make_tiny_model, tokens) -> None:
    model = make_tiny_model("llama")
    prefix = SharedPrefix(model, ["resid_pre.0"])
    with prefix.recording():
        forward_with(model, tokens)
    full, _ = forward_with(model, tokens, {"resid_pre.0": _shift})
    with prefix.replaying():
        replayed, _ = forward_with(model, tokens, {"resid_pre.0": _shift})
    torch.testing.assert_close(replayed, full, rtol=0, atol=0)


def test_replaying_before_recording_is_an_error(make_tiny_model) -> None:
    prefix = SharedPrefix(make_tiny_model("gpt2"), ["resid_post.1"])
    with pytest.raises(HookpointError, match="recording"), prefix.replaying():
        pass


def test_an_exception_restores_every_forward_including_one_set_on_the_instance(make_tiny_model, tokens) -> None:
    model = make_tiny_model("llama")
    layers = blocks(model)
    original = layers[0].forward
    layers[0].forward = original  # an instance attribute, as accelerate's dispatch hooks set
    prefix = SharedPrefix(model, ["resid_post.1"])
    with prefix.recording():
        expected, _ = forward_with(model, tokens)
    with pytest.raises(RuntimeError, match="boom"), prefix.replaying():
        raise RuntimeError("boom")
    assert layers[0].__dict__["forward"] is original
    assert "forward" not in layers[1].__dict__
    torch.testing.assert_close(forward_with(model, tokens)[0], expected, rtol=0, atol=0)
