"""Send a run's spooled metrics to its store, once.

    python -m mnist_logreg.spool metrics-RUN_ID.spool.jsonl [--tracking-uri URI]

A job that logs to a tracking server keeps the metrics it could not send in
`metrics-RUN_ID.spool.jsonl` in its job folder, and sends them when the server answers again. If
the server was still down when the job gave up, this command sends them later. It is idempotent:
a point already in the run (same metric, step, timestamp and value) is not logged again, so
running it twice logs each point once. It refuses a file whose run is not in the store.
Exit status 0 when every point is in the run, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import exit_on_error
from .tracking.runlog import read_spool, upload
from .tracking.store import existing_store_client, reading_store_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_logreg.spool", description=__doc__.strip().splitlines()[0])
    parser.add_argument("file", type=Path, help="metrics-RUN_ID.spool.jsonl, from the job's output folder")
    parser.add_argument("--tracking-uri", default=None,
                        help="the run's store (default: $MLFLOW_TRACKING_URI, else mlflow.db in this folder)")
    args = parser.parse_args(argv)
    with exit_on_error():
        run_id, points = read_spool(args.file)
        client = existing_store_client(args.tracking_uri or reading_store_uri())
        sent, present = upload(client, run_id, points)
    print(f"run {run_id}: {sent} metric points sent, {present} already there ({len(points)} in {args.file.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
