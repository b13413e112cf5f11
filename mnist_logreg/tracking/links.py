"""Addresses of runs in the MLflow UI, in its "Model training" view.

MLflow 3.17's UI opens in its GenAI view, which lists traces, not runs; the URL parameter
`workflowType=machine_learning` opens the Model-training view, where runs, their charts and a
sweep's children are. For a local store the address is the one the README's `mlflow ui` command
serves (127.0.0.1:5000); with tracking=server it is the server's own address, without credentials.
"""

from __future__ import annotations

from .store import server_address

UI_HOST = "127.0.0.1"
UI_PORT = 5000
VIEW = "workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """The UI's address for a store: the server itself, or where `mlflow ui` serves a local store."""
    if str(tracking_uri).startswith(("http://", "https://")):
        return server_address(tracking_uri)
    return f"http://{UI_HOST}:{UI_PORT}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{VIEW}"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}?{VIEW}"
