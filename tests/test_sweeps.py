"""Sweeps at scale: presets, the joblib and submitit launchers, many writers, compare, the MLflow server."""

import csv

import pytest
from hydra import compose, initialize_config_dir

from mnist_logreg import compare
from mnist_logreg.job import train
from conftest import ROOT, compose_cfg, jobs_and_parents, numbers_of, run_cli, runs_of, store_uri

pytestmark = pytest.mark.slow


def test_presets_set_their_axes(monkeypatch):
    monkeypatch.setenv("MNIST_LOGREG_ROOT", str(ROOT))
    expected = {
        "lr_sweep": {"optim.lr"}, "batch_size_sweep": {"data.batch_size"}, "sigma_sweep": {"model.sigma"},
        "context_sweep": {"context"}, "grid": {"optim.lr", "data.batch_size", "model.sigma"},
        "seeds": {"seed"}, "optuna": {"optim.lr", "model.sigma"},
    }
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, axes in expected.items():
            cfg = compose("config", overrides=[f"experiments={name}"], return_hydra_config=True)
            assert set(cfg.hydra.sweeper.params) == axes, name
        grid = compose("config", overrides=["experiments=grid"], return_hydra_config=True).hydra.sweeper.params
        assert [len(str(v).split(",")) for v in grid.values()] == [3, 3, 3]
        both = compose("config", overrides=["experiments=[lr_sweep,seeds]"], return_hydra_config=True)
        assert set(both.hydra.sweeper.params) == {"optim.lr", "seed"}
        tutorial = compose("config", overrides=["experiments=tutorial"])
        assert (tutorial.optim.lr, tutorial.data.batch_size, tutorial.model.sigma, tutorial.trainer.epochs) == (
            0.1, 64, 1.0, 10)
        default = compose("config", return_hydra_config=True)
        assert default.hydra.launcher._target_.endswith("mnist_logreg_stacked.StackedLauncher")
    assert {p.stem for p in (ROOT / "experiments").glob("*.yaml")} == set(expected) | {"tutorial"}


def test_submitit_local_launcher_runs_a_preset_with_one_axis_overridden(tmp_path, mnist5k_root):
    proc = run_cli(["-m", "hydra/launcher=local", "experiments=sigma_sweep", "model.sigma=0.05,0.5",
                    "trainer.epochs=1", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, jobs, parents = jobs_and_parents(tmp_path)
    assert len(parents) == 1 and sorted(r.data.params["model.sigma"] for r in jobs) == ["0.05", "0.5"]
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in jobs)


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, mnist5k_root):
    """A fresh SQLite store that 8 jobs on 2 parallel joblib workers wrote: an lr x sigma x seed sweep."""
    folder = tmp_path_factory.mktemp("sweep_store")
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=0.1,0.5",
                    "model.sigma=0.1,1.0", "seed=1,2", "trainer.epochs=1", f"data.root={mnist5k_root}"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    (folder / "stdout.txt").write_text(proc.stdout)
    return folder


def test_a_seeded_sweep_ends_with_mean_and_std_per_config_and_marks_those_within_noise(sweep_store):
    import re

    from mnist_logreg.analysis.compare import comparison_table, histories, seed_spread, sweep_runs

    out = (sweep_store / "stdout.txt").read_text()
    printed = out.split("over seeds, best mean first")[1].splitlines()[2:6]
    assert len(printed) == 4 and all(re.search(r"0\.\d{4} ± 0\.\d{4} +2 ", line) for line in printed), printed
    assert printed[0].rstrip().endswith("*")  # the best is within noise of itself
    client, jobs, parents = jobs_and_parents(sweep_store)
    runs = sweep_runs(store_uri(sweep_store), parents[0].info.experiment_id, parents[0].data.tags["sweep"])
    spread = seed_spread(comparison_table(runs, histories(client, runs["run_id"])))
    best = spread.iloc[0]
    for line, (_, row) in zip(printed, spread.iterrows()):  # marked exactly when within one std of the best
        noise = max(row["std"], best["std"])
        assert line.rstrip().endswith("*") == (best["mean"] - row["mean"] <= noise), (line, row.to_dict())
    assert "one seed per config" not in out


def test_parallel_writers_exact_counts(sweep_store):
    client, jobs, parents = jobs_and_parents(sweep_store)
    assert len(parents) == 1 and len(jobs) == 8
    assert len({(r.data.params["optim.lr"], r.data.params["model.sigma"], r.data.params["seed"]) for r in jobs}) == 8
    points = sum(len(client.get_metric_history(r.info.run_id, k)) for r in jobs
                 for k in ("train_acc", "test_acc", "train_loss", "epoch_seconds", "eval_seconds",
                           "examples_per_second"))
    assert points == 8 * (2 * 2 + 4 * 1)
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in jobs)
    assert {r.data.tags["threads.OMP_NUM_THREADS"] for r in jobs} == {"1"}  # 2 cores / 2 workers
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id])


def test_joblib_runs_equal_the_plain_single_run_path(sweep_store, tmp_path, mnist5k_root):
    """Two of the joblib workers' runs against the same configs trained in this process by job.train."""
    client, jobs, _ = jobs_and_parents(sweep_store)
    for run in sorted(jobs, key=lambda r: r.info.start_time)[::5]:
        p = run.data.params
        alone = train(compose_cfg(f"optim.lr={p['optim.lr']}", f"model.sigma={p['model.sigma']}", f"seed={p['seed']}",
                                  "trainer.epochs=1", f"data.root={mnist5k_root}", f"tracking.uri={store_uri(tmp_path)}"))
        mine = runs_of(tmp_path)[0]
        assert numbers_of(client, run) == numbers_of(mine, mine.get_run(alone["run_id"]))


def test_compare_table_and_plots(sweep_store, capsys, monkeypatch):
    out = sweep_store / "cmp"
    monkeypatch.chdir(sweep_store / "outputs")  # the store is named by the environment, as MLflow reads it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(sweep_store))
    assert compare.main(["--output", str(out)]) == 0
    with open(out / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    assert {"optim.lr", "model.sigma", "seed", "test_acc", "best_test_acc", "train_loss", "epochs",
            "wall_s", "status"} <= set(rows[0])
    accs = [float(r["test_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert all(r["epochs"] == "1" and r["status"] == "FINISHED" for r in rows)
    assert all(float(r["best_test_acc"]) >= float(r["test_acc"]) for r in rows)
    with open(out / "seeds.csv") as fh:
        seeds = list(csv.DictReader(fh))
    assert len(seeds) == 4 and all(r["count"] == "2" for r in seeds)
    for png in ("learning_curves.png", "heatmap.png", "seeds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out.splitlines()
    assert {"run_id", "optim.lr", "model.sigma", "seed", "test_acc"} <= set(printed[0].split())
    assert len(printed) >= 9

    client, _, parents = jobs_and_parents(sweep_store)
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
    assert {"compare/comparison.csv", "compare/learning_curves.png", "compare/heatmap.png"} <= logged


@pytest.mark.parametrize("lrs, sigmas", [(6, 4), (6, 1), (2, 8)])
def test_the_learning_curves_legend_and_labels_stay_inside_the_picture(tmp_path, lrs, sigmas):
    """A large sweep's curves: a colour per lr, a panel per sigma, a legend below. However many panels the
    legend shares its width with, nothing is cut at the picture's edges (its outermost pixels are white)."""
    import pandas as pd
    from matplotlib.image import imread

    from mnist_logreg.analysis.plots import plot_curves

    lr_values, sigma_values = [0.01, 0.03, 0.1, 0.3, 0.5, 1.0][:lrs], [0.01, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0][:sigmas]
    rows = [{"run_id": f"{i:032x}", "status": "FINISHED", "optim.lr": lr_values[i % lrs],
             "model.sigma": sigma_values[i // lrs % sigmas], "optim.wd": [0.0, 0.0001][i // (lrs * sigmas) % 2],
             "test_acc": 0.8 + 0.001 * i} for i in range(max(13, lrs * sigmas * 2))]
    table = pd.DataFrame(rows).sort_values("test_acc", ascending=False)
    curves = {r["run_id"]: [(s, r["test_acc"] - 0.01 * (5 - s)) for s in range(6)] for r in rows}
    axes = ["optim.lr", "model.sigma", "optim.wd"] if sigmas > 1 else ["optim.lr"]  # one panel (seeds are no axis)
    picture = imread(plot_curves(table, curves, tmp_path / "curves.png", axes))[..., :3]
    edges = [picture[:, 0], picture[:, -1], picture[0], picture[-1]]
    assert all((edge > 0.99).all() for edge in edges)  # nothing drawn across an edge
    assert (picture[-int(picture.shape[0] * 0.15):] < 0.5).any()  # and the legend is there, below


def test_compare_on_an_empty_experiment(tmp_path, sweep_store, capsys):
    proc = run_cli(["--experiment", "nothing_here", "--tracking-uri", store_uri(sweep_store)], cwd=tmp_path,
                   module="mnist_logreg.compare")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("Error: experiment 'nothing_here' does not exist")
    assert "\n" not in proc.stderr.strip()


