"""hydra/launcher=slurm against a live single-node Slurm (mnist_logreg.services.slurm, started once
for this file): one array task per stack, bit-identical to the local default launcher; scancel; a
preemption (Slurm's USR2) that requeues the task, which continues its runs in place; refusals."""

import os
import re
import signal
import subprocess
import time

import pytest

from hydra.core.config_store import ConfigStore
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from hydra_plugins.mnist_logreg_stacked import StackedSlurmLauncherConf
from mnist_logreg.services.slurm import SlurmCluster, missing
from conftest import jobs_and_parents, numbers_of, run_cli, signal_when, start_cli

pytestmark = pytest.mark.slow
# Hydra's LauncherTestSuite selects a launcher by name alone: the stacked Slurm launcher, small.
ConfigStore.instance().store(group="hydra/launcher", name="slurm_contract", provider="tests",
                             node=StackedSlurmLauncherConf(cpus_per_task=1, mem_gb=1, timeout_min=5))
CARD = ["optim.lr=0.05,0.1,0.5", "trainer.epochs=3", "data.batch_size=96"]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def sacct(cluster, *args) -> str:
    return subprocess.run(["sacct", "-a", "-n", "-P", *args], env=cluster.env, capture_output=True, text=True).stdout


def until_training(folder, jobs_expected: int, epochs: int, pause: float = 0.5) -> str:
    """Wait until every job of the sweep in folder has a run that has logged `epochs` epochs; return
    the Slurm job id its runs carry."""
    while True:
        client, jobs, _ = jobs_and_parents(folder)
        steps = [m.step for r in jobs for m in client.get_metric_history(r.info.run_id, "train_loss")]
        if len(jobs) == jobs_expected and max(steps, default=0) >= epochs:
            return jobs[0].data.tags["slurm.job_id"]
        time.sleep(pause)


def by_lr(folder):
    client, jobs, parents = jobs_and_parents(folder)
    return client, {r.data.params["optim.lr"]: r for r in jobs}, parents


def test_the_card_on_slurm_is_one_array_task_and_bit_identical_to_local(cluster, tmp_path, mnist5k_root):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir(), remote.mkdir()
    assert run_cli(["-m", *CARD, f"data.root={mnist5k_root}"], cwd=local).returncode == 0
    proc = run_cli(["-m", *SLURM, *CARD, f"data.root={mnist5k_root}"], cwd=remote, env=cluster.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    found = re.search(r"submitted Slurm array (\d+): 1 task \(one per stack\); watch it with squeue -j \1", proc.stdout)
    assert found, proc.stdout[-2000:]
    client_l, lone, _ = by_lr(local)
    client_s, slurm, parents = by_lr(remote)
    assert sorted(slurm) == sorted(lone) == ["0.05", "0.1", "0.5"] and len(parents) == 1
    for lr, run in slurm.items():
        assert numbers_of(client_s, run) == numbers_of(client_l, lone[lr]), lr
        assert run.data.tags["slurm.job_id"] in (found[1], f"{found[1]}_0")  # as squeue and sacct print it
        assert run.data.tags["slurm.node"] == cluster.node
        assert run.data.tags["slurm.requeues"] == "0" and os.path.isfile(run.data.tags["slurm.log"])
        assert run.data.tags["stack.size"] == "3"
    assert f"{slurm['0.1'].data.tags['slurm.job_id']}|COMPLETED" in sacct(cluster, "-X", "-o", "JobID,State")


def test_scancel_mid_sweep_stops_with_one_line_and_every_run_killed(cluster, tmp_path, mnist5k_root):
    args = ["-m", *SLURM, "optim.lr=0.1,0.5", "trainer.epochs=400", "data.batch_size=500", f"data.root={mnist5k_root}"]
    proc = start_cli(args, tmp_path, env=cluster.env)
    started = []

    def cancel():
        started.append(until_training(tmp_path, 2, 2))
        subprocess.run(["scancel", started[0].split("_")[0]], env=cluster.env, check=True)
        started.append(time.monotonic())

    out = signal_when(proc, r"submitted Slurm array", None, timeout=120, before=cancel)
    assert time.monotonic() - started[1] < 40, "the launching process noticed late"
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"task {started[0]} CANCELLED (2 jobs: 2 runs KILLED with their metrics" in errors[0]
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert parents[0].info.status == "KILLED"
    assert all(r.info.status == "KILLED" for r in jobs), [r.info.status for r in jobs]
    for run in jobs:
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2


def test_a_preempted_task_requeues_and_continues_its_runs_bit_identical(cluster, tmp_path, mnist5k_root):
    """Slurm's warning signal, as on a preemption (scancel --signal=USR2): the runs end KILLED with
    their checkpoints, the task requeues, and the requeued task goes on in the same runs."""
    points = ["optim.lr=0.1,0.5", "trainer.epochs=40", "data.batch_size=8"]  # long enough to be preempted
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir(), remote.mkdir()
    assert run_cli(["-m", *points, f"data.root={mnist5k_root}"], cwd=local).returncode == 0
    proc = start_cli(["-m", *SLURM, *points, f"data.root={mnist5k_root}"], remote, env=cluster.env)
    job = []

    def preempt():
        job.append(until_training(remote, 2, 3, pause=0.3))
        subprocess.run(["scancel", "--signal=USR2", job[0]], env=cluster.env, check=True)
        deadline = time.monotonic() + 60  # Slurm holds a requeued task back 2 minutes: start it now
        while "REQUEUED" not in sacct(cluster, "-D", "-X", "-o", "JobID,State") and time.monotonic() < deadline:
            time.sleep(0.5)
        # slurmd refuses a relaunch whose credential is not newer than the kill's revocation (same
        # second: "Job credential revoked", and the task ends FAILED): let a few seconds pass first.
        time.sleep(3)
        for _ in range(20):
            subprocess.run(["scontrol", "update", f"JobId={job[0]}", "StartTime=now"], env=cluster.env,
                           capture_output=True)
            time.sleep(0.5)

    out = signal_when(proc, r"submitted Slurm array", None, timeout=300, before=preempt)
    assert proc.returncode == 0, out[-3000:]
    history = sacct(cluster, "-D", "-X", "-o", "JobID,State", "-j", job[0].split("_")[0])
    assert "REQUEUED" in history and "COMPLETED" in history, history
    client_l, lone, _ = by_lr(local)
    client_s, slurm, parents = by_lr(remote)
    assert len(parents) == 1 and sorted(slurm) == ["0.1", "0.5"]  # the same runs, one per point
    for lr, run in slurm.items():
        assert run.info.status == "FINISHED" and run.data.tags["slurm.requeues"] == "1"
        assert numbers_of(client_s, run) == numbers_of(client_l, lone[lr]), lr


def test_a_request_slurm_refuses_is_one_line_and_leaves_nothing(cluster, tmp_path, mnist5k_root):
    proc = run_cli(["-m", *SLURM[:2], "hydra.launcher.mem_gb=100000", "optim.lr=0.1,0.5", "trainer.epochs=1",
                    f"data.root={mnist5k_root}"], cwd=tmp_path, env=cluster.env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Slurm refused the array: ") and "emory" in lines[0]
    assert not jobs_and_parents(tmp_path)[1] and not jobs_and_parents(tmp_path)[2]


def test_no_slurm_at_all_says_how_to_get_one(tmp_path, mnist5k_root):
    env = {"SLURM_CONF": str(tmp_path / "nowhere.conf"), "PATH": os.environ["PATH"]}
    proc = run_cli(["-m", *SLURM, "optim.lr=0.1,0.5", "trainer.epochs=1", f"data.root={mnist5k_root}"], cwd=tmp_path,
                   env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "python -m mnist_logreg.services.slurm" in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or not jobs_and_parents(tmp_path)[2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_launching_process_cancels_its_array(cluster, tmp_path, mnist5k_root, sig):
    args = ["-m", *SLURM, "optim.lr=0.1,0.5", "trainer.epochs=400", "data.batch_size=500", f"data.root={mnist5k_root}"]
    proc = start_cli(args, tmp_path, env=cluster.env)
    array = []

    def wait_for_training():
        array.append(until_training(tmp_path, 2, 2).split("_")[0])

    out = signal_when(proc, r"submitted Slurm array", sig, timeout=120, before=wait_for_training)
    assert proc.returncode == 128 + sig and "Traceback" not in out, out[-3000:]
    assert f"cancelling Slurm array {array[0]}" in out and f"Stopped by {signal.Signals(sig).name}" in out
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert parents[0].info.status == "KILLED" and all(r.info.status == "KILLED" for r in jobs), [(r.info.status, r.data.tags.get("failure")) for r in jobs]
    assert "CANCELLED" in sacct(cluster, "-X", "-o", "JobID,State", "-j", array[0])


@pytest.fixture
def slurm_env(cluster, monkeypatch, fresh_hydra):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))


@pytest.mark.usefixtures("slurm_env")
@pytest.mark.parametrize("launcher_name, overrides", [("slurm_contract", [])])
class TestStackedSlurmLauncher(LauncherTestSuite):
    """Hydra's LauncherTestSuite on the live cluster: another app's task function, one task per job."""


@pytest.mark.usefixtures("slurm_env")
@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({"defaults": [{"override hydra/launcher": "stacked_slurm"}, {"override hydra/hydra_logging": "hydra_debug"},
                    {"override hydra/job_logging": "disabled"}],
       "hydra": {"launcher": {"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5}}}, ["-m"])],
)
class TestStackedSlurmLauncherIntegration(IntegrationTestSuite):
    """Hydra's IntegrationTestSuite on the live cluster."""


def test_per_job_mode_submits_one_task_per_job(cluster, tmp_path, mnist5k_root):
    proc = run_cli(["-m", *SLURM, "hydra.launcher.stack=false", "optim.lr=0.1,0.5", "trainer.epochs=1",
                    "data.batch_size=500", f"data.root={mnist5k_root}"], cwd=tmp_path, env=cluster.env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert re.search(r"submitted Slurm array \d+: 2 tasks \(one per job\)", proc.stdout)
    _, jobs, _ = jobs_and_parents(tmp_path)
    assert len({r.data.tags["slurm.job_id"] for r in jobs}) == 2 and all(r.info.status == "FINISHED" for r in jobs)
