"""The search: an Optuna 5 study behind Hydra's sweeper interface (`hydra/sweeper=optuna`, whose thin
class is hydra_plugins/mnist_logreg_optuna).

    hydra.sweeper.params: {optim.lr: "tag(log, interval(0.001, 2.0))", model.sigma: "choice(0.01, 0.1)"}

- The search space is Hydra's sweep syntax: `interval(a, b)` (floats, `tag(log, ...)` for a log
  scale, `tag(int, ...)` for integers), `choice(...)` or `a,b,c`, `range(a, b[, step])`; from
  hydra.sweeper.params and from the command line. Other overrides are the same for every trial.
- Each batch of `n_jobs` trials goes to the launcher as one launch: the stacked launcher trains it
  as one stack.
- The study lives in `storage`, by default `optuna.db` beside an SQLite tracking store. Relaunching
  the same command continues it up to n_trials in all. A trial that a stop cut short is trained
  again with its own number and parameters: its MLflow run is continued from its last checkpoint.
- Each trial and its run name each other: the trial's user attribute `mlflow.run_id`, the run's
  `search.study` and `search.trial` tags (config keys that change no number).
- The objective is what `lifecycle.train.objective` says of a job's result.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..errors import ConfigError

log = logging.getLogger(__name__)

RUN_ID_ATTR, HOLDER_ATTR = "mlflow.run_id", "holder"


def distribution(key: str, text: str):
    """The Optuna distribution of one search-space entry in Hydra's sweep syntax, or None when the
    value is a plain one (the same for every trial)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    override = OverridesParser.create().parse_override(f"{key}={text}")
    if not override.is_sweep_override():
        return None
    sweep = override.value()
    tags = set(getattr(sweep, "tags", ()) or ())
    if isinstance(sweep, ChoiceSweep):
        if tags:
            raise ConfigError(f"{key}={text}: a choice takes no tags; use tag(log, interval(a, b)) for a log scale")
        return CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        numbers = (sweep.start, sweep.stop, sweep.step)
        if all(isinstance(n, int) for n in numbers):
            return IntDistribution(sweep.start, sweep.stop - sweep.step, step=sweep.step, log="log" in tags)
        return FloatDistribution(sweep.start, sweep.stop - sweep.step, step=sweep.step)
    if isinstance(sweep, IntervalSweep):
        if "int" in tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log="log" in tags)
        return FloatDistribution(sweep.start, sweep.end, log="log" in tags)
    raise ConfigError(f"{key}={text}: a search takes interval(...), choice(...) or range(...)")


def search_space(params: dict[str, Any], arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions to search (in the order given, the command line's last) and the overrides
    every trial shares."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space: dict[str, Any] = {}
    fixed: list[str] = []
    for key, text in (params or {}).items():
        found = distribution(str(key), str(text))
        if found is None:
            fixed.append(f"{key}={text}")
        else:
            space[str(key)] = found
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        if override.is_sweep_override():
            space.pop(key, None)
            space[key] = distribution(key, override.get_value_element_as_str())
        else:
            fixed = [f for f in fixed if f.split("=", 1)[0] != key] + [override.input_line]
    if not space:
        raise ConfigError("the search has nothing to search: give hydra.sweeper.params (see experiments/optuna.yaml) "
                          "or a sweep on the command line, e.g. 'optim.lr=tag(log, interval(0.001, 1))'")
    return space, fixed


def storage_url(storage: str | None, tracking_uri: str) -> str:
    """The study's storage: as given, else optuna.db beside an SQLite tracking store."""
    from ..tracking.store import sqlite_path

    if storage:
        return str(storage)
    db = sqlite_path(str(tracking_uri))
    if db is None:
        raise ConfigError(f"hydra.sweeper.storage is not set and the tracking store ({tracking_uri}) is not an SQLite "
                          "file: give the study a database the team shares, e.g. "
                          "hydra.sweeper.storage=postgresql://USER@HOST/DB")
    return f"sqlite:///{db.with_name('optuna.db')}"


def open_study(name: str, storage: str, direction: str, seed: int | None, pruner: str | None):
    """Create the study, or load it when it exists; a storage that cannot be opened is one line
    (exit 2), and an SQLite file this call created is removed again."""
    import optuna

    from ..config import redact
    from ..tracking.store import sqlite_path

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = sqlite_path(storage) if storage.startswith("sqlite:///") else None
    existed = db is not None and db.exists()
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                                    pruner=make_pruner(pruner))
        # A continued study seeds its sampler past the trials it holds: it asks new points (the same
        # seed again would ask its first trials again), and the same history asks the same ones.
        study.sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + len(study.trials))
        return study
    except ConfigError:
        raise
    except Exception as exc:
        if db is not None and not existed:
            db.unlink(missing_ok=True)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"hydra.sweeper.storage={redact(storage)} cannot hold the study ({reason}): give an "
                          "sqlite:///PATH in a folder that exists, or a reachable database URL") from exc


def make_pruner(pruner: Any):
    """hydra.sweeper.pruner: null (none), median or hyperband, or {name: median, ARG: VALUE, ...}
    with the pruner's own arguments (n_startup_trials, n_warmup_steps, ...)."""
    import optuna

    pruners = {None: optuna.pruners.NopPruner, "none": optuna.pruners.NopPruner,
               "median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner}
    args = dict(pruner) if hasattr(pruner, "items") else {"name": pruner}
    name = args.pop("name", None)
    if name not in pruners:
        raise ConfigError(f"hydra.sweeper.pruner={name!r} is not allowed: null, median or hyperband "
                          "(or {name: median, n_startup_trials: 2, ...})")
    try:
        return pruners[name](**args)
    except TypeError as exc:
        raise ConfigError(f"hydra.sweeper.pruner: {exc}") from exc


def _holder() -> str:
    """This process, as the holder of the trials it asks (lease.holder_tags' host, pid and start)."""
    import json

    from ..lifecycle.lease import HOST, PID, START, holder_tags

    return json.dumps({k: v for k, v in holder_tags().items() if k in (HOST, PID, START)})


def _holder_alive(holder: str | None) -> bool:
    """Whether a trial's holder still runs. A holder on another host counts as gone: a trial has no
    heartbeat, so a relaunch there trains it again."""
    import json

    from ..lifecycle.lease import holder_alive

    try:
        return holder_alive(json.loads(holder or "{}")) is True
    except (ValueError, AttributeError):
        return False


def cut_short(study) -> list:
    """The study's RUNNING trials whose process is gone (a stop, SIGKILL): they are trained again."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not _holder_alive(t.user_attrs.get(HOLDER_ATTR))]


def trial_overrides(fixed: list[str], params: dict[str, Any], study: str, number: int,
                    log: Sequence[str] = ()) -> list[str]:
    return [*fixed, *(f"{k}={_value(v)}" for k, v in params.items()), f"search.study={study}",
            f"search.trial={number}", *([f"search.log=[{','.join(log)}]"] if log else [])]


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


class Search:
    """One launch of the sweeper: ask, launch a batch, tell, until the study holds n_trials."""

    def __init__(self, launcher, config, *, direction: str, study_name: str | None, storage: str | None,
                 n_trials: int, n_jobs: int, seed: int | None, pruner: str | None, params: dict[str, Any]) -> None:
        if not isinstance(n_trials, int) or n_trials < 1 or not isinstance(n_jobs, int) or n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials!r} and n_jobs={n_jobs!r}: both must be integers >= 1")
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction!r} is not allowed: maximize or minimize")
        self.launcher, self.config = launcher, config
        self.direction, self.n_trials, self.n_jobs, self.seed = direction, n_trials, n_jobs, seed
        self.name = study_name or str(config.tracking.experiment)
        self.storage_arg, self.pruner, self.params = storage, pruner, dict(params or {})

    def run(self, arguments: Sequence[str]) -> list:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        from ..config import redact
        from ..lifecycle.train import set_epoch_judge

        space, fixed = search_space(self.params, arguments)
        storage = storage_url(self.storage_arg, self.config.tracking.uri)
        study = open_study(self.name, storage, self.direction, self.seed, self.pruner)
        again = cut_short(study)
        done = [t for t in study.trials if t.state.is_finished()]
        log.info("study %s in %s: %d of %d trials done%s", self.name, redact(storage), len(done), self.n_trials,
                 f", {len(again)} cut short to train again" if again else "")
        if len(done) >= self.n_trials:
            log.info("study %s is complete: raise hydra.sweeper.n_trials (now %d) to search further", self.name,
                     self.n_trials)
        returns, job_idx = [], 0
        while True:
            done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
            room = self.n_trials - len(done)
            if room <= 0:
                break
            batch = again[:min(self.n_jobs, room)]
            again = again[len(batch):]
            trials = [study.ask() for _ in range(min(self.n_jobs, room) - len(batch))] if not batch else []
            holder = _holder()
            for trial in batch:
                _trial(study, trial.number).set_user_attr(HOLDER_ATTR, holder)
            numbered = [(t.number, t.params) for t in batch]
            for trial in trials:
                trial.set_user_attr(HOLDER_ATTR, holder)
                numbered.append((trial.number, {k: _suggest(trial, k, d) for k, d in space.items()}))
            log_scaled = [k for k, d in space.items() if getattr(d, "log", False)]
            overrides = [trial_overrides(fixed, params, self.name, number, log_scaled) for number, params in numbered]
            live = {number: _trial(study, number) for number, _ in numbered}
            set_epoch_judge(lambda job, m: self._judge(live, job, m))
            try:
                batch_returns = self.launcher.launch(overrides, initial_job_idx=job_idx)
            finally:
                set_epoch_judge(None)
            job_idx += len(overrides)
            failed = None  # the first job that raised (bad input, a store that fails): the search stops there
            for (number, _), ret in zip(numbered, batch_returns):
                if ret.status == JobStatus.FAILED and failed is None:
                    failed = ret
                result = ret._return_value if ret.status == JobStatus.COMPLETED else None
                value = _objective(result)
                run_id = getattr(result, "run_id", None)
                if run_id:
                    _trial(study, number).set_user_attr(RUN_ID_ATTR, run_id)
                if getattr(result, "status", None) == "PRUNED":
                    study.tell(number, state=TrialState.PRUNED)
                elif value is None:
                    study.tell(number, state=TrialState.FAIL)
                else:
                    study.tell(number, value)
            returns.append(batch_returns)
            if failed is not None:  # as Hydra's sweepers do: its error, in one line, once its batch is told
                failed.return_value
        self._say_best(study)
        return returns

    def _judge(self, live: dict, job, m) -> str | None:
        """After each epoch of a trial's run: report its objective to the trial, and stop the run
        when the pruner says so."""
        search = job.cfg.get("search") or {}
        trial = live.get(search.get("trial")) if search.get("study") == self.name else None
        if trial is None or self.pruner in (None, "none"):
            return None
        name, value = ("val_acc", m.val_acc) if m.val_acc is not None else ("test_acc", m.test_acc)
        trial.report(value, m.epoch)
        if trial.should_prune():
            return f"the search's pruner stopped it ({name} {value:.4f} after epoch {m.epoch})"
        return None

    def _say_best(self, study) -> None:
        from omegaconf import OmegaConf

        best = best_trial(study)
        if best is None:
            log.info("study %s: no trial finished", self.name)
            return
        metric = "val_acc" if (OmegaConf.select(self.config, "data.val_size") or 0) > 0 else "test_acc"
        log.info("study %s: best trial #%d, %s %.4f, run %s: %s", self.name, best.number, metric, best.value,
                 best.user_attrs.get(RUN_ID_ATTR, "?"), " ".join(f"{k}={_value(v)}" for k, v in best.params.items()))


def _trial(study, number: int):
    """The live trial `number` of the study (one asked by an earlier process included): Optuna's
    public API makes Trial objects only for trials this process asked, so its storage is asked."""
    import optuna

    return optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def _suggest(trial, name: str, dist) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)


def best_trial(study):
    """The best COMPLETE trial: the best value, a tie going to the earlier trial (as the comparison's
    first row goes to the earlier run)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    return min(complete, key=lambda t: (sign * t.value, t.number))


def _objective(result: Any) -> float | None:
    """A job's objective (`lifecycle.train.Objective`) as a trial's value: None for a run that did
    not finish (it failed, or diverged)."""
    import math

    if not isinstance(result, float) or getattr(result, "status", "FINISHED") not in ("FINISHED", "SKIPPED"):
        return None
    return float(result) if math.isfinite(result) else None

