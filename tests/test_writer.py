"""The record writer: a stacked sweep's MLflow writes made by a child process. A store that fails a
run's writes mid-sweep fails that run alone, with one line; a writer killed mid-sweep leaves no run
RUNNING; and every run that finishes holds the same records as one written directly."""

import os
import signal
import sqlite3

import pytest

from mnist_logreg.sweep.stopping import descendants
from conftest import artifact_paths, history, jobs_and_parents, run_cli, signal_when, start_cli, store_uri

pytestmark = pytest.mark.slow

# A launch of 8 jobs or fewer writes directly unless told otherwise.
CARD = ["-m", "hydra.launcher.record_writer=true", "optim.lr=0.05,0.1,0.5", "trainer.epochs=4"]


def break_runs_with(db, key: str, value: str, from_step: int) -> None:
    """The store refuses the metrics of the run whose param `key` is `value` from step from_step on,
    as a failing disk or a full quota would: MLflow's insert raises inside the writer."""
    with sqlite3.connect(db) as con:
        con.execute(f"""CREATE TRIGGER refuse BEFORE INSERT ON metrics
            WHEN NEW.step >= {from_step} AND NEW.run_uuid IN
                (SELECT run_uuid FROM params WHERE key = '{key}' AND value = '{value}')
            BEGIN SELECT RAISE(ABORT, 'the store refused this write'); END""")


def test_a_store_that_fails_one_runs_writes_fails_that_run_alone(tmp_path, mnist5k_root):
    from mnist_logreg.tracking.store import client_for

    client_for(store_uri(tmp_path))  # the store, laid as a sweep lays it, then broken for one run
    break_runs_with(tmp_path / "mlflow.db", "optim.lr", "0.1", from_step=2)
    done = run_cli([*CARD, f"data.root={mnist5k_root}"], cwd=tmp_path)
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "the store refused this write" in line]
    # the run's own line as it fails, and the sweep's last word on its first failed job
    assert len(errors) == 2 and "[ERROR]" in errors[0] and errors[1].startswith("Error: "), out[-3000:]
    assert "log_batch" in errors[0] and "[SQL" not in errors[0]
    client, jobs, parents = jobs_and_parents(tmp_path)
    by_lr = {r.data.params["optim.lr"]: r for r in jobs}
    broken = by_lr.pop("0.1")
    assert broken.info.status == "FAILED"
    assert "the store refused this write" in broken.data.tags["failure"]
    assert [s for s, _ in history(client, broken.info.run_id, "train_loss")] == [1]  # step 2 was refused
    assert broken.info.run_id[:8] in errors[0]
    for run in by_lr.values():  # its stack-mates trained on and hold every record
        assert run.info.status == "FINISHED"
        assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == [0, 1, 2, 3, 4]
        assert {"model/model-0000.params", "predictions.png", "config.yaml"} <= set(
            artifact_paths(client, run.info.run_id))
        assert run.data.tags["params.sha256"]
        models = client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'")
        assert [m.status for m in models] == ["READY"]
    assert parents[0].info.status == "FAILED" and done.returncode != 0
    assert not _writers_in(tmp_path)


def test_a_run_whose_files_the_store_refuses_fails_alone_with_nothing_half_uploaded(tmp_path, mnist5k_root):
    """The writer stages and uploads a stack's files (pictures, environment, logged model) while the
    next stack trains, and after the last stack shares them with the training process: when the
    store refuses some runs' logged models, those runs end FAILED with one line each and no artifact
    of their upload left, and every other run, of their stack and the next, finishes whole."""
    from mnist_logreg.tracking.store import client_for

    client_for(store_uri(tmp_path))
    with sqlite3.connect(tmp_path / "mlflow.db") as con:  # marking the logged model READY, for lr=0.1 only
        con.execute("""CREATE TRIGGER refuse BEFORE UPDATE ON logged_models
            WHEN OLD.source_run_id IN (SELECT run_uuid FROM params WHERE key = 'optim.lr' AND value = '0.1')
            BEGIN SELECT RAISE(ABORT, 'the store refused this model'); END""")
    done = run_cli(["-m", "hydra.launcher.record_writer=true", "hydra.launcher.max_stack=4", "optim.lr=0.05,0.1,0.5,1.0",
                    "model.sigma=0.01,0.1", "trainer.epochs=2", f"data.root={mnist5k_root}"], cwd=tmp_path)
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "the store refused this model" in line]
    assert len(errors) == 3 and all("[ERROR]" in e and "write_files" in e for e in errors[:2]), out[-3000:]
    client, jobs, parents = jobs_and_parents(tmp_path)
    sweep = parents[0].data.tags["sweep"]
    assert {r.data.tags["stack.group"] for r in jobs} == {f"{sweep}/1", f"{sweep}/2"}
    for run in jobs:
        if run.data.params["optim.lr"] == "0.1":
            assert run.info.status == "FAILED" and "the store refused this model" in run.data.tags["failure"]
            assert run.info.run_id[:8] in " ".join(errors)
            assert not {"predictions.png", "model/model-0000.params"} & set(artifact_paths(client, run.info.run_id))
            continue
        assert run.info.status == "FINISHED", run.data.params
        assert {"model/model-0000.params", "predictions.png", "confusion_matrix.png", "environment/requirements.txt",
                "hydra/overrides.yaml", "config.yaml"} <= set(artifact_paths(client, run.info.run_id))
        assert run.data.tags["params.sha256"]
        models = client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'")
        assert [m.status for m in models] == ["READY"]
    assert done.returncode != 0 and not _writers_in(tmp_path)


def test_a_writer_killed_mid_sweep_leaves_no_run_running_and_a_relaunch_continues(tmp_path, mnist5k_root):
    args = ["-m", "hydra.launcher.record_writer=true", "optim.lr=0.1,0.5", "trainer.epochs=4", "data.batch_size=8",
            f"data.root={mnist5k_root}"]
    proc = start_cli(args, tmp_path)
    killed = []

    def kill_the_writer():
        for pid in descendants(proc.pid):
            if b"mnist_logreg.tracking.writer" in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    out = signal_when(proc, r"job\.1\]\[INFO\] - epoch 2/4", None, before=kill_the_writer)
    assert len(killed) == 1, out[-3000:]
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "the record writer process ended (exit -9)" in line]
    assert len(lines) == 3 and lines[-1].startswith("Error: "), out[-6000:]  # a line per run, and the sweep's
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert sorted(r.info.status for r in jobs) == ["FAILED", "FAILED"]  # ended directly, not left RUNNING
    assert parents[0].info.status == "FAILED"

    again = run_cli(args, cwd=tmp_path)  # continues both runs in place from their checkpoints
    assert again.returncode == 0, again.stderr[-3000:]
    client, jobs, _ = jobs_and_parents(tmp_path)
    assert len(jobs) == 2 and all(r.info.status == "FINISHED" for r in jobs)
    for run in jobs:
        assert [s for s, _ in history(client, run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert not _writers_in(tmp_path)


def _writers_in(folder) -> list[int]:
    """Record writers still running whose folder is `folder` (a sweep's own leave with it)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if (name.isdigit() and b"mnist_logreg.tracking.writer" in open(f"/proc/{name}/cmdline", "rb").read()
                    and os.readlink(f"/proc/{name}/cwd") == str(folder)):
                found.append(int(name))
        except OSError:
            pass
    return found


def test_a_trained_stacks_writes_wait_while_the_training_stacks_go_first(tmp_path, monkeypatch):
    """The writer's two lanes, on a real store: the runs `background` names (a trained stack's files)
    are written only when no other run's request waits, so a training run's epoch is not queued
    behind them; each run's own requests keep their order, and a read of a background run waits
    for its writes."""
    from mlflow.entities import Metric

    from mnist_logreg.tracking import writer
    from mnist_logreg.tracking.store import client_for

    monkeypatch.chdir(tmp_path)
    uri = store_uri(tmp_path)
    client = client_for(uri)
    exp = client.create_experiment("lanes")
    trained, training = (client.create_run(exp).info.run_id for _ in range(2))
    writer.start(uri)
    try:
        deferring = writer.deferring(client)
        child = deferring.writer
        deferring.set_tag(trained, "epochs", "done")  # sent before it moved: taken in order still
        writer.background(deferring, [trained])
        for i in range(150):  # some 0.5 s of the child's time
            deferring.set_tag(trained, "upload", str(i))
        deferring.log_batch(training, metrics=[Metric("test_acc", 0.5, 0, 1)])
        epoch = writer.mark(deferring)
        writer.settle(deferring, training, epoch)
        behind = len(child.pending)
        assert behind >= 100, behind  # the epoch went first: most of the trained run's writes still wait
        seen = deferring.get_run(trained)  # read in its lane: after every write it was sent
        assert seen.data.tags["upload"] == "149" and seen.data.tags["epochs"] == "done"
        assert not child.pending
    finally:
        writer.stop_all()
    assert client.get_metric_history(training, "test_acc")[0].value == 0.5
