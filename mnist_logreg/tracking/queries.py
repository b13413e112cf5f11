"""The searches every reader of a store makes: a sweep's job runs, its parent, a finished fingerprint."""

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


def finished_run_with(client, experiment_id: str, fingerprint: str):
    """A FINISHED run of the experiment with this fingerprint, or None (a relaunched sweep skips its job)."""
    runs = client.search_runs([experiment_id], runs_filter(None, fingerprint=fingerprint, status="FINISHED"),
                              max_results=1)
    return runs[0] if runs else None
