"""The stacked launcher's work (`hydra/launcher=stacked`): a sweep's jobs that share a batch stream
train together as one stack. Its Hydra face is hydra_plugins/mnist_logreg_stacked.

Every job runs through Hydra's `run_job` (`run_job` here: Hydra's, with fewer copies of the config)
with the app's own task function, exactly as the basic launcher runs it (its folder, `.hydra/`
files, log, callbacks and JobReturn), but each in a greenlet
(lifecycle.gathering): the harness's `job.train` prepares the job and pauses there. Once every job
has started, the paused ones are grouped by `lifecycle.train.stack_key` and trained as stacks of up
to `max_stack`, one after another, on the main thread; then each job resumes with its own result,
its task function returns, and Hydra's `on_job_end` fires after its run has ended. A task function
that never calls `job.train` (another app's) runs to its end at once, job by job, as under basic.
Each job gets its own MLflow run, live per-epoch metrics and checkpoints, artifacts and JobReturn
(so optuna's trials get their objectives).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..project import LOG_FORMAT

log = logging.getLogger(__name__)


def _member_logger(num: int, output_dir: Path, job_name: str) -> logging.Logger:
    """A logger for one job of a stack: its own log file in its job folder, and the console."""
    from ..config import QuietJobLines, RedactPasswords

    logger = logging.getLogger(f"mnist_logreg.job.{num}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in (logging.FileHandler(output_dir / f"{job_name}.log"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(RedactPasswords())
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(QuietJobLines())
        logger.addHandler(handler)
    return logger


def _close_logger(logger: Any) -> None:
    if isinstance(logger, logging.Logger):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def compose_once(hydra_context: Any) -> None:
    """Hydra's sweeper composes every job's config to check the batch, and the launcher composes it
    again to run it: the launcher takes the sweeper's composition instead, and most compositions
    are a copy of an earlier job's (`SweepComposer`)."""
    loader = hydra_context.config_loader
    if getattr(loader, "composed_for_launch", None) is not None:
        return
    composer = SweepComposer(loader.load_sweep_config)
    composed: dict[tuple, DictConfig] = {}

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key in composed:  # the launcher's call after the sweeper's check
            return composed.pop(key)
        config = composer.load_sweep_config(master_config, sweep_overrides)
        composed[key] = config
        return config

    loader.load_sweep_config = load_sweep_config
    loader.composed_for_launch = composed


class SweepComposer:
    """Hydra's `load_sweep_config`, most of it skipped: composing a job's config takes Hydra about
    0.05 s here (the defaults tree, every file merged), which a 96-job sweep pays twice. A job whose
    overrides differ from an earlier job's only in the values of plain config keys (`optim.lr=0.1`
    against `optim.lr=0.05`: no config group, no `+`, `~` or `hydra.` key, a scalar value) gets a
    copy of that job's config with the new values set by Hydra's own override code, and its
    `hydra.overrides.task` and `hydra.job.override_dirname` written as Hydra writes them. Anything
    else is composed by Hydra. tests/test_sweep_logic.py compares the two on real sweeps."""

    def __init__(self, compose) -> None:
        self.compose = compose
        self.templates: dict[tuple, tuple[list, bytes]] = {}  # pickled: loading one is a deep copy, 5x as fast
        self._parser = None

    def parse(self, overrides: list[str]) -> list:
        if self._parser is None:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            self._parser = OverridesParser.create()
        return self._parser.parse_overrides(overrides=overrides)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        import pickle

        parsed = self.parse(list(sweep_overrides))
        groups = master_config.hydra.runtime.choices
        shape = (id(master_config),) + tuple(
            o.key_or_group if _scalar_change(o) and o.key_or_group not in groups else o.input_line for o in parsed)
        found = self.templates.get(shape)
        if found is None:
            config = self.compose(master_config, list(sweep_overrides))
            if all(_plain_key(config, o) for o in parsed if _scalar_change(o) and o.key_or_group not in groups):
                self.templates[shape] = (parsed, pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
            return config
        before, template = found
        return self._from(template, [o for o, b in zip(parsed, before) if o.input_line != b.input_line], parsed,
                          master_config)

    @staticmethod
    def _from(template: bytes, changed: list, parsed: list, master_config: DictConfig) -> DictConfig:
        import pickle

        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from omegaconf import OmegaConf

        config = pickle.loads(template)  # a copy of the earlier job's config: 0.6 ms, a deepcopy 3 ms
        ConfigLoaderImpl._apply_overrides_to_config(changed, config)
        app = [o for o in parsed if not o.is_hydra_override()]
        dirname = config.hydra.job.config.override_dirname
        with open_dict(config.hydra):
            config.hydra.overrides.task = [o.input_line for o in app]
            config.hydra.job.override_dirname = get_overrides_dirname(
                overrides=app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys)
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config


def _scalar_change(override: Any) -> bool:
    """`key=value` of an app key to one scalar (what a sweep varies from job to job)."""
    from hydra.core.override_parser.types import OverrideType

    return (override.type == OverrideType.CHANGE and override.package is None and not override.is_hydra_override()
            and not override.is_sweep_override() and isinstance(override.value(), (bool, int, float, str, type(None))))


def _plain_key(config: DictConfig, override: Any) -> bool:
    """The override's key is a value in the composed config, not a config group or a node of several."""
    from omegaconf import Container, OmegaConf

    key = override.key_or_group
    if key in config.hydra.runtime.choices or "/" in key:
        return False
    try:
        return not isinstance(OmegaConf.select(config, key, throw_on_missing=False), Container)
    except Exception:
        return False


def run_job(hydra_context: Any, task_function: Any, config: DictConfig, job_dir_key: str,
            job_subdir_key: str | None) -> JobReturn:
    """Hydra's own run_job (hydra.core.utils), step for step: the job's folder, its three `.hydra/`
    files, job logging, env_set, hydra.job.chdir, the callbacks and the JobReturn, with three deep
    copies of the config fewer (some 7 ms of a job's 40 here). HydraConfig is set once, and the
    job's output folder written into it as well (Hydra sets it a second time, copying the hydra
    node again); the JobReturn's hydra config is that one (Hydra copies it once more); and
    the task's config is copied without the hydra node (Hydra copies the whole config, then deletes
    it). HydraConfig holds the job's read-only hydra node itself (`_hydra_config`), and the task's
    copy is made by pickle, a third of a deep copy's time. A config that leaves hydra.job.chdir
    unset goes to Hydra's own, which decides it by version. tests/test_sweep_logic.py runs both on
    the same jobs and compares what each job saw and left, node by node."""
    from hydra.core import utils

    if config.hydra.job.chdir is None:
        return utils.run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                             job_dir_key=job_dir_key, job_subdir_key=job_subdir_key)
    callbacks = hydra_context.callbacks
    old_cwd = os.getcwd()
    orig_hydra_cfg = HydraConfig.instance().cfg
    HydraConfig.instance().cfg = _hydra_config(config)  # for the ${hydra:...} the folder's name may hold
    output_dir = str(OmegaConf.select(config, job_dir_key))
    if job_subdir_key is not None:
        output_dir = os.path.join(output_dir, str(OmegaConf.select(config, job_subdir_key)))
    hydra_cfg = HydraConfig.instance().cfg  # holds config's own hydra node: written once for both
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    _chdir = False
    try:
        ret = JobReturn()
        content = config.__dict__["_content"]  # copied without its hydra node, which is put back
        config.__dict__["_content"] = {k: v for k, v in content.items() if k != "hydra"}
        try:
            task_cfg = _copy(config)
        finally:
            config.__dict__["_content"] = content
        ret.cfg = task_cfg
        ret.hydra_cfg = hydra_cfg
        overrides = OmegaConf.to_container(config.hydra.overrides.task)
        assert isinstance(overrides, list)
        ret.overrides = overrides
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        _chdir = bool(hydra_cfg.hydra.job.chdir)
        if _chdir:
            os.chdir(output_dir)
            ret.working_dir = output_dir
        else:
            ret.working_dir = os.getcwd()
        configure_log(config.hydra.job_logging, config.hydra.verbose)
        if config.hydra.output_subdir is not None:
            hydra_output = Path(config.hydra.runtime.output_dir) / Path(config.hydra.output_subdir)
            _save_config(task_cfg, "config.yaml", hydra_output)
            _save_config(hydra_cfg, "hydra.yaml", hydra_output)
            _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
        with utils.env_override(hydra_cfg.hydra.job.env_set):
            callbacks.on_job_start(config=config, task_function=task_function)
            try:
                ret.return_value = task_function(task_cfg)
                ret.status = JobStatus.COMPLETED
            except Exception as e:
                ret.return_value = e
                ret.status = JobStatus.FAILED
        ret.task_name = utils.JobRuntime.instance().get("name")
        utils._flush_loggers()
        callbacks.on_job_end(config=config, job_return=ret)
        return ret
    finally:
        HydraConfig.instance().cfg = orig_hydra_cfg
        if _chdir:
            os.chdir(old_cwd)


def _copy(node: Any) -> Any:
    """A deep copy of a config node (its parent left out), by pickle: 0.25 ms for a job's config
    here, where copy.deepcopy takes 0.7 ms; the same nodes, metadata and flags."""
    import pickle

    parent = node._get_parent()
    node._set_parent(None)
    try:
        data = pickle.dumps(node, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        node._set_parent(parent)
    return pickle.loads(data)


def _hydra_config(config: DictConfig) -> DictConfig:
    """What HydraConfig.set_config(config) sets: config's hydra node made read-only, and a config
    holding that node alone, whose parent stays config (so that the app's keys resolve from it).
    set_config holds a copy of the node (masked_copy, 2.5 ms here); a job's config is its own and
    its hydra node read-only from here on, so this holds the node itself."""
    from hydra.conf import HydraConf
    from omegaconf import flag_override

    OmegaConf.set_readonly(config.hydra, True)
    kind = OmegaConf.get_type(config, "hydra")
    assert kind is not None and issubclass(kind, HydraConf)
    masked = DictConfig(content={})
    with flag_override(masked, "no_deepcopy_set_nodes", True):
        masked["hydra"] = config._get_node("hydra")
    masked.hydra._set_parent(config)
    return masked


def _save_config(cfg: Any, filename: str, output_dir: Path) -> None:
    """Hydra's `_save_config` (OmegaConf.to_yaml of cfg into output_dir/filename), its YAML emitted
    by libyaml when PyYAML has it: the same text as OmegaConf's pure-Python emitter writes (the
    run_job test compares every file), in a third of the time (hydra.yaml 2.9 ms to 0.8 ms here)."""
    import yaml

    from ..config import libyaml_dumper

    dumper = libyaml_dumper()
    if dumper is None:
        from hydra.core import utils

        return utils._save_config(cfg, filename, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True), default_flow_style=False,
                     allow_unicode=True, sort_keys=False, Dumper=dumper)
    with open(output_dir / filename, "w", encoding="utf-8") as file:
        file.write(text)


def check_record_writer(value: Any) -> bool | None:
    """hydra.launcher.record_writer: true, false or null, or one line and exit 2."""
    if value is not None and not isinstance(value, bool):
        from ..errors import ConfigError
        from .progress import CONSOLE_JOBS

        raise ConfigError(f"hydra.launcher.record_writer={value!r} is not allowed: true, false or null "
                          f"(null: for a launch of more than {CONSOLE_JOBS} jobs)")
    return value


def start_record_writer(uri: str | None) -> None:
    """This process's runs on a local SQLite store write through a record writer process, started
    before the jobs are prepared so that it has imported MLflow (about 1.5 s of a core) by the time
    the first stack opens its runs (a server's runs write directly, with their spool)."""
    from ..tracking.store import sqlite_path
    from ..tracking.writer import start

    db = sqlite_path(uri) if isinstance(uri, str) else None  # None: another app's config, or a server
    if db is not None and db.is_absolute():  # a relative path would name another file after a job's chdir
        start(uri)


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


_frozen = False  # whether launch has frozen the process's objects for the collector (gc.freeze)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
           numbers: Sequence[int] | None = None, extra_tags: dict[str, str] | None = None) -> Sequence[JobReturn]:
    """Start every job through Hydra's run_job in a greenlet, train the ones that joined as stacks
    (grouped by stack_key, at most launcher.max_stack each), then let each joined job end.

    launcher: the Hydra plugin, set up (config, hydra_context, task_function); numbers: the jobs'
    numbers (default initial_job_idx onwards); extra_tags: on every run (a Slurm task's own)."""
    from ..lifecycle.gathering import Gathering
    from ..lifecycle.parent import parent_run
    from ..lifecycle.prepare import looked_up, points_with_runs, skip
    from ..lifecycle.signals import JobSignals
    from ..lifecycle.train import Training, stack_key, train_jobs

    from ..config import QuietJobLines
    from .progress import CONSOLE_JOBS, SweepProgress

    import gc

    setup_globals()
    assert launcher.config is not None and launcher.hydra_context is not None and launcher.task_function is not None
    global _frozen
    if not _frozen:  # what the process holds by now (Hydra, MLflow, their modules) is never rescanned by a full
        gc.freeze()  # collection; once, as a search's later launches would freeze the garbage of the earlier ones
        _frozen = True
    quiet = len(job_overrides) > CONSOLE_JOBS  # at scale: a line per stack and epoch, and a record writer
    wanted = getattr(launcher, "record_writer", None)  # null: at scale (the Slurm launcher's tasks too)
    if wanted or (wanted is None and quiet):
        start_record_writer(OmegaConf.select(launcher.config, "tracking.uri"))
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs, those that share a batch stream stacked (up to %d per stack)", len(job_overrides),
             launcher.max_stack)
    if quiet:
        log.info("\tjobs %s: each job's overrides and lines are in its folder, %s/<N>/ (.hydra/overrides.yaml, "
                 "%s.log); here, a line per stack and epoch", job_numbers(
                     [numbers[i] if numbers is not None else initial_job_idx + i for i in range(len(job_overrides))]),
                 sweep_dir, launcher.config.hydra.job.name)
    QuietJobLines.active = quiet

    def alone(job):  # a job that joined a second time from the same task function
        looked_up(job)
        return skip(job) if job.skipped else train_jobs([job])[0]

    gathering = Gathering(alone)
    home, hydra_cfg = os.getcwd(), HydraConfig.instance().cfg
    configs: list[DictConfig] = []
    returns: dict[int, JobReturn] = {}
    joined: dict[int, Any] = {}
    hydra_of: dict[int, Any] = {}

    def settle(logging_too: bool = True) -> None:  # what run_job leaves behind, as basic leaves it between jobs
        HydraConfig.instance().cfg = hydra_cfg
        os.chdir(home)
        if logging_too:
            configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)

    try:
        for i, overrides in enumerate(job_overrides):
            idx = numbers[i] if numbers is not None else initial_job_idx + i
            if not quiet:
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
            paused, ret = gathering.start(run_job, hydra_context=launcher.hydra_context,
                                          task_function=launcher.task_function, config=sweep_config,
                                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            job_hydra = HydraConfig.instance().cfg  # what run_job set for the task (the job's hydra node)
            settle(logging_too=not quiet)  # at scale nothing logs before the next job's run_job sets its own
            if paused is None:
                returns[i] = ret  # ran to its end: another app's task, a skipped or a refused job
            else:
                joined[i] = paused
                hydra_of[i] = job_hydra
                hc = sweep_config.hydra
                paused.job.log = _member_logger(idx, Path(hc.runtime.output_dir), hc.job.name)
        settle()

        def finish(i: int, result: Any) -> None:
            """Job i resumed with its result (or the exception that ended it), as run_job had it
            while its task ran, and run to its end."""
            HydraConfig.instance().cfg = hydra_of.pop(i)
            if configs[i].hydra.job.chdir:
                os.chdir(configs[i].hydra.runtime.output_dir)
            paused = joined.pop(i)
            try:
                returns[i] = gathering.finish(paused, result)
            finally:
                _close_logger(paused.job.log)
                settle()

        with_runs = points_with_runs([paused.job for paused in joined.values()])
        for i in list(joined):  # what each point's runs say, the whole sweep's looked up at once
            job = joined[i].job
            try:
                looked_up(job, with_runs)
                result = skip(job) if job.skipped else None
            except Exception as exc:  # this job fails, as it would have in prepare
                result = exc
            if result is not None:
                finish(i, result)

        parent = parent_run()
        keys = [stack_key(joined[i].job) if i in joined else None for i in range(len(configs))]
        chunks = plan_stacks(keys, launcher.max_stack)
        names = [f"{parent.sweep if parent else 'stack'}/{launcher.stacks_trained + k + 1}" for k in range(len(chunks))]
        progress = SweepProgress(log, [[(int(configs[i].hydra.job.num), list(job_overrides[i]),
                                         joined[i].job.cfg.trainer.epochs - joined[i].job.start_epoch) for i in chunk]
                                        for chunk in chunks], names)
        signals = JobSignals()  # one for every stack, since one stack's runs end while the next trains
        pending: list[tuple[int, list[int], Training]] = []  # a trained stack whose last records are being written

        def end_stack(k: int, chunk: list[int], training: Training) -> None:
            """A trained stack's last records sent (the rest of them, after a stop), its runs
            ended, and then each of its jobs."""
            try:
                training.send()
            except BaseException as exc:
                training.end(exc)
                raise
            results = training.end()
            if quiet:
                progress.stack_done(k, results)
            for i, result in zip(chunk, results):
                finish(i, result)

        def end_pending() -> None:
            while pending:
                end_stack(*pending.pop(0))

        def on_epoch_done(k: int, epoch: int, metrics: dict) -> None:
            if pending and pending[0][2].written():  # the stack before's records, written meanwhile
                end_pending()
            if quiet:
                progress.epoch(k, epoch, metrics)

        with signals.installed():
            try:
                for k, (chunk, name) in enumerate(zip(chunks, names)):
                    launcher.stacks_trained += 1
                    jobs = [joined[i].job for i in chunk]
                    nums = [int(configs[i].hydra.job.num) for i in chunk]
                    together = f"stack {name}: jobs {job_numbers(nums)} together (batch size {jobs[0].cfg.data.batch_size})"
                    progress.start(k)
                    training = Training(jobs, name, extra_tags=extra_tags,
                                        on_stack=lambda products: log.info("%s, %s", together, products),
                                        on_epoch_done=lambda epoch, metrics, k=k: on_epoch_done(k, epoch, metrics),
                                        signals=signals)
                    try:
                        training.open()
                        for _, _, before in pending:  # created first, then the stack before's files
                            before.send(last=False)  # staged by the writer too, while this stack trains
                        training.train()
                    except BaseException as exc:
                        training.end(exc)
                        raise
                    progress.trained(k)
                    end_pending()
                    pending.append((k, chunk, training))
            finally:  # the last stack, or at a stop the one trained before: its runs are complete
                end_pending()
    finally:
        for paused in joined.values():  # a stop: the jobs that did not train unwind
            gathering.abandon(paused)
            _close_logger(paused.job.log)
        settle()
        QuietJobLines.active = False
    return [returns[i] for i in range(len(configs))]
