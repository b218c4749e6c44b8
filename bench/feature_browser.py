"""How fast the feature browser opens in headless Chromium: a synthetic 100k-latent SAE, and optionally a run's own.

    PYTHONPATH=src .venv/bin/python bench/feature_browser.py [--latents 100000] [--run runs/demo] [--repeats 3]

Synthetic: a random top-k SAE (d_in 16, k 16) with `--latents` latents recorded over 25,600 tokens of a random
store (200 contexts of 128 words), so about 4 activations per latent; the full site is built (index and every
chunk). Measured per site, median of `--repeats` fresh tabs: the index load (navigation to the table drawn, i.e. the
page's `data-ready`), sorting all latents by count (a click until the table is redrawn), and opening one latent's
panel (its chunk loaded on demand). With `--run`, the run's `features/index.html` is measured the same way (build it
with `saelab demo`, or `saelab train --store ... --features-tokens N`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saelab.activations.writer import StoreWriter
from saelab.interp.examples import TokenText
from saelab.interp.feature_data import FeatureDataConfig
from saelab.report.chromium import Chromium
from saelab.report.run_features import write_run_features
from saelab.saes import create_sae

HOOKPOINT = "resid_post.0"


def synthetic_site(folder: Path, n_latents: int) -> tuple[Path, float]:
    n_contexts, length, d = 200, 128, 16
    words = ["<unk>"] + [f"w{i}" for i in range(999)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    generator = torch.Generator().manual_seed(0)
    contexts = torch.randint(1, len(words), (n_contexts, length), generator=generator)
    writer = StoreWriter(folder / "store", model="synthetic", hookpoints=[HOOKPOINT], dtype="float32",
                         context_length=length, shard_tokens=65_536, contexts=contexts)
    for c in range(n_contexts):
        writer.append({HOOKPOINT: torch.randn(length, d, generator=generator)}, contexts[c], torch.arange(length),
                      torch.full((length,), c), n_contexts=1)
    store = writer.finish()
    torch.manual_seed(0)
    sae = create_sae("topk", d_in=d, n_latents=n_latents, k=16, hookpoint=HOOKPOINT)
    started = time.perf_counter()
    cfg = FeatureDataConfig(top=5, quantiles=2, per_quantile=1, chunk_size=64)
    index, _ = write_run_features(sae, store, HOOKPOINT, folder / "run", TokenText(tokenizer), cfg=cfg,
                                  unembedding=torch.randn(len(words), d), title=f"synthetic {n_latents:,} latents")
    return index, time.perf_counter() - started


def measure(browser: Chromium, index: Path, repeats: int) -> dict[str, float]:
    loads, sorts, panels = [], [], []
    for _ in range(repeats):
        page = browser.open(index.resolve().as_uri(), ready="document.body.dataset.ready")
        loads.append(page.load_ms)
        sorts.append(page.evaluate("""(() => { const t0 = performance.now();
            document.querySelector('th[data-key=count]').click(); return performance.now() - t0; })()"""))
        latent = page.evaluate("+document.querySelector('#latents tbody tr').dataset.latent")
        started = time.perf_counter()
        page.evaluate(f"location.hash = '#latent={latent}'")
        page.wait_until(f"document.getElementById('panel').dataset.latent === '{latent}'")
        panels.append(1000 * (time.perf_counter() - started))
        problems = page.check().problems
        if problems:
            raise SystemExit(f"{index}: {problems}")
        page.close()
    data = index.parent / "data"
    return {"index_load_ms": statistics.median(loads), "sort_all_ms": statistics.median(sorts),
            "open_latent_ms": statistics.median(panels), "index_js_kb": (data / "index.js").stat().st_size / 1024,
            "chunks": len(list(data.glob("chunk_*.js"))),
            "site_mb": sum(p.stat().st_size for p in data.iterdir()) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=100_000)
    parser.add_argument("--run", type=Path, help="a run folder with features/index.html to measure too")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Chromium() as browser:
        if args.run is not None:
            print(f"{args.run}: {measure(browser, args.run / 'features' / 'index.html', args.repeats)}")
        index, build_s = synthetic_site(Path(tmp), args.latents)
        print(f"synthetic {args.latents:,} latents (built in {build_s:.1f} s): "
              f"{measure(browser, index, args.repeats)}")


if __name__ == "__main__":
    main()
