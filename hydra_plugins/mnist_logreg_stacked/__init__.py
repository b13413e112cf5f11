"""mnist_logreg's Hydra launcher plugin, `hydra/launcher=stacked` (the default of conf/config.yaml).

A thin Launcher: Hydra imports this package whenever it scans for plugins, so the work and its heavy
imports (MXNet, MLflow) stay in mnist_logreg.sweep.launcher until a sweep launches. Its config is
registered in Hydra's ConfigStore here, as Hydra's own launchers register theirs, so that any app
with the package installed can select it. (No `from __future__ import annotations`: Hydra's plugin
scan runs this module outside sys.modules, where dataclasses cannot resolve string annotations.)
"""
from dataclasses import dataclass
from typing import Optional, Sequence

from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig


@dataclass
class StackedLauncherConf:
    """`hydra/launcher=stacked`: jobs that share a batch stream train together (mnist_logreg's own
    task function); any other task function runs job by job, as under hydra/launcher=basic."""

    _target_: str = "hydra_plugins.mnist_logreg_stacked.StackedLauncher"
    # Most jobs trained in one stack; a larger group is split into stacks of this size.
    max_stack: int = 32
    # Whether runs write their records through a record writer process (null: for a launch of more
    # than 8 jobs on a local SQLite store, where it saves more than the writer's start costs).
    record_writer: Optional[bool] = None


@dataclass
class StackedSlurmLauncherConf(SlurmQueueConf):
    """`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): one Slurm array task per stack."""

    _target_: str = "hydra_plugins.mnist_logreg_stacked.StackedSlurmLauncher"
    # false: one array task per job, as hydra-submitit-launcher submits them
    stack: bool = True
    max_stack: int = 32
    # Requeues after a time limit (Slurm's warning signal, USR2, comes signal_delay_s before it).
    max_num_timeout: int = 3


ConfigStore.instance().store(group="hydra/launcher", name="stacked", node=StackedLauncherConf,
                             provider="mnist_logreg")
ConfigStore.instance().store(group="hydra/launcher", name="stacked_slurm", node=StackedSlurmLauncherConf,
                             provider="mnist_logreg")


class StackedLauncher(Launcher):
    """Jobs that share a batch stream train together as one stack, each with its own MLflow run."""

    def __init__(self, max_stack: int = 32, record_writer: Optional[bool] = None) -> None:
        from mnist_logreg.sweep.launcher import check_max_stack, check_record_writer

        self.max_stack = check_max_stack(max_stack)
        self.record_writer = check_record_writer(record_writer)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self.stacks_trained = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from mnist_logreg.sweep.launcher import compose_once

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        compose_once(hydra_context)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mnist_logreg.sweep.launcher import launch

        return launch(self, job_overrides, initial_job_idx)


class StackedSlurmLauncher(SlurmLauncher):
    """Jobs that share a batch stream train as one Slurm array task per stack (submitit), each job with
    its own MLflow run; preempted or timed-out tasks requeue and continue their runs in place."""

    def __init__(self, stack: bool = True, max_stack: int = 32, **params: Any) -> None:
        from mnist_logreg.sweep.launcher import check_max_stack

        super().__init__(**params)
        self.stack, self.max_stack = bool(stack), check_max_stack(max_stack)
        self.stacks_trained = 0

    def __call__(self, *args: Any) -> Any:  # type: ignore[override]
        if len(args) != 2:  # one job, as hydra-submitit-launcher runs it (another app's task)
            return super().__call__(*args)
        from mnist_logreg.sweep.slurm import run_task

        members, singleton_state = args
        return run_task(self, members, singleton_state)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mnist_logreg.sweep.slurm import is_harness_config, launch

        if not is_harness_config(self.config):  # another app: one task per job, through run_job
            return super().launch(job_overrides, initial_job_idx)
        return launch(self, job_overrides, initial_job_idx)
