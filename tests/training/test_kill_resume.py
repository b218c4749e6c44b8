"""SIGKILL at random moments of a `saelab train` process, resume, repeat: the final weights are byte-identical to an
uninterrupted run's, at the default thread count, training from a store and streamed from a model."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saelab
from saelab.activations.writer import StoreWriter

KILLS = 5
WEIGHTS = Path("sae") / "sae_weights.safetensors"
TRAINER = ["--trainer.warmup-steps", "3", "--trainer.log-every-steps", "1", "--trainer.checkpoint-every-steps", "3",
           "--trainer.progress", "false", "--trainer.auxk-coefficient", "0.03", "--trainer.dead-window-tokens", "2048"]


def _env() -> dict[str, str]:
    """The default thread count (no OMP_NUM_THREADS), the package under test first on the path."""
    src = str(Path(saelab.__file__).parents[1])
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return env


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps_logged(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _kill_and_resume(args: list[str], out: Path, metrics: Path, seed: int) -> list[int]:
    """Start the command, SIGKILL it at a random moment after it has made new progress (1-6 more logged steps, then
    up to 50 ms), KILLS times, then let it finish; returns the logged step counts seen at each kill."""
    chooser = random.Random(seed)
    seen = []
    for _ in range(KILLS):
        before = _steps_logged(metrics)
        process = subprocess.Popen([sys.executable, "-m", "saelab", *args, "--resume", "true"], env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # a random moment measured in progress, not in seconds (a faster trainer would otherwise finish before the
        # kills land): a few more steps logged, then a random fraction of a step
        target = before + 1 + chooser.randrange(6)
        deadline = time.monotonic() + 120
        while _steps_logged(metrics) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if process.poll() is not None:  # finished before a kill could land: nothing left to interrupt
            assert process.returncode == 0, process.stderr.read().decode()
            break
        time.sleep(chooser.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        seen.append(_steps_logged(metrics))
    done = subprocess.run([sys.executable, "-m", "saelab", *args, "--resume", "true"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return seen


def _check(args_for, tmp_path: Path, metrics_of) -> None:
    reference = subprocess.run([sys.executable, "-m", "saelab", *args_for(tmp_path / "reference")], env=_env(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    seen = _kill_and_resume(args_for(out), out, metrics_of(out), seed=len(str(tmp_path)))
    assert len(seen) >= 3, f"too few kills landed mid-run: {seen}"
    assert _digest(metrics_of(out).parent / WEIGHTS) == _digest(metrics_of(tmp_path / "reference").parent / WEIGHTS)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_store_run_killed_at_random_points_resumes_to_identical_weights(tmp_path) -> None:
    writer = StoreWriter(tmp_path / "store", model="synthetic", hookpoints=["resid_post.0"], dtype="float32",
                         context_length=16, shard_tokens=1024)
    generator = torch.Generator().manual_seed(0)
    n = 256 * 16
    writer.append({"resid_post.0": torch.randn(n, 64, generator=generator) * 2 + 1}, torch.arange(n) % 50,
                  torch.arange(n) % 16, torch.arange(n) // 16, n_contexts=256)
    writer.finish()

    def args(out: Path) -> list[str]:
        return ["train", "--store", str(tmp_path / "store"), "--out-dir", str(out), "--sae.n-latents", "2048",
                "--sae.k", "16", "--trainer.total-tokens", str(60 * 256), "--trainer.batch-size", "256", *TRAINER]

    _check(args, tmp_path, lambda out: out / "metrics.jsonl")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_streamed_run_killed_at_random_points_resumes_to_identical_weights(saved_tiny_llama, tmp_path) -> None:
    model_dir, corpus = saved_tiny_llama(n_documents=200)

    def args(out: Path) -> list[str]:
        return ["train", "--model", str(model_dir), "--hookpoints", "resid_post.0,resid_post.2", "--data.source",
                str(corpus), "--data.context-length", "16", "--data.n-tokens", "3000", "--sae.n-latents", "1024",
                "--sae.k", "8", "--trainer.total-tokens", str(50 * 128), "--trainer.batch-size", "128",
                "--buffer-tokens", "512", "--contexts-per-forward", "4", "--out-dir", str(out), *TRAINER]

    _check(args, tmp_path, lambda out: out / "resid_post.2" / "metrics.jsonl")
