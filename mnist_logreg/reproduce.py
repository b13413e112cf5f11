"""Re-run a logged run from what MLflow holds, and check that it reproduces.

    python -m mnist_logreg.reproduce RUN_ID [--atol 1e-6] [--tracking-uri URI] [--target-uri URI]

RUN_ID may be a sweep's parent run (or pass --sweep SWEEP): every run of the sweep is reproduced.
Exit status 0 when every metric at every step and the trained parameters match (exactly, or
within --atol), 1 when something differs (the fingerprint differences are listed as likely
causes), 2 for bad input.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from .config import flatten
from .runconfig import config_from_run
from .fingerprint import LOCATION_KEYS
from .errors import HarnessError, exit_on_error
from .tracking import TAG_ROLE, TAG_SWEEP, client_for, existing_store_client, reading_store_uri

# Timings differ on every run; everything else must match.
TIMING_METRICS = {"epoch_seconds", "eval_seconds", "examples_per_second"}
# Tags that pin what a run computed: a difference here is a likely cause of a mismatch.
CAUSE_TAGS = ("config.sha256", "data.sha256", "git.commit", "git.diff.sha256", "uv.lock.sha256",
              "mxnet.version", "numpy.version", "python.version", "cpu.model", "threads.cpus",
              "threads.OMP_NUM_THREADS", "threads.MXNET_CPU_WORKER_NTHREADS", "threads.MXNET_ENGINE_TYPE",
              "threads.OPENBLAS_NUM_THREADS", "threads.OPENBLAS_CORETYPE", "context")


@dataclass
class Row:
    metric: str
    step: int
    original: float
    reproduced: float

    @property
    def difference(self) -> float:
        if math.isnan(self.original) and math.isnan(self.reproduced):
            return 0.0
        return abs(self.reproduced - self.original)


def compare_runs(source, target, original, reproduced, atol: float) -> tuple[list[Row], bool, dict[str, tuple]]:
    """Every metric at every step, the parameter hash, and the differing fingerprint tags.

    source holds the original run, target the reproduction (they may be two stores).
    """
    rows: list[Row] = []
    ok = True
    keys = sorted((set(original.data.metrics) | set(reproduced.data.metrics)) - TIMING_METRICS)
    for key in keys:
        a = {m.step: m.value for m in source.get_metric_history(original.info.run_id, key)}
        b = {m.step: m.value for m in target.get_metric_history(reproduced.info.run_id, key)}
        for step in sorted(set(a) | set(b)):
            row = Row(key, step, a.get(step, float("nan")), b.get(step, float("nan")))
            rows.append(row)
            if step not in a or step not in b or not row.difference <= atol:
                ok = False
    h_a, h_b = original.data.tags.get("params.sha256"), reproduced.data.tags.get("params.sha256")
    if h_a != h_b and not (atol > 0 and _weights_within((source, target), (original, reproduced), atol)):
        ok = False
    causes = {k: (original.data.tags.get(k), reproduced.data.tags.get(k)) for k in CAUSE_TAGS
              if original.data.tags.get(k) != reproduced.data.tags.get(k)}
    return rows, ok, causes


def _weights_within(clients, runs, atol: float) -> bool:
    """Whether the two runs' exported weights agree within atol, element by element."""
    import mxnet as mx

    with tempfile.TemporaryDirectory() as tmp:
        loaded = []
        for i, (client, run) in enumerate(zip(clients, runs)):
            path = client.download_artifacts(run.info.run_id, "model/model-0000.params", f"{tmp}/{i}")
            loaded.append({k.split("_", 1)[-1]: v.asnumpy() for k, v in mx.nd.load(path).items()})
    if loaded[0].keys() != loaded[1].keys():
        return False
    return all(abs(loaded[0][k] - loaded[1][k]).max() <= atol for k in loaded[0])


def format_verdict(rows: list[Row], ok: bool, hashes: tuple, causes: dict, config_diff: dict) -> str:
    lines = [f"{'metric':<12} {'step':>4} {'original':>14} {'reproduced':>14} {'difference':>11}"]
    for r in rows:
        lines.append(f"{r.metric:<12} {r.step:>4} {r.original:>14.8f} {r.reproduced:>14.8f} {r.difference:>11.3g}")
    lines.append(f"params.sha256  original {hashes[0][:16]}  reproduced {hashes[1][:16]}  "
                 f"{'identical' if hashes[0] == hashes[1] else 'DIFFERENT'}")
    if ok:
        lines.append("REPRODUCED")
        return "\n".join(lines)
    lines.append("NOT REPRODUCED")
    if causes or config_diff:
        lines.append("likely causes (original -> reproduction):")
        for k, (a, b) in causes.items():
            lines.append(f"  {k}: {a} -> {b}")
        for k, (a, b) in config_diff.items():
            lines.append(f"  config {k}: {a} -> {b}")
    else:
        lines.append("no fingerprint difference recorded: nondeterminism in this environment")
    return "\n".join(lines)


def _config_diff(client, original, cfg: DictConfig) -> dict[str, tuple]:
    """Config values the reproduction used that differ from the original's config.yaml artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(original.info.run_id, "config.yaml", tmp)
        logged = flatten(OmegaConf.create(yaml.safe_load(Path(local).read_text())))
    now = flatten(cfg)
    return {k: (logged.get(k), now.get(k)) for k in sorted(set(logged) | set(now))
            if not k.startswith(LOCATION_KEYS) and logged.get(k) != now.get(k)}


def reproduce_run(client, run, target_uri: str, atol: float, data_root: str | None = None) -> bool:
    """Train `run` again into target_uri as a run tagged `reproduces`, print the verdict, return it."""
    from .job import train

    cfg = config_from_run(client, run)
    cfg.tracking.uri = target_uri
    cfg.force = True
    if data_root:
        cfg.data.root = data_root
    result = train(cfg, extra_tags={"reproduces": run.info.run_id, TAG_ROLE: "reproduction"})
    target = client_for(target_uri)
    new = target.get_run(result["run_id"])
    rows, ok, causes = compare_runs(client, target, run, new, atol)
    hashes = (run.data.tags.get("params.sha256", "none"), new.data.tags.get("params.sha256", "none"))
    print(f"\nrun {run.info.run_id} ({run.info.run_name}) reproduced as {new.info.run_id}, atol={atol:g}")
    print(format_verdict(rows, ok, hashes, causes, {} if ok else _config_diff(client, run, cfg)))
    target.set_tag(new.info.run_id, "reproduction.verdict", "reproduced" if ok else "not reproduced")
    return ok


def runs_to_reproduce(client, run_id: str | None, sweep: str | None, experiment: str) -> list:
    """The run, or every job run of the sweep it is the parent of (or of --sweep)."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise HarnessError(f"run {run_id} does not exist in {client.tracking_uri}: check the run id "
                               "and --tracking-uri") from exc
        if run.data.tags.get(TAG_ROLE) != "sweep":
            return [run]
        sweep, experiment_ids = run.data.tags[TAG_SWEEP], [run.info.experiment_id]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise HarnessError(f"experiment {experiment!r} does not exist in {client.tracking_uri}")
        experiment_ids = [exp.experiment_id]
    runs = client.search_runs(experiment_ids, filter_string=f"tags.{TAG_SWEEP} = '{sweep}' and "
                                                           f"tags.`{TAG_ROLE}` = 'job'")
    if not runs:
        raise HarnessError(f"sweep {sweep!r} has no runs to reproduce")
    return sorted(runs, key=lambda r: r.info.start_time)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_logreg.reproduce",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("run_id", nargs="?", help="the run (or a sweep's parent run) to reproduce")
    parser.add_argument("--sweep", help="reproduce every run of this sweep tag instead")
    parser.add_argument("--experiment", default="mnist_logreg", help="where --sweep is looked up")
    parser.add_argument("--tracking-uri", default=None,
                        help="store holding the run (default: $MLFLOW_TRACKING_URI, else mlflow.db in this folder)")
    parser.add_argument("--target-uri", help="store for the reproduction (default: the same store)")
    parser.add_argument("--atol", type=float, default=0.0, help="allowed absolute difference (default 0: bit-identical)")
    parser.add_argument("--data-root", help="folder of the dataset files on this machine, if not where the run found them")
    args = parser.parse_args(argv)
    if not args.run_id and not args.sweep:
        parser.error("give a RUN_ID or --sweep")
    args.tracking_uri = args.tracking_uri or reading_store_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with exit_on_error():
        client = existing_store_client(args.tracking_uri)
        runs = runs_to_reproduce(client, args.run_id, args.sweep, args.experiment)
        target = args.target_uri or args.tracking_uri
        verdicts = [reproduce_run(client, run, target, args.atol, args.data_root) for run in runs]
    if len(verdicts) > 1:
        print(f"\n{sum(verdicts)} of {len(verdicts)} runs reproduced")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
