"""Stopping a sweep from its launching process: what Ctrl-C or SIGTERM there does, and the cleanup
of jobs whose processes died without ending their runs.

A launcher may run jobs in worker processes (joblib's loky workers, submitit's subprocesses).
SIGTERM sent to the launching process alone (by `timeout`, a cancelled CI job, a scheduler) would
leave them training; Ctrl-C in a terminal reaches them too, but the launcher then kills its
workers. So the launching process, on the first signal:
  1. sends SIGTERM to every process below it: each job ends its run KILLED, with its metrics and
     last checkpoint (lifecycle.signals.JobSignals);
  2. waits (up to GRACE_S) until those processes are gone or the sweep's runs left RUNNING;
  3. raises KeyboardInterrupt, which stops the launcher; run.py prints one line.
At exit, any run of the sweep still RUNNING is ended (KILLED after a signal; otherwise FAILED,
with a `failure` tag: its process died without ending it, as under SIGKILL or the OOM killer), and
any process still below the launching one is terminated. A second signal stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from ..tracking import writer
from ..tracking.queries import job_runs
from ..tracking.tags import TAG_FAILURE

log = logging.getLogger(__name__)
GRACE_S = 20.0


def descendants(pid: int | None = None) -> list[int]:
    """Every process below pid (default: this one), from /proc; [] where /proc is not available."""
    root = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def job_processes() -> list[int]:
    """The processes below this one that run jobs: all but the resource trackers of multiprocessing
    and loky and this process's record writer, which ignore SIGTERM and exit by themselves once
    this process has gone (the writer after writing what it holds)."""
    out = []
    for pid in descendants():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in command and writer.__name__.encode() not in command:
            out.append(pid)
    return out


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def terminate_and_wait(pids: list[int], grace: float, done=lambda: False) -> list[int]:
    """SIGTERM pids, then wait until they are gone, or done() says so, or `grace` seconds pass;
    return the pids still alive."""
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive or done():
            return alive
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def terminate_descendants(grace: float = 5.0) -> list[int]:
    """SIGTERM every job process below this one, then SIGKILL those still there after `grace` seconds."""
    pids = job_processes()
    if pids:
        signal_all(terminate_and_wait(pids, grace), signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def running_runs(client, experiment_id: str, parent_run_id: str) -> list:
    return job_runs(client, [experiment_id], parent=parent_run_id, status="RUNNING")


def install(on_first_signal) -> None:
    """Ctrl-C and SIGTERM in the launching process: on_first_signal(signum), then KeyboardInterrupt;
    a second signal stops at once. A signal that finds a finaliser running (where Python would
    swallow the KeyboardInterrupt, and the sweep go on) is heard again once it has returned."""
    from ..lifecycle.signals import in_finaliser, redeliver

    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame):
        if in_finaliser(frame):
            redeliver(signum)
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        on_first_signal(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def stop_workers(client, experiment_id: str, parent_run_id: str, grace: float = GRACE_S) -> None:
    """Ask every job process to stop (SIGTERM: its run ends KILLED), and wait until their runs have
    ended or the processes are gone, whichever comes first."""
    pids = job_processes()
    if not pids:
        return
    log.info("stopping %d job processes; their runs end KILLED with their metrics and checkpoints", len(pids))

    def runs_ended() -> bool:
        try:
            return not running_runs(client, experiment_id, parent_run_id)
        except Exception:  # the store is busy or gone: wait for the processes instead
            return False

    terminate_and_wait(pids, grace, runs_ended)


def end_orphaned_runs(client, experiment_id: str, parent_run_id: str, interrupted: bool) -> int:
    """End the sweep's runs left RUNNING by processes that died: KILLED after a signal, else FAILED
    with a `failure` tag (a run whose holder process is alive elsewhere, such as a Slurm task still
    training, is left to it). Returns how many."""
    from ..lifecycle.lease import HOST, PID, abandoned

    def held_elsewhere(run) -> bool:  # by a live process other than this one (a Slurm task on a node)
        tags = run.data.tags
        mine = tags.get(PID) == str(os.getpid()) and tags.get(HOST) == socket.gethostname()
        return bool(tags.get(HOST)) and not mine and abandoned(run) is None

    runs = [r for r in running_runs(client, experiment_id, parent_run_id) if not held_elsewhere(r)]
    for run in runs:
        if interrupted:
            client.set_terminated(run.info.run_id, "KILLED")
        else:
            client.set_tag(run.info.run_id, TAG_FAILURE, "its process died without ending the run (SIGKILL, the "
                           "out-of-memory killer, or its launcher stopping the workers after another died); "
                           "its metrics so far are kept: rerun the sweep")
            client.set_terminated(run.info.run_id, "FAILED")
        log.warning("run %s was left RUNNING by a process that died: ended %s", run.info.run_id,
                    "KILLED" if interrupted else "FAILED")
    return len(runs)


def shield_submitit_controllers() -> None:
    """submitit's local launcher runs each job under a controller process in the terminal's process
    group. A terminal's Ctrl-C would give that controller a KeyboardInterrupt traceback, and it then
    forwards a second SIGINT to its job and SIGKILLs it a second later, cutting the job's stop short.
    Controllers started from here on ignore SIGINT (an ignored signal is inherited); the job inside
    installs its own handlers, so it still stops on the terminal's Ctrl-C, and this process still
    hears it and stops the rest."""
    import submitit.local.local as local

    original = local.start_controller
    if getattr(original, "shielded", False) or threading.current_thread() is not threading.main_thread():
        return

    def start_controller(*args, **kwargs):
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return original(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    start_controller.shielded = True  # type: ignore[attr-defined]
    local.start_controller = start_controller
