"""Team tracking: a real PostgreSQL, a real `mlflow server` on it, parallel jobs logging over HTTP."""

import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnist_logreg.services.tracking import MlflowServer, free_port, postgres, postgres_bin
from mnist_logreg.soak import soak_against
from conftest import artifact_paths, history, run_cli, start_cli

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-Pw-42"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
    with postgres() as db_uri, MlflowServer(db_uri, tmp_path_factory.mktemp("artifacts")) as srv:
        yield srv


def test_metrics_survive_a_server_outage_mid_run_and_no_password_is_logged(tmp_path, mnist5k_root, server):
    """A run over HTTP with a password in tracking.uri. The server stops mid-run: the job spools its
    metrics, goes on training, and sends them once the server is back. The password is nowhere in
    what was logged. (Parallel writers over HTTP: the soak below.)"""
    epochs = 60
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{server.port}"
    proc = start_cli(["tracking=server", f"tracking.uri={uri}", f"trainer.epochs={epochs}",
                      f"data.root={mnist5k_root}", "tracking.experiment=outage"], tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"epoch +3/", line):
            break
    server.stop()
    time.sleep(2)
    server.start()
    out, _ = proc.communicate(timeout=240)
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    assert "kept in" in out and "sent the spooled metrics" in out
    assert PASSWORD not in out
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("outage")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "train_loss")] == list(range(1, epochs + 1))
    assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == list(range(epochs + 1))
    assert "model/model-0000.params" in artifact_paths(client, run.info.run_id)

    blob = repr(run.data.params) + repr(run.data.tags) + run.info.run_name
    assert PASSWORD not in blob and "alice:***@" in run.data.params["tracking.uri"]
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
    for path in Path(local).rglob("*"):
        # (environment/git.diff is the user's own uncommitted code, as it is)
        if path.is_file() and path.suffix in (".yaml", ".txt", ".json"):
            assert PASSWORD not in path.read_text(errors="ignore"), path


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
    assert_the_rest_api_shows_the_sweep(server.url, "soak", jobs=4, epochs=1)


def test_spool_upload_is_idempotent_and_refuses_a_foreign_run(tmp_path, server, capsys):
    """A spool file left by a job whose server stayed down: sent later, each point once."""
    from mnist_logreg import spool

    client = MlflowClient(server.url)
    exp = client.create_experiment("spooled")
    run_id = client.create_run(exp).info.run_id
    points = [[("train_loss", 0.5 / s, 1_700_000_000_000 + s, s), ("test_acc", 0.8 + s / 100, 1_700_000_000_000 + s, s)]
              for s in (1, 2, 3)]
    path = tmp_path / f"metrics-{run_id}.spool.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in points) + "\n")
    for _ in range(2):  # twice: the second run sends nothing
        assert spool.main([str(path), "--tracking-uri", server.url]) == 0
    out = capsys.readouterr().out
    assert "6 metric points sent, 0 already there" in out and "0 metric points sent, 6 already there" in out
    assert [s for s, _ in history(client, run_id, "train_loss")] == [1, 2, 3]
    assert [v for _, v in history(client, run_id, "test_acc")] == [0.8 + s / 100 for s in (1, 2, 3)]

    foreign = tmp_path / f"metrics-{'0' * 32}.spool.jsonl"
    foreign.write_text(path.read_text())
    with pytest.raises(SystemExit) as err:
        spool.main([str(foreign), "--tracking-uri", server.url])
    assert err.value.code == 2
    assert f"run {'0' * 32} is not in" in capsys.readouterr().err


def _get(base, path, **query):
    with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(query)}", timeout=10) as resp:
        return json.load(resp)


def _post(base, path, body):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def assert_the_rest_api_shows_the_sweep(base: str, experiment: str, jobs: int, epochs: int) -> None:
    """What the UI asks the server for, about the one sweep of an experiment: its parent, children, histories."""
    exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)["experiment"]
    parents = _post(base, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp["experiment_id"]], "filter": "tags.`mnist_logreg.role` = 'sweep'"})["runs"]
    assert len(parents) == 1
    parent_id = parents[0]["info"]["run_id"]
    children = _post(base, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{parent_id}'", "max_results": 100})["runs"]
    assert len(children) == jobs
    for child in children:
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert {"optim.lr", "model.sigma", "seed", "data.batch_size"} <= set(params)
        hist = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=child["info"]["run_id"],
                    metric_key="test_acc")["metrics"]
        assert sorted(m["step"] for m in hist) == list(range(epochs + 1))


def test_a_search_on_the_team_server_keeps_its_study_in_the_teams_postgresql(tmp_path, mnist5k_root, server):
    """With tracking=server the study needs the team's database: without one, one line and exit 2; with
    a PostgreSQL database, the study lives there and its trials name the server's runs."""
    import optuna
    import psycopg2

    base = ["-m", "experiments=optuna", "data.val_size=1000", "hydra.sweeper.n_trials=2", "trainer.epochs=1",
            "tracking=server", f"tracking.uri={server.url}", "tracking.experiment=team-search",
            f"data.root={mnist5k_root}"]
    refused = run_cli(base, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "hydra.sweeper.storage is not set" in line and "postgresql://" in line
    admin = psycopg2.connect(server.backend_uri.replace("postgresql+psycopg2", "postgresql"))
    admin.autocommit = True
    admin.cursor().execute("CREATE DATABASE studies")
    admin.close()
    storage = server.backend_uri.rsplit("/", 1)[0] + "/studies"
    proc = run_cli([*base, f"hydra.sweeper.storage={storage}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert not list(tmp_path.rglob("optuna.db"))
    study = optuna.load_study(study_name="mnist_logreg", storage=storage)
    client = MlflowClient(server.url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow.run_id"])
        assert run.data.tags["search.trial"] == str(trial.number) and trial.value == run.data.metrics["val_acc"]
