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
import os
import sys

from .analysis.verdict import compare_runs, config_diff, format_verdict, runs_to_reproduce
from .errors import exit_on_error
from .project import LOG_FORMAT
from .tracking.runconfig import config_from_run
from .tracking.store import client_for, existing_store_client, reading_store_uri
from .tracking.tags import TAG_ROLE


def reproduce_run(client, run, target_uri: str, atol: float, data_root: str | None = None, full: bool = False
                  ) -> bool:
    """Train `run` again into target_uri as a run tagged `reproduces`, print the verdict, return it."""
    from .job import train

    cfg = config_from_run(client, run)
    cfg.tracking.uri = target_uri
    cfg.force = True
    if data_root:
        cfg.data.root = data_root
    result = train(cfg, extra_tags={"reproduces": run.info.run_id, TAG_ROLE: "reproduction"},
                   run_name=f"reproduction of {run.info.run_name} ({run.info.run_id[:8]})")
    target = client_for(target_uri)
    new = target.get_run(result["run_id"])
    rows, ok, causes = compare_runs(client, target, run, new, atol)
    hashes = (run.data.tags.get("params.sha256", "none"), new.data.tags.get("params.sha256", "none"))
    print(f"\nrun {run.info.run_id} ({run.info.run_name}) reproduced as {new.info.run_id}, atol={atol:g}")
    print(format_verdict(rows, ok, hashes, causes, {} if ok else config_diff(client, run, cfg), full))
    target.set_tag(new.info.run_id, "reproduction.verdict", "reproduced" if ok else "not reproduced")
    return ok


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
    parser.add_argument("--full", action="store_true", help="print every metric at every step, not a summary per metric")
    parser.add_argument("--data-root", help="folder of the dataset files on this machine, if not where the run found them")
    args = parser.parse_args(argv)
    if not args.run_id and not args.sweep:
        parser.error("give a RUN_ID or --sweep")
    args.tracking_uri = args.tracking_uri or reading_store_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    with exit_on_error():
        client = existing_store_client(args.tracking_uri)
        runs = runs_to_reproduce(client, args.run_id, args.sweep, args.experiment)
        target = args.target_uri or args.tracking_uri
        verdicts = [reproduce_run(client, run, target, args.atol, args.data_root, args.full) for run in runs]
    if len(verdicts) > 1:
        print(f"\n{sum(verdicts)} of {len(verdicts)} runs reproduced")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
