"""mnist_logreg's Hydra launcher plugin, `hydra/launcher=stacked` (the default of conf/config.yaml).

A thin Launcher: Hydra imports this package whenever it scans for plugins, so the work and its heavy
imports (MXNet, MLflow) stay in mnist_logreg.sweep.launcher until a sweep launches.
"""
from __future__ import annotations

from typing import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class StackedLauncher(Launcher):
    """Jobs that share a batch stream train together as one stack, each with its own MLflow run."""

    def __init__(self, max_stack: int = 32) -> None:
        from mnist_logreg.sweep.launcher import check_max_stack

        self.max_stack = check_max_stack(max_stack)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self.stacks_trained = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from mnist_logreg.sweep.launcher import compose_once

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        compose_once(hydra_context)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mnist_logreg.sweep.launcher import launch

        return launch(self, job_overrides, initial_job_idx)


