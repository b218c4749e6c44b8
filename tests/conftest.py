"""Shared test settings: deterministic, one thread (tiny tensors run fastest single-threaded), offline fixtures
(a tokenizer, a loopback HTTP server speaking the OpenAI chat-completions protocol, headless Chromium)."""

import dataclasses
import json
import math
import os
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from saelab.saes.base import SAEConfig, SparseAutoencoder, SparseLatents, to_dense
from saelab.saes.relu import ReluSAE, ReluSAEConfig


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


torch.set_num_threads(1)


# ----------------------------------------------------------- pages in a real browser


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the whole session; tests that need it skip where it is not installed."""
    from saelab.report.chromium import Chromium, find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run does it): pages not "
                    "checked in a browser")
    with Chromium() as browser:
        yield browser


@pytest.fixture
def open_page(chromium):
    """`open_page(path_or_url, ready=None) -> (page, check)`: load a page in headless Chromium and fail on any
    console error, failed request, broken image or broken link; `page.evaluate(js)` then reads the rendered page."""
    opened = []

    def open_(target: str | Path, ready: str | None = None, clean: bool = True):
        url = target if isinstance(target, str) and "://" in target else Path(target).resolve().as_uri()
        page = chromium.open(url, ready)
        opened.append(page)
        check = page.check()
        if clean:
            assert check.problems == [], f"{url} is broken in Chromium: {check.problems}"
        return page, check

    yield open_
    for page in opened:
        page.close()


@pytest.fixture
def shows_values():
    """`shows_values(page, values)`: every name of `values` is a row of a name/value table on the page, showing the
    value as the report builder formats it (so the page's numbers are the summary's)."""
    from saelab.report.html import format_value

    def check(page, values) -> None:
        rows = page.evaluate("""Array.from(document.querySelectorAll('table'))
            .filter(t => t.tHead && Array.from(t.tHead.rows[0].cells).map(c => c.textContent).join() === 'name,value')
            .flatMap(t => Array.from(t.tBodies[0].rows).map(r => [r.cells[0].textContent, r.cells[1].textContent]))""")
        assert values, "nothing to compare"
        for name, value in values.items():
            assert [name, format_value(value)] in rows, f"{name}={format_value(value)} is not shown: {rows}"

    return check


# ----------------------------------------------------------- several processes in one gloo group (latent sharding)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, check: Callable[..., None], args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        check(rank, *args)
    finally:
        dist.destroy_process_group()


def _run_in_group(check: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run `check(rank, *args)` in `world` forked processes joined in a gloo group; a worker's exception fails the
    caller with its traceback. Forked, not spawned: pytest imports test modules by path, so a spawned child could
    not import the module defining `check`."""
    import torch.multiprocessing as mp

    torch.testing.assert_close(torch.zeros(1), torch.zeros(1))  # its lazy imports (~2 s) once, before the fork
    mp.start_processes(_gloo_worker, args=(world, _free_port(), check, args), nprocs=world, start_method="fork")


@pytest.fixture
def run_in_group() -> Callable[..., None]:
    return _run_in_group


@pytest.fixture
def word_tokenizer():
    """Offline fast tokenizer: one token per whitespace-separated word `w0`..`w95` (anything else is <unk>),
    with BOS, EOS, pad and unk specials (ids 0-3), so token counts in tests are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(96)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


# ----------------------------------------------------------- a loopback server speaking the OpenAI chat protocol


@dataclasses.dataclass
class FakeServer:
    """`reply(body) -> (status, content)` decides each answer: with status 200, a str is the assistant's message,
    a dict is sent as the whole JSON response and bytes as the raw body; otherwise content is the error body.
    `bodies` are the requests received, in order; `served` counts the 200 answers."""

    url: str
    bodies: list[dict[str, Any]]
    headers: list[dict[str, str]]
    reply: Callable[[dict[str, Any]], tuple[int, Any]]
    served: int = 0

    @property
    def count(self) -> int:
        return len(self.bodies)


def deterministic_reply(body: dict[str, Any]) -> tuple[int, str]:
    """Explainer prompts get an explanation; yes/no prompts answer Yes iff the excerpt holds the token "w7"."""
    user = body["messages"][-1]["content"]
    if "Explanation:" not in user:
        return 200, "Explanation: the token w7"
    excerpt = user.split("Excerpt:", 1)[1]
    return 200, "Yes" if "w7" in excerpt.split() or "<<w7>>" in excerpt else "No"


def completion(body: dict[str, Any], content: str) -> dict[str, Any]:
    """An OpenAI chat-completions response; with logprobs, P(Yes) = 0.8 for a Yes and 0.3 for a No."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if body.get("logprobs"):
        p_yes = 0.8 if content == "Yes" else 0.3
        top = [{"token": "Yes", "logprob": math.log(p_yes)}, {"token": "No", "logprob": math.log(1 - p_yes)}]
        choice["logprobs"] = {"content": [{"token": content, "logprob": top[0]["logprob"], "top_logprobs": top}]}
    prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
    return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}}


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server_state = FakeServer(url="", bodies=[], headers=[], reply=deterministic_reply)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server_state.bodies.append(body)
            server_state.headers.append(dict(self.headers))
            status, content = server_state.reply(body)
            if self.path != "/v1/chat/completions":
                status, content = 404, "no such route"
            if status == 200:
                server_state.served += 1
            if isinstance(content, bytes):
                payload = content
            else:
                payload = json.dumps(content if isinstance(content, dict) else completion(body, content)).encode()
            if status != 200:
                payload = str(content).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield server_state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def saved_tiny_llama(tmp_path, word_tokenizer):
    """Factory for (model folder, corpus file): a random Llama saved with the word tokenizer, so recipes load it by
    path as they would a hub model, and a corpus of random word documents."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(hidden_size: int = 32, num_hidden_layers: int = 3, n_documents: int = 90):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=len(word_tokenizer),
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
        ))
        model.save_pretrained(tmp_path / "model")
        word_tokenizer.save_pretrained(tmp_path / "model")
        generator = torch.Generator().manual_seed(0)
        documents = [" ".join(f"w{int(i)}" for i in torch.randint(0, 96, (40,), generator=generator))
                     for _ in range(n_documents)]
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n\n".join(documents))
        return tmp_path / "model", corpus

    return make


def make_perfect_sae(d: int, tied: bool = False, preprocessing: str = "none", scale: float = 1.0) -> ReluSAE:
    """2d latents ±q_i of an orthonormal basis: ReLU keeps either (q_i·x) or −(q_i·x), and decoding with the same ±q_i
    sums back to x exactly. A nonzero b_dec checks the subtract-before-encode / add-after-decode convention."""
    sae = ReluSAE(ReluSAEConfig(d_in=d, n_latents=2 * d, tied=tied, preprocessing=preprocessing, input_scale=scale))
    q = torch.linalg.qr(torch.randn(d, d)).Q
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([q, -q]))
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.randn(d))
        if not tied:
            sae.W_dec.copy_(torch.cat([q, -q]))
    x = torch.randn(50, d) * 3
    torch.testing.assert_close(sae.reconstruct(x), x, atol=1e-5, rtol=1e-5)
    return sae

@pytest.fixture
def perfect_sae():
    """Factory (d, tied, preprocessing, scale) -> a ReLU SAE that reconstructs every input exactly."""
    return make_perfect_sae


# ----------------------------------------------- small SAEs implementing the interface, independent of saelab.saes.*


@dataclasses.dataclass
class TinyTopKConfig(SAEConfig):
    k: int = 2


class TinyTopK(SparseAutoencoder):
    """Plain top-k SAE (dense matmuls): b_dec subtracted before encoding, W_dec rows are the atoms."""

    architecture = "tiny_topk_test"
    config_class = TinyTopKConfig

    def __init__(self, cfg: TinyTopKConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_in) / cfg.d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.median_calls: list[Tensor] = []

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode(self, x: Tensor) -> SparseLatents:
        values, indices = self.pre_activations(x).topk(self.cfg.k, dim=-1)
        return SparseLatents(values.clamp_min(0), indices, self.n_latents)

    def decode(self, latents: SparseLatents) -> Tensor:
        return to_dense(latents) @ self.W_dec + self.b_dec

    def decoder_matrices(self) -> list[Tensor]:
        return [self.W_dec]

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    def auxk_latents(self, x: Tensor, dead_mask: Tensor, k_aux: int) -> SparseLatents:
        pre = self.pre_activations(x).masked_fill(~dead_mask, float("-inf"))
        values, indices = pre.topk(k_aux, dim=-1)
        return SparseLatents(values.clamp_min(0), indices, self.n_latents)

    def latent_parameters(self) -> dict[str, int]:
        return {"W_enc": 0, "b_enc": 0, "W_dec": 0}

    def initialize_from_batch(self, x: Tensor) -> None:
        self.median_calls.append(x.clone())
        self.b_dec.data.copy_(x.median(dim=0).values)

    def flops_per_token(self) -> int:
        return 2 * self.d_in * self.n_latents + 2 * self.cfg.k * self.d_in


class TinyRelu(SparseAutoencoder):
    """ReLU SAE with dense latents and no optional methods at all (the bare interface)."""

    architecture = "tiny_relu_test"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_in) / cfg.d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_in) / cfg.d_in**0.5)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W_enc.T + self.b_enc)

    def decode(self, latents: Tensor) -> Tensor:
        return to_dense(latents) @ self.W_dec + self.b_dec

    def decoder_matrices(self) -> list[Tensor]:
        return [self.W_dec]

    def flops_per_token(self) -> int:
        return 4 * self.d_in * self.n_latents


@pytest.fixture
def tiny_topk():
    def make(d_in: int = 8, n_latents: int = 16, k: int = 2, seed: int = 0, **kw) -> TinyTopK:
        torch.manual_seed(seed)
        return TinyTopK(TinyTopKConfig(d_in=d_in, n_latents=n_latents, k=k, **kw))

    return make


@pytest.fixture
def tiny_relu():
    def make(d_in: int = 8, n_latents: int = 16, seed: int = 0) -> TinyRelu:
        torch.manual_seed(seed)
        return TinyRelu(SAEConfig(d_in=d_in, n_latents=n_latents))

    return make


def planted_batches(
    n_batches: int, batch_size: int, d: int = 16, n_atoms: int = 32, k: int = 3, seed: int = 0,
    sample_seed: int | None = None,
) -> list[Tensor]:
    """Tokens that are sparse sums of k of n_atoms random unit atoms (magnitudes 0.5-1.5), plus an offset.
    `seed` fixes the atoms; `sample_seed` (default: seed) the tokens drawn from them."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=gen), dim=1)
    offset = torch.randn(d, generator=gen)
    if sample_seed is not None:
        gen.manual_seed(sample_seed)
    out = []
    for _ in range(n_batches):
        idx = torch.rand(batch_size, n_atoms, generator=gen).argsort(dim=1)[:, :k]
        coef = torch.zeros(batch_size, n_atoms).scatter_(1, idx, 0.5 + torch.rand(batch_size, k, generator=gen))
        out.append(coef @ atoms + offset)
    return out


@pytest.fixture
def planted():
    return planted_batches


# ----------------------------------------------------------- a Hugging Face hub cache, offline


class HubCache:
    """A hub cache laid out as `huggingface_hub.snapshot_download` leaves it (blobs, snapshot symlinks,
    refs/main), so the real library resolves `hf:` sources from it offline and nothing downloads."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, repo_id: str, files: dict[str, Path]) -> Path:
        """Cache `files` ({path in the repository: local file}) as `repo_id`'s main branch; its snapshot folder."""
        import hashlib

        root = self.path / f"models--{repo_id.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(self.COMMIT)
        for name, source in files.items():
            data = source.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            link = root / "snapshots" / self.COMMIT / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        return root / "snapshots" / self.COMMIT

    @staticmethod
    def files(folder: Path, under: str) -> dict[str, Path]:
        """The files of `folder` as they would sit in a repository's subfolder `under` ("" = top level)."""
        return {f"{under}/{p.name}" if under else p.name: p for p in Path(folder).iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    """An empty offline hub cache: HF_HUB_CACHE and HF_HUB_OFFLINE=1, set both in the environment and in
    huggingface_hub.constants (which reads them once, at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubCache(cache)
