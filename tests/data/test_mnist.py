import gzip
import pickle

import numpy as np
import pytest
import torch

from saelab.data.mnist import N_PIXELS, load_mnist
from saelab.errors import DataError


def _write_pickle(path, parts) -> None:
    with gzip.open(path, "wb") as handle:
        pickle.dump(parts, handle)


def test_shipped_split_sizes_and_ranges() -> None:
    sizes = {split: len(load_mnist(split).labels) for split in ("train", "val", "test")}
    assert sizes == {"train": 50_000, "val": 10_000, "test": 10_000}
    images, labels = load_mnist("test", limit=500)
    assert images.shape == (500, N_PIXELS) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.9


def test_returned_tensors_do_not_alias_the_cache() -> None:
    images, _ = load_mnist("val", limit=3)
    images.fill_(-1.0)
    assert load_mnist("val", limit=3).images.min() >= 0.0


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(DataError, match="split='dev' is unknown"):
        load_mnist("dev")  # type: ignore[arg-type]


def test_damaged_or_foreign_files_are_named(tmp_path) -> None:
    garbage = tmp_path / "garbage.pkl.gz"
    garbage.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot be read"):
        load_mnist("train", path=garbage)

    two_parts = tmp_path / "two.pkl.gz"
    _write_pickle(two_parts, ((np.zeros((2, 784)), np.zeros(2)),) * 2)
    with pytest.raises(DataError, match=r"expected \(train, val, test\)"):
        load_mnist("train", path=two_parts)

    bytes_images = tmp_path / "bytes.pkl.gz"
    _write_pickle(bytes_images, ((np.full((2, 784), 255.0), np.zeros(2, dtype=np.int64)),) * 3)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_mnist("val", path=bytes_images)
