"""Stopping: Ctrl-C and SIGTERM reach the launching process; runs end KILLED with their metrics and
checkpoints, a relaunch reruns only what did not finish, and resume=RUN_ID continues a run."""

import os
import signal
import time

import pytest

from mnist_logreg.sweep.stopping import _alive, descendants
from conftest import (artifact_paths, history, jobs_and_parents, run_cli, signal_when,
                      start_cli)

pytestmark = pytest.mark.slow


def test_ctrl_c_kills_the_stack_and_a_relaunch_continues_its_runs_in_place(tmp_path, mnist5k_root):
    # Stack 1 (batch 4000, one batch per epoch) finishes at once; stack 2 (batch 8) is stopped mid-run,
    # its records in the hands of the record writer.
    args = ["-m", "hydra.launcher.record_writer=true", "optim.lr=0.1,0.5", "trainer.epochs=3", "data.batch_size=4000,8", f"data.root={mnist5k_root}"]
    out = signal_when(start_cli(args, tmp_path), r"job\.3\]\[INFO\] - epoch 2/3", signal.SIGINT)
    assert "Traceback" not in out and "Stopped by SIGINT" in out
    client, jobs, parents = jobs_and_parents(tmp_path)
    status = sorted((r.data.params["data.batch_size"], r.info.status) for r in jobs)
    assert status == [("4000", "FINISHED"), ("4000", "FINISHED"), ("8", "KILLED"), ("8", "KILLED")]
    assert parents[0].info.status == "KILLED"
    killed = {r.info.run_id for r in jobs if r.info.status == "KILLED"}
    for run in jobs:
        if run.info.status == "KILLED":  # its metrics so far and its last checkpoint
            assert [s for s, _ in history(client, run.info.run_id, "train_loss")][:2] == [1, 2]
            assert any(p.startswith("checkpoint/") for p in artifact_paths(client, run.info.run_id))

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped: run") == 2
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert len(jobs) == 4 and len(parents) == 1 and parents[0].info.status == "FINISHED"
    for run in jobs:  # the stopped runs went on in place: every step once
        assert run.info.status == "FINISHED"
        assert [s for s, _ in history(client, run.info.run_id, "train_loss")] == [1, 2, 3]
    assert killed <= {r.info.run_id for r in jobs}


def test_a_stop_while_the_stack_before_is_still_being_recorded_finishes_that_stack_whole(tmp_path, mnist5k_root):
    # Stack 1's pictures, uploads, logged models and ends are the record writer's while stack 2 sets
    # up and trains, and stack 1's jobs end as stack 2's first epoch ends (4,000 batches of 1, about
    # half a second): Ctrl-C in that epoch stops stack 2 alone, whose runs the writer created meanwhile.
    args = ["-m", "hydra.launcher.record_writer=true", "hydra.launcher.max_stack=2", "optim.lr=0.05,0.1,0.5,1.0",
            "trainer.epochs=2", "data.batch_size=1", f"data.root={mnist5k_root}"]
    proc = start_cli(args, tmp_path)
    out = signal_when(proc, r"\] stack \S+/2: jobs", signal.SIGINT, before=lambda: time.sleep(0.25))
    assert "Traceback" not in out and "Stopped by SIGINT" in out, out[-3000:]
    client, jobs, parents = jobs_and_parents(tmp_path)
    stacks = sorted((r.data.tags["stack.group"][-1], r.info.status) for r in jobs)
    assert stacks == [("1", "FINISHED"), ("1", "FINISHED"), ("2", "KILLED"), ("2", "KILLED")], stacks
    for run in jobs:
        if run.info.status == "FINISHED":  # whole: every epoch, its files, its logged model and its hash
            assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == [0, 1, 2]
            assert {"model/model-0000.params", "predictions.png", "confusion_matrix.png",
                    "environment/requirements.txt"} <= set(artifact_paths(client, run.info.run_id))
            assert run.data.tags["params.sha256"] and "timing.train_s" in run.data.tags
            models = client.search_logged_models([run.info.experiment_id],
                                                 filter_string=f"source_run_id = '{run.info.run_id}'")
            assert [m.status for m in models] == ["READY"]
        else:  # stopped in its first epoch (as a rule): its params and step 0 all the same
            assert run.data.params["optim.lr"] in ("0.5", "1.0")
            assert [s for s, _ in history(client, run.info.run_id, "test_acc")][:1] == [0]
    assert parents[0].info.status == "KILLED"
    assert not [p for p in descendants(proc.pid) if _alive(p)]

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped: run") == 2
    client, jobs, _ = jobs_and_parents(tmp_path)
    assert len(jobs) == 4 and all(r.info.status == "FINISHED" for r in jobs)


JOBLIB = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=0.1,0.5", "trainer.epochs=300"]
def test_a_worker_killed_with_sigkill_leaves_no_run_running(tmp_path, mnist5k_root):
    proc = start_cli([*JOBLIB, f"data.root={mnist5k_root}"], tmp_path)
    workers = []

    def kill_a_worker():
        workers.extend(p for p in descendants(proc.pid) if b"LokyProcess" in open(f"/proc/{p}/cmdline", "rb").read())
        os.kill(workers[0], signal.SIGKILL)

    out = signal_when(proc, r"epoch +3/300", None, before=kill_a_worker)
    assert proc.returncode != 0, out[-2000:]
    assert len(workers) == 2  # both jobs were training in their own worker
    deadline = time.monotonic() + 10
    while [p for p in workers if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], "a worker outlived its launcher"
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert parents[0].info.status == "FAILED"
    assert all(r.info.status in ("FAILED", "KILLED") for r in jobs)  # none left RUNNING
    assert [r for r in jobs if "process died" in r.data.tags.get("failure", "")]
