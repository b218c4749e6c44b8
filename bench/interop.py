"""Round trips between saelab and the peers' own code: does each library compute what saelab computes?

1. saelab -> peer: a saelab SAE of each architecture (seeded random weights, non-zero biases and thresholds) is
   written with `saelab.saes.formats.write` as a SAELens and as a sparsify folder; the real library loads it
   (`bench/interop_peer.py` in `bench/.peers-venv`) and computes latents and reconstructions of the same inputs.
2. peer -> saelab: the library saves what it loaded with its own writer (SAELens `save_model`, sparsify
   `save_to_disk`); saelab loads that and must again compute what the original SAE computed.
3. Read only: each fixture of `tests/saes/formats/fixtures/` (written by SAELens, sparsify, dictionary_learning)
   loaded by saelab against the outputs the library computed.

Prints a table (format x architecture: write/read/refused, max abs diff of latents and reconstructions) and, as the
last line, one JSON object with every cell.

Usage: PYTHONPATH=src python bench/interop.py [--peers-python bench/.peers-venv/bin/python] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saelab.errors import ConfigError
from saelab.saes import (
    DeepSAE,
    DeepSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    MultiLayerSAE,
    MultiLayerSAEConfig,
    ReluSAE,
    ReluSAEConfig,
    SparseAutoencoder,
    TopKSAE,
    TopKSAEConfig,
    TopKTranscoder,
    TopKTranscoderConfig,
)
from saelab.saes.formats import check_writable, detect_format, load_any, write
from saelab.saes.initialization import seeded
from saelab.saes.latents import to_dense

BENCH = Path(__file__).resolve().parent
FIXTURES = BENCH.parent / "tests" / "saes" / "formats" / "fixtures"
D, N, K = 16, 64, 4
META = dict(hookpoint="resid_post.1", model_name="tiny")
ARCHITECTURES: dict[str, Callable[[], SparseAutoencoder]] = {
    "relu": lambda: ReluSAE(ReluSAEConfig(d_in=D, n_latents=N, **META)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D, n_latents=N, k=K, **META)),
    "topk (input_scale 0.25)": lambda: TopKSAE(TopKSAEConfig(d_in=D, n_latents=N, k=K, preprocessing="scale",
                                                             input_scale=0.25, **META)),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, n_latents=N, apply_b_dec_to_input=False, **META)),
    "topk_transcoder (skip)": lambda: TopKTranscoder(TopKTranscoderConfig(d_in=D, n_latents=N, k=K,
                                                                          skip_connection=True, **META)),
    "topk (token_l2)": lambda: TopKSAE(TopKSAEConfig(d_in=D, n_latents=N, k=K, preprocessing="token_l2", **META)),
    "deep": lambda: DeepSAE(DeepSAEConfig(d_in=D, n_latents=N, k=K, **META)),
    "multilayer": lambda: MultiLayerSAE(MultiLayerSAEConfig(
        d_in=D, n_latents=N, k=K, layers=[1, 2], hookpoints=["resid_post.1", "resid_post.2"], slice_widths=[8, 8],
        layer_scales=[1.0, 1.0])),
}


def _randomised(make: Callable[[], SparseAutoencoder], seed: int) -> SparseAutoencoder:
    with seeded(seed):
        sae = make()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                if "threshold" in name:
                    p.copy_(0.2 + 0.3 * torch.rand(p.shape, generator=g))
                elif p.ndim == 1:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return sae


@torch.no_grad()
def _outputs(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return to_dense(sae.encode(sae.normalize(x)[0])), sae.reconstruct(x)


def _diff(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    return {"latents": float((a[0] - b[0]).abs().max()), "x_hat": float((a[1] - b[1]).abs().max())}


def round_trip(arch: str, sae: SparseAutoencoder, to: str, x: torch.Tensor, python: str, work: Path) -> dict[str, Any]:
    try:
        check_writable(sae, to)
    except ConfigError as exc:
        return {"format": to, "architecture": arch, "result": "refused", "why": str(exc)}
    folder = work / f"{arch}-{to}".replace(" ", "_") / "layers.1"
    write(sae, folder, to=to)
    io_file, resaved = folder.parent / "io.safetensors", folder.parent / "resaved" / "layers.1"
    save_file({"x": x}, str(io_file))
    proc = subprocess.run([python, str(BENCH / "interop_peer.py"), to, str(folder), str(io_file), str(resaved)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"format": to, "architecture": arch, "result": "peer failed", "why": proc.stderr[-1500:]}
    peer = load_file(str(io_file))
    ours = _outputs(sae, x)
    back = load_any(resaved)
    return {"format": to, "architecture": arch, "result": "write", "saelab_to_peer": _diff(ours, (peer["latents"],
            peer["x_hat"])), "peer_to_saelab": _diff(ours, _outputs(back, x)), "detected_back": detect_format(resaved)}


def read_fixture(name: str) -> dict[str, Any]:
    folder = FIXTURES / name
    io = load_file(str(folder / "io.safetensors"))
    sae = load_any(folder)
    return {"format": detect_format(folder), "architecture": f"{sae.architecture} ({name})", "result": "read",
            "peer_to_saelab": _diff((io["latents"], io["x_hat"]), _outputs(sae, io["x"]))}


def _table(cells: list[dict[str, Any]]) -> str:
    lines = [f"{'format':<20} {'architecture':<48} {'result':<8} {'saelab->peer (z, x_hat)':<26} "
             "peer->saelab (z, x_hat)"]

    def pair(d: dict[str, float] | None) -> str:
        return f"{d['latents']:.2e}, {d['x_hat']:.2e}" if d else "-"

    for c in cells:
        lines.append(f"{c['format']:<20} {c['architecture']:<48} {c['result']:<8} "
                     f"{pair(c.get('saelab_to_peer')):<26} {pair(c.get('peer_to_saelab'))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-python", default=str(BENCH / ".peers-venv" / "bin" / "python"))
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    if not Path(args.peers_python).exists():
        sys.exit(f"{args.peers_python} does not exist; build it with bench/peerbench/install.py or pass "
                 "--peers-python")
    x = torch.randn(args.tokens, D, generator=torch.Generator().manual_seed(0)) * 2
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (arch, make) in enumerate(ARCHITECTURES.items()):
            sae = _randomised(make, seed)
            for to in ("saelens", "sparsify"):
                cells.append(round_trip(arch, sae, to, x, args.peers_python, Path(tmp)))
    cells += [read_fixture(str(p.parent.relative_to(FIXTURES))) for p in sorted(FIXTURES.rglob("io.safetensors"))]
    print(_table(cells))
    for c in cells:
        if c["result"] == "refused":
            print(f"refused {c['format']} x {c['architecture']}: {c['why']}")
    print(json.dumps(cells))


if __name__ == "__main__":
    main()
