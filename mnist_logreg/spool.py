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
import json
import re
import sys
from pathlib import Path

from .errors import HarnessError, exit_on_error
from .tracking import chunks, existing_store_client, reading_store_uri

NAME = re.compile(r"metrics-(?P<run_id>[0-9a-f]{32})\.spool\.jsonl$")


def read_spool(path: Path) -> tuple[str, list[tuple]]:
    """The run id (from the file name) and the points (key, value, timestamp, step, model_id)."""
    match = NAME.search(path.name)
    if match is None:
        raise HarnessError(f"{path} is not a spool file (metrics-RUN_ID.spool.jsonl): give the file a job left")
    if not path.is_file():
        raise HarnessError(f"{path} does not exist")
    points = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            for p in json.loads(line):
                key, value, timestamp, step, *rest = p
                points.append((str(key), float(value), int(timestamp), int(step), rest[0] if rest else None))
        except (ValueError, TypeError) as exc:
            raise HarnessError(f"{path}:{number} is not a line of spooled metrics ({exc})") from exc
    return match["run_id"], points


def upload(client, run_id: str, points: list[tuple]) -> tuple[int, int]:
    """Log the points the run does not have yet; return (sent, already there)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise HarnessError(f"run {run_id} is not in {client.tracking_uri}: this spool file belongs to another "
                           "store; pass that store's --tracking-uri") from exc
    have = {}
    for key in {p[0] for p in points}:
        have[key] = {(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)}
    todo = [p for p in points if (p[3], p[2], p[1]) not in have[p[0]]]
    for part in chunks(todo, 500):
        client.log_batch(run_id, metrics=[Metric(k, v, t, s, model_id=m) for k, v, t, s, m in part])
    return len(todo), len(points) - len(todo)


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
