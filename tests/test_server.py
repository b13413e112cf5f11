"""Team tracking: a real PostgreSQL, a real `mlflow server` on it, parallel jobs logging over HTTP."""

import os
import re
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from mnist_logreg.services import MlflowServer, free_port, postgres, postgres_bin
from mnist_logreg.soak import soak_against
from conftest import ROOT, artifact_paths, history, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("server")]
PASSWORD = "s3cret-Pw-42"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
    with postgres() as db_uri, MlflowServer(db_uri, tmp_path_factory.mktemp("artifacts")) as srv:
        yield srv


def test_parallel_sweep_over_http_into_postgres(tmp_path, mnist5k_root, server):
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{server.port}"
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking=server",
                    f"tracking.uri={uri}", "optim.lr=0.1,0.5", "seed=1,2", "trainer.epochs=2",
                    f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr

    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("mnist_logreg")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "job"]
    assert len(parents) == 1 and len(jobs) == 4  # exact counts: nothing lost, nothing doubled
    assert len({(r.data.params["optim.lr"], r.data.params["seed"]) for r in jobs}) == 4
    points = 0
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key, steps in (("test_acc", [0, 1, 2]), ("train_acc", [0, 1, 2]), ("train_loss", [1, 2])):
            got = history(client, run.info.run_id, key)
            assert [s for s, _ in got] == steps
            points += len(got)
        assert "model/model-0000.params" in artifact_paths(client, run.info.run_id)
    assert points == 4 * 8

    # The password appears nowhere in what was logged.
    for run in [*jobs[:2], parents[0]]:
        blob = repr(run.data.params) + repr(run.data.tags) + run.info.run_name
        assert PASSWORD not in blob
        assert "alice:***@" in run.data.params.get("tracking.uri", "alice:***@")
    local = client.download_artifacts(jobs[0].info.run_id, "", str(tmp_path / "dl"))
    for path in __import__("pathlib").Path(local).rglob("*"):
        # (environment/git.diff is the user's own uncommitted code, as it is)
        if path.is_file() and path.suffix in (".yaml", ".txt", ".json") :
            assert PASSWORD not in path.read_text(errors="ignore"), path


def test_metrics_survive_a_server_outage_mid_run(tmp_path, mnist5k_root, server):
    """The server stops mid-run: the job spools its metrics, goes on training, and sends them later."""
    env = {**os.environ, "MNIST_LOGREG_CACHE": str(tmp_path / "cache")}
    epochs = 100
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "tracking=server", f"tracking.uri={server.url}",
         f"trainer.epochs={epochs}", f"data.root={mnist5k_root}", "tracking.experiment=outage"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"epoch +3/", line):
            break
    server.stop()
    time.sleep(4)
    server.start()
    out, _ = proc.communicate(timeout=600)
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    assert "kept in" in out and "sent the spooled metrics" in out
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("outage")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "train_loss")] == list(range(1, epochs + 1))
    assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == list(range(epochs + 1))


def test_unreachable_server_fails_fast_and_plainly(tmp_path, mnist5k_root):
    port = free_port()
    started = time.monotonic()
    proc = run_cli(["-m", "tracking=server", f"tracking.uri=http://127.0.0.1:{port}", f"data.root={mnist5k_root}"],
                   cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and f"http://127.0.0.1:{port} is unreachable" in line and "tracking.uri" in line
    assert elapsed < 60  # not MLflow's minutes of retries
    assert not (tmp_path / "outputs" / "sweeps").exists() or not any(
        (tmp_path / "outputs" / "sweeps").rglob("*.log"))  # no job started


def test_soak_at_reduced_size(tmp_path, mnist5k_root, server):
    """The soak (python -m mnist_logreg.soak) at 4 jobs, against the shared server, restarted midway."""
    report = soak_against(server, jobs=4, workers=2, epochs=1, data=[f"data.root={mnist5k_root}"], downtime=2.0,
                          cwd=str(tmp_path))
    assert report["sweep_exit"] == 0, report["last_lines"]
    assert report["runs_recorded"] == 4 and report["runs_finished"] == 4 and report["errors"] == 0
    assert report["metric_points_recorded"] == report["metric_points_expected"] == 4 * 8
    assert report["server_restarted_at_s"] is not None  # the server really went down mid-sweep
