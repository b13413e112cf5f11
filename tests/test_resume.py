"""Checkpoints and resume=RUN_ID: a stopped run continues into the same MLflow run, bit-identical."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli
from test_run_e2e import history, runs_of

pytestmark = pytest.mark.slow
KEYS = ("train_loss", "train_acc", "test_acc")


def test_killed_run_resumes_bit_identical(tmp_path, mnist5k_root):
    args = ["trainer.epochs=120", f"data.root={mnist5k_root}"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    assert run_cli(args, cwd=whole).returncode == 0
    client_a, (ref,) = runs_of(whole)

    env = {**os.environ, "MNIST_LOGREG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cut, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if re.search(r"epoch +3/", line) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    client_b, (stopped,) = runs_of(cut)
    assert stopped.info.status == "KILLED"
    done = len(history(client_b, stopped.info.run_id, "train_loss"))
    assert 3 <= done < 120

    again = run_cli([f"resume={stopped.info.run_id}"], cwd=cut)
    assert again.returncode == 0, again.stderr
    assert f"after epoch {done}" in again.stdout
    client_b, runs = runs_of(cut)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, not a new one
    for key in KEYS:
        assert history(client_b, stopped.info.run_id, key) == history(client_a, ref.info.run_id, key), key
    assert runs[0].data.tags["params.sha256"] == ref.data.tags["params.sha256"]


def test_resume_refuses_a_finished_run(tmp_path, mnist5k_root):
    assert run_cli(["trainer.epochs=1", f"data.root={mnist5k_root}"], cwd=tmp_path).returncode == 0
    _, (run,) = runs_of(tmp_path)
    proc = run_cli([f"resume={run.info.run_id}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"Error: resume={run.info.run_id}: the run is FINISHED; only KILLED or "
                                   "FAILED runs can be resumed")


def test_rerun_after_ctrl_c_reruns_only_the_stopped_job(tmp_path, mnist5k_root):
    # Job 0 (one batch per epoch) finishes at once; job 1 (batch size 2) is stopped mid-epoch.
    args = ["-m", "data.batch_size=4000,2", "trainer.epochs=3", f"data.root={mnist5k_root}"]
    env = {**os.environ, "MNIST_LOGREG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second_job, deadline = False, time.time() + 120
    for line in proc.stdout:
        second_job = second_job or "#1 :" in line
        if (second_job and re.search(r"epoch 1/3", line)) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    _, runs = runs_of(tmp_path)
    status = {r.data.params["data.batch_size"]: r.info.status for r in runs if "data.batch_size" in r.data.params}
    assert status == {"4000": "FINISHED", "2": "KILLED"}
    parent = [r for r in runs if r.data.tags.get("mnist_logreg.role") == "sweep"]
    assert parent[0].info.status == "KILLED"

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped: run") == 1
    _, runs = runs_of(tmp_path)
    jobs = sorted((r.data.params["data.batch_size"], r.info.status) for r in runs if "data.batch_size" in r.data.params)
    assert jobs == [("2", "FINISHED"), ("2", "KILLED"), ("4000", "FINISHED")]
