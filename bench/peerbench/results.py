"""Render the measured figures and the speed and quality targets as `bench/RESULTS.md` (formatting only)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]  # one worker's JSON line (see workers.common.report)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    n: int | None
    required: str
    measured: float | None  # None: not measured in this run
    met: bool | None
    digits: int = 3  # decimals shown: the FVU difference needs the workers' five to show a difference at all


def machine_info() -> dict[str, str]:
    """CPU model, cores, the vector ISA torch uses (GEMM speed depends on it), load average, torch version and date."""
    import torch

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        model = names[0] if names else model
    return {
        "cpu": model, "cores": str(os.cpu_count()), "load_average": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
        "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "bf16": _bf16_capability(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _bf16_capability() -> str:
    import torch

    from saelab.saes.certified import bf16_gemm_available

    if bf16_gemm_available(torch.device("cpu")):
        return "yes (avx512_bf16 or amx_bf16)"
    return "no (neither avx512_bf16 nor amx_bf16: the ours-bf16 rows run the fp32 path)"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _get(rows: Sequence[Row], trainer: str, n: int, key: str) -> float | None:
    for row in rows:
        if row["trainer"] == trainer and row["n"] == n:
            return row[key]
    return None


def speed_targets(rows: Sequence[Row], sizes: Sequence[int]) -> list[Target]:
    """Issue 7's per-size targets from the synthetic speed rows (medians, measured in the same run)."""
    targets = []
    for n in sizes:
        ours = _get(rows, "ours", n, "median_tokens_per_s")
        for name, peer, required, floor in (
            ("tokens/s vs sparsify", "sparsify", "≥ 1.6×", 1.6), ("tokens/s vs SAELens", "saelens", "≥ 6×", 6.0),
        ):
            ratio = _ratio(ours, _get(rows, peer, n, "median_tokens_per_s"))
            targets.append(Target(name, n, required, ratio, None if ratio is None else ratio >= floor))
        ratio = _ratio(ours, _get(rows, "ours", n, "encode_median_tokens_per_s"))
        met = None if ratio is None else ratio >= 0.85
        targets.append(Target("tokens/s vs our encode-only", n, "≥ 0.85×", ratio, met))
        ratio = _ratio(_get(rows, "ours", n, "peak_rss_mb"), _get(rows, "sparsify", n, "peak_rss_mb"))
        targets.append(Target("peak RSS vs sparsify", n, "≤ 0.6×", ratio, None if ratio is None else ratio <= 0.6))
        if n >= 24_576:  # bf16-exact's target applies where the bf16 path runs (bf16 hardware)
            ratio = _ratio(_get(rows, "ours-bf16", n, "median_tokens_per_s"),
                           _get(rows, "sparsify", n, "median_tokens_per_s"))
            ran = _get(rows, "ours-bf16", n, "bf16_path_ran")
            name = "tokens/s ours-bf16 vs sparsify" + ("" if ran else " (fp32 ran: no bf16 hardware)")
            targets.append(Target(name, n, "≥ 3× (bf16 hardware)", ratio,
                                  None if ratio is None or not ran else ratio >= 3.0))
    return targets


def gemm_ceilings(rows: Sequence[Row], sizes: Sequence[int]) -> list[str]:
    """Per size: how far ahead of sparsify any exact top-k trainer could be here, when its whole step cost no more
    than the bare fp32 encoder GEMM (which every exact top-k step must run)."""
    notes = []
    for n in sizes:
        gemm = _get(rows, "ours", n, "gemm_median_tokens_per_s")
        peer = _get(rows, "sparsify", n, "median_tokens_per_s")
        ceiling = _ratio(gemm, peer)
        if ceiling is not None:
            notes.append(f"n = {n:,}: the bare encoder GEMM alone runs at {gemm:,.0f} tokens/s, {ceiling:.2f}× "
                         "sparsify's whole step: the most any exact top-k trainer's step could be ahead on this "
                         "machine.")
    return notes


def precision_note(machine: dict[str, str]) -> list[str]:
    """Which rows `saelab train`'s default precision ("auto") gives on this machine: the ours rows force fp32."""
    if "bf16" not in machine:
        return []
    default = "bf16-exact, the ours-bf16 rows" if machine["bf16"].startswith("yes") else "fp32, the ours rows"
    return ["ours, ours-deep and ours-multilayer run `--trainer.precision fp32` (the encoder GEMM in fp32) and "
            "ours-bf16 bf16-exact, with the same weights bit for bit; `saelab train`'s default (auto) runs "
            f"{default} on this machine."]


def quality_target(rows: Sequence[Row]) -> Target:
    ours = next((r["fvu"] for r in rows if r["trainer"] == "ours"), None)
    peer = next((r["fvu"] for r in rows if r["trainer"] == "sparsify"), None)
    diff = None if ours is None or peer is None else ours - peer
    return Target("FVU at equal tokens, ours − sparsify (real activations)", None, "≤ 0", diff,
                  None if diff is None else diff <= 0, digits=5)


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in body)]


def trainer_table(rows: Sequence[Row]) -> list[str]:
    """One line per (trainer, n): median and min tokens/s, peak RSS, our ratio to it, load during the run."""
    body = []
    for row in rows:
        ours = _get(rows, "ours", row["n"], "median_tokens_per_s") if row["data"] == "synthetic" else None
        mine = row["trainer"].startswith("ours")
        body.append([
            row["trainer"], _fmt(row["n"]), _fmt(row["d"]), row["data"].split(":")[0],
            _fmt(row["median_tokens_per_s"]), _fmt(row["min_tokens_per_s"]), _fmt(row["peak_rss_mb"]),
            _fmt(row.get("encode_median_tokens_per_s")), _fmt(row.get("gemm_median_tokens_per_s")),
            "–" if mine else _fmt(_ratio(ours, row["median_tokens_per_s"]), 2),
            _fmt(row["fvu"], 4), _fmt(row.get("certified_fraction"), 3), _fmt(row["load_average_1min"], 2),
        ])
    return _table(["trainer", "n", "d", "data", "median tok/s", "min tok/s", "peak RSS MB", "encode-only tok/s",
                   "GEMM-only tok/s", "ours ÷ this", "FVU (held out)", "bf16 certified", "load 1 min"], body)


def target_table(targets: Sequence[Target]) -> list[str]:
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    return _table(["target", "n", "required", "measured", "verdict"], [
        [t.name, _fmt(t.n), t.required, _fmt(t.measured, t.digits), verdict[t.met]] for t in targets
    ])


def render(machine: Mapping[str, str], settings: str, speed: Sequence[Row], quality: Sequence[Row],
           costs: Sequence[Row], sizes: Sequence[int], notes: Sequence[str] = ()) -> str:
    """The whole RESULTS.md: machine, targets, trainer table, quality, harvesting/evaluation costs, notes."""
    lines = [
        "# Peer benchmark results", "",
        "Generated by `make bench-peers` (`bench/peers.py`); do not edit by hand.", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, vector ISA {machine.get('isa', '?')}; load average at "
        f"write time {machine['load_average']}",
        f"- bf16 GEMM: {machine.get('bf16', '?')}",
        f"- torch {machine['torch']}; {machine['date']}",
        f"- Settings: {settings}", "",
        "## Targets", "", *target_table([*speed_targets(speed, sizes), quality_target(quality)]), "",
        "## Training throughput (synthetic activations; ours' deep and multi-layer SAE rows included)", "",
        *trainer_table(speed), "",
        "## Quality at an equal token budget (real activations)", "", *trainer_table(quality), "",
    ]
    if costs:
        lines += ["## Harvesting and evaluation cost (SmolLM2)", "",
                  *_table(["measurement", "tokens/s", "relative to a full forward", "load 1 min"], [
                      [c["name"], _fmt(c["tokens_per_s"]), _fmt(c["relative"], 3), _fmt(c["load_average_1min"], 2)]
                      for c in costs
                  ]), ""]
    notes = [*gemm_ceilings(speed, sizes), *precision_note(machine), *notes]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)
