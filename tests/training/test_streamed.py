"""`saelab train --model`: several SAEs from one forward pass, exact resume, a cache equal to a harvest, clear
errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import saelab.activations.stream as stream_module
from saelab.activations.store import ActivationStore
from saelab.cli import main
from saelab.models.hooks import capture
from saelab.saes import MultiLayerSAE, TopKSAE, load_sae

HOOKPOINTS = ["resid_post.0", "resid_post.2"]
WEIGHTS = "sae/sae_weights.safetensors"


def _args(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--hookpoints", ",".join(HOOKPOINTS), "--data.source", str(corpus),
            "--data.context-length", "16", "--data.n-tokens", "600", "--sae.n-latents", "16", "--sae.k", "2",
            "--trainer.total-tokens", "384", "--trainer.batch-size", "32", "--trainer.warmup-steps", "2",
            "--trainer.checkpoint-every-steps", "3", "--trainer.log-every-steps", "2", "--trainer.progress", "false",
            "--buffer-tokens", "128", "--contexts-per-forward", "4", "--out-dir", str(out), *extra]


class _Forwards:
    """Counts forward passes (and the hookpoints each read); raises after `fail_after` of them when set."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.inputs: list[bytes] = []
        self.fail_after = fail_after

    def __call__(self, model, ids, hookpoints, **kw):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(list(hookpoints))
        self.inputs.append(ids.numpy().tobytes())
        return capture(model, ids, hookpoints, **kw)


def test_one_pass_trains_an_sae_per_hookpoint_and_a_multilayer_one(saved_tiny_llama, tmp_path, monkeypatch) -> None:
    model_dir, corpus = saved_tiny_llama()
    forwards = _Forwards()
    monkeypatch.setattr(stream_module, "capture", forwards)
    out = tmp_path / "run"
    assert main(_args(model_dir, corpus, out, "--multilayer", "true")) == 0
    assert forwards.calls and all(call == HOOKPOINTS for call in forwards.calls)  # one forward feeds every SAE
    assert len(set(forwards.inputs)) == len(forwards.inputs)  # and no batch of contexts runs twice
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["saes"]) == {*HOOKPOINTS, "multilayer"} and summary["completed"]
    for name, final in summary["saes"].items():
        assert final["tokens_seen"] == 384 and final["steps"] == 12 and final["fvu"] > 0 and final["l0"] <= 2
        folder = out / name
        assert (folder / "done" / "train.json").exists() and (folder / "metrics.jsonl").exists()
        assert (folder / "checkpoints").is_dir()
    for hp in HOOKPOINTS:
        sae = load_sae(out / hp / "sae")
        assert isinstance(sae, TopKSAE) and sae.cfg.hookpoint == hp and sae.d_in == 32
    multi = load_sae(out / "multilayer" / "sae")
    assert isinstance(multi, MultiLayerSAE) and multi.hookpoints == HOOKPOINTS and multi.d_in == 64
    assert json.loads((out / "config.json").read_text())["model"] == str(model_dir)
    assert main(_args(model_dir, corpus, out, "--multilayer", "true")) == 2  # an earlier run: only with --resume
    n_forwards = len(forwards.calls)
    assert main(_args(model_dir, corpus, out, "--multilayer", "true", "--resume", "true")) == 0
    assert len(forwards.calls) == n_forwards  # finished: nothing recomputed


def _weights(out: Path) -> dict[str, bytes]:
    return {hp: (out / hp / WEIGHTS).read_bytes() for hp in HOOKPOINTS}


def _store_contents(folder: Path) -> tuple[dict[str, bytes], dict]:
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}
    manifest = ActivationStore(folder).manifest
    for volatile in ("out_dir", "resume"):
        del manifest["config"][volatile]
    return files, manifest


def test_an_interrupted_run_resumes_to_identical_weights_and_cache(saved_tiny_llama, tmp_path, monkeypatch) -> None:
    model_dir, corpus = saved_tiny_llama()
    cache = ["--cache-to", str(tmp_path / "cache-whole"), "--cache-shard-tokens", "64"]
    assert main(_args(model_dir, corpus, tmp_path / "whole", *cache)) == 0

    split = tmp_path / "split"
    cache = ["--cache-to", str(tmp_path / "cache-split"), "--cache-shard-tokens", "64"]
    monkeypatch.setattr(stream_module, "capture", _Forwards(fail_after=8))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(model_dir, corpus, split, *cache))
    steps = {hp: sorted(p.name for p in (split / hp / "checkpoints").glob("step_*")) for hp in HOOKPOINTS}
    assert steps[HOOKPOINTS[0]] == steps[HOOKPOINTS[1]] == ["step_000000003", "step_000000006"]
    assert not (split / HOOKPOINTS[0] / "done").exists()
    # a crash between two SAEs' checkpoints: the run continues from the newest step both hold
    for name in ("step_000000006", "latest.json"):
        path = split / HOOKPOINTS[1] / "checkpoints" / name
        path.unlink() if path.is_file() else shutil.rmtree(path)
    monkeypatch.setattr(stream_module, "capture", capture)
    assert main(_args(model_dir, corpus, split, *cache, "--resume", "true")) == 0
    assert _weights(split) == _weights(tmp_path / "whole")

    harvested = tmp_path / "harvest"
    assert main(["harvest", "--model", str(model_dir), "--hookpoints", ",".join(HOOKPOINTS), "--data.source",
                 str(corpus), "--data.context-length", "16", "--data.n-tokens", "600", "--batch-size", "4",
                 "--shard-tokens", "64", "--out-dir", str(harvested)]) == 0
    assert _store_contents(tmp_path / "cache-whole") == _store_contents(harvested)
    assert _store_contents(tmp_path / "cache-split") == _store_contents(harvested)
    assert ActivationStore(harvested).n_tokens > 384  # the cache holds every context, not just those trained on

    reuse = ["train", "--store", str(tmp_path / "cache-split"), "--hookpoint", "resid_post.2", "--sae.n-latents", "16",
             "--sae.k", "2", "--trainer.total-tokens", "64", "--trainer.batch-size", "32", "--trainer.progress",
             "false", "--out-dir", str(tmp_path / "from-cache")]
    assert main(reuse) == 0


def test_bad_input_gets_one_clear_error_before_anything_is_written(saved_tiny_llama, tmp_path, capsys) -> None:
    model_dir, corpus = saved_tiny_llama()
    out = tmp_path / "run"
    args = _args(model_dir, corpus, out)
    at = args.index("--hookpoints") + 1
    bad = [*args[:at], "resid_post.0,resid_post.7", *args[at + 1 :]]
    assert main(bad) == 2
    assert "resid_post.7" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--store", str(tmp_path / "store")]) == 2
    assert "got both" in capsys.readouterr().err
    assert main(["train", "--out-dir", str(out)]) == 2
    assert "got neither" in capsys.readouterr().err and not out.exists()


def test_a_bfloat16_model_streams_trains_and_caches_what_a_bfloat16_harvest_stores(saved_tiny_llama, tmp_path) -> None:
    model_dir, corpus = saved_tiny_llama()
    bf16 = ["--model-dtype", "bfloat16"]
    cache = ["--cache-to", str(tmp_path / "cache"), "--cache-shard-tokens", "64", "--cache-dtype", "float32"]
    assert main(_args(model_dir, corpus, tmp_path / "run", *bf16, *cache)) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] and all(0 < s["fvu"] < 1 for s in summary["saes"].values())
    harvest = ["harvest", "--model", str(model_dir), "--hookpoints", ",".join(HOOKPOINTS), "--data.source",
               str(corpus), "--data.context-length", "16", "--data.n-tokens", "600", "--batch-size", "4",
               "--shard-tokens", "64", "--dtype", "float32"]
    assert main([*harvest, *bf16, "--out-dir", str(tmp_path / "bf16")]) == 0
    assert main([*harvest, "--out-dir", str(tmp_path / "fp32")]) == 0
    assert _store_contents(tmp_path / "cache") == _store_contents(tmp_path / "bf16")
    low, full = ActivationStore(tmp_path / "bf16"), ActivationStore(tmp_path / "fp32")
    for hp in HOOKPOINTS:
        x, y = low.load(hp, 0, low.n_tokens), full.load(hp, 0, full.n_tokens)
        assert torch.equal(x, x.bfloat16().float())  # bf16 values, stored exactly in float32
        drift = float((x - y).norm() / y.norm())
        assert 0 < drift < 0.05  # bf16 rounding, not another computation
