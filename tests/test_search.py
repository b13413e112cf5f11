"""The search (hydra/sweeper=optuna, mnist_logreg.sweep.search): real Optuna 5 studies in SQLite,
trained by the stacked launcher, stopped by a real signal and continued."""

import re
import signal

import optuna

from conftest import history, jobs_and_parents, run_cli, signal_when, start_cli


def _study(folder):
    return optuna.load_study(study_name="mnist_logreg", storage=f"sqlite:///{folder / 'optuna.db'}")


def test_trials_stack_the_best_is_the_tables_first_row_and_is_registered(tmp_path, mnist5k_root):
    proc = run_cli(["-m", "experiments=optuna", "data.val_size=1000", "hydra.sweeper.n_trials=4", "trainer.epochs=1",
                    "tracking.register=optuna-best", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert len(parents) == 1 and len(jobs) == 4
    assert {r.data.tags["stack.size"] for r in jobs} == {"4"}  # the preset's batch of 4 trials, one stack
    said = re.search(r"study mnist_logreg: best trial #(\d+), val_acc (0\.\d+), run (\w+):", proc.stdout)
    assert said, proc.stdout[-2000:]
    best_run = said[3]
    # The objective is the held-out val_acc, not the test set's accuracy.
    assert client.get_run(best_run).data.metrics["val_acc"] == max(r.data.metrics["val_acc"] for r in jobs)
    table_first = re.search(r"sorted by final val_acc \(the held-out validation split; test_acc is for "
                            r"reporting\):\n.*\n(\w{8}) ", proc.stdout)[1]
    assert best_run.startswith(table_first)  # one tie rule: the sweeper's best is the table's first row
    study = _study(tmp_path)
    assert study.trials[int(said[1])].user_attrs["mlflow.run_id"] == best_run
    (version,) = client.search_model_versions("name = 'optuna-best'")  # tracking.register, at the sweep's end
    assert version.run_id == best_run and version.tags["sweep"] == parents[0].data.tags["sweep"]
    # A search's comparison: each searched value against the objective, no averaged heatmap.
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
    assert "compare/search.png" in logged and "compare/heatmap.png" not in logged
    assert {r.data.tags["search.log"] for r in jobs} == {"optim.lr,model.sigma"}  # the scatter's log axes
    # The one-seed hint retrains the best points over 5 seeds: a sweep of seeds, not the search again,
    # with the preset's values (its val_size overridden on the command line) and not its sweeper.
    hint = proc.stdout.split("one seed per config")[1].splitlines()[1]
    assert "experiments=" not in hint and "data.val_size=1000" in hint and "5000" not in hint, hint
    seeds = run_cli(hint.split()[2:], cwd=tmp_path)
    assert seeds.returncode == 0, seeds.stderr[-2000:]
    assert "Launching 5 jobs" in seeds.stdout and "study " not in seeds.stdout, seeds.stdout[-2000:]


def test_a_study_stopped_after_its_first_batch_continues_to_n_trials_and_no_trial_trains_twice(tmp_path,
                                                                                            mnist5k_root):
    args = ["-m", "experiments=optuna", "data.val_size=1000", "hydra.sweeper.n_trials=8", "trainer.epochs=3", "data.batch_size=16",
            f"data.root={mnist5k_root}"]
    out = signal_when(start_cli(args, tmp_path), r"job\.5\]\[INFO\] - epoch 1/3", signal.SIGINT)
    assert "Stopped by SIGINT" in out and "Traceback" not in out
    study = _study(tmp_path)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 4 + ["RUNNING"] * 4, states  # the second batch was cut short
    client, jobs, _ = jobs_and_parents(tmp_path)
    killed = {r.data.tags["search.trial"]: r.info.run_id for r in jobs if r.info.status == "KILLED"}
    assert sorted(killed) == ["4", "5", "6", "7"]

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "4 of 8 trials done, 4 cut short to train again" in again.stdout
    study = _study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 8  # 8 trials in all: none asked twice
    client, jobs, parents = jobs_and_parents(tmp_path)
    assert len(jobs) == 8 and all(r.info.status == "FINISHED" for r in jobs) and len(parents) == 1
    by_trial = {int(r.data.tags["search.trial"]): r for r in jobs}
    for trial in study.trials:  # each trial names its run, the run its trial, and the value is the run's
        run = by_trial[trial.number]
        assert trial.user_attrs["mlflow.run_id"] == run.info.run_id
        assert trial.value == run.data.metrics["val_acc"]
        assert float(run.data.params["optim.lr"]) == trial.params["optim.lr"]
    for number, run_id in killed.items():  # the cut-short trials went on in their own runs: every epoch once
        assert by_trial[int(number)].info.run_id == run_id
        assert [s for s, _ in history(client, run_id, "train_loss")] == [1, 2, 3]


def test_a_storage_that_cannot_hold_the_study_is_one_line_exit_2_and_leaves_nothing(tmp_path, mnist5k_root):
    for storage in (f"sqlite:///{tmp_path}/no/such/folder/optuna.db", "bogus://somewhere/db"):
        proc = run_cli(["-m", "experiments=optuna", "data.val_size=1000", f"hydra.sweeper.storage={storage}", "trainer.epochs=1",
                        f"data.root={mnist5k_root}"], cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "hydra.sweeper.storage=" in lines[0] and "cannot hold the study" in lines[0], lines
    assert not list(tmp_path.rglob("optuna.db"))
    _, jobs, parents = jobs_and_parents(tmp_path)
    assert jobs == [] and parents == []


def test_a_trial_refused_as_bad_input_stops_the_search_with_its_one_line(tmp_path):
    proc = run_cli(["-m", "experiments=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                    f"data.root={tmp_path}/no/such/folder"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    assert "Error: data.root=" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert "no trial finished" not in proc.stdout + proc.stderr  # not a search that merely found nothing
    assert [t.state.name for t in _study(tmp_path).trials] == ["FAIL", "FAIL"]  # its first batch, told; no more


def test_a_pruner_stops_hopeless_trials_in_their_stack_and_the_survivors_stay_bit_identical(tmp_path, mnist5k_root):
    from mnist_logreg import reproduce

    from conftest import store_uri

    proc = run_cli(["-m", "experiments=optuna", "data.val_size=1000", "hydra.sweeper.n_trials=8", "trainer.epochs=3",
                    "hydra.sweeper.pruner={name: median, n_startup_trials: 2}", f"data.root={mnist5k_root}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    study = _study(tmp_path)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials), [t.state for t in study.trials]
    client, jobs, _ = jobs_and_parents(tmp_path)
    by_trial = {int(r.data.tags["search.trial"]): r for r in jobs}
    for trial in pruned:  # marked on the run: the epoch it stopped at, FINISHED so that no relaunch continues it
        run = by_trial[trial.number]
        stopped = int(run.data.tags["pruned"])
        assert run.info.status == "FINISHED" and 1 <= stopped < 3
        assert [s for s, _ in history(client, run.info.run_id, "test_acc")] == list(range(stopped + 1))
        assert re.search(rf"\n{run.info.run_id[:8]} .* {stopped} +\S+ +PRUNED\n", proc.stdout)
    best = re.search(r"best trial #(\d+)", proc.stdout)[1]
    assert int(best) not in {t.number for t in pruned}
    # The survivors of a stack that pruned some of its members equal their lone training, bit for bit.
    stack = by_trial[pruned[0].number].data.tags["stack.group"]
    survivors = [r for r in jobs if r.data.tags["stack.group"] == stack and "pruned" not in r.data.tags]
    assert survivors
    for run in survivors:
        assert reproduce.main([run.info.run_id, "--tracking-uri", store_uri(tmp_path)]) == 0
