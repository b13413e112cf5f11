"""run.py end to end: real Hydra runs and multiruns in subprocesses, into a real SQLite MLflow store,
and the error paths: one bad input of each kind through run.py, the rest through the same checks in-process."""

import signal
import subprocess

import pytest

from mnist_logreg.errors import ConfigError, DataError, HarnessError
from mnist_logreg.job import train
from conftest import (compose_cfg, history, jobs_and_parents, numbers_of, run_cli,
                      runs_of, signal_when, start_cli, store_uri)

pytestmark = pytest.mark.slow


def test_sweep_on_full_fashion_mnist(tmp_path, fashion_root):
    proc = run_cli(["-m", "data=fashion_mnist", "optim.lr=0.1,0.5", "trainer.epochs=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert len(parents) == 1 and len(jobs) == 2
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
        (["optim.lr=-1"], "optim.lr=-1"),                              # a config value
        (["optim.learning_rate=0.1"], "optim.learning_rate"),          # Hydra composition
        (["-m", "optim.lr=0.1,abc"], "optim.lr='abc'"),                # the sweep callback
        (["data.root=/nonexistent/idx"], "data.root=/nonexistent/idx does not exist"),  # the job
        (["-m", "optim.lr=0.1,0.5", "tracking.uri=sqlite:///{tmp}/notes.db"], "notes.db is not an SQLite database"),
        # A typo, appended with + (Hydra's own advice) or not, single run or sweep: the nearest key.
        (["trainer.epoch=3"], "trainer.epoch is not a config key of mnist_logreg (did you mean trainer.epochs?)"),
        (["+trainer.epoch=3"], "trainer.epoch is not a config key of mnist_logreg (did you mean trainer.epochs?)"),
        (["-m", "+model.sgima=0.5", "optim.lr=0.1,0.5"], "model.sgima is not a config key of mnist_logreg (did you "
                                                          "mean model.sigma?)"),
        (["resume=0123456789abcdef0123456789abcdef", "trainer.epochs=5"],
         "resume=0123456789abcdef0123456789abcdef continues the run with the config it logged, so trainer.epochs=5 "
         "would be ignored"),
        (["-m", "optim.lr=[0.05,0.1]"], "to sweep it, write -m optim.lr=0.05,0.1"),
        (["-m", "optim.lr=0.05,", "0.1"], "a sweep is one argument with no spaces, as in -m optim.lr=0.05,0.1"),
        (["-m", "optim.lr=0.05,0.1,0,5"], "optim.lr=0 is not allowed: optim.lr must be a number > 0 (did you mean 0.5?"),
        (["resume=abc"], "resume=abc: a run id is 32 hex digits, or a unique prefix of 6 or more"),
        (["resume=abcdef12"], "resume=abcdef12: no run id begins with abcdef12"),
    ],
    ids=["config-value", "composition", "callback", "job", "corrupt-store", "typo", "appended-typo",
         "appended-typo-sweep", "resume-with-override", "sweep-as-list", "sweep-with-space", "decimal-comma",
         "short-id", "unknown-prefix"],
)
def test_bad_input_one_line_no_run(tmp_path, mnist5k_root, args, expect):
    notes = tmp_path / "notes.db"
    notes.write_text("not a database, and it stays as it is\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    defaults = [f"data.root={mnist5k_root}", *([] if any(a.startswith("resume=") for a in args) else ["trainer.epochs=1"])]
    given = {a.split("=", 1)[0].lstrip("+") for a in args}
    proc = run_cli([*args, *(d for d in defaults if d.split("=", 1)[0] not in given)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and " +" not in lines[0]  # never advises +key
    assert _no_runs(tmp_path)
    assert notes.read_text() == "not a database, and it stays as it is\n"
    if "-m" not in args:  # a refused single run leaves no job folder
        assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


@pytest.mark.parametrize(
    "overrides, error, expect",
    [
        (["data.batch_size=0"], ConfigError, "data.batch_size=0"),
        (["model.sigma=0"], ConfigError, "model.sigma=0"),
        (["trainer.epochs=1.5"], ConfigError, "trainer.epochs=1.5"),
        (["context=gpu"], HarnessError, "mxnet-cu"),
        (["tracking.uri=sqlite:////nonexistent/dir/mlflow.db"], HarnessError, "folder /nonexistent/dir does not exist"),
    ],
)
def test_bad_values_stop_before_any_run(tmp_path, mnist5k_root, overrides, error, expect):
    """The same checks run.py reaches, called in-process (run.py turns them into one line, above)."""
    given = {o.split("=", 1)[0] for o in overrides}
    cfg = compose_cfg(*overrides, f"data.root={mnist5k_root}",
                      *([] if "tracking.uri" in given else [f"tracking.uri={store_uri(tmp_path)}"]))
    with pytest.raises(error, match=expect.replace(".", r"\.")):
        train(cfg)
    assert _no_runs(tmp_path)


def test_missing_data_offline_names_files_folder_and_override(tmp_path):
    cache = tmp_path / "cache"
    cfg = compose_cfg(f"data.cache={cache}", "data.mirrors=[http://127.0.0.1:9/]",
                      f"tracking.uri={store_uri(tmp_path)}")
    with pytest.raises(DataError) as err:
        train(cfg)
    line = str(err.value)
    assert "\n" not in line and "train-images-idx3-ubyte.gz" in line and "data.root=" in line and str(cache) in line
    assert _no_runs(tmp_path)


def test_diverging_run_fails_with_its_metrics(tmp_path, mnist5k_root):
    result = train(compose_cfg("optim.lr=1e38", "trainer.epochs=2", f"data.root={mnist5k_root}",
                               f"tracking.uri={store_uri(tmp_path)}"))
    assert result["status"] == "FAILED" and "epoch 1" in result["failure"]
    client, (run,) = runs_of(tmp_path)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["failure"]
    assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == [0]  # what was logged is kept


def test_sigterm_ends_the_run_killed_and_resume_continues_it_bit_identical(tmp_path, mnist5k_root):
    args = ["trainer.epochs=20", f"data.root={mnist5k_root}"]
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    cut.mkdir(), whole.mkdir()
    out = signal_when(start_cli(args, cut), r"epoch +3/", signal.SIGTERM)
    assert "Stopped by SIGTERM" in out and "Traceback" not in out
    client, (stopped,) = runs_of(cut)
    assert stopped.info.status == "KILLED"
    done = len(history(client, stopped.info.run_id, "train_loss"))
    assert 3 <= done < 20 and [s for s, _ in history(client, stopped.info.run_id, "train_loss")][:3] == [1, 2, 3]

    resumed = train(compose_cfg(f"resume={stopped.info.run_id}", f"tracking.uri={store_uri(cut)}"))
    assert resumed["status"] == "FINISHED" and resumed["run_id"] == stopped.info.run_id
    assert resumed["epochs"] == 20 - done  # it trained only what was left
    client, runs = runs_of(cut)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, not a new one
    reference = train(compose_cfg(*args, f"tracking.uri={store_uri(whole)}"))
    client_w = runs_of(whole)[0]
    assert numbers_of(client, runs[0]) == numbers_of(client_w, client_w.get_run(reference["run_id"]))


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


def test_a_fresh_sqlite_store_is_a_copy_of_the_migrated_template(tmp_path, monkeypatch):
    """A new store is laid whole from a template made once per MLflow version (no 68 migrations per
    store), and MLflow's own schema check accepts it; an existing store is never replaced."""
    import sqlite3

    from mnist_logreg.tracking.store import client_for, lay_fresh_sqlite_store, store_template

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    client = client_for(f"sqlite:///{db}")
    template = store_template()
    assert template.is_file() and template.parent == tmp_path / "cache" / "mnist_logreg"
    version = lambda path: sqlite3.connect(path).execute("SELECT version_num FROM alembic_version").fetchall()  # noqa: E731
    assert version(db) == version(template)
    assert client.get_experiment("0").artifact_location == str(tmp_path / "mlruns" / "0")
    run = client.create_run(client.create_experiment("x"))
    client.log_metric(run.info.run_id, "m", 1.0)
    assert not lay_fresh_sqlite_store(db)  # the store with its run stays as it is
    assert client_for(f"sqlite:///{db}").get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_a_store_checked_once_is_still_refused_once_its_file_is_no_store(tmp_path, monkeypatch):
    """A store's tables are read once per process, but a file put in its place that is not an SQLite
    database is refused at the next check, with the one-line message."""
    from mnist_logreg.errors import TrackingError
    from mnist_logreg.tracking.store import check_sqlite_store, client_for

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    client_for(f"sqlite:///{db}").search_experiments()
    check_sqlite_store(db)
    check_sqlite_store(db)  # the second time from what the first found
    with open(db, "r+b") as fh:  # overwritten in place: the same file (inode) as the one found a store
        fh.write(b"these are someone's notes, not a database\n")
    with pytest.raises(TrackingError, match="is not an SQLite database"):
        check_sqlite_store(db)


def test_the_logged_models_shared_files_are_made_once_per_user_and_a_staged_model_predicts(tmp_path, monkeypatch):
    """The pyfunc template (MLflow's save_model of a placeholder export) is made once into the user
    cache and then read from there, even by a process whose save_model would fail; a model staged
    from it loads in MLflow and predicts what the net computes; another input example gets its own."""
    import mlflow
    import mxnet as mx
    import numpy as np

    from mnist_logreg.ml.model import build_net
    from mnist_logreg.tracking import pyfunc

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    example = np.arange(5 * 784, dtype=np.float32).reshape(5, 784) / (5 * 784)
    pyfunc._template.cache_clear()
    made = pyfunc._template(example.tobytes(), example.shape, str(example.dtype))
    (folder,) = (tmp_path / "cache" / "mnist_logreg").glob("pyfunc-template-*")
    assert made.folder == folder / "model" and not list(folder.parent.glob(".pyfunc-template-*"))

    def refuse(*args, **kwargs):
        raise AssertionError("save_model called again")

    monkeypatch.setattr(mlflow.pyfunc, "save_model", refuse)
    pyfunc._template.cache_clear()
    again = pyfunc._template(example.tobytes(), example.shape, str(example.dtype))
    assert again.folder == made.folder and again.text == made.text
    net = build_net(10, 0.1, mx.cpu(), 7)
    net.hybridize()
    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    scores = net(mx.nd.array(x)).asnumpy()
    (tmp_path / "export").mkdir()
    net.export(str(tmp_path / "export" / "model"), epoch=0)
    pyfunc.stage_model(tmp_path / "export", example, tmp_path / "staged")
    predicted = mlflow.pyfunc.load_model(str(tmp_path / "staged")).predict(x)
    assert list(predicted["label"]) == list(scores.argmax(axis=1))
    pyfunc._template.cache_clear()
    with pytest.raises(AssertionError, match="save_model called again"):  # another example: another template
        pyfunc._template(example[:2].tobytes(), (2, 784), str(example.dtype))
    pyfunc._template.cache_clear()


def test_a_run_id_prefix_of_digits_only_is_taken_as_typed(tmp_path, mnist5k_root):
    """Hydra reads resume=99893388 as a number; the prefix still names the run (here: none such)."""
    proc = run_cli(["resume=99893388", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 2 and "resume=99893388: no run id begins with 99893388" in proc.stderr, proc.stderr
