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

from .analysis.compare import compare, format_table, latest_sweep
from .analysis.registry import register_best
from .errors import exit_on_error
from .tracking.store import existing_store_client, reading_store_uri


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
