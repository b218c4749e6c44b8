import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from saelab.activations.harvest import HarvestConfig, harvest, harvest_from_config
from saelab.activations.store import ActivationStore
from saelab.data.tokenize import DataConfig, build_contexts, context_mask
from saelab.errors import ConfigError, DataError, StoreError
from saelab.models.hooks import capture
from saelab.models.loading import load_model

VOCAB = 64
BOS, EOS = 0, 1
T = 8


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _model(family: str = "gpt2") -> torch.nn.Module:
    if family == "llama":
        config = LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            max_position_embeddings=T,
        )
        return LlamaForCausalLM(config).eval()
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=T)).eval()


def _contexts(n: int = 10) -> torch.Tensor:
    contexts = torch.randint(2, VOCAB, (n, T))
    contexts[:, 0] = BOS
    contexts[3, 5] = EOS
    return contexts


def _cfg(tmp_path, name: str = "store", **overrides) -> HarvestConfig:
    data = overrides.pop("data", DataConfig(context_length=T, exclude_special_tokens=False))
    fields = dict(
        out_dir=str(tmp_path / name),
        model="tiny",
        hookpoints=["resid_post.0", "mlp_out.1", "resid_post.2"],
        data=data,
        batch_size=2,
        dtype="float32",
        shard_tokens=20,
    )
    return HarvestConfig(**{**fields, **overrides})


def _contents(folder) -> tuple[dict[str, bytes], dict]:
    """Every shard file's bytes, and the manifest without the one field that names the folder."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}
    manifest = ActivationStore(folder).manifest
    del manifest["config"]["out_dir"]
    return files, manifest


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_pass_equals_separate_captures(tmp_path, family) -> None:
    model, contexts = _model(family), _contexts()
    cfg = _cfg(tmp_path)
    store = harvest(model, _tokenizer(), contexts, cfg, show_progress=False)
    assert store.n_tokens == contexts.numel() and store.dims == {hp: 16 for hp in cfg.hookpoints}
    for hp in cfg.hookpoints:
        alone = capture(model, contexts, [hp], stop_early=False)[hp].reshape(-1, 16)
        torch.testing.assert_close(store.load(hp), alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(store.token_ids(), contexts.flatten())
    assert torch.equal(store.contexts(), contexts)
    assert torch.equal(store.positions(), torch.arange(T).repeat(10))
    assert torch.equal(store.context_index(), torch.arange(10).repeat_interleave(T))
    assert store.manifest["config"] == cfg.to_dict() and store.model_name == "tiny"


def test_position_filtering_and_special_tokens(tmp_path) -> None:
    model, contexts = _model(), _contexts()
    data = DataConfig(context_length=T, drop_first_positions=2, exclude_special_tokens=True)
    store = harvest(model, _tokenizer(), contexts, _cfg(tmp_path, data=data), show_progress=False)
    keep = (torch.arange(T) >= 2) & (contexts != EOS) & (contexts != BOS)
    assert store.n_tokens == int(keep.sum()) == 10 * 6 - 1
    assert torch.equal(store.token_ids(), contexts[keep])
    assert int(store.positions().min()) == 2
    full = capture(model, contexts, ["mlp_out.1"])["mlp_out.1"]
    torch.testing.assert_close(store.load("mlp_out.1"), full[keep], atol=1e-5, rtol=1e-5)


def _interrupt_at_forward(model: torch.nn.Module, call: int) -> torch.utils.hooks.RemovableHandle:
    calls = []

    def crash(module, args):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("simulated crash")

    return model.transformer.h[0].register_forward_pre_hook(crash)


def test_resume_after_interruption_gives_the_identical_store(tmp_path) -> None:
    model, contexts, tokenizer = _model(), _contexts(), _tokenizer()
    cfg = _cfg(tmp_path, name="interrupted")
    handle = _interrupt_at_forward(model, call=4)  # batches of 2 contexts (16 tokens), shards of 2 batches
    with pytest.raises(RuntimeError, match="simulated crash"):
        harvest(model, tokenizer, contexts, cfg, show_progress=False)
    handle.remove()
    partial = ActivationStore(tmp_path / "interrupted", require_complete=False)
    assert partial.manifest["n_contexts"] == 4 and partial.n_shards == 1  # batch 3 was buffered, not written
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "interrupted")
    with pytest.raises(StoreError, match="already holds an activation store"):
        harvest(model, tokenizer, contexts, cfg, show_progress=False)
    resumed = harvest(model, tokenizer, contexts, cfg.replace(resume=True), show_progress=False)
    uninterrupted = harvest(model, tokenizer, contexts, _cfg(tmp_path, name="straight"), show_progress=False)
    shards = ["shard_00000", "shard_00001", "shard_00002"]
    assert resumed.n_shards == uninterrupted.n_shards == 3
    assert _contents(tmp_path / "interrupted") == _contents(tmp_path / "straight")
    assert sorted(p.name for p in (tmp_path / "interrupted").iterdir()) == ["contexts.npy", "manifest.json", *shards]


def test_resume_refuses_other_settings_or_contexts(tmp_path) -> None:
    model, contexts, tokenizer = _model(), _contexts(), _tokenizer()
    cfg = _cfg(tmp_path)
    handle = _interrupt_at_forward(model, call=4)
    with pytest.raises(RuntimeError):
        harvest(model, tokenizer, contexts, cfg, show_progress=False)
    handle.remove()
    with pytest.raises(StoreError, match=r"different settings \(dtype, config\.dtype\)"):
        harvest(model, tokenizer, contexts, cfg.replace(resume=True, dtype="float16"), show_progress=False)
    with pytest.raises(StoreError, match=r"different settings \(source\)"):
        harvest(model, tokenizer, _contexts(), cfg.replace(resume=True), show_progress=False)
    faster = cfg.replace(resume=True, batch_size=3, shard_tokens=1000)  # execution settings may change
    assert harvest(model, tokenizer, contexts, faster, show_progress=False).n_tokens == contexts.numel()


def test_damaged_contexts_file_is_reported_and_rewritten_by_resume(tmp_path) -> None:
    model, contexts, tokenizer = _model(), _contexts(), _tokenizer()
    cfg = _cfg(tmp_path)
    harvest(model, tokenizer, contexts, cfg, show_progress=False)
    file = tmp_path / "store" / "contexts.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x10
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"contexts\.npy does not match its sha256.*--resume"):
        ActivationStore(cfg.out_dir).contexts()
    harvest(model, tokenizer, contexts, cfg.replace(resume=True), show_progress=False)
    assert torch.equal(ActivationStore(cfg.out_dir).contexts(), contexts)


def test_nan_in_the_model_names_where_and_keeps_written_shards(tmp_path) -> None:
    model, calls = _model(), []

    def poison(module, args, output):  # third batch holds contexts 4 and 5
        calls.append(1)
        if len(calls) == 3:
            (output[0] if isinstance(output, tuple) else output)[1, 3, 0] = float("nan")

    model.transformer.h[0].register_forward_hook(poison)
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError, match=r"1 token\(s\) of resid_post\.0 .*first at context 5 position 3.*--resume"):
        harvest(model, _tokenizer(), _contexts(), cfg, show_progress=False)
    partial = ActivationStore(cfg.out_dir, require_complete=False)
    partial.verify_all()
    assert partial.manifest["n_contexts"] == 4 and partial.n_tokens == 4 * T


def test_harvest_from_config_end_to_end(tmp_path) -> None:
    _model().save_pretrained(tmp_path / "model")
    _tokenizer().save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{(7 * d + i) % 60 + 2}" for i in range(9)) for d in range(12)))
    cfg = HarvestConfig.from_dict(
        {
            "out_dir": str(tmp_path / "store"),
            "model": str(tmp_path / "model"),
            "hookpoints": "resid_post.1",
            "data": {"source": str(corpus), "context_length": T, "n_tokens": 50},
            "batch_size": 4,
            "shard_tokens": 32,
        }
    )
    store = harvest_from_config(cfg, show_progress=False)
    _, tokenizer = load_model(cfg.model)
    contexts = build_contexts(cfg.data, tokenizer)
    assert contexts.shape == (8, T)  # ceil(50 / 7 usable positions per context)
    assert torch.equal(store.token_ids(), contexts[context_mask(cfg.data, tokenizer, contexts)])
    assert int(store.token_ids().eq(EOS).sum()) == 0
    assert HarvestConfig.from_dict(store.manifest["config"]) == cfg  # reproducible from the store folder
    assert store.dtype == torch.float16
    again = harvest_from_config(cfg.replace(resume=True), show_progress=False)  # complete: nothing to do
    assert again.manifest == store.manifest


def test_config_rejects_no_hookpoints() -> None:
    with pytest.raises(ConfigError, match="hookpoints is empty"):
        HarvestConfig.from_dict({"hookpoints": []})


def test_a_bad_hookpoint_writes_nothing_so_the_corrected_rerun_starts_clean(tmp_path) -> None:
    from saelab.errors import HookpointError

    model, contexts = _model(), _contexts()
    with pytest.raises(HookpointError, match="resid_post.7"):
        harvest(model, _tokenizer(), contexts, _cfg(tmp_path, hookpoints=["resid_post.0", "resid_post.7"]),
                show_progress=False)
    assert not (tmp_path / "store").exists()
    store = harvest(model, _tokenizer(), contexts, _cfg(tmp_path, hookpoints=["resid_post.0"]), show_progress=False)
    assert store.hookpoints == ["resid_post.0"]
