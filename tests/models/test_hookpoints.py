import logging

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, Olmo2Config, Olmo2ForCausalLM, OlmoConfig, OlmoForCausalLM

from saelab.errors import HookpointError
from saelab.models.hookpoints import KINDS, d_model, list_hookpoints, num_layers, resolve_hookpoint
from saelab.models.hooks import capture

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)


def _is_parallel(model) -> bool:
    return "resid_mid.0" not in list_hookpoints(model)


def test_every_hookpoint_resolves_to_a_module_of_the_model(tiny_model):
    names = list_hookpoints(tiny_model)
    kinds = [k for k in KINDS if not (k == "resid_mid" and _is_parallel(tiny_model))]
    assert names == [f"{kind}.{layer}" for layer in range(3) for kind in kinds]
    modules = set(tiny_model.modules())
    for name in names:
        site = resolve_hookpoint(tiny_model, name)
        assert site.name == name and site.layer == int(name.split(".")[1])
        assert site.module in modules
        assert site.io == ("input" if name.split(".")[0] in ("resid_pre", "resid_mid", "mlp_in") else "output")
    assert num_layers(tiny_model) == 3
    assert d_model(tiny_model) == 32


def test_residual_stream_matches_output_hidden_states(tiny_model, tokens):
    acts = capture(tiny_model, tokens, list_hookpoints(tiny_model), stop_early=False)
    with torch.no_grad():
        hidden = tiny_model(tokens, output_hidden_states=True).hidden_states
    for layer in range(3):
        torch.testing.assert_close(acts[f"resid_pre.{layer}"], hidden[layer], rtol=0, atol=0)
    for layer in range(2):  # the last entry of hidden_states has the final norm applied
        torch.testing.assert_close(acts[f"resid_post.{layer}"], hidden[layer + 1], rtol=0, atol=0)


def test_attn_and_mlp_outputs_are_what_the_block_adds_to_the_residual_stream(tiny_model, tokens):
    """Pins down resid_mid / attn_out / mlp_out / mlp_in semantics per family (Gemma 2/3's sandwich norms)."""
    acts = capture(tiny_model, tokens, list_hookpoints(tiny_model), stop_early=False)
    for layer in range(3):
        pre, post = acts[f"resid_pre.{layer}"], acts[f"resid_post.{layer}"]
        attn, mlp_in, mlp = acts[f"attn_out.{layer}"], acts[f"mlp_in.{layer}"], acts[f"mlp_out.{layer}"]
        if _is_parallel(tiny_model):
            torch.testing.assert_close(pre + attn + mlp, post)
            norm = resolve_hookpoint(tiny_model, f"resid_pre.{layer}").module.post_attention_layernorm
            torch.testing.assert_close(norm(pre), mlp_in)
        else:
            mid = acts[f"resid_mid.{layer}"]
            torch.testing.assert_close(pre + attn, mid)
            torch.testing.assert_close(mid + mlp, post)
            with torch.no_grad():
                torch.testing.assert_close(resolve_hookpoint(tiny_model, f"resid_mid.{layer}").module(mid), mlp_in)


@pytest.mark.parametrize("name", ["resid_post.3", "resid_post.-1", "resid_post", "residual.1", "mlp_out.1.x", ""])
def test_invalid_hookpoint_names_list_the_valid_forms(make_tiny_model, name):
    model = make_tiny_model("llama")
    with pytest.raises(HookpointError) as info:
        resolve_hookpoint(model, name)
    message = str(info.value)
    assert repr(name) in message
    assert "0..2" in message
    assert all(kind in message for kind in KINDS)


def test_parallel_residual_has_no_resid_mid(make_tiny_model):
    model = make_tiny_model("neox_parallel")
    with pytest.raises(HookpointError, match="parallel residual"):
        resolve_hookpoint(model, "resid_mid.1")
    assert resolve_hookpoint(make_tiny_model("neox_sequential"), "resid_mid.1").io == "input"


def test_untested_model_type_with_a_known_block_shape_works_with_a_warning(caplog, tokens):
    model = OlmoForCausalLM(OlmoConfig(**TINY)).eval()
    with caplog.at_level(logging.WARNING, logger="saelab.models.hookpoints"):
        acts = capture(model, tokens, ["resid_post.0"])
    assert "'olmo'" in caplog.text and "Llama" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(acts["resid_post.0"], model(tokens, output_hidden_states=True).hidden_states[1])


@pytest.mark.parametrize(
    "build",
    [
        lambda: Olmo2ForCausalLM(Olmo2Config(**TINY)),  # norm-after blocks: Llama names, different dataflow
        lambda: BertForMaskedLM(BertConfig(**TINY)),
    ],
    ids=["olmo2", "bert"],
)
def test_unsupported_architectures_are_refused_rather_than_mis_hooked(build):
    with pytest.raises(HookpointError, match="supported"):
        list_hookpoints(build())


def test_a_plain_module_is_refused():
    with pytest.raises(HookpointError, match="Hugging Face"):
        resolve_hookpoint(torch.nn.Linear(2, 2), "resid_post.0")
