"""The searches every reader of a store makes: a sweep's job runs, its parents, a point's runs by
fingerprint, and a run by its id or a unique prefix of it."""

from __future__ import annotations

from typing import Sequence

from .tags import TAG_PARENT, TAG_ROLE, TAG_SWEEP

MAX_RESULTS = 5000


def runs_filter(role: str | None = "job", *, sweep: str | None = None, parent: str | None = None,
                status: str | None = None, fingerprint: str | None = None) -> str:
    """MLflow's filter string for runs of a role ('job', 'sweep', 'reproduction'; None: any), narrowed
    to a sweep tag, a parent run, a status or a fingerprint."""
    terms = [f"tags.`{TAG_ROLE}` = '{role}'"] if role else []
    if sweep is not None:
        terms.append(f"tags.{TAG_SWEEP} = '{sweep}'")
    if parent is not None:
        terms.append(f"tags.`{TAG_PARENT}` = '{parent}'")
    if fingerprint is not None:
        terms.append(f"tags.fingerprint = '{fingerprint}'")
    if status is not None:
        terms.append(f"attributes.status = '{status}'")
    return " and ".join(terms)


def job_runs(client, experiment_ids: Sequence[str], *, sweep: str | None = None, parent: str | None = None,
             status: str | None = None, max_results: int = MAX_RESULTS) -> list:
    """The job runs of the experiments (of one sweep, under one parent, in one status), oldest first."""
    runs = client.search_runs(list(experiment_ids), runs_filter(sweep=sweep, parent=parent, status=status),
                              max_results=max_results)
    return sorted(runs, key=lambda r: r.info.start_time)


def sweep_parents(client, experiment_id: str, sweep: str | None = None) -> list:
    """The parent runs of a sweep tag, or of every sweep, newest first."""
    return client.search_runs([experiment_id], runs_filter("sweep", sweep=sweep),
                              order_by=["attributes.start_time DESC"], max_results=MAX_RESULTS)


def runs_with_fingerprint(client, experiment_id: str, fingerprint: str) -> list:
    """The job runs of the experiment with this fingerprint (the same config, code and data), in any
    status, newest first: what a relaunched point finds of itself."""
    return client.search_runs([experiment_id], runs_filter("job", fingerprint=fingerprint),
                              order_by=["attributes.start_time DESC"], max_results=100)


def fingerprints_with_runs(uri: str, experiment_id: str, fingerprints: set[str]) -> set[str] | None:
    """Which of the fingerprints have a run (a job run or any other, not deleted) in the experiment
    of a local SQLite store, read in one query of MLflow's tables (runs, tags) without MLflow; None
    for another store, or if the store cannot be read so (runs_with_fingerprint then asks MLflow)."""
    import contextlib
    import sqlite3

    from .store import sqlite_path

    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return None
    found: set[str] = set()
    wanted = sorted(fingerprints)
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            for lo in range(0, len(wanted), 500):
                chunk = wanted[lo : lo + 500]
                rows = con.execute(
                    "SELECT DISTINCT tags.value FROM tags JOIN runs ON runs.run_uuid = tags.run_uuid "
                    "WHERE tags.key = 'fingerprint' AND runs.experiment_id = ? AND runs.lifecycle_stage = 'active' "
                    f"AND tags.value IN ({', '.join('?' * len(chunk))})", [int(experiment_id), *chunk])
                found.update(row[0] for row in rows)
    except (sqlite3.Error, ValueError):
        return None
    return found


MIN_PREFIX = 6


def run_by_id(client, run_id: str, what: str, where: str):
    """The run whose id is run_id or begins with it (6 characters or more, as the tables print 8),
    in any experiment of the store; one line naming the candidates when the prefix is ambiguous.
    `what` and `where` name the argument and the store (with how to fix it) in the messages."""
    import re

    from ..errors import ConfigError

    run_id = run_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{%d,32}" % MIN_PREFIX, run_id):
        raise ConfigError(f"{what}: a run id is 32 hex digits, or a unique prefix of {MIN_PREFIX} or more "
                          "(the tables print 8)")
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"attributes.run_id LIKE '{run_id}%'", max_results=11) if experiments else []
    if not found:
        raise ConfigError(f"{what}: no such run in {where}" if len(run_id) == 32 else
                          f"{what}: no run id begins with {run_id} in {where}")
    if len(found) > 1:
        names = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in found[:10])
        raise ConfigError(f"{what}: {len(found)}{'+' if len(found) > 10 else ''} runs begin with {run_id}: {names}; "
                          "give more of the id")
    return found[0]
