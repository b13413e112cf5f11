"""The IDX reader: round trips, and clear errors for every kind of bad file."""

import gzip

import numpy as np
import pytest

from mnist_logreg.ml.data import DatasetFiles, SPLIT_FILES, load
from mnist_logreg.errors import DataError
from mnist_logreg.ml.idx import read_idx, write_idx


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_round_trip_raw_and_gzip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    back = read_idx(tmp_path / name)
    assert back.shape == (7, 28, 28) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, images)


def test_gzip_detected_by_content_not_name(tmp_path):
    write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8), compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), np.arange(5))


def test_bad_magic_names_the_file(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(DataError, match="bad-idx1-ubyte.*magic"):
        read_idx(path)


def test_truncated_raw_file(tmp_path):
    path = tmp_path / "t-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="t-idx3-ubyte is truncated"):
        read_idx(path)


def test_truncated_gzip_file(tmp_path):
    path = tmp_path / "t-idx3-ubyte.gz"
    write_idx(path, np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="t-idx3-ubyte.gz is a truncated or corrupt gzip"):
        read_idx(path)


def test_corrupt_gzip_file(tmp_path):
    path = tmp_path / "c-idx1-ubyte.gz"
    data = bytearray(gzip.compress(b"\x00\x00\x08\x01" + (1000).to_bytes(4, "big") + bytes(1000)))
    data[20:30] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="c-idx1-ubyte.gz"):
        read_idx(path)


def test_extra_bytes_are_an_error(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(DataError, match="longer than its header"):
        read_idx(path)


def _dataset(tmp_path, n_train=6, n_labels=6, shape=(28, 28), max_label=9):
    rng = np.random.default_rng(2)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train_labels": np.full(n_labels, max_label, np.uint8),
        "test_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(3, dtype=np.uint8),
    }
    paths = {}
    for key, stem in SPLIT_FILES.items():
        paths[key] = tmp_path / f"{stem}.gz"
        write_idx(paths[key], arrays[key])
    return DatasetFiles("tiny", tmp_path, paths), arrays


def test_load_scales_pixels_and_keeps_labels(tmp_path):
    files, arrays = _dataset(tmp_path)
    train, test = load(files)
    assert train.x.shape == (6, 784) and train.x.dtype == np.float32
    np.testing.assert_array_equal(train.x, arrays["train_images"].reshape(6, -1).astype(np.float32) / 255)
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    np.testing.assert_array_equal(test.y, [0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_labels": 5}, "holds 6 images but .* holds 5 labels"),
        ({"shape": (27, 28)}, r"images of shape \(27, 28\)"),
        ({"max_label": 12}, "label 12"),
    ],
)
def test_load_rejects_mismatched_files(tmp_path, kwargs, match):
    files, _ = _dataset(tmp_path, **kwargs)
    with pytest.raises(DataError, match=match):
        load(files)
