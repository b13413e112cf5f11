"""Determinism and `python -m mnist_logreg.reproduce` on real logged runs."""

import shutil
import sqlite3

import pytest

from mnist_logreg.idx import read_idx, write_idx
from conftest import run_cli, store_uri
from test_run_e2e import history, runs_of

pytestmark = pytest.mark.slow


def job_runs(folder):
    client, runs = runs_of(folder)
    return client, sorted((r for r in runs if r.data.tags.get("mnist_logreg.role") == "job"),
                          key=lambda r: r.info.start_time)


def metrics_of(client, run):
    return {k: history(client, run.info.run_id, k) for k in ("train_loss", "train_acc", "test_acc")}


def _logged(folder, mnist5k_root):
    data = folder / "data"
    shutil.copytree(mnist5k_root, data)
    proc = run_cli(["-m", "optim.lr=0.1,0.5", "trainer.epochs=2", f"data.root={data}"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    client, runs = job_runs(folder)
    return folder, data, client, runs


@pytest.fixture(scope="module")
def logged_shared(tmp_path_factory, mnist5k_root):
    """A store with a two-job sweep, shared by the tests that only read it and add runs."""
    return _logged(tmp_path_factory.mktemp("logged"), mnist5k_root)


@pytest.fixture
def logged(tmp_path, mnist5k_root):
    """A store with a two-job sweep trained on a private copy of the digits (which the test alters)."""
    return _logged(tmp_path, mnist5k_root)


def test_same_seed_identical_in_one_process_other_seed_differs(tmp_path, mnist5k_root):
    proc = run_cli(["-m", "seed=1,1,2", "force=true", "trainer.epochs=2", f"data.root={mnist5k_root}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, (first, second, other) = job_runs(tmp_path)
    assert metrics_of(client, first) == metrics_of(client, second)  # 1st and 2nd job of one process
    assert first.data.tags["params.sha256"] == second.data.tags["params.sha256"]
    assert metrics_of(client, first) != metrics_of(client, other)
    assert first.data.tags["params.sha256"] != other.data.tags["params.sha256"]


def test_fingerprint_is_logged(logged_shared):
    folder, _, client, runs = logged_shared
    tags = runs[0].data.tags
    for key in ("config.sha256", "data.sha256", "git.commit", "git.diff.sha256", "uv.lock.sha256", "cpu.model",
                "threads.OMP_NUM_THREADS", "threads.cpus", "params.sha256", "fingerprint", "command", "platform"):
        assert tags.get(key), key
    assert "run.py" in tags["command"]
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "environment")}
    assert "environment/requirements.txt" in arts
    reqs = client.download_artifacts(runs[0].info.run_id, "environment/requirements.txt", str(folder / "dl"))
    assert "mxnet==1.9.1" in open(reqs).read()


def test_reproduce_passes_and_links_the_new_run(logged_shared):
    folder, _, client, runs = logged_shared
    proc = run_cli([runs[0].info.run_id], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REPRODUCED" in proc.stdout and "NOT REPRODUCED" not in proc.stdout
    assert "train_loss      2" in proc.stdout  # the verdict table has every metric at every step
    _, all_runs = runs_of(folder)
    copies = [r for r in all_runs if r.data.tags.get("reproduces") == runs[0].info.run_id]
    assert copies and all(c.data.tags["reproduction.verdict"] == "reproduced" for c in copies)
    assert all(c.data.tags["params.sha256"] == runs[0].data.tags["params.sha256"] for c in copies)
    assert all(c.data.tags["mnist_logreg.role"] == "reproduction" for c in copies)


def test_reproduce_a_whole_sweep_into_another_store(logged_shared, tmp_path_factory):
    folder, _, client, runs = logged_shared
    parent = runs[0].data.tags["mlflow.parentRunId"]
    other = tmp_path_factory.mktemp("other_store")
    proc = run_cli([parent, "--target-uri", store_uri(other)], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 2 runs reproduced" in proc.stdout
    _, copies = runs_of(other)
    assert len(copies) == 2


def test_changed_dataset_is_named(logged):
    folder, data, client, runs = logged
    path = data / "train-images-idx3-ubyte.gz"
    images = read_idx(path).copy()
    images[:, 10:18, 10:18] = 255 - images[:, 10:18, 10:18]
    write_idx(path, images)
    proc = run_cli([runs[0].info.run_id], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NOT REPRODUCED" in proc.stdout and "data.sha256:" in proc.stdout


def test_changed_param_is_named(logged):
    folder, _, client, runs = logged
    run_id = runs[0].info.run_id
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.execute("UPDATE params SET value = '0.2' WHERE key = 'optim.lr' AND run_uuid = ?", (run_id,))
    proc = run_cli([run_id], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "config optim.lr: 0.1 -> 0.2" in proc.stdout and "config.sha256:" in proc.stdout


def test_tolerance(logged_shared):
    folder, _, _, runs = logged_shared
    proc = run_cli([runs[0].info.run_id, "--atol", "1e-6"], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 0 and "atol=1e-06" in proc.stdout


def test_unknown_run_id(tmp_path, logged_shared):
    folder = logged_shared[0]
    proc = run_cli(["0123456789abcdef0123456789abcdef"], cwd=folder, module="mnist_logreg.reproduce")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("Error: run 0123456789abcdef0123456789abcdef does not exist")
    assert "Traceback" not in proc.stderr


def test_basic_and_joblib_launchers_agree(tmp_path, mnist5k_root):
    results = {}
    for name, extra in (("basic", []), ("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])):
        folder = tmp_path / name
        folder.mkdir()
        proc = run_cli(["-m", "optim.lr=0.1,0.5", "trainer.epochs=2", f"data.root={mnist5k_root}", *extra],
                       cwd=folder)
        assert proc.returncode == 0, proc.stderr
        client, runs = job_runs(folder)
        results[name] = {r.data.params["optim.lr"]: (r.data.tags["params.sha256"], metrics_of(client, r))
                         for r in runs}
    assert results["basic"] == results["joblib"]
    assert len({h for h, _ in results["basic"].values()}) == 2
