"""Soak: a long joblib sweep against a PostgreSQL-backed `mlflow server`, restarted once midway.

    python -m mnist_logreg.soak [--jobs 100] [--workers 2] [--epochs 2] [--data-root DIR]

Starts a throwaway PostgreSQL cluster and an MLflow server on 127.0.0.1, runs the sweep through
run.py, stops the server when about half the jobs have runs and starts it again a few seconds
later, then prints jobs run, runs recorded, metric points expected and recorded, and errors.
Exit status 0 when nothing was lost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .project import PROJECT_ROOT
from .services.tracking import MlflowServer, postgres
from .tracking.queries import job_runs


def _count_jobs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else job_runs(client, [exp.experiment_id])


def soak(jobs: int, workers: int, epochs: int, data: list[str], downtime: float) -> dict:
    """The soak on a throwaway PostgreSQL cluster and MLflow server of its own."""
    with tempfile.TemporaryDirectory() as tmp, postgres() as db_uri:
        server = MlflowServer(db_uri, Path(tmp) / "artifacts").start()
        try:
            return soak_against(server, jobs, workers, epochs, data, downtime, tmp)
        finally:
            server.stop()


def soak_against(server: MlflowServer, jobs: int, workers: int, epochs: int, data: list[str], downtime: float,
                 cwd: str, experiment: str = "soak") -> dict:
    """Run the sweep against a running server (into `experiment`), restart the server once when
    half the jobs have runs, and count what was recorded."""
    from mlflow.tracking import MlflowClient

    seeds = ",".join(str(s) for s in range(jobs))
    client = MlflowClient(server.url)
    cmd = [sys.executable, str(PROJECT_ROOT / "run.py"), "-m", "hydra/launcher=joblib",
           f"hydra.launcher.n_jobs={workers}", "tracking=server", f"tracking.uri={server.url}",
           f"tracking.experiment={experiment}", f"seed={seeds}", f"trainer.epochs={epochs}", *data]
    started = time.time()
    sweep = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    restarted_at = None
    while sweep.poll() is None and restarted_at is None:
        time.sleep(0.5)
        try:
            if len(_count_jobs(client, experiment)) >= jobs // 2:
                server.stop()
                time.sleep(downtime)
                server.start()
                restarted_at = time.time() - started
        except Exception:
            pass
    output, _ = sweep.communicate()
    runs = _count_jobs(client, experiment)
    per_run = 2 * (epochs + 1) + 4 * epochs  # train_acc, test_acc from step 0; 4 more per epoch
    recorded = sum(len(client.get_metric_history(r.info.run_id, k)) for r in runs
                   for k in ("train_acc", "test_acc", "train_loss", "epoch_seconds",
                             "eval_seconds", "examples_per_second"))
    return {
        "jobs": jobs,
        "jobs_run": output.count("ended FINISHED") + output.count("ended FAILED"),
        "runs_recorded": len(runs),
        "runs_finished": sum(r.info.status == "FINISHED" for r in runs),
        "metric_points_expected": jobs * per_run,
        "metric_points_recorded": recorded,
        "errors": (sweep.returncode != 0) + sum(r.info.status != "FINISHED" for r in runs),
        "sweep_exit": sweep.returncode,
        "server_restarted_at_s": restarted_at,
        "wall_s": round(time.time() - started, 1),
        "last_lines": output.strip().splitlines()[-3:] if sweep.returncode else [],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_logreg.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--downtime", type=float, default=3.0, help="seconds the server stays down")
    parser.add_argument("--data-root", help="folder of MNIST IDX files (default: Fashion-MNIST from Debian)")
    args = parser.parse_args(argv)
    data = [f"data.root={args.data_root}"] if args.data_root else ["data=fashion_mnist"]
    report = soak(args.jobs, args.workers, args.epochs, data, args.downtime)
    print(json.dumps(report, indent=2))
    lost = (report["runs_recorded"] != args.jobs or report["runs_finished"] != args.jobs
            or report["metric_points_recorded"] != report["metric_points_expected"])
    return 1 if lost or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
