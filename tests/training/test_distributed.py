"""Data-parallel training: 2 gloo processes equal one process, resume exactly after a rank is killed, and fail
together with one clear line on bad input. The default run and the fault go through torchrun; the other jobs fork
their ranks from this process (same environment variables, same code path) to skip two torch imports per job."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

import saelab
from saelab.activations.writer import StoreWriter
from saelab.cli import main
from saelab.errors import ConfigError, DataError
from saelab.metrics import fraction_of_variance_unexplained
from saelab.saes import TopKSAE, load_sae, losses
from saelab.saes.base import BatchShare, TrainingContext
from saelab.saes.topk import TopKSAEConfig
from saelab.training import checkpoint as ckpt
from saelab.training.config import TrainerConfig
from saelab.training.distributed import Dist, pooled_sq_dev, shard_batches, slice_moments
from saelab.training.entry import train
from saelab.training.logger import read_records
from saelab.training.trainer import Trainer

D = 8
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    writer = StoreWriter(tmp_path_factory.mktemp("dist") / "store", model="synthetic", hookpoints=["resid_post.0"],
                         dtype="float32", context_length=4, shard_tokens=64)
    n = 32 * 4
    generator = torch.Generator().manual_seed(0)
    writer.append({"resid_post.0": torch.randn(n, D, generator=generator) * 3 + 1}, torch.arange(n) % 50,
                  torch.arange(n) % 4, torch.arange(n) // 4, n_contexts=32)
    return writer.finish()


def _args(store, out: Path, **trainer) -> list[str]:
    settings = {"total-tokens": 320, "batch-size": 32, "warmup-steps": 2, "log-every-steps": 2, "progress": "false",
                **trainer}
    return ["train", "--store", str(store.path), "--out-dir", str(out), "--sae.n-latents", "16", "--sae.k", "2",
            *[item for key, value in settings.items() for item in (f"--trainer.{key}", str(value))]]


def _torchrun(args: list[str], script: Path | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """A 2-process gloo job on this machine: `python -m saelab args` (or `script args`) per rank."""
    src = str(Path(saelab.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "SAELAB_DIST_TIMEOUT_S": "30"}
    target = [str(script)] if script is not None else ["-m", "saelab"]
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *target, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_sae(out / "sae").state_dict()


def _assert_same_run(one: Path, two: Path, atol: float) -> None:
    for name, value in _weights(one).items():
        torch.testing.assert_close(_weights(two)[name], value, atol=atol, rtol=0, msg=name)
    first, second = read_records(one / "metrics.jsonl"), read_records(two / "metrics.jsonl")
    assert [r["step"] for r in first] == [r["step"] for r in second] and first
    for a, b in zip(first, second, strict=True):
        for key in ("loss", "fvu", "l0", "dead_fraction", "tokens"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


@pytest.fixture(scope="module")
def two_ranks(store, tmp_path_factory) -> Path:
    """The default run (pooled FVU) trained by `torchrun --nproc-per-node 2 -m saelab train`."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    job = _torchrun(_args(store, out))
    assert job.returncode == 0, job.stderr
    return out


def _forked(targets: list, timeout: float = 60) -> list[tuple[int, str]]:
    """Run `targets[r]()` as rank r of a gloo job in processes forked from this one (no torch import to wait
    for), with torchrun's environment variables; returns each rank's (exit code, stderr)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    context = multiprocessing.get_context("fork")
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in targets]
        processes = [context.Process(target=_rank_main, args=(rank, len(targets), port, target, log.fileno()))
                     for rank, (target, log) in enumerate(zip(targets, logs, strict=True))]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
        outcomes = []
        for process, log in zip(processes, logs, strict=True):
            log.seek(0)
            outcomes.append((process.exitcode, log.read()))
    return outcomes


def _rank_main(rank: int, world: int, port: int, target, log_fd: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), SAELAB_DIST_TIMEOUT_S="30")
    torch.set_num_threads(1)
    os.dup2(log_fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os._exit(target())


def test_two_ranks_train_the_same_sae_as_one_process(store, tmp_path, two_ranks) -> None:
    assert main(_args(store, tmp_path / "one")) == 0
    _assert_same_run(tmp_path / "one", two_ranks, atol=1e-5)
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["completed"]
    assert not list(two_ranks.glob("**/*.tmp*"))


def test_two_ranks_with_auxk_equal_one_process(store, tmp_path) -> None:
    auxk = {"auxk-coefficient": 0.5, "dead-window-tokens": 32, "k-aux": 4}
    assert main(_args(store, tmp_path / "one", **auxk)) == 0
    outcomes = _forked([lambda: main(_args(store, tmp_path / "two", **auxk))] * 2)
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    _assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5)
    records = read_records(tmp_path / "two" / "metrics.jsonl")  # AuxK really ran: latents died, its term counted
    assert any(r["auxk"] > 0 for r in records) and any(r["dead_fraction"] > 0 for r in records)


KILL_RANK_1 = """
    import os, signal, sys
    from saelab.cli import main
    from saelab.training.trainer import Trainer

    train_on = Trainer.train_on

    def dying(self, batch):
        if self.dist is not None and self.dist.rank == 1 and self.step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
        train_on(self, batch)

    Trainer.train_on = dying
    sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_rank_ends_the_job_and_the_run_resumes_exactly(store, tmp_path, two_ranks) -> None:
    reference = two_ranks
    script = tmp_path / "kill_rank_1.py"
    script.write_text(textwrap.dedent(KILL_RANK_1.format(step=5)))
    out = tmp_path / "run"
    started = time.monotonic()
    job = _torchrun(_args(store, out, **{"checkpoint-every-steps": 2}), script=script)
    assert time.monotonic() - started < 60
    assert job.returncode != 0
    assert "saelab train: error: rank 0" in job.stderr  # the survivor's one line
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and latest.name == "step_000000004"
    state, _ = ckpt.read_checkpoint(latest)  # intact
    assert state["step"] == 4 and state["world_size"] == 2
    assert not (out / "done").exists()

    other_world = tmp_path / "resumed_alone"
    shutil.copytree(out, other_world)
    resume = [*_args(store, out, **{"checkpoint-every-steps": 2}), "--resume", "true"]
    outcomes = _forked([lambda: main(resume)] * 2)
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    for name, value in _weights(reference).items():
        assert torch.equal(_weights(out)[name], value), name
    untimed = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_records(run / "metrics.jsonl")]
               for run in (out, reference)]
    assert untimed[0] == untimed[1]
    # Another world size continues the same run (same global batches), to float tolerance.
    assert main([*_args(store, other_world, **{"checkpoint-every-steps": 2}), "--resume", "true"]) == 0
    _assert_same_run(reference, other_world, atol=1e-5)


def test_ranks_launched_with_different_settings_fail_on_every_rank(store, tmp_path) -> None:
    started = time.monotonic()
    args = _args(store, tmp_path / "run")
    outcomes = _forked([lambda rank=rank: main([*args, "--trainer.lr", str(1e-3 * (rank + 1))]) for rank in range(2)])
    assert time.monotonic() - started < 60
    for code, stderr in outcomes:
        assert code == 2
        assert stderr.strip().splitlines()[-1].startswith("saelab train: error: the ranks were given different")
    assert not (tmp_path / "run" / "sae").exists()


def _wrong_width(store, out: Path) -> int:
    sae = TopKSAE(TopKSAEConfig(d_in=D - 2, n_latents=16, k=2))
    cfg = TrainerConfig(total_tokens=64, batch_size=32, progress=False)
    try:
        train(sae, store.batches("resid_post.0", 32, epochs=None), cfg, out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def test_a_store_of_another_width_fails_on_every_rank(store, tmp_path) -> None:
    outcomes = _forked([lambda: _wrong_width(store, tmp_path / "run")] * 2)
    for code, stderr in outcomes:
        assert code == 2 and f"batch 0: expected activations of shape [B, {D - 2}]" in stderr


def test_each_rank_takes_its_rows_of_every_global_batch() -> None:
    batches = [torch.arange(7 * 2).reshape(7, 2).float(), torch.arange(4 * 2).reshape(4, 2).float()]
    parts = [list(shard_batches(batches, Dist(rank, 3, torch.device("cpu")))) for rank in range(3)]
    for step, batch in enumerate(batches):
        assert torch.equal(torch.cat([part[step] for part in parts]), batch)
    assert [len(part[0]) for part in parts] == [2, 2, 3]
    assert shard_batches(batches, None) is batches


def _shares(x: torch.Tensor, bounds: list[int]) -> list[BatchShare]:
    """What each of len(bounds) - 1 ranks holding x[bounds[r]:bounds[r + 1]] would get from `Dist.share`."""
    slices = [x[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    n, sq_dev = pooled_sq_dev(torch.stack([slice_moments(part) for part in slices]), x.dtype)
    return [BatchShare(n, sq_dev, sq_dev=lambda t: pytest.fail("unused")) for _ in slices]


def test_the_ranks_loss_shares_add_up_to_the_one_process_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, D, generator=generator) * 3 + 100  # far from the origin: no cancellation allowed
    sae = TopKSAE(TopKSAEConfig(d_in=D, n_latents=16, k=3))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    bounds = [0, 3, 3, 10]  # unequal slices, one of them empty
    n, sq_dev = pooled_sq_dev(torch.stack([slice_moments(x[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]),
                              x.dtype)
    assert n == 10
    torch.testing.assert_close(sq_dev, (x - x.mean(0)).pow(2).sum(), rtol=1e-6, atol=0)
    ctx = TrainingContext(l1_coefficient=0.1, activation_decay=0.1)
    alone = sae.training_loss(x, sae(x), ctx, lambda: torch.zeros(16, dtype=torch.bool))
    parts = [sae.training_loss(x[a:b], sae(x[a:b]), TrainingContext(l1_coefficient=0.1, activation_decay=0.1,
                                                                     share=share), lambda: None)
             for (a, b), share in zip(zip(bounds, bounds[1:], strict=False), _shares(x, bounds), strict=True)]
    for name, term in alone.items():
        torch.testing.assert_close(sum(part[name].value for part in parts), term.value, rtol=1e-5, atol=1e-7)
    mse_parts = [losses.reconstruction_loss(x[a:b], sae(x[a:b]).x_hat, "mse", share)
                 for (a, b), share in zip(zip(bounds, bounds[1:], strict=False), _shares(x, bounds), strict=True)]
    torch.testing.assert_close(sum(mse_parts), losses.reconstruction_loss(x, sae(x).x_hat, "mse"))
    assert alone["recon"].value.item() == pytest.approx(fraction_of_variance_unexplained(x, sae(x).x_hat).item())


def test_one_process_makes_no_collective_call(store, tmp_path, monkeypatch) -> None:
    import torch.distributed as torch_dist

    for name in ("init_process_group", "all_reduce", "all_gather", "broadcast", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(torch_dist, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} called"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(_args(store, tmp_path / "one", **{"auxk-coefficient": 0.5, "dead-window-tokens": 32})) == 0


def test_a_trainer_without_dist_under_torchrun_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    sae = TopKSAE(TopKSAEConfig(d_in=D, n_latents=16, k=2))
    with pytest.raises(ConfigError, match="one of 2 launched by torchrun"):
        Trainer(sae, TrainerConfig(total_tokens=64, batch_size=32, progress=False), tmp_path / "run")


def test_two_ranks_stream_the_same_saes_as_one_process(saved_tiny_llama, tmp_path) -> None:
    """`saelab train --model` under torchrun: every rank streams the same global batches and keeps its rows."""
    model_dir, corpus = saved_tiny_llama()
    hookpoints = ["resid_post.0", "resid_post.2"]

    def args(out: Path) -> list[str]:
        return ["train", "--model", str(model_dir), "--hookpoints", ",".join(hookpoints), "--data.source",
                str(corpus), "--data.context-length", "16", "--data.n-tokens", "600", "--sae.n-latents", "16",
                "--sae.k", "2", "--trainer.total-tokens", "256", "--trainer.batch-size", "32",
                "--trainer.warmup-steps", "2", "--trainer.log-every-steps", "2", "--trainer.progress", "false",
                "--buffer-tokens", "128", "--contexts-per-forward", "4", "--out-dir", str(out)]

    assert main(args(tmp_path / "one")) == 0
    outcomes = _forked([lambda: main(args(tmp_path / "two"))] * 2)
    assert all(code == 0 for code, _ in outcomes), outcomes
    for hookpoint in hookpoints:
        _assert_same_run(tmp_path / "one" / hookpoint, tmp_path / "two" / hookpoint, atol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


# ---- --distribute-hookpoints -------------------------------------------------------------------------------------

SPREAD = ["resid_post.0", "resid_post.1", "resid_post.2"]  # 2 ranks: rank 0 owns .0 and .2, rank 1 owns .1


def _spread_args(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--hookpoints", ",".join(SPREAD), "--data.source", str(corpus),
            "--data.context-length", "16", "--data.n-tokens", "600", "--sae.n-latents", "16", "--sae.k", "2",
            "--trainer.total-tokens", "256", "--trainer.batch-size", "32", "--trainer.warmup-steps", "2",
            "--trainer.log-every-steps", "2", "--trainer.checkpoint-every-steps", "2", "--trainer.progress", "false",
            "--buffer-tokens", "128", "--contexts-per-forward", "3", "--out-dir", str(out), *extra]


@pytest.fixture
def spread_alone(saved_tiny_llama, tmp_path_factory) -> tuple[Path, Path, Path]:
    """One process training an SAE on each of SPREAD: what the distributed runs must reproduce."""
    model_dir, corpus = saved_tiny_llama()
    out = tmp_path_factory.mktemp("spread") / "one"
    assert main(_spread_args(model_dir, corpus, out)) == 0
    return model_dir, corpus, out


def _assert_identical(one: Path, two: Path) -> None:
    for hookpoint in SPREAD:
        for name, value in _weights(one / hookpoint).items():
            assert torch.equal(_weights(two / hookpoint)[name], value), (hookpoint, name)
        untimed = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_records(run / "metrics.jsonl")]
                   for run in (one / hookpoint, two / hookpoint)]
        assert untimed[0] == untimed[1] and untimed[0], hookpoint


def test_distributed_hookpoints_train_each_sae_as_one_process_does(spread_alone, tmp_path) -> None:
    model_dir, corpus, one = spread_alone
    two = tmp_path / "two"
    outcomes = _forked([lambda: main(_spread_args(model_dir, corpus, two, "--distribute-hookpoints", "true"))] * 2)
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    _assert_identical(one, two)  # bit for bit: each owner assembles the batches one process would have seen
    summary = json.loads((two / "summary.json").read_text())
    assert list(summary["saes"]) == SPREAD and summary["completed"] and summary["world_size"] == 2
    alone = json.loads((one / "summary.json").read_text())["saes"]
    assert summary["saes"] == alone


STOP_AT_STEP = """
    import sys
    from saelab.cli import main
    from saelab.training.trainer import Trainer

    train_on = Trainer.train_on

    def stopping(self, batch):
        if self.step == {step}:
            raise KeyboardInterrupt
        train_on(self, batch)

    Trainer.train_on = stopping
    sys.exit(main(sys.argv[1:]))
"""


def test_distributed_hookpoints_resume_exactly(spread_alone, tmp_path) -> None:
    model_dir, corpus, one = spread_alone
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent(STOP_AT_STEP.format(step=5)))
    out = tmp_path / "run"
    args = _spread_args(model_dir, corpus, out, "--distribute-hookpoints", "true")
    job = _torchrun(args, script=script)
    assert job.returncode != 0
    assert all(ckpt.latest_checkpoint(out / hp).name == "step_000000004" for hp in SPREAD)
    outcomes = _forked([lambda: main([*args, "--resume", "true"])] * 2)
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    _assert_identical(one, out)


def test_distribute_hookpoints_refuses_what_it_cannot_do(saved_tiny_llama, store, tmp_path, capsys) -> None:
    from saelab.training.entry import TrainConfig

    model_dir, corpus = saved_tiny_llama()
    assert main(_spread_args(model_dir, corpus, tmp_path / "alone", "--distribute-hookpoints", "true")) != 0
    assert "launch with torchrun" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot be combined with --store"):
        TrainConfig(store=str(store.path), distribute_hookpoints=True).validate()
    args = [*_spread_args(model_dir, corpus, tmp_path / "few", "--distribute-hookpoints", "true"),
            "--hookpoints", "resid_post.0"]
    outcomes = _forked([lambda: main(args)] * 2)
    for code, stderr in outcomes:
        assert code != 0 and "only 1 were given" in stderr, stderr
