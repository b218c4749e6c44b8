"""circuit-tracer's own code against saelab's transcoder-set export, in a venv where circuit-tracer imports.

circuit-tracer 0.5 pins huggingface-hub<1 and transformers<=4.57.3, which the saelab venv does not hold; a
throwaway venv that sees the saelab venv's packages and adds those pins is enough for its loader:
    python3 -m venv /tmp/ctvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/ctvenv/lib/python3.11/site-packages/saelab.pth
    /tmp/ctvenv/bin/pip install --no-deps "huggingface-hub<1.0" "transformers==4.57.3" "tokenizers==0.22.1" \
        circuit-tracer==0.5.0

Two jobs:
    /tmp/ctvenv/bin/python bench/circuit_tracer_check.py fixture [--out tests/saes/formats/fixtures/circuit_tracer]
writes a 2-layer JumpReLU transcoder set with a skip connection by circuit-tracer's own `TranscoderSet.to_safetensors`
and `io.safetensors` with inputs and what its `SingleLayerTranscoder.forward` computes (the CI tests check saelab's
layout and arithmetic against it, without circuit-tracer);
    PYTHONPATH=src /tmp/ctvenv/bin/python bench/circuit_tracer_check.py load EXPORT_DIR [--store STORE]
loads a folder written by `saelab export-transcoders` with circuit-tracer's `load_transcoders` (its config.yaml read
by yaml, the layer files by `load_relu_transcoder`) and prints, per layer, the largest difference between
circuit-tracer's output and saelab's JumpReLU reading of the same files (`apply_layer`) on the store's inputs (or
random ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "saes" / "formats" / "fixtures" / "circuit_tracer"
D, N, TOKENS = 8, 16, 12


def write_fixture(out: Path) -> None:
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    g = torch.Generator().manual_seed(0)
    layers = {}
    for layer in range(2):
        tc = SingleLayerTranscoder(D, N, JumpReLU(0.2 + 0.3 * torch.rand(N, generator=g), 0.1), layer,
                                   skip_connection=True, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            for name, p in tc.named_parameters():
                if "threshold" not in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        layers[layer] = tc
    out.mkdir(parents=True, exist_ok=True)
    TranscoderSet(layers, "mlp.hook_in", "mlp.hook_out", scan="fixture").to_safetensors(str(out))
    x = torch.randn(TOKENS, D, generator=g)
    with torch.no_grad():
        save_file({"x": x, **{f"out_{layer}": tc(x) for layer, tc in layers.items()}}, str(out / "io.safetensors"))
    print(f"wrote {out}")


def load_export(folder: Path, store: str | None) -> None:
    import yaml
    from circuit_tracer.utils.hf_utils import load_transcoders
    from safetensors.torch import load_file

    from saelab.saes.formats.circuit_tracer import apply_layer, layer_file

    config = yaml.safe_load((folder / "config.yaml").read_text())
    n_layers = len(list(folder.glob("layer_*.safetensors")))
    config["transcoders"] = [str(folder / layer_file(layer)) for layer in range(n_layers)]  # local files
    config["scan"] = "saelab-export"
    tset = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    print(f"circuit-tracer loaded {len(tset)} layers, d_transcoder={tset.d_transcoder}, "
          f"skip={tset.skip_connection}, hooks {tset.feature_input_hook} -> {tset.feature_output_hook}")
    report = {}
    for layer in range(n_layers):
        tensors = load_file(str(folder / layer_file(layer)))
        d = tensors["b_dec"].shape[0]
        if store is not None:
            from saelab.activations.store import ActivationStore

            s = ActivationStore(store)
            x = s.load(f"mlp_in.{layer}", 0, 2048)
        else:
            x = torch.randn(512, d)
        with torch.no_grad():
            theirs = tset[layer](x)
            ours, acts = apply_layer(tensors, x)
        diff = float((theirs - ours).abs().max())
        report[layer] = {"max_abs_diff": diff, "l0": float((acts != 0).sum(-1).float().mean()),
                         "out_norm": float(ours.norm(dim=-1).mean())}
        print(f"layer {layer}: max |circuit-tracer - saelab| = {diff:.3g}, L0 {report[layer]['l0']:.1f}")
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="job", required=True)
    fixture = sub.add_parser("fixture")
    fixture.add_argument("--out", type=Path, default=DEFAULT_OUT)
    load = sub.add_parser("load")
    load.add_argument("folder", type=Path)
    load.add_argument("--store", default=None)
    args = parser.parse_args()
    if args.job == "fixture":
        write_fixture(args.out)
    else:
        load_export(args.folder, args.store)


if __name__ == "__main__":
    main()
