"""Write the tiny SAE fixtures of `tests/saes/formats/fixtures/` with the peers' own code, and what the peers compute.

Run with the peers' venv (`bench/.peers-venv`, built by `bench/peerbench/install.py`):
    bench/.peers-venv/bin/python bench/interop_fixtures.py [--out tests/saes/formats/fixtures]

Each fixture is one folder: the SAE as the library saves it (SAELens `save_model` / `save_inference_model`,
sparsify `save_to_disk`, dictionary_learning's `trainSAE` layout: `torch.save` of the state dict + `config.json`
holding `{"trainer": trainer.config}`), and `io.safetensors` with `x` (inputs), `latents` (dense) and `x_hat`
(reconstruction) computed by that library's own model loaded back from those files. d_in 8, 16 latents, 24 tokens:
a few KB each. Weights are seeded random draws (biases and thresholds non-zero, decoder rows not unit norm) so
every term of each architecture matters.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

D, N, K, TOKENS = 8, 16, 3, 24
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "saes" / "formats" / "fixtures"
HOOK, MODEL = "blocks.1.hook_resid_post", "tiny-llama"


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Seeded draws for every floating parameter: biases and thresholds small, decoder rows of varied norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "threshold" in name:
                p.copy_(0.2 + 0.3 * torch.rand(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 + torch.rand(p.shape[0], 1, generator=g)))


def _inputs(seed: int) -> Tensor:
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1000 + seed))


def _save_io(folder: Path, x: Tensor, latents: Tensor, x_hat: Tensor) -> None:
    save_file({"x": x.contiguous(), "latents": latents.detach().contiguous(), "x_hat": x_hat.detach().contiguous()},
              str(folder / "io.safetensors"))


# ---- SAELens ---------------------------------------------------------------------------------------------------
def saelens_fixtures(out: Path) -> None:
    from sae_lens import (
        SAE,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    def meta() -> SAEMetadata:
        return SAEMetadata(hook_name=HOOK, model_name=MODEL)

    cases: dict[str, Callable[[], SAE]] = {
        "saelens_standard": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta())),
        "saelens_standard_no_b_dec_in": lambda: StandardSAE(
            StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False, metadata=meta())),
        "saelens_topk": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K, metadata=meta())),
        "saelens_topk_rescaled": lambda: TopKSAE(
            TopKSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=True, metadata=meta())),
        "saelens_jumprelu": lambda: JumpReLUSAE(
            JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False, metadata=meta())),
    }
    for seed, (name, make) in enumerate(cases.items()):
        sae = make()
        _randomise(sae, seed)
        _saelens_case(out / name, sae, seed)
    # BatchTopK and Matryoshka: trained here, saved by SAELens for inference as "jumprelu" with the threshold.
    training = {
        "saelens_batchtopk": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=False)),
        "saelens_matryoshka": lambda: MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D, d_sae=N, k=K, matryoshka_widths=[4, N], rescale_acts_by_decoder_norm=False)),
    }
    for seed, (name, make) in enumerate(training.items(), start=len(cases)):
        trained = make()
        _randomise(trained, seed)
        trained.topk_threshold = torch.tensor(0.4, dtype=trained.topk_threshold.dtype)
        tmp = out / f".{name}.training"
        trained.save_inference_model(tmp)
        _saelens_case(out / name, None, seed, saved=tmp)


def _saelens_case(folder: Path, sae, seed: int, saved: Path | None = None) -> None:
    from sae_lens import SAE

    shutil.rmtree(folder, ignore_errors=True)
    if saved is None:
        sae.save_model(folder)
    else:
        saved.rename(folder)
    loaded = SAE.load_from_disk(str(folder))
    x = _inputs(seed)
    with torch.no_grad():
        latents = loaded.encode(x)
        _save_io(folder, x, latents, loaded.decode(latents))


# ---- sparsify --------------------------------------------------------------------------------------------------
def sparsify_fixtures(out: Path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    cases = {
        "sparsify_topk/layers.1": SparseCoderConfig(num_latents=N, k=K),
        "sparsify_transcoder_skip/layers.1.mlp": SparseCoderConfig(num_latents=N, k=K, transcode=True,
                                                                   skip_connection=True),
    }
    for seed, (name, cfg) in enumerate(cases.items(), start=20):
        folder = out / name
        shutil.rmtree(folder.parent, ignore_errors=True)
        sae = SparseCoder(D, cfg)
        _randomise(sae, seed)
        sae.save_to_disk(folder)
        loaded = SparseCoder.load_from_disk(folder)
        x = _inputs(seed)
        with torch.no_grad():
            top = loaded.encode(x)
            latents = torch.zeros(TOKENS, N).scatter(-1, top.top_indices, top.top_acts)
            _save_io(folder, x, latents, loaded(x).sae_out)


# ---- dictionary_learning ---------------------------------------------------------------------------------------
def dictionary_learning_fixtures(out: Path) -> None:
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = dict(steps=10_000, activation_dim=D, dict_size=N, layer=1, lm_name=MODEL, device="cpu")
    cases = {
        "dl_autoencoder": lambda: StandardTrainer(**common, submodule_name="resid_post_layer_1"),
        "dl_topk": lambda: TopKTrainer(**common, k=K, submodule_name="resid_post_layer_1"),
        "dl_batchtopk": lambda: BatchTopKTrainer(**common, k=K, submodule_name="resid_post_layer_1"),
        "dl_matryoshka": lambda: MatryoshkaBatchTopKTrainer(**common, k=K, group_fractions=[0.25, 0.75],
                                                            submodule_name="resid_post_layer_1"),
        "dl_jumprelu": lambda: JumpReluTrainer(**common, submodule_name="resid_post_layer_1"),
    }
    for seed, (name, make) in enumerate(cases.items(), start=40):
        trainer = make()
        ae = trainer.ae
        _randomise(ae, seed)
        if hasattr(ae, "k") and "threshold" in dict(ae.named_buffers()):
            ae.threshold = torch.tensor(0.4)  # what training's running estimate would hold
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"trainer": trainer.config}, indent=4))  # as trainSAE does
        torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
        if name == "dl_autoencoder":  # its from_pretrained rescales the decoder by default: load the file as saved
            loaded = type(ae)(D, N)
            loaded.load_state_dict(torch.load(folder / "ae.pt", weights_only=True))
        else:
            loaded = type(ae).from_pretrained(folder / "ae.pt")
        x = _inputs(seed)
        with torch.no_grad():
            latents = loaded.encode(x)
            _save_io(folder, x, latents, loaded.decode(latents))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    saelens_fixtures(args.out)
    sparsify_fixtures(args.out)
    dictionary_learning_fixtures(args.out)
    for folder in sorted(p for p in args.out.rglob("io.safetensors")):
        print(folder.parent.relative_to(args.out), sum(f.stat().st_size for f in folder.parent.iterdir()), "bytes")


if __name__ == "__main__":
    main()
