"""The stacked launcher keeps Hydra's launcher contract: Hydra's own launcher test suites, as Hydra's
launcher plugins run them, pass against hydra/launcher=stacked (selected by name, from the
ConfigStore entry the installed plugin registers)."""

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from hydra_plugins.mnist_logreg_stacked import StackedLauncher


def test_discovery():
    assert StackedLauncher.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]


@pytest.mark.usefixtures("fresh_hydra")
@pytest.mark.parametrize("launcher_name, overrides", [("stacked", [])])
class TestStackedLauncher(LauncherTestSuite):
    """Hydra's LauncherTestSuite: another app's task function runs job by job, as under basic."""


@pytest.mark.usefixtures("fresh_hydra")
@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({"defaults": [{"override hydra/launcher": "stacked"}, {"override hydra/hydra_logging": "hydra_debug"},
                    {"override hydra/job_logging": "disabled"}]}, ["-m"])],
)
class TestStackedLauncherIntegration(IntegrationTestSuite):
    """Hydra's IntegrationTestSuite: apps written to a temporary folder, run as subprocesses."""


@pytest.mark.slow
def test_a_users_callback_sees_each_stacked_job_start_before_training_and_end_after_its_run(tmp_path, mnist5k_root):
    import json
    import os

    from conftest import ROOT, history, jobs_and_parents, run_cli

    events = tmp_path / "events.jsonl"
    env = {"JOB_EVENTS": str(events), "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli(["-m", "optim.lr=0.05,0.1,0.5", "trainer.epochs=2", "data.batch_size=500", f"data.root={mnist5k_root}",
                    "+hydra.callbacks.job_events._target_=hydra_callback.JobEvents"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "products of" in proc.stdout or "product of" in proc.stdout  # it did stack
    client, jobs, _ = jobs_and_parents(tmp_path)
    runs = {r.info.run_id: r for r in jobs}
    assert len({r.data.tags["stack.group"] for r in jobs}) == 1 and len(jobs) == 3
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    starts = {e["num"]: e for e in seen if e["event"] == "start"}
    ends = {e["num"]: e for e in seen if e["event"] == "end"}
    assert sorted(starts) == sorted(ends) == [0, 1, 2]
    first_epoch = min(m.timestamp for r in jobs for m in client.get_metric_history(r.info.run_id, "train_loss")) / 1000
    for num, end in ends.items():
        run = next(r for r in runs.values() if r.data.tags["hydra.overrides"].startswith(
            ("optim.lr=0.05", "optim.lr=0.1", "optim.lr=0.5")[num]))
        assert starts[num]["time"] < first_epoch  # before its training
        assert end["time"] > run.info.end_time / 1000  # after its run had ended
        assert end["status"] == "COMPLETED"
        assert end["return_value"] == history(client, run.info.run_id, "test_acc")[-1][1]  # the objective
        assert end["working_dir"] == str(tmp_path)  # hydra.job.chdir=false, as under basic
        assert (tmp_path / starts[num]["output_dir"] / ".hydra" / "overrides.yaml").is_file()
