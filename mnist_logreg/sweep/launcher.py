"""The stacked launcher's work (`hydra/launcher=stacked`): a sweep's jobs that share a batch stream
train together as one stack. Its Hydra face is hydra_plugins/mnist_logreg_stacked.

Every job is composed and prepared first, in order, through Hydra's own `run_job` (so each has
its job folder, `.hydra/` and log), and skip-if-FINISHED is decided then. The jobs left are
grouped by `lifecycle.train.stack_key`; each group, up to `max_stack` jobs, trains in one pass in this process,
groups one after another. Each job still gets its own MLflow run, live per-epoch metrics and
checkpoints, artifacts and JobReturn (so optuna's trials get their objectives).
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, open_dict

from ..project import LOG_FORMAT

log = logging.getLogger(__name__)


def _member_logger(num: int, output_dir: Path, job_name: str) -> logging.Logger:
    """A logger for one job of a stack: its own log file in its job folder, and the console."""
    from ..config import RedactPasswords

    logger = logging.getLogger(f"mnist_logreg.job.{num}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in (logging.FileHandler(output_dir / f"{job_name}.log"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(RedactPasswords())
        logger.addHandler(handler)
    return logger


def _close_logger(logger: Any) -> None:
    if isinstance(logger, logging.Logger):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def _prepare_task(cfg: DictConfig):
    """run_job's task for a stacked launch: the job's preparation only (no MLflow writes)."""
    from ..lifecycle.prepare import prepare

    hc = HydraConfig.get()
    job = prepare(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    job.log = _member_logger(int(hc.job.num), Path(hc.runtime.output_dir), hc.job.name)
    return job


def _returned(prepared: JobReturn, result: Any) -> JobReturn:
    """The job's JobReturn: the prepared one with the job's objective, or the exception that ended it."""
    from ..lifecycle.train import objective

    ret = JobReturn(overrides=prepared.overrides, cfg=prepared.cfg, hydra_cfg=prepared.hydra_cfg,
                    working_dir=prepared.working_dir, task_name=prepared.task_name)
    if isinstance(result, BaseException):
        ret.return_value, ret.status = result, JobStatus.FAILED
    else:
        ret.return_value, ret.status = objective(result), JobStatus.COMPLETED
    return ret


def compose_once(hydra_context: Any) -> None:
    """Hydra's sweeper composes every job's config to check the batch, and the launcher composes it
    again to run it: the launcher takes the sweeper's composition instead (about 0.06 s a job here)."""
    loader = hydra_context.config_loader
    if getattr(loader, "composed_for_launch", None) is not None:
        return
    compose = loader.load_sweep_config
    composed: dict[tuple, DictConfig] = {}

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key in composed:  # the launcher's call after the sweeper's check
            return composed.pop(key)
        config = compose(master_config, sweep_overrides)
        composed[key] = config
        return config

    loader.load_sweep_config = load_sweep_config
    loader.composed_for_launch = composed


def plan_stacks(keys: Sequence[Hashable | None], max_stack: int) -> list[list[int]]:
    """The stacks to train: the indices of the jobs with a key (None: not to train), grouped by equal
    keys in the order each key first appears, and each group cut into stacks of at most max_stack."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if key is not None:
            groups[key].append(i)
    return [members[lo : lo + max_stack] for members in groups.values() for lo in range(0, len(members), max_stack)]


def job_numbers(nums: Sequence[int]) -> str:
    """Job numbers as a reader scans them: runs of consecutive ones as #a..#b, the rest listed."""
    parts, start = [], 0
    for i in range(1, len(nums) + 1):
        if i == len(nums) or nums[i] != nums[i - 1] + 1:
            run = nums[start:i]
            parts.append(f"#{run[0]}..#{run[-1]}" if len(run) > 2 else ", ".join(f"#{n}" for n in run))
            start = i
    return ", ".join(parts)


def check_max_stack(max_stack: Any) -> int:
    """hydra.launcher.max_stack: an integer >= 1, or one line and exit 2."""
    if not isinstance(max_stack, int) or isinstance(max_stack, bool) or max_stack < 1:
        from ..errors import ConfigError

        raise ConfigError(f"hydra.launcher.max_stack={max_stack!r} is not allowed: it must be an integer >= 1")
    return max_stack


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Prepare every job through Hydra's run_job, skip the FINISHED ones, group the rest by stack_key
    into stacks of at most launcher.max_stack, and train the stacks one after another.

    launcher: the Hydra plugin, set up (config, hydra_context, task_function)."""
    from ..lifecycle.parent import parent_run
    from ..lifecycle.prepare import skip
    from ..lifecycle.train import stack_key, train_jobs

    setup_globals()
    assert launcher.config is not None and launcher.hydra_context is not None and launcher.task_function is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Preparing %d jobs to train stacked (up to %d per stack)", len(job_overrides), launcher.max_stack)
    prepared: list[JobReturn] = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        prepared.append(run_job(hydra_context=launcher.hydra_context, task_function=_prepare_task,
                                config=sweep_config, job_dir_key="hydra.sweep.dir",
                                job_subdir_key="hydra.sweep.subdir"))
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)

    returns: dict[int, JobReturn] = {}
    keys: list[tuple | None] = []
    for i, ret in enumerate(prepared):
        keys.append(None)
        if ret.status != JobStatus.COMPLETED:  # bad input: its exception, as run_job keeps it
            returns[i] = ret
        elif ret.return_value.done is not None:
            returns[i] = _returned(ret, skip(ret.return_value))
        else:
            keys[i] = stack_key(ret.return_value)
    parent = parent_run()
    try:
        for chunk in plan_stacks(keys, launcher.max_stack):
            launcher.stacks_trained += 1
            name = f"{parent.sweep if parent else 'stack'}/{launcher.stacks_trained}"
            jobs = [prepared[i].return_value for i in chunk]
            together = (f"stack {name}: jobs {job_numbers([initial_job_idx + i for i in chunk])} together "
                        f"(batch size {jobs[0].cfg.data.batch_size})")
            for i, result in zip(chunk, train_jobs(jobs, name, on_stack=lambda products: log.info(
                    "%s, %s", together, products))):
                returns[i] = _returned(prepared[i], result)
    finally:
        for ret in prepared:
            if ret.status == JobStatus.COMPLETED:
                _close_logger(ret.return_value.log)
    return [returns[i] for i in range(len(prepared))]
