"""run.py end to end: real Hydra runs and multiruns in subprocesses, into a real SQLite MLflow store."""

import re
import signal
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mnist_logreg.data import load, locate
from conftest import ROOT, run_cli, store_uri

pytestmark = pytest.mark.slow


def runs_of(folder, experiment="mnist_logreg"):
    client = MlflowClient(store_uri(folder))
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def artifact_paths(client, run_id, path=None):
    out = []
    for info in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, info.path) if info.is_dir else [info.path]
    return out


def test_sweep_on_real_digits(tmp_path, mnist5k_root):
    epochs = 3
    proc = run_cli(["-m", "optim.lr=0.05,0.5", f"trainer.epochs={epochs}", "model.sigma=0.1",
                    f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"epoch {epochs}/{epochs}") == 2  # a progress line per epoch
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "outputs" / "sweeps").is_dir()

    client, runs = runs_of(tmp_path)
    parents = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "job"]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id])

    assert sorted(float(r.data.params["optim.lr"]) for r in children) == [0.05, 0.5]
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["sweep"] == parent.data.tags["sweep"]
        assert params["data.batch_size"] == "64" and params["model.sigma"] == "0.1"
        assert params["trainer.epochs"] == str(epochs) and params["seed"] == "42"
        assert params["data.root"] == str(mnist5k_root)
        for key in ("git.commit", "python.version", "mxnet.version", "numpy.version", "hydra.version",
                    "mlflow.version", "data.sha256", "hydra.overrides", "context"):
            assert tags.get(key), key
        assert tags["context"] == "cpu(0)"
        assert f"optim.lr={params['optim.lr']}" in tags["hydra.overrides"]

        assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == list(range(epochs + 1))
        assert [s for s, _ in history(client, run.info.run_id, "train_acc")] == list(range(epochs + 1))
        for key in ("train_loss", "epoch_seconds", "eval_seconds", "examples_per_second"):
            assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(1, epochs + 1)), key
        accs = history(client, run.info.run_id, "test_acc")
        assert accs[0][1] < 0.3 and accs[-1][1] > 0.8  # chance before training, far above it after

        arts = set(artifact_paths(client, run.info.run_id))
        assert {"config.yaml", "predictions.png", "confusion_matrix.png", "model/model-symbol.json",
                "model/model-0000.params", "hydra/config.yaml", "hydra/overrides.yaml",
                "hydra/hydra.yaml"} <= arts

    # The exported model reloads with SymbolBlock.imports and scores what the run logged.
    run = children[0]
    local = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
    net = mx.gluon.SymbolBlock.imports(f"{local}/model-symbol.json", ["data"], f"{local}/model-0000.params")
    _, test = load(locate("mnist", str(mnist5k_root), ""))
    pred = net(mx.nd.array(test.x)).argmax(axis=1).asnumpy()
    assert np.mean(pred == test.y) == pytest.approx(history(client, run.info.run_id, "test_acc")[-1][1])


def test_sweep_on_full_fashion_mnist(tmp_path, fashion_root):
    proc = run_cli(["-m", "data=fashion_mnist", "optim.lr=0.1,0.5", "trainer.epochs=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, runs = runs_of(tmp_path)
    jobs = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "job"]
    assert len(runs) == 3 and len(jobs) == 2
    for run in jobs:
        assert run.info.status == "FINISHED" and "mlflow.parentRunId" in run.data.tags
        assert run.data.tags["data.root"] == str(fashion_root)
        assert run.data.params["data.name"] == "fashion_mnist"
        assert run.data.metrics["test_acc"] > 0.7  # Fashion-MNIST after one epoch; chance is 0.1


def test_single_run_has_no_parent(tmp_path, mnist5k_root):
    proc = run_cli(["trainer.epochs=1", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "mlflow.parentRunId" not in runs[0].data.tags and "sweep" not in runs[0].data.tags
    assert (tmp_path / "outputs" / "runs").is_dir() and not (tmp_path / "outputs" / "sweeps").exists()


def _no_runs(folder):
    return not (folder / "mlflow.db").exists() or not runs_of(folder)[1]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["optim.lr=-1"], "optim.lr=-1"),
        (["-m", "optim.lr=0.1,abc"], "optim.lr='abc'"),
        (["-m", "data.batch_size=64,0"], "data.batch_size=0"),
        (["model.sigma=0"], "model.sigma=0"),
        (["trainer.epochs=1.5"], "trainer.epochs=1.5"),
        (["optim.learning_rate=0.1"], "optim.learning_rate"),
        (["context=tpu"], "context/tpu"),
        (["context=gpu"], "mxnet-cu"),
        (["-m", "context=cpu,gpu"], "mxnet-cu"),
        (["data.root=/nonexistent/idx"], "data.root=/nonexistent/idx does not exist"),
        (["tracking.uri=sqlite:////nonexistent/dir/mlflow.db"], "folder /nonexistent/dir does not exist"),
    ],
)
def test_bad_input_one_line_no_run(tmp_path, mnist5k_root, args, expect):
    defaults = [f"data.root={mnist5k_root}", "trainer.epochs=1"]
    given = {a.split("=", 1)[0] for a in args}
    proc = run_cli([*args, *(d for d in defaults if d.split("=", 1)[0] not in given)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _no_runs(tmp_path)


def test_missing_data_offline(tmp_path):
    proc = run_cli(["data.mirrors=[http://127.0.0.1:9/]"], cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "train-images-idx3-ubyte.gz" in line and "data.root=" in line
    assert str(tmp_path / "cache" / "mnist") in line
    assert _no_runs(tmp_path)


def test_diverging_run_fails_and_the_sweep_goes_on(tmp_path, mnist5k_root):
    proc = run_cli(["-m", "optim.lr=1e38,0.1", "trainer.epochs=2", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, runs = runs_of(tmp_path)
    by_lr = {r.data.params.get("optim.lr"): r for r in runs if r.data.tags.get("mnist_logreg.role") == "job"}
    failed, ok = by_lr["1e+38"], by_lr["0.1"]
    assert failed.info.status == "FAILED" and "non-finite" in failed.data.tags["failure"]
    assert history(client, failed.info.run_id, "test_acc")[0][0] == 0  # what was logged is kept
    assert ok.info.status == "FINISHED"


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, "KILLED"), (signal.SIGTERM, "KILLED")])
def test_interrupted_run_ends_killed_with_its_metrics(tmp_path, mnist5k_root, sig, status):
    import os

    env = {**os.environ, "MNIST_LOGREG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "trainer.epochs=100000", f"data.root={mnist5k_root}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 120
    for line in proc.stdout:
        if re.search(r"epoch +3/", line) or time.time() > deadline:
            break
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == status
    steps = [s for s, _ in history(client, runs[0].info.run_id, "train_loss")]
    assert steps[:3] == [1, 2, 3]


def test_full_disk_for_artifacts(tmp_path, mnist5k_root):
    """Artifacts go to a 64 KiB tmpfs: one clear line, the run FAILED with its metrics, no partial files."""
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        proc = run_cli(["trainer.epochs=1", f"data.root={mnist5k_root}",
                        f"tracking.artifact_location={full.as_uri()}"], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]  # (MLflow logs creating the fresh store before it)
        assert "could not store the artifacts" in line and "No space left" in line
        assert "Traceback" not in proc.stderr
        client, (run,) = runs_of(tmp_path)
        assert run.info.status == "FAILED"
        assert [s for s, _ in history(client, run.info.run_id, "train_loss")] == [1]
        left = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
        # What is left is complete: the config logged at the start and the checkpoint for resume=.
        assert left and all(p.endswith("config.yaml") or "/checkpoint/" in p for p in left), left
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)
