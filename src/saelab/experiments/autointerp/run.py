"""`saelab autointerp`: explain and score an SAE's latents, or compare two SAEs, and write their feature pages.

Per SAE: one pass over the store into a latent record; `n_latents` alive latents drawn at random; for each, an LLM
explanation from its training examples and the baseline explanation (its most frequent activating tokens), both
scored by detection and fuzzing; then the feature pages. With `--compare-sae-dir`, the second SAE gets the same
treatment and the two are compared by Mann-Whitney U tests (per-example correctness and per-latent accuracy).
Writes `config.json`, `summary.json`, `report.html` and per SAE `<label>/latents/*.json`,
`<label>/pages/index.html` (the scored latents) and `<label>/features/index.html` (the browser of every latent).

Resumable at every level: the record resumes after its last shard, each latent's result is written once it is
scored (a rerun skips it), and every LLM reply is cached on disk, so a rerun after a failure costs only what is
missing. The summary and the feature pages are rebuilt from those files on every run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.errors import ConfigError
from saelab.evaluation import check_compatible, check_on_store
from saelab.experiments.autointerp.pages import write_browser, write_pages
from saelab.experiments.autointerp.report import write_report
from saelab.interp.cache import CachedClient, ResponseCache
from saelab.interp.compare import compare_results, latent_scores
from saelab.interp.examples import ExampleConfig, ExampleSampler, LatentExamples, TokenText
from saelab.interp.explainers import Explanation, baseline_explanation, explain_latents
from saelab.interp.feature_data import FeatureDataConfig
from saelab.interp.llm import ChatClient
from saelab.interp.record import LatentRecord, record_latents
from saelab.interp.scorers import (
    SCORERS,
    Answer,
    Query,
    answer,
    binary_metrics,
    detection_queries,
    fuzzing_queries,
)
from saelab.io import atomic_write_json
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model
from saelab.run_folder import RunFolder
from saelab.saes.self_check import SELF_CHECK_HELP
from saelab.saes.sources import SOURCE_HELP, open_sae

log = logging.getLogger(__name__)

EXPLAINERS = ("llm", "baseline")


@dataclasses.dataclass
class LLMConfig(Config):
    """The chat model that explains and scores: a local transformers model or an OpenAI-compatible server."""

    kind: Literal["local", "openai"] = dataclasses.field(default="local", metadata={"help": "local | openai"})
    model: str = dataclasses.field(
        default=OFFLINE_DEFAULT_MODEL, metadata={"help": "local: model name/path; openai: the server's model name"}
    )
    base_url: str = dataclasses.field(default="http://localhost:8000/v1", metadata={"help": "openai: endpoint"})
    api_key_env: str = dataclasses.field(default="OPENAI_API_KEY", metadata={"help": "openai: env var of the key"})
    concurrency: int = dataclasses.field(default=4, metadata={"help": "openai: requests in flight"})
    max_retries: int = dataclasses.field(default=4, metadata={"help": "openai: retries per request"})
    backoff_s: float = dataclasses.field(default=1.0, metadata={"help": "openai: first retry delay (doubles)"})
    timeout_s: float = dataclasses.field(default=120.0, metadata={"help": "openai: seconds per request"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "local: prompts per forward / generate call"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "local: device of the model"})
    top_logprobs: int = dataclasses.field(
        default=10, metadata={"help": "alternatives asked for the yes/no token (AUC); 0 if the server rejects it"}
    )
    explainer_max_tokens: int = dataclasses.field(default=48, metadata={"help": "length limit of an explanation"})
    cache: str | None = dataclasses.field(default=None, metadata={"help": "reply cache (default: out_dir/llm_cache)"})

    def validate(self) -> None:
        if min(self.concurrency, self.batch_size, self.explainer_max_tokens) < 1 or self.max_retries < 0:
            raise ConfigError("llm.concurrency, batch_size and explainer_max_tokens must be >= 1, max_retries >= 0")


@dataclasses.dataclass
class AutointerpConfig(Config):
    """What to explain and score (one SAE, or two to compare) on which store, with which examples and chat model."""

    sae_dir: str = dataclasses.field(default="runs/frontier/saes/shallow-k32/sae",
                                     metadata={"help": f"the SAE: {SOURCE_HELP}"})
    compare_sae_dir: str | None = dataclasses.field(
        default=None, metadata={"help": f"second SAE to compare with ({SOURCE_HELP})"}
    )
    store: str = dataclasses.field(default="runs/frontier/activations/train", metadata={"help": "activation store"})
    out_dir: str = dataclasses.field(default="runs/autointerp", metadata={"help": "run folder"})
    n_latents: int = dataclasses.field(default=50, metadata={"help": "alive latents scored per SAE"})
    latent_seed: int = dataclasses.field(default=0, metadata={"help": "seed of the latent draw"})
    max_tokens: int | None = dataclasses.field(
        default=200_000, metadata={"help": "store tokens recorded (cut back to whole contexts)"}
    )
    record_chunk_tokens: int = dataclasses.field(default=65_536, metadata={"help": "tokens per record shard"})
    batch_size: int = dataclasses.field(default=4096, metadata={"help": "tokens per SAE encode"})
    examples: ExampleConfig = dataclasses.field(default_factory=ExampleConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    score_baseline: bool = dataclasses.field(default=True, metadata={"help": "also score the baseline explanation"})
    latents_per_step: int = dataclasses.field(default=10, metadata={"help": "latents sent to the LLM together"})
    pages: bool = dataclasses.field(default=True, metadata={"help": "write the feature pages"})
    page_top: int = dataclasses.field(default=10, metadata={"help": "top windows per feature page"})
    page_quantiles: int = dataclasses.field(default=4, metadata={"help": "quantile sections per feature page"})
    page_per_quantile: int = dataclasses.field(default=3, metadata={"help": "windows per quantile section"})
    logit_tokens: int = dataclasses.field(default=10, metadata={"help": "promoted/suppressed tokens per page"})
    browser: bool = dataclasses.field(default=True, metadata={"help": "write the feature browser of every latent"})
    features: FeatureDataConfig = dataclasses.field(default_factory=FeatureDataConfig)
    self_check: bool = dataclasses.field(default=True, metadata={"help": SELF_CHECK_HELP})
    device: str = dataclasses.field(default="cpu", metadata={"help": "device of the SAEs"})

    def validate(self) -> None:
        if self.n_latents < 1 or self.latents_per_step < 1:
            raise ConfigError("n_latents and latents_per_step must be at least 1")


@dataclasses.dataclass
class Subject:
    """What both SAEs share: the store, the subject model's tokenizer text and unembedding, and the chat client."""

    store: ActivationStore
    text: TokenText
    unembedding: Tensor
    client: CachedClient


def sae_label(sae_dir: str | Path) -> str:
    """A folder name for an SAE: its folder's name, or the parent's for the frontier layout `<variant>/sae`."""
    path = Path(sae_dir).resolve()
    return path.parent.name if path.name == "sae" else path.name


def build_client(cfg: LLMConfig, cache_path: Path, loaded: dict[str, Any]) -> CachedClient:
    """The configured client behind the reply cache; `loaded` maps model names to already loaded (model, tokenizer)."""
    from saelab.interp.local_client import LocalChatClient  # the clients only load what their kind needs
    from saelab.interp.openai_client import OpenAIChatClient

    client: ChatClient
    if cfg.kind == "openai":
        client = OpenAIChatClient(cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout_s, cfg.max_retries,
                                  cfg.backoff_s, cfg.concurrency)
    else:
        model, tokenizer = loaded.get(cfg.model) or load_model(cfg.model, cfg.device, torch.float32)
        client = LocalChatClient(model.to(cfg.device), tokenizer, cfg.model, cfg.batch_size)
    return CachedClient(client, ResponseCache(cache_path))


def choose_latents(counts: np.ndarray, n: int, min_activations: int, seed: int) -> list[int]:
    """`n` latents drawn at random among those firing on at least `min_activations` tokens, ascending."""
    alive = np.flatnonzero(counts >= min_activations)
    if len(alive) < n:
        log.warning("only %d latents fire on at least %d tokens; scoring all of them", len(alive), min_activations)
        return alive.tolist()
    return sorted(np.random.default_rng(seed).choice(alive, size=n, replace=False).tolist())


def latent_file(folder: Path, latent: int) -> Path:
    return folder / "latents" / f"latent_{latent:06d}.json"


def score_latents(
    cfg: AutointerpConfig, subject: Subject, record: LatentRecord, sampler: ExampleSampler, latents: list[int],
    folder: Path,
) -> dict[str, float]:
    """Explain and score `latents` in steps of `latents_per_step`, writing each latent's result once complete;
    returns the seconds spent explaining and scoring."""
    todo = [latent for latent in latents if not latent_file(folder, latent).exists()]
    steps = [todo[i : i + cfg.latents_per_step] for i in range(0, len(todo), cfg.latents_per_step)]
    seconds = {"explain": 0.0, "score": 0.0}
    for step in tqdm(steps, desc=f"autointerp {folder.name}", unit="step"):
        started = time.perf_counter()
        examples = [sampler.examples(latent, cfg.examples) for latent in step]
        explanations = {"llm": explain_latents(subject.client, examples, subject.text, cfg.llm.explainer_max_tokens)}
        if cfg.score_baseline:
            explanations["baseline"] = [
                baseline_explanation(ex.latent, sampler.activating_token_ids(ex.latent), subject.text)
                for ex in examples
            ]
        explained = time.perf_counter()
        queries = {}
        for explainer, per_latent in explanations.items():
            for latent_examples, explanation in zip(examples, per_latent, strict=True):
                if explanation.text is not None:
                    queries[explanation.latent, explainer] = _queries(cfg, explanation.text, latent_examples, subject)
        requests = [q.request for per_key in queries.values() for q in per_key]
        with tqdm(total=len(requests), desc="scoring", unit="query", leave=False) as bar:
            replies = iter(subject.client.complete_many(requests, on_reply=lambda index, reply: bar.update()))
        answers = {key: [answer(query, next(replies)) for query in per_key] for key, per_key in queries.items()}
        for position, latent_examples in enumerate(examples):
            scores = {
                explainer: _by_scorer(queries[latent_examples.latent, explainer],
                                      answers[latent_examples.latent, explainer])
                for explainer in explanations if (latent_examples.latent, explainer) in queries
            }
            write_result(folder, record, latent_examples,
                         {name: per_latent[position] for name, per_latent in explanations.items()}, scores)
        seconds["explain"] += explained - started
        seconds["score"] += time.perf_counter() - explained
    return seconds


def write_result(
    folder: Path, record: LatentRecord, examples: LatentExamples, explanations: dict[str, Explanation],
    scores: dict[str, Any],
) -> None:
    count = int(record.counts[examples.latent])
    atomic_write_json(latent_file(folder, examples.latent), {
        "latent": examples.latent,
        "count": count,
        "frequency": count / record.n_tokens,
        "max_activation": examples.max_activation,
        "explanations": {name: explanation.to_dict() for name, explanation in explanations.items()},
        "scores": scores,
        "n_examples": {"train": len(examples.train), "test_activating": len(examples.test_activating),
                       "test_non_activating": len(examples.test_non_activating)},
    })


def _by_scorer(queries: list[Query], answers: list[Answer]) -> dict[str, Any]:
    out = {}
    for scorer in SCORERS:
        chosen = [a for q, a in zip(queries, answers, strict=True) if q.scorer == scorer]
        out[scorer] = {"metrics": binary_metrics(chosen), "answers": [a.to_dict() for a in chosen]}
    return out


def _queries(cfg: AutointerpConfig, explanation: str, examples: LatentExamples, subject: Subject) -> list[Query]:
    top = cfg.llm.top_logprobs
    return (detection_queries(explanation, examples, subject.text, top)
            + fuzzing_queries(explanation, examples, subject.text, cfg.examples.seed, top))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per explainer and scorer: metrics pooled over every answer, per-latent means (and the per-latent accuracies
    the report plots), invalid explanation count."""
    summary: dict[str, Any] = {}
    for explainer in EXPLAINERS:
        explained = [r for r in results if explainer in r["explanations"]]
        if not explained:
            continue
        entry: dict[str, Any] = {
            "n_latents": len(explained),
            "n_invalid_explanations": sum(r["explanations"][explainer]["text"] is None for r in explained),
        }
        for scorer in SCORERS:
            answers = [Answer.from_dict(a) for r in explained
                       for a in r["scores"].get(explainer, {}).get(scorer, {}).get("answers", [])]
            per_latent = {metric: latent_scores(explained, explainer, scorer, metric)
                          for metric in ("accuracy", "balanced_accuracy", "f1", "auc")}
            entry[scorer] = {
                "pooled": binary_metrics(answers),
                "per_latent_mean": {m: (float(np.mean(v)) if v else None) for m, v in per_latent.items()},
                "per_latent_accuracy": per_latent["accuracy"],
            }
        summary[explainer] = entry
    return summary


def check_settings(cfg: AutointerpConfig, folder: Path, model_id: str) -> None:
    """Refuse to mix per-latent results made with different examples, explainer or scorer settings in one folder."""
    settings = {"examples": cfg.examples.to_dict(), "model_id": model_id, "top_logprobs": cfg.llm.top_logprobs,
                "explainer_max_tokens": cfg.llm.explainer_max_tokens, "score_baseline": cfg.score_baseline}
    path = folder / "settings.json"
    if not path.exists():
        atomic_write_json(path, settings)
        return
    recorded = json.loads(path.read_text())
    changed = sorted(key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key))
    if changed:
        raise ConfigError(
            f"{folder} holds results scored with other settings ({', '.join(changed)} differ); rerun with the "
            "original settings, or choose another --out-dir"
        )


def autointerp_sae(
    cfg: AutointerpConfig, run_folder: RunFolder, sae_dir: str, label: str, subject: Subject
) -> dict[str, Any]:
    """Record, explain, score and page one SAE in `<out_dir>/<label>`; returns its summary (with the per-latent
    results). Times its stages as `<label>/record`, `<label>/latents` and `<label>/pages`."""
    folder = run_folder.path / label
    check_settings(cfg, folder, subject.client.model_id)
    sae = open_sae(sae_dir, device=cfg.device)
    hookpoint = check_compatible(sae, subject.store)
    check_on_store(sae, subject.store, hookpoint, str(sae_dir), cfg.self_check)
    record = record_latents(sae, subject.store, folder / "record", hookpoint, cfg.max_tokens, cfg.record_chunk_tokens,
                            cfg.batch_size)
    run_folder.lap(f"{label}/record")
    sampler = ExampleSampler(record, subject.store, cfg.examples.window_before, cfg.examples.window_after)
    latents = choose_latents(record.counts, cfg.n_latents, cfg.examples.min_activations, cfg.latent_seed)
    # Seconds of this run only: explaining and scoring latents done by an earlier run cost nothing here.
    latent_seconds = score_latents(cfg, subject, record, sampler, latents, folder)
    run_folder.lap(f"{label}/latents")
    results = [json.loads(latent_file(folder, latent).read_text()) for latent in latents]
    summary = {
        "label": label, "sae_dir": str(sae_dir), "hookpoint": hookpoint, "architecture": sae.architecture,
        "n_latents_total": sae.n_latents, "record_tokens": record.n_tokens,
        "alive_fraction": float((record.counts > 0).mean()), "latents": latents, "scores": summarize(results),
        "latent_seconds": {key: round(value, 2) for key, value in latent_seconds.items()},
    }
    if cfg.pages:
        index = write_pages(sae, record, sampler, results, folder / "pages", label, text=subject.text,
                            unembedding=subject.unembedding, top=cfg.page_top, quantiles=cfg.page_quantiles,
                            per_quantile=cfg.page_per_quantile, seed=cfg.examples.seed,
                            logit_tokens=cfg.logit_tokens)
        summary["pages"] = str(index)
        run_folder.lap(f"{label}/pages")
    if cfg.browser:
        browser = write_browser(sae, record, subject.store, results, folder / "features", label, text=subject.text,
                                unembedding=subject.unembedding, cfg=cfg.features)
        summary["browser"] = str(browser)
        run_folder.lap(f"{label}/browser")
    return {**summary, "results": results}


def run(cfg: AutointerpConfig) -> dict[str, Any]:
    """Autointerp of `cfg.sae_dir` (and `cfg.compare_sae_dir`, then the comparison); returns the written summary."""
    folder = RunFolder.start(cfg)
    store = ActivationStore(cfg.store)
    model, tokenizer = load_model(store.model_name, cfg.device, torch.float32)
    loaded = {store.model_name: (model, tokenizer)}
    client = build_client(cfg.llm, Path(cfg.llm.cache or folder.file("llm_cache.sqlite")), loaded)
    subject = Subject(store, TokenText(tokenizer), model.get_output_embeddings().weight.detach(), client)
    folder.lap("load")
    dirs = [cfg.sae_dir] + ([cfg.compare_sae_dir] if cfg.compare_sae_dir else [])
    labels = [sae_label(d) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{label}-{side}" for label, side in zip(labels, "ab", strict=False)]
    runs = [autointerp_sae(cfg, folder, sae_dir, label, subject) for sae_dir, label in zip(dirs, labels, strict=True)]
    summary: dict[str, Any] = {
        "saes": [{k: v for k, v in r.items() if k != "results"} for r in runs],
        "llm": {"model_id": client.model_id, "usage": client.usage.to_dict(), "cache": client.cache.totals()},
    }
    if len(runs) == 2:
        summary["comparison"] = {
            explainer: compare_results(runs[0]["results"], runs[1]["results"], explainer, SCORERS)
            for explainer in EXPLAINERS if explainer in runs[0]["scores"]
        }
        folder.lap("compare")
    summary = folder.write_summary(summary, cfg)
    write_report(summary, folder.path)
    log.info("autointerp finished: %s", {r["label"]: {s: r["scores"]["llm"][s]["pooled"]["accuracy"] for s in SCORERS}
                                         for r in runs if "llm" in r["scores"]})
    return summary
