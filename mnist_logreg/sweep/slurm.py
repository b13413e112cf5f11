"""The Slurm launcher's work (`hydra/launcher=slurm`): a sweep's jobs grouped into stacks as the
default launcher groups them, one array task per stack, submitted with submitit.

In the launching process each job's point is decided from the store alone (its fingerprint from the
config, the code and the data files' hashes; no data is loaded and no device opened, so a login node
without the nodes' GPU can submit): FINISHED points are skipped, and the others are grouped by their
batch stream. On the node, a task runs its jobs through the stacked launcher's own code
(`sweep.launcher.launch`): each job's Hydra run_job and task function, its own run, log, checkpoints
and artifacts, and a width probe on the node's own CPU. Slurm's warning signal (USR2, before a
preemption or a time limit) ends the task's runs KILLED with their checkpoints, and the task
requeues itself; the requeued task continues every run in place (the same resume-in-place as a
relaunched sweep). The launching process polls the array, prints one line when a task ends other
than COMPLETED, and cancels the array on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..errors import HarnessError

log = logging.getLogger(__name__)
POLL_S = 3.0
SETTLE_S = 8.0  # how long a task's end other than COMPLETED must hold before it counts
SILENT_S = 300.0  # how long every task may stay UNKNOWN to sacct before the launching process gives up
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE", "REVOKED"}
NO_CLUSTER_FIX = ("point SLURM_CONF at your cluster's slurm.conf, or start a throwaway single-node one: "
                  "python -m mnist_logreg.services.slurm")


class ClusterError(HarnessError):
    """Slurm is absent or refused the sweep, or its tasks did not complete."""


def is_harness_config(config: DictConfig) -> bool:
    """Whether the app is this harness (its jobs stack); another app's jobs go one per task."""
    return all(OmegaConf.select(config, key) is not None for key in ("trainer.epochs", "tracking.uri", "data.batch_size"))


def check_cluster() -> None:
    """Slurm answers here, or one line saying how to point at a cluster."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ClusterError(f"hydra/launcher=slurm: no Slurm commands on this machine (sbatch not found): {NO_CLUSTER_FIX}")
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not Path(conf).is_file():  # Slurm would then look for a configuration server in DNS, for a minute
        raise ClusterError(f"hydra/launcher=slurm: no Slurm configuration at {conf}: {NO_CLUSTER_FIX}")
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"hydra/launcher=slurm: Slurm did not answer within 30 s: {NO_CLUSTER_FIX}") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["sinfo failed"])[-1]
        raise ClusterError(f"hydra/launcher=slurm: Slurm does not answer ({why}): {NO_CLUSTER_FIX}")


def slurm_tags() -> dict[str, str]:
    """A Slurm task's own tags for its runs: the job id as squeue and sacct print it, node, log, requeues."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    array = env.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array else env["SLURM_JOB_ID"]
    tags = {"slurm.job_id": job_id, "slurm.node": env.get("SLURMD_NODENAME", ""),
            "slurm.requeues": env.get("SLURM_RESTART_COUNT", "0")}
    try:
        import submitit

        tags["slurm.log"] = str(submitit.JobEnvironment().paths.stdout)
    except Exception:  # not started by submitit
        pass
    return tags


def _warn_if_shared_sqlite(uri: str) -> None:
    """A SQLite store written by tasks on several nodes (over a network filesystem) is not safe."""
    if not uri.startswith("sqlite:"):
        return
    out = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, timeout=30).stdout.split()
    if sum(int(n) for n in out if n.isdigit()) > 1:
        log.warning("tracking.uri is a SQLite file, which tasks on several nodes cannot share safely: use "
                    "tracking=server (docs/team-server.md)")


def _plan(cfg: DictConfig) -> tuple[Any, tuple, Any]:
    """(a FINISHED or busy run of this point, or None; its batch stream; the store's client), from
    the store and the config alone."""
    from ..config import check_known_keys, validate
    from ..lifecycle.prepare import _experiment, resolve
    from ..lifecycle.train import batch_stream
    from ..ml.data import locate
    from ..tracking.fingerprint import fingerprint_tags

    validate(cfg)
    check_known_keys(cfg)
    if cfg.resume:  # its own task: the node resolves it
        return None, ("resume", str(cfg.resume)), None
    d = cfg.data
    files = locate(d.name, d.root, d.cache, list(d.search), list(d.mirrors), dict(d.md5), timeout=d.download_timeout)
    client, experiment_id, _ = _experiment(cfg)
    fingerprint = fingerprint_tags(cfg, files.digest())["fingerprint"]
    done = busy = resumed = None
    if not cfg.force:
        done, busy, resumed = resolve(client, experiment_id, fingerprint)
    start = resumed.epoch if resumed is not None and resumed.checkpoint is not None else 0
    device = f"{cfg.context.device}({cfg.context.index})"
    return done or busy, batch_stream(cfg, files.digest(), device, start), client


def _skipped(sweep_config: DictConfig, run, client) -> JobReturn:
    from ..lifecycle.parent import note_reused
    from ..lifecycle.train import objective

    task_cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
    log.info("\tskipped: run %s (%s) already did this point", run.info.run_id, run.info.status)
    if run.info.status == "FINISHED":
        note_reused(client, str(task_cfg.tracking.uri), run.info.run_id, "skipped")
    ret = JobReturn(overrides=list(sweep_config.hydra.overrides.task), cfg=task_cfg, hydra_cfg=sweep_config,
                    working_dir=os.getcwd(), task_name=str(sweep_config.hydra.job.name))
    ret.return_value = objective({**run.data.metrics, "run_id": run.info.run_id,
                                  "status": "SKIPPED" if run.info.status == "FINISHED" else run.info.status})
    ret.status = JobStatus.COMPLETED
    return ret


def _failed(sweep_config: DictConfig, exc: BaseException) -> JobReturn:
    ret = JobReturn(overrides=list(sweep_config.hydra.overrides.task), cfg=sweep_config, hydra_cfg=sweep_config,
                    working_dir=os.getcwd(), task_name=str(sweep_config.hydra.job.name))
    ret.return_value, ret.status = exc, JobStatus.FAILED
    return ret


def executor_for(launcher: Any, gpu: bool):
    """submitit's Slurm executor with the launcher's parameters (hydra.launcher.*)."""
    import submitit

    params = dict(launcher.params)
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout", 3))
    common = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
              "stderr_to_stdout"}
    if gpu and not params.get("gpus_per_node"):
        params["gpus_per_node"] = 1  # context=gpu asks Slurm for a GPU
    executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()
                                  if v is not None and k not in ("_target_",)})
    return executor


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Decide each point, submit one array task per stack, wait for the array, return every JobReturn."""
    from ..lifecycle.parent import discard_parent_run, ensure_parent_run
    from .launcher import plan_stacks

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    check_cluster()
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    returns: dict[int, JobReturn] = {}
    keys: list[Any] = []
    members: list[tuple[int, list[str]]] = []
    gpu = False
    saved = HydraConfig.instance().cfg
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)  # so that ${hydra:...} resolves
        task_cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        members.append((idx, list(overrides)))
        keys.append(None)
        try:
            with read_write(task_cfg):
                OmegaConf.resolve(task_cfg)
            found, key, client = _plan(task_cfg)
        except HarnessError as exc:
            log.error("\t#%d refused: %s", idx, exc)
            returns[i] = _failed(sweep_config, exc)
            continue
        finally:
            HydraConfig.instance().cfg = saved
        gpu = gpu or task_cfg.context.device == "gpu"
        if found is not None:
            returns[i] = _skipped(sweep_config, found, client)
        else:
            keys[i] = key
    stacks = plan_stacks(keys, launcher.max_stack if launcher.stack else 1)
    if not stacks:
        return [returns[i] for i in range(len(job_overrides))]
    _warn_if_shared_sqlite(str(OmegaConf.select(launcher.config, "tracking.uri") or ""))
    ensure_parent_run()
    executor = executor_for(launcher, gpu)
    state = Singleton.get_state()
    with _stderr_kept() as said:  # sbatch writes its refusal there; it is said once, below
        try:
            jobs = executor.map_array(launcher, [[members[i] for i in stack] for stack in stacks],
                                      [state] * len(stacks))
        except Exception as exc:
            refusal: Exception | None = exc
        else:
            refusal = None
    if refusal is not None:
        discard_parent_run()
        lines = [line.split("sbatch: error: ", 1)[-1] for line in said() if "error" in line or "fatal" in line]
        why = lines[0] if lines else str(refusal).splitlines()[0]
        raise ClusterError(f"Slurm refused the array: {why.strip()}; check hydra.launcher.partition, mem_gb, "
                           "timeout_min and cpus_per_task")
    array = jobs[0].job_id.split("_")[0]
    log.info("submitted Slurm array %s: %d task%s (%s); watch it with squeue -j %s, stop it with scancel %s",
             array, len(jobs), "" if len(jobs) == 1 else "s", "one per stack" if launcher.stack else "one per job",
             array, array)
    states = wait_for(jobs, array)
    problems = []
    for job, stack, final in zip(jobs, stacks, states):
        if final == "COMPLETED":
            for i, ret in zip(stack, job.results()[0]):
                returns[i] = ret
        else:
            problems.append((job.job_id, final, stack))
            for i in stack:
                returns[i] = _failed(launcher.hydra_context.config_loader.load_sweep_config(
                    launcher.config, members[i][1]), ClusterError(f"Slurm task {job.job_id} ended {final}"))
    if problems:
        raise ClusterError(_what_became(problems, states))
    return [returns[i] for i in range(len(job_overrides))]


@contextlib.contextmanager
def _stderr_kept():
    """Collect what this process's fd 2 receives meanwhile (sbatch's own messages); yields a reader."""
    import tempfile

    sys.stderr.flush()
    saved, kept = os.dup(2), tempfile.TemporaryFile(mode="w+")
    os.dup2(kept.fileno(), 2)
    try:
        yield lambda: (kept.seek(0), kept.read().splitlines())[1]
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def wait_for(jobs: list, array: str) -> list[str]:
    """Poll the array until every task has ended; Ctrl-C or SIGTERM cancels it (then waits for its
    tasks to end their runs, up to 60 s) and stops."""
    from ..lifecycle.parent import mark_interrupted

    unknown_since = None
    ended_at: dict[str, float] = {}  # a task that read as ended other than COMPLETED, and since when
    try:
        while True:
            states = [_state(job) for job in jobs]
            now = time.monotonic()
            for job, state in zip(jobs, states):
                if state in DONE_STATES and state != "COMPLETED":
                    ended_at.setdefault(job.job_id, now)
                else:
                    ended_at.pop(job.job_id, None)
            # A preempted task reads as ended for a moment while Slurm requeues it: an end other than
            # COMPLETED counts once it has held for SETTLE_S and Slurm no longer queues the task.
            unsettled = [j for j, t in ended_at.items() if now - t < SETTLE_S]
            if all(s in DONE_STATES for s in states) and not unsettled and not _still_queued(list(ended_at)):
                return states
            if all(s == "UNKNOWN" for s in states):  # sacct no longer answers about any task
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since > SILENT_S:
                    raise ClusterError(f"Slurm has said nothing about array {array} for {SILENT_S:.0f} s (is the "
                                       f"cluster still up? sacct -j {array}); its runs stay as the tasks left them: "
                                       "run the same command again to continue them")
            else:
                unknown_since = None
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        mark_interrupted()
        log.info("cancelling Slurm array %s; its runs end KILLED with their metrics and checkpoints", array)
        subprocess.run(["scancel", array], capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(_state(job) in DONE_STATES for job in jobs):
            time.sleep(1)
        raise


def _still_queued(job_ids: list[str]) -> bool:
    """Whether Slurm still holds any of these tasks (a requeued task reads as ended in sacct for a
    moment, until it is pending again)."""
    if not job_ids:
        return False
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True,
                         timeout=30)
    return out.returncode == 0 and bool(out.stdout.strip())


def _state(job) -> str:
    state = job.watcher.get_state(job.job_id, mode="force")
    return str(state).split()[0].upper().rstrip("+")


def _what_became(problems: list, states: list[str]) -> str:
    """One line: each task that did not complete, Slurm's state, and what became of its runs (any it
    left RUNNING, dying before it could end them, are ended here, as the local orphan sweep does)."""
    from collections import Counter

    from ..lifecycle.parent import mark_interrupted, parent_run
    from ..tracking.store import client_for
    from .stopping import end_orphaned_runs

    cancelled = any(final == "CANCELLED" for _, final, _ in problems)
    if cancelled:
        mark_interrupted()  # the parent ends KILLED
    told = []
    parent = parent_run()
    client = client_for(parent.tracking_uri) if parent is not None and parent.parent_run_id else None
    if client is not None:
        end_orphaned_runs(client, parent.experiment_id, parent.parent_run_id, cancelled)
    for job_id, final, stack in problems:
        fate = ""
        if client is not None:
            runs = client.search_runs([parent.experiment_id], f"tags.`slurm.job_id` = '{job_id}'")
            counts = Counter(r.info.status for r in runs)
            fate = ": " + (", ".join(f"{n} run{'s' if n > 1 else ''} {status}" for status, n in sorted(counts.items()))
                           or "no run had started") + (" with their metrics and last checkpoint" if runs else "")
        told.append(f"task {job_id} {final} ({len(stack)} job{'s' if len(stack) > 1 else ''}{fate})")
    done = sum(s == "COMPLETED" for s in states)
    return (f"Slurm: {'; '.join(told)}{f'; {done} other tasks COMPLETED' if done else ''}: run the same command "
            "again to continue what did not finish")


def run_task(launcher: Any, members: list[tuple[int, list[str]]], singleton_state: dict) -> list[JobReturn]:
    """On the node: this stack's jobs through the stacked launcher's code, tagged with the task's
    Slurm ids. Slurm's warning signal ends the runs KILLED; the task then requeues itself (submitit
    calls launcher.checkpoint, which resubmits these same members: they continue in place)."""
    from .launcher import launch as launch_stacked

    usr2 = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint and requeue, then exit
    Singleton.set_state(singleton_state)
    setup_globals()
    try:
        return list(launch_stacked(launcher, [o for _, o in members], 0, numbers=[n for n, _ in members],
                                   extra_tags=slurm_tags()))
    except KeyboardInterrupt as stop:
        if str(stop) == f"signal {int(signal.SIGUSR2)}" and callable(usr2):
            log.warning("Slurm's warning signal: runs ended KILLED with their checkpoints; requeueing this task")
            usr2(signal.SIGUSR2, None)
        raise
