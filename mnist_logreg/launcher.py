"""`hydra/launcher=stacked`: a sweep's jobs that share a batch stream train together as one stack.

Every job is composed and prepared first, in order, through Hydra's own `run_job` (so each has
its job folder, `.hydra/` and log), and skip-if-FINISHED is decided then. The jobs left are
grouped by `job.stack_key`; each group, up to `max_stack` jobs, trains in one pass in this process,
groups one after another. Each job still gets its own MLflow run, live per-epoch metrics and
checkpoints, artifacts and JobReturn (so optuna's trials get their objectives).
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
JOB_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def _member_logger(num: int, output_dir: Path, job_name: str) -> logging.Logger:
    """A logger for one job of a stack: its own log file in its job folder, and the console."""
    from .config import RedactPasswords

    logger = logging.getLogger(f"mnist_logreg.job.{num}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in (logging.FileHandler(output_dir / f"{job_name}.log"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(logging.Formatter(JOB_LOG_FORMAT))
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
    from .phases import prepare

    job = prepare(cfg)
    hc = HydraConfig.get()
    job.log = _member_logger(int(hc.job.num), Path(hc.runtime.output_dir), hc.job.name)
    return job


def _returned(prepared: JobReturn, result: Any) -> JobReturn:
    """The job's JobReturn: the prepared one with the job's objective, or the exception that ended it."""
    from .job import objective

    ret = JobReturn(overrides=prepared.overrides, cfg=prepared.cfg, hydra_cfg=prepared.hydra_cfg,
                    working_dir=prepared.working_dir, task_name=prepared.task_name)
    if isinstance(result, BaseException):
        ret.return_value, ret.status = result, JobStatus.FAILED
    else:
        ret.return_value, ret.status = objective(result), JobStatus.COMPLETED
    return ret


class StackedLauncher(Launcher):
    def __init__(self, max_stack: int = 32) -> None:
        super().__init__()
        if not isinstance(max_stack, int) or max_stack < 1:
            from .errors import ConfigError

            raise ConfigError(f"hydra.launcher.max_stack={max_stack!r} is not allowed: it must be an integer >= 1")
        self.max_stack = max_stack
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self._groups = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from .job import stack_key, train_stack
        from .phases import skip
        from .sweep import current

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Preparing %d jobs to train stacked (up to %d per stack)", len(job_overrides), self.max_stack)
        prepared: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            prepared.append(run_job(hydra_context=self.hydra_context, task_function=_prepare_task,
                                    config=sweep_config, job_dir_key="hydra.sweep.dir",
                                    job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

        returns: dict[int, JobReturn] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, ret in enumerate(prepared):
            if ret.status != JobStatus.COMPLETED:  # bad input: its exception, as run_job keeps it
                returns[i] = ret
            elif ret.return_value.done is not None:
                returns[i] = _returned(ret, skip(ret.return_value))
            else:
                groups[stack_key(ret.return_value)].append(i)
        sweep = current()
        try:
            for members in groups.values():
                for start in range(0, len(members), self.max_stack):
                    chunk = members[start : start + self.max_stack]
                    self._groups += 1
                    name = f"{sweep.sweep if sweep else 'stack'}/{self._groups}"
                    jobs = [prepared[i].return_value for i in chunk]
                    log.info("stack %s: jobs %s together (batch size %d)", name,
                             ", ".join(f"#{initial_job_idx + i}" for i in chunk), jobs[0].cfg.data.batch_size)
                    for i, result in zip(chunk, train_stack(jobs, name)):
                        returns[i] = _returned(prepared[i], result)
        finally:
            for ret in prepared:
                if ret.status == JobStatus.COMPLETED:
                    _close_logger(ret.return_value.log)
        return [returns[i] for i in range(len(prepared))]
