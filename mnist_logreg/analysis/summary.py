"""What a sweep prints and logs when it ends: its comparison, and its best model registered on request.

conf/config.yaml hands `summarize_sweep` to the sweep's callback (mnist_logreg.sweep.SweepTracking),
which calls it in the launching process once every job is done.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .compare import compare, format_spread, format_table, ranking, seed_spread, seeds_command
from .registry import register_best

log = logging.getLogger("mnist_logreg.sweep.callback")


def summarize_sweep(client, tracking_uri: str, experiment: str, sweep: str, output: Path, register: str | None
                    ) -> None:
    """Compare the sweep's runs: table and plots in `output` and on the parent run; then register the
    best run's model when `register` names a registered model."""
    table, folder = compare(tracking_uri, experiment, sweep, output)
    by = ranking(table)
    log.info("sweep %s, sorted by final %s%s:\n%s\n(plots in %s; python -m mnist_logreg.compare "
             "redraws them)", sweep, by, " (the held-out validation split; test_acc is for reporting)"
             if by == "val_acc" else "", format_table(table), folder)
    spread = seed_spread(table)
    if spread is not None and int(spread["count"].max()) > 1:
        log.info("over seeds, best mean first (* within one standard deviation of the best: not told apart by "
                 "these seeds):\n%s", format_spread(spread))
    elif (table["status"] == "FINISHED").sum() > 1:
        overrides = sweep_overrides(client, experiment, sweep)
        log.info("one seed per config: whether the top configs' order is more than noise, these tell "
                 "(5 seeds each):\n%s", "\n".join(seeds_command(table, overrides)))
    if register:
        version = register_best(client, table, sweep, register)
        log.info("registered %s version %s: run %s (test_acc %s)", register, version.version,
                 version.run_id, version.tags["test_acc"])


def sweep_overrides(client, experiment: str, sweep: str) -> list[str]:
    """The command-line overrides of the sweep (its parent run's record)."""
    import json

    from ..tracking.queries import sweep_parents

    exp = client.get_experiment_by_name(experiment)
    parents = sweep_parents(client, exp.experiment_id, sweep) if exp is not None else []
    return json.loads(parents[0].data.tags.get("hydra.overrides.json", "[]")) if parents else []
