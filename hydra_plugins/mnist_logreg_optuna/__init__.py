"""mnist_logreg's Hydra sweeper plugin, `hydra/sweeper=optuna`: a persistent Optuna 5 study whose
batches of trials the launcher trains (as one stack under the default launcher).

A thin Sweeper: the work and its imports (Optuna) stay in mnist_logreg.sweep.search. Its config is
registered in Hydra's ConfigStore here. (No `from __future__ import annotations`: Hydra's plugin scan
runs this module outside sys.modules, where dataclasses cannot resolve string annotations.)
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class SamplerConf:
    # TPE's seed: the same seed asks the same trials
    seed: Optional[int] = None


@dataclass
class OptunaSweeperConf:
    """`hydra/sweeper=optuna`: see mnist_logreg/sweep/search.py and docs/search.md."""

    _target_: str = "hydra_plugins.mnist_logreg_optuna.OptunaSweeper"
    direction: str = "maximize"
    # default: the experiment's name (tracking.experiment)
    study_name: Optional[str] = None
    # default: optuna.db beside an SQLite tracking store; with tracking=server, the team's database
    storage: Optional[str] = None
    # trials in the study in all: a relaunch continues up to this many
    n_trials: int = 20
    # trials per batch: the stacked launcher trains a batch as one stack
    n_jobs: int = 4
    sampler: SamplerConf = field(default_factory=SamplerConf)
    # null (none), median or hyperband, or {name: median, n_startup_trials: 2, ...}: stops hopeless
    # trials (stack members included) after an epoch
    pruner: Optional[Any] = None
    # key: Hydra sweep syntax, e.g. optim.lr: tag(log, interval(0.001, 2.0))
    params: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="mnist_logreg")


class OptunaSweeper(Sweeper):
    """Ask a batch of trials, launch it, tell the objectives; the study persists between launches."""

    def __init__(self, direction: str, study_name: Optional[str], storage: Optional[str], n_trials: int, n_jobs: int,
                 sampler: Any, pruner: Any, params: Optional[Dict[str, Any]]) -> None:
        self.options = dict(direction=direction, study_name=study_name, storage=storage, n_trials=n_trials,
                            n_jobs=n_jobs, seed=(sampler or {}).get("seed"), pruner=pruner, params=dict(params or {}))
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from mnist_logreg.sweep.search import Search

        assert self.config is not None
        return Search(self.launcher, self.config, **self.options).run(arguments)
