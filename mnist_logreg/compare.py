"""Side-by-side comparison of a sweep's runs: a table sorted by test accuracy, and plots.

    python -m mnist_logreg.compare [--experiment NAME] [--sweep ID] [--output DIR] [--register NAME]

The table and plots are written to --output and logged as artifacts of the sweep's parent run.
--register NAME puts the logged model of the sweep's best FINISHED run (by final test_acc) in
MLflow's Model Registry as a new version of NAME, tagged with the sweep and its test_acc.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .errors import HarnessError, exit_on_error
from .tracking import TAG_REUSED, TAG_ROLE, TAG_SWEEP, existing_store_client, reading_store_uri

HIDDEN_PARAMS = {"tracking.uri"}


def latest_sweep(client, experiment_id: str) -> str:
    """The sweep tag of the experiment's most recently started sweep."""
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise HarnessError("the experiment has no sweep yet: run `python run.py -m ...` first, or pass --sweep")
    return parents[0].data.tags[TAG_SWEEP]


def sweep_runs(uri: str, experiment_id: str, sweep: str, reused: list[str] = ()) -> pd.DataFrame:
    """The sweep's job runs as mlflow.search_runs returns them, one row per run, plus the runs
    that skipped jobs of the sweep reused (finished earlier with the same fingerprint)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'job' and tags.{TAG_SWEEP} = '{sweep}'",
        output_format="pandas",
    )
    extra = [mlflow.search_runs(experiment_ids=[experiment_id], filter_string=f"attributes.run_id = '{rid}'",
                                output_format="pandas") for rid in reused if rid not in set(found.get("run_id", []))]
    frames = [f for f in (found, *extra) if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else found


def swept_axes(runs: pd.DataFrame) -> list[str]:
    """The params that take more than one value across the runs (the sweep's axes)."""
    axes = []
    for col in runs.columns:
        if col.startswith("params.") and col[len("params."):] not in HIDDEN_PARAMS:
            if runs[col].nunique(dropna=False) > 1:
                axes.append(col[len("params."):])
    return axes


def _number(value):
    try:
        return float(value) if "." in str(value) or "e" in str(value) else int(value)
    except (TypeError, ValueError):
        return value


def histories(client, run_ids, key: str = "test_acc") -> dict[str, list[tuple[int, float]]]:
    """Each run's metric history as (step, value) pairs in step order."""
    return {rid: sorted((m.step, m.value) for m in client.get_metric_history(rid, key)) for rid in run_ids}


def comparison_table(runs: pd.DataFrame, curves: dict[str, list[tuple[int, float]]]) -> pd.DataFrame:
    """A row per run: swept values, final and best test_acc, final train_loss, epochs, wall time, status."""
    axes = swept_axes(runs)
    table = pd.DataFrame({"run_id": runs["run_id"]})
    for axis in axes:
        table[axis] = runs[f"params.{axis}"].map(_number)
    table["test_acc"] = runs.get("metrics.test_acc")
    table["best_test_acc"] = [max((v for s, v in curves.get(r, []) if s > 0), default=float("nan"))
                              for r in runs["run_id"]]
    table["train_loss"] = runs.get("metrics.train_loss")
    table["epochs"] = [max((s for s, _ in curves.get(r, [])), default=0) for r in runs["run_id"]]
    table["wall_s"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds().round(2)
    table["status"] = runs["status"]
    return table.sort_values("test_acc", ascending=False, na_position="last").reset_index(drop=True)


def seed_spread(table: pd.DataFrame) -> pd.DataFrame | None:
    """Mean and standard deviation of the final test_acc over seeds, per config; None without a seeds axis."""
    if "seed" not in table.columns:
        return None
    others = [c for c in table.columns if c not in {"run_id", "seed", "test_acc", "best_test_acc",
                                                   "train_loss", "epochs", "wall_s", "status"}]
    grouped = table.groupby(others, dropna=False) if others else table.assign(_all="all").groupby("_all")
    spread = grouped["test_acc"].agg(["mean", "std", "count"]).reset_index()
    return spread.sort_values("mean", ascending=False).reset_index(drop=True)


def _label(row: pd.Series, axes: list[str]) -> str:
    return ", ".join(f"{a.split('.')[-1]}={row[a]}" for a in axes) or row["run_id"][:8]


def plot_curves(table: pd.DataFrame, curves, path: Path) -> Path:
    """Test accuracy against epoch, a line per run labelled by its swept values."""
    from .plots import _pyplot

    plt = _pyplot()
    axes = [c for c in table.columns if c not in {"run_id", "test_acc", "best_test_acc", "train_loss",
                                                 "epochs", "wall_s", "status"}]
    fig, ax = plt.subplots(figsize=(8, 5))
    for _, row in table.iterrows():
        steps, values = zip(*curves[row["run_id"]]) if curves.get(row["run_id"]) else ((), ())
        ax.plot(steps, values, marker="o", markersize=3, label=_label(row, axes))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if len(table) <= 20:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_heatmap(table: pd.DataFrame, x: str, y: str, path: Path, averaged: list[str] = ()) -> Path:
    """Final test accuracy over two swept axes (mean where other axes, such as seeds, repeat a cell)."""
    from .plots import _pyplot

    plt = _pyplot()
    grid = table.pivot_table(index=y, columns=x, values="test_acc", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(grid.values, cmap="viridis")
    fig.colorbar(im, ax=ax, label="final test accuracy")
    ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if averaged:
        ax.set_title(f"mean over {', '.join(averaged)}", fontsize=9)
    middle = (grid.values.min() + grid.values.max()) / 2
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value = grid.values[i, j]
            ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=8,
                    color="black" if value > middle else "white")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_seeds(spread: pd.DataFrame, path: Path) -> Path:
    """Mean final test accuracy per config with a one-standard-deviation bar over seeds."""
    from .plots import _pyplot

    plt = _pyplot()
    labels = [", ".join(f"{c.split('.')[-1]}={row[c]}" for c in spread.columns
                        if c not in {"mean", "std", "count"}) for _, row in spread.iterrows()]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(spread)), 4))
    ax.errorbar(range(len(spread)), spread["mean"], yerr=spread["std"].fillna(0), fmt="o", capsize=4)
    ax.set_xticks(range(len(spread)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(uri: str, experiment: str, sweep: str | None, output: Path | None, log_to_parent: bool = True
            ) -> tuple[pd.DataFrame, Path]:
    """Build the comparison of one sweep: table (printed by the caller), CSV and PNGs in output."""
    client = existing_store_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise HarnessError(f"experiment {experiment!r} does not exist in {uri}: check --experiment/--tracking-uri")
    sweep = sweep or latest_sweep(client, exp.experiment_id)
    parents = client.search_runs([exp.experiment_id],
                                 filter_string=f"tags.`{TAG_ROLE}` = 'sweep' and tags.{TAG_SWEEP} = '{sweep}'")
    reused = [k.split(".", 1)[1] for p in parents for k in p.data.tags if k.startswith(f"{TAG_REUSED}.")]
    runs = sweep_runs(uri, exp.experiment_id, sweep, reused)
    if runs.empty:
        raise HarnessError(f"sweep {sweep!r} has no runs in experiment {experiment!r}: check --sweep")
    curves = histories(client, runs["run_id"])
    table = comparison_table(runs, curves)
    output = Path(output or Path("outputs") / "compare" / sweep)
    output.mkdir(parents=True, exist_ok=True)
    table.to_csv(output / "comparison.csv", index=False)
    plot_curves(table, curves, output / "learning_curves.png")
    order = ["optim.lr", "model.sigma", "data.batch_size"]
    axes = sorted((a for a in swept_axes(runs) if a != "seed"),
                  key=lambda a: order.index(a) if a in order else len(order))
    if len(axes) >= 2:  # more axes: the first two, averaged over the others
        plot_heatmap(table, axes[0], axes[1], output / "heatmap.png", averaged=axes[2:])
    spread = seed_spread(table)
    if spread is not None:
        spread.to_csv(output / "seeds.csv", index=False)
        plot_seeds(spread, output / "seeds.png")
    if log_to_parent:
        for parent in parents:
            client.log_artifacts(parent.info.run_id, str(output), "compare")
    return table, output


def format_table(table: pd.DataFrame) -> str:
    shown = table.assign(run_id=table["run_id"].str[:8])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def register_best(client, table: pd.DataFrame, sweep: str, name: str):
    """Register the logged model of the best FINISHED run of the table as a version of `name`."""
    from mlflow.exceptions import MlflowException

    finished = table[table["status"] == "FINISHED"].dropna(subset=["test_acc"])
    if finished.empty:
        raise HarnessError(f"sweep {sweep!r} has no FINISHED run to register")
    best = finished.sort_values("test_acc", ascending=False).iloc[0]
    run = client.get_run(best["run_id"])
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'", max_results=1)
    if not models:
        raise HarnessError(f"run {run.info.run_id} has no logged model (it was trained before models were "
                           "logged): reproduce it, then register the reproduction")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="mnist_logreg: best runs of sweeps")
    test_acc = run.data.metrics["test_acc"]
    version = client.create_model_version(name, f"models:/{models[0].model_id}", run_id=run.info.run_id,
                                          model_id=models[0].model_id,
                                          tags={TAG_SWEEP: sweep, "test_acc": f"{test_acc:.6g}"},
                                          description=f"best of sweep {sweep}: test_acc {test_acc:.4f}")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_logreg.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else mlflow.db in this folder)")
    parser.add_argument("--experiment", default="mnist_logreg")
    parser.add_argument("--sweep", default=None, help="sweep tag (default: the latest sweep)")
    parser.add_argument("--output", type=Path, default=None, help="folder (default outputs/compare/SWEEP)")
    parser.add_argument("--no-log", action="store_true", help="do not log the results to the sweep's parent run")
    parser.add_argument("--register", metavar="NAME", help="register the best run's model as a version of NAME")
    args = parser.parse_args(argv)
    args.tracking_uri = args.tracking_uri or reading_store_uri()
    with exit_on_error():
        table, output = compare(args.tracking_uri, args.experiment, args.sweep, args.output, not args.no_log)
        if args.register:
            client = existing_store_client(args.tracking_uri)
            sweep = args.sweep or latest_sweep(client, client.get_experiment_by_name(args.experiment).experiment_id)
            version = register_best(client, table, sweep, args.register)
    print(format_table(table))
    print(f"\nwritten to {output}: {', '.join(sorted(p.name for p in output.iterdir()))}")
    if args.register:
        print(f"registered {args.register} version {version.version}: run {version.run_id} "
              f"(test_acc {version.tags['test_acc']}), models:/{args.register}/{version.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
