"""The stacked launcher (`-m`'s default) through run.py: every run bit-identical to the basic launcher's."""

import signal

import pytest

from mnist_logreg import reproduce
from mnist_logreg.job import train
from conftest import (artifact_paths, compose_cfg, history, jobs_and_parents, numbers_of, run_cli, signal_when,
                      start_cli, store_uri)

pytestmark = pytest.mark.slow
# 96 does not divide the 4,000 training digits: every epoch ends on a short batch.
CARD = ["optim.lr=0.05,0.1,0.5", "trainer.epochs=3", "data.batch_size=96"]


@pytest.fixture(scope="module")
def card(tmp_path_factory, mnist5k_root):
    """The card's 3-lr sweep, with the default launcher and with hydra/launcher=basic, into two stores."""
    folders = {}
    for name, extra in (("stacked", []), ("basic", ["hydra/launcher=basic"])):
        folder = tmp_path_factory.mktemp(name)
        proc = run_cli(["-m", *CARD, f"data.root={mnist5k_root}", *extra], cwd=folder)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
        folders[name] = folder
    return folders


def by_param(folder, key="optim.lr"):
    client, jobs, parents = jobs_and_parents(folder)
    return client, {r.data.params[key]: r for r in jobs}, parents


def test_stacked_runs_equal_basic_runs_bit_for_bit(card):
    client_s, stacked, parents = by_param(card["stacked"])
    client_b, basic, _ = by_param(card["basic"])
    assert sorted(stacked) == sorted(basic) == ["0.05", "0.1", "0.5"]
    for lr, run in stacked.items():
        assert numbers_of(client_s, run) == numbers_of(client_b, basic[lr]), lr
        assert len(history(client_s, run.info.run_id, "test_acc")) == 4  # steps 0..3
    # One stack of three, and each run still has everything a lone job has.
    assert {r.data.tags["stack.group"] for r in stacked.values()} == {f"{parents[0].data.tags['sweep']}/1"}
    assert sorted(r.data.tags["stack.index"] for r in stacked.values()) == ["0", "1", "2"]
    assert all(r.data.tags["stack.size"] == "3" for r in stacked.values())
    assert "stack.group" not in next(iter(basic.values())).data.tags
    for run in stacked.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"config.yaml", "predictions.png", "confusion_matrix.png", "model/model-symbol.json",
                "model/model-0000.params", "hydra/config.yaml", "hydra/overrides.yaml",
                "environment/requirements.txt"} <= set(artifact_paths(client_s, run.info.run_id))
    assert parents[0].info.status == "FINISHED"
    jobs = sorted((card["stacked"] / "outputs" / "sweeps").glob("*/*/[0-9]"))
    assert len(jobs) == 3
    for folder in jobs:  # each job its own folder, Hydra record, log and checkpoint
        assert (folder / ".hydra" / "overrides.yaml").is_file()
        assert "epoch 3/3" in (folder / "run.log").read_text()
        assert (folder / "checkpoint" / "epoch-0003" / "net.params").is_file()


def test_reproduce_a_stacked_run_at_atol_0(card, capsys):
    _, stacked, _ = by_param(card["stacked"])
    run_id = stacked["0.5"].info.run_id
    assert reproduce.main([run_id, "--tracking-uri", store_uri(card["stacked"])]) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and "atol=0" in out


def test_diverging_member_and_two_batch_sizes(card, tmp_path, mnist5k_root):
    proc = run_cli(["-m", "optim.lr=1e38,0.1,0.5", "trainer.epochs=3", "data.batch_size=96,500",
                    f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert len(jobs) == 6 and parents[0].info.status == "FINISHED"
    groups = {}
    for run in jobs:
        groups.setdefault(run.data.params["data.batch_size"], set()).add(run.data.tags["stack.group"])
    assert len(groups["96"]) == len(groups["500"]) == 1 and groups["96"] != groups["500"]
    diverged = [r for r in jobs if r.data.params["optim.lr"] == "1e+38"]
    assert all(r.info.status == "FAILED" and "non-finite" in r.data.tags["failure"] for r in diverged)
    # Its stack-mates at batch 96 equal, to the bit, the basic launcher's lone runs of the card.
    client_b, basic, _ = by_param(card["basic"])
    for run in jobs:
        if run.data.params["data.batch_size"] == "96" and run.info.status == "FINISHED":
            assert numbers_of(client, run) == numbers_of(client_b, basic[run.data.params["optim.lr"]])


def test_relaunch_skips_finished_points_before_stacking(card, mnist5k_root):
    proc = run_cli(["-m", "optim.lr=0.05,0.1,0.5,1.0", *CARD[1:], f"data.root={mnist5k_root}"], cwd=card["stacked"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped: run") == 3
    _, stacked, _ = by_param(card["stacked"])
    assert stacked["1.0"].data.tags["stack.size"] == "1"


def test_optuna_trials_stack(tmp_path, mnist5k_root):
    proc = run_cli(["-m", "experiments=optuna", "hydra.sweeper.n_trials=4", "trainer.epochs=1",
                    f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Best value" in proc.stdout
    _, jobs, parents = jobs_and_parents(tmp_path)
    assert len(parents) == 1 and len(jobs) == 4
    assert {r.data.tags["stack.size"] for r in jobs} == {"4"}  # the preset's batch of 4 trials, one stack
    best = float(proc.stdout.split("Best value:")[1].split()[0])
    assert best == max(r.data.metrics["test_acc"] for r in jobs)


def test_ctrl_c_kills_every_member_and_a_member_resumes_alone_bit_identical(tmp_path, mnist5k_root):
    args = ["optim.lr=0.1,0.5", "trainer.epochs=5", "data.batch_size=2", f"data.root={mnist5k_root}"]
    out = signal_when(start_cli(["-m", *args], tmp_path), r"job\.1\]\[INFO\] - epoch 2/5", signal.SIGINT)
    assert "Traceback" not in out
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert len(jobs) == 2 and parents[0].info.status == "KILLED"
    for run in jobs:
        assert run.info.status == "KILLED", out[-2000:]
        assert [s for s, _ in history(client, run.info.run_id, "train_loss")][:2] == [1, 2]
        assert any(p.startswith("checkpoint/") for p in artifact_paths(client, run.info.run_id))
    stopped = next(r for r in jobs if r.data.params["optim.lr"] == "0.5")

    uri = store_uri(tmp_path)
    result = train(compose_cfg(f"resume={stopped.info.run_id}", f"tracking.uri={uri}"))
    assert result["status"] == "FINISHED" and result["epochs"] >= 1
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    alone = train(compose_cfg("optim.lr=0.5", *args[1:], f"tracking.uri={store_uri(fresh)}"))
    client_f = jobs_and_parents(fresh)[0]
    assert numbers_of(client, client.get_run(stopped.info.run_id)) == numbers_of(client_f, client_f.get_run(alone["run_id"]))
