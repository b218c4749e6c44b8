"""The peer harness without peers: our worker emits a valid JSON line, and RESULTS.md renders from fixed figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
from peerbench import results  # noqa: E402


def run_our_worker(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "peerbench.workers.ours", *argv], cwd=BENCH, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_our_worker_trains_tiny_sae_and_prints_json() -> None:
    argv = ["--d", "16", "--n", "64", "--k", "4", "--batch", "32", "--steps", "2", "--warmup", "1", "--eval-rows", "16"]
    row = run_our_worker(*argv)
    assert row["trainer"] == "ours" and (row["d"], row["n"], row["k"], row["steps"]) == (16, 64, 4, 2)
    assert row["tokens_trained"] == 4 * 32  # warmup + steps + the untimed last step
    assert row["median_tokens_per_s"] > 0 and row["encode_median_tokens_per_s"] > 0 and row["fvu"] >= 0
    assert row["gemm_median_tokens_per_s"] > 0
    # a second process starts from the same init (torch's global generator differs from process to process)
    assert run_our_worker(*argv)["fvu"] == row["fvu"]


def test_warmup_grows_at_narrower_sizes_up_to_eight_fold() -> None:
    sizes = [4096, 24576, 98304]
    assert [peers.warmup_steps(1, n, sizes) for n in sizes] == [8, 4, 1]
    assert peers.warmup_steps(2, 512, [512]) == 2


def _row(trainer: str, tps: float, rss: float, fvu: float, data: str = "synthetic") -> dict:
    return {"trainer": trainer, "n": 4096, "d": 768, "data": data, "median_tokens_per_s": tps,
            "min_tokens_per_s": tps / 2, "peak_rss_mb": rss, "fvu": fvu, "load_average_1min": 1.0,
            **({"encode_median_tokens_per_s": 20_000.0, "gemm_median_tokens_per_s": 27_000.0}
               if trainer == "ours" else {})}


def test_results_render_targets_and_tables_from_fixed_figures() -> None:
    speed = [_row("ours", 18_000.0, 600.0, 0.5), _row("sparsify", 9_000.0, 1_200.0, 0.6),
             _row("saelens", 4_000.0, 2_000.0, 0.7)]
    quality = [_row("ours", 1.0, 1.0, 0.30, "store:x"), _row("sparsify", 1.0, 1.0, 0.25, "store:x")]
    machine = {"cpu": "Test CPU", "cores": "2", "load_average": "1.00 / 1.00 / 1.00", "torch": "2.13.0",
               "date": "2026-01-01"}
    text = results.render(machine, "fixed", speed, quality, [], [4096])
    assert "Test CPU, 2 cores" in text
    verdicts = {t.name: (t.measured, t.met) for t in results.speed_targets(speed, [4096])}
    assert verdicts["tokens/s vs sparsify"] == (2.0, True)
    assert verdicts["tokens/s vs SAELens"] == (4.5, False)
    assert verdicts["tokens/s vs our encode-only"] == (0.9, True)
    assert verdicts["peak RSS vs sparsify"] == (0.5, True)
    assert results.quality_target(quality).met is False
    assert "| FVU at equal tokens, ours − sparsify (real activations) | – | ≤ 0 | 0.05000 | **not met** |" in text
    assert "| ours | 4,096 | 768 | synthetic | 18,000 | 9,000 | 600 | 20,000 | 27,000 | – | 0.5000 | – | 1.00 |" in text
    assert "| sparsify | 4,096 | 768 | synthetic | 9,000 | 4,500 | 1,200 | – | – | 2.00 |" in text
    assert "n = 4,096: the bare encoder GEMM alone runs at 27,000 tokens/s, 3.00× sparsify's whole step" in text
    assert "default (auto)" not in text  # no bf16 capability recorded: nothing said about it
    for capability, default in (("yes (avx512_bf16 or amx_bf16)", "runs bf16-exact, the ours-bf16 rows"),
                                ("no (neither)", "runs fp32, the ours rows")):
        assert f"`saelab train`'s default (auto) {default} on this machine" in results.render(
            {**machine, "bf16": capability}, "fixed", speed, quality, [], [4096])


def test_paths_are_resolved_before_the_workers_change_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = peers.parse_args(["--store", "runs/acts", "--out", "RESULTS.md"])
    assert args.store == str(tmp_path / "runs" / "acts") and args.out == str(tmp_path / "RESULTS.md")


def test_our_worker_runs_bf16_exact_and_autocast_rows() -> None:
    argv = ["--d", "16", "--n", "64", "--k", "4", "--batch", "32", "--steps", "2", "--warmup", "1", "--eval-rows", "16"]
    env = {**__import__("os").environ, "SAELAB_FORCE_BF16_EXACT": "1"}
    for precision, name in (("bf16-exact", "ours-bf16"), ("autocast", "ours-autocast")):
        proc = subprocess.run([sys.executable, "-m", "peerbench.workers.ours", *argv, "--precision", precision],
                              cwd=BENCH, capture_output=True, text=True, check=True, env=env)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["trainer"] == name and row["fvu"] >= 0
        if precision == "bf16-exact":
            assert row["bf16_path_ran"] and 0 <= row["certified_fraction"] <= 1


def test_bf16_target_is_judged_only_where_the_bf16_path_ran() -> None:
    def bf16(ran: bool) -> dict:
        return {**_row("ours-bf16", 27_000.0, 600.0, 0.5), "n": 24576, "bf16_path_ran": ran}

    sparsify = {**_row("sparsify", 9_000.0, 1_200.0, 0.6), "n": 24576}
    for ran, met in ((True, True), (False, None)):
        target = [t for t in results.speed_targets([bf16(ran), sparsify], [24576]) if "ours-bf16" in t.name][0]
        assert (target.measured, target.met) == (3.0, met)
        assert ("fp32 ran" in target.name) is not ran


def test_the_cuda_section_renders_its_rows_and_survives_a_cpu_rerun(tmp_path) -> None:
    from peerbench import cuda_results, end_to_end_results

    rows = [{**_row(trainer, tps, 0.0, 0.5), "n": 24576, "peak_cuda_mb": 900.0}
            for trainer, tps in (("ours", 300_000.0), ("sparsify", 200_000.0), ("ours-bf16", 650_000.0))]
    gpu = {"gpu": "Test GPU", "cuda": "13.0", "torch": "2.11.0", "date": "2026-01-01"}
    section = cuda_results.render(gpu, "fixed", rows, [24576], ["ours-autocast at n = 24,576: the worker failed"])
    assert section.startswith(cuda_results.HEADING) and "Test GPU; CUDA 13.0" in section
    assert section.rstrip("\n").endswith("- ours-autocast at n = 24,576: the worker failed")
    assert "| ours | 24,576 | 768 | 300,000 | 150,000 | 900 | 27,000 | 1.50 |" in section
    verdicts = {t.name: (t.measured, t.met) for t in cuda_results.targets(rows, [24576])}
    assert verdicts["tokens/s ours vs sparsify (CUDA)"] == (1.5, False)
    assert verdicts["tokens/s ours-bf16 vs sparsify (CUDA)"] == (3.25, True)
    out = tmp_path / "RESULTS.md"
    out.write_text("# Peer benchmark results\n\n## Targets\n\nold\n")
    end_to_end_results.write_section(out, section)
    assert cuda_results.HEADING in peers.KEPT_SECTIONS
    assert end_to_end_results.read_section(out, cuda_results.HEADING) == section.rstrip("\n") + "\n"
