"""Which process holds a RUNNING run: its host, pid and process start, recorded on the run, and a
heartbeat with a lease, so that a relaunch can tell a run whose process is gone (SIGKILL, the OOM
killer, a lost node) from one really training elsewhere, which it must never touch."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

HOST, PID, START = "process.host", "process.pid", "process.start"
HEARTBEAT, LEASE = "heartbeat", "heartbeat.lease_s"
# A run on another host counts as abandoned once its heartbeat is older than its lease: at least
# this long, and at least 3 times the longest gap between two of its epochs.
MIN_LEASE_S = 900.0
BEAT_EVERY_S = 60.0


def process_start(pid: int) -> str | None:
    """The start time of process pid (clock ticks after boot, from /proc), or None if it is gone:
    with the pid, it names one process even after the pid is reused."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def process_age() -> float | None:
    """Seconds since this process started (from /proc), or None where /proc cannot tell."""
    try:
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - int(process_start(os.getpid()) or "") / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def holder_tags() -> dict[str, str]:
    """This process, as the holder of the runs it opens, with a first heartbeat."""
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: str(pid), START: process_start(pid) or "", HEARTBEAT: f"{time.time():.0f}",
            LEASE: f"{MIN_LEASE_S:.0f}"}


class Heartbeat:
    """The tags a run's holder refreshes, at most every BEAT_EVERY_S seconds."""

    def __init__(self) -> None:
        self.last = time.time()
        self.longest_gap = 0.0

    def due(self) -> dict[str, str]:
        now = time.time()
        self.longest_gap = max(self.longest_gap, now - self.last)
        if now - self.last < BEAT_EVERY_S:
            return {}
        self.last = now
        return {HEARTBEAT: f"{now:.0f}", LEASE: f"{max(MIN_LEASE_S, 3 * self.longest_gap):.0f}"}


def holder_alive(tags: dict) -> bool | None:
    """Whether the process that `holder_tags` named still runs; None when it is on another host
    (where only its heartbeat can tell)."""
    host, pid, start = tags.get(HOST), tags.get(PID), tags.get(START)
    if host != socket.gethostname() or not pid:
        return None
    alive = process_start(int(pid))
    return alive is not None and (not start or alive == start)


def abandoned(run: Any, now: float | None = None) -> str | None:
    """Why a RUNNING run's process is gone, or None while it may still be training."""
    tags = run.data.tags
    host, pid = tags.get(HOST), tags.get(PID)
    alive = holder_alive(tags)
    if alive is not None:
        return None if alive else f"its process {pid} on {host} is gone"
    beat = float(tags.get(HEARTBEAT) or run.info.start_time / 1000)
    lease = float(tags.get(LEASE) or MIN_LEASE_S)
    age = (now or time.time()) - beat
    if age <= lease:
        return None
    return f"no heartbeat from {host or 'its process'} for {age:.0f} s (its lease is {lease:.0f} s)"
