"""The Model Registry: a sweep's best logged model as a new version of a registered model."""

from __future__ import annotations

import pandas as pd

from ..errors import HarnessError
from ..tracking.store import process_tracking_uri
from .compare import ranking
from ..tracking.tags import TAG_SWEEP


def register_best(client, table: pd.DataFrame, sweep: str, name: str):
    """Register the logged model of the best FINISHED run of the table as a version of `name`."""
    from mlflow.exceptions import MlflowException

    finished = table[table["status"] == "FINISHED"].dropna(subset=[ranking(table)])
    if finished.empty:
        raise HarnessError(f"sweep {sweep!r} has no FINISHED run to register")
    best = finished.iloc[0]  # the comparison's first row (its ranking and tie rule)
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
    with process_tracking_uri(client.tracking_uri):  # where MLflow looks up the models:/ source
        return client.create_model_version(name, f"models:/{models[0].model_id}", run_id=run.info.run_id,
                                           model_id=models[0].model_id,
                                           tags={TAG_SWEEP: sweep, "test_acc": f"{test_acc:.6g}"},
                                           description=f"best of sweep {sweep}: test_acc {test_acc:.4f}")
