from __future__ import annotations

import pytest
import torch

from saelab.errors import HookpointError
from saelab.models.blocks import BlockRunner, block
from saelab.models.hooks import capture, forward_with

FAMILIES = ("gpt2", "neox_parallel", "llama", "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
def test_run_reproduces_the_models_own_hidden_states(make_tiny_model, family: str, tokens) -> None:
    model = make_tiny_model(family)
    clean = capture(model, tokens, ["resid_post.0", "resid_post.1", "resid_post.2"])
    runner = BlockRunner(model, tokens, first_block=1, last_block=2)
    torch.testing.assert_close(runner.resid_post(0), clean["resid_post.0"], rtol=0, atol=0)
    with torch.no_grad():
        out = runner.run(runner.resid_post(0), after_layer=0, until_layers=[2, 1])
    torch.testing.assert_close(out[0], clean["resid_post.2"], rtol=0, atol=0)
    torch.testing.assert_close(out[1], clean["resid_post.1"], rtol=0, atol=0)


def test_the_map_from_layer_l_to_m_runs_exactly_blocks_l_plus_1_to_m(make_tiny_model, tokens) -> None:
    model = make_tiny_model("llama")
    calls = {i: 0 for i in range(3)}
    handles = [block(model, i).register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in range(3)]
    try:
        runner = BlockRunner(model, tokens, first_block=1, last_block=2)
        assert calls == {0: 1, 1: 1, 2: 0}  # the recording pass stops as the last block of the span starts
        for after, until, expected in ((0, [2], {0: 0, 1: 1, 2: 1}), (1, [2], {0: 0, 1: 0, 2: 1}),
                                       (0, [1], {0: 0, 1: 1, 2: 0})):
            calls.update(dict.fromkeys(calls, 0))
            with torch.no_grad():
                runner.run(runner.resid_post(after), after, until)
            assert calls == expected, (after, until)
    finally:
        for handle in handles:
            handle.remove()


def test_layers_outside_the_recorded_span_are_errors(make_tiny_model, tokens) -> None:
    runner = BlockRunner(make_tiny_model("gpt2"), tokens, first_block=1, last_block=1)
    with pytest.raises(HookpointError, match="outside the recorded span"):
        runner.run(runner.resid_post(0), 0, [2])
    with pytest.raises(HookpointError, match="must all come after"):
        runner.run(runner.resid_post(0), 0, [0])
    with pytest.raises(HookpointError, match="not recorded"):
        runner.resid_post(1)


@pytest.mark.parametrize(("family", "eps", "tol"), [("gpt2", 1e-6, 1e-7), ("llama", 1e-3, 2e-3)])
def test_jvp_equals_a_finite_difference_through_the_full_model(make_tiny_model, tokens, family, eps, tol) -> None:
    # The reference perturbs resid_post.0 at one position inside the model's own forward pass (so attention, masks
    # and rotary embeddings are the model's) and reads resid_post.2 at every position. Llama's RMSNorm computes in
    # float32 even in a float64 model, hence its larger step and tolerance.
    model = make_tiny_model(family).double()
    position = 4
    direction = torch.zeros(*tokens.shape, 32, dtype=torch.float64)
    direction[:, position] = torch.randn(2, 32, dtype=torch.float64)
    runner = BlockRunner(model, tokens, first_block=1, last_block=2)
    (out,), (jd,) = runner.jvp(runner.resid_post(0), direction, after_layer=0, until_layers=[2])

    def shifted(sign: float) -> torch.Tensor:
        with torch.no_grad():
            _, acts = forward_with(model, tokens, {"resid_post.0": lambda h: h + sign * eps * direction},
                                   capture=["resid_post.2"])
        return acts["resid_post.2"]

    finite_difference = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    torch.testing.assert_close(out, capture(model, tokens, ["resid_post.2"])["resid_post.2"])
    assert jd.abs().max() > 0.1
    torch.testing.assert_close(jd, finite_difference, rtol=0, atol=tol * jd.abs().max().item())
    assert not jd[:, :position].any()  # causal: earlier positions do not move
