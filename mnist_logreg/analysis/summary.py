"""What a sweep prints and logs when it ends: its comparison, and its best model registered on request.

conf/config.yaml hands `summarize_sweep` to the sweep's callback (mnist_logreg.sweep.SweepTracking),
which calls it in the launching process once every job is done.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .compare import compare, format_table
from .registry import register_best

log = logging.getLogger("mnist_logreg.sweep.callback")


def summarize_sweep(client, tracking_uri: str, experiment: str, sweep: str, output: Path, register: str | None
                    ) -> None:
    """Compare the sweep's runs: table and plots in `output` and on the parent run; then register the
    best run's model when `register` names a registered model."""
    table, folder = compare(tracking_uri, experiment, sweep, output)
    log.info("sweep %s, sorted by final test_acc:\n%s\n(plots in %s; python -m mnist_logreg.compare "
             "redraws them)", sweep, format_table(table), folder)
    if register:
        version = register_best(client, table, sweep, register)
        log.info("registered %s version %s: run %s (test_acc %s)", register, version.version,
                 version.run_id, version.tags["test_acc"])
