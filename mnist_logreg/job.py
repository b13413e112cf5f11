"""One Hydra job, or a stack of them: the phases of mnist_logreg.phases around a fit.

    train(cfg)          one model through training.fit (run.py, reproduce, resume, every launcher)
    train_stack(jobs)   K prepared jobs through stack.Stack, each with its own run (the stacked launcher)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import numpy as np
from omegaconf import DictConfig

from . import checkpoint
from .phases import Job, Recorder, StopSignals, open_run, prepare, seed_everything, skip

log = logging.getLogger("mnist_logreg.job")


def train(cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one model as `cfg` says, track it in MLflow, and return its final metrics and run id.

    Everything that can be wrong with the input is checked before the MLflow run is created, so
    bad input leaves no run behind.
    """
    job = prepare(cfg)
    if job.done is not None:
        return skip(job)
    signals = StopSignals()
    recorder = open_run(job, signals, extra_tags)
    with recorder.running(), signals.installed():
        return _fit_one(job, recorder)


def _fit_one(job: Job, recorder: Recorder) -> dict[str, Any]:
    from .model import build_net
    from .training import NonFiniteLoss, evaluate, fit, make_trainer, to_device

    cfg = job.cfg
    with job.clock("setup"):
        seed_everything(cfg.seed)
        train_d, test_d = to_device(job.train_split, job.ctx), to_device(job.test_split, job.ctx)
        net = build_net(cfg.model.num_outputs, cfg.model.sigma, job.ctx, cfg.seed)
        trainer = make_trainer(net, cfg.optim.lr, cfg.optim.momentum, cfg.optim.wd)
        rng, start_epoch = np.random.default_rng(cfg.seed), 1
        if job.resumed is not None:
            done_epochs, rng = checkpoint.load(job.resumed.checkpoint, net, trainer)
            start_epoch = done_epochs + 1
            job.log.info("resuming run %s after epoch %d", recorder.run.run_id, done_epochs)
        else:
            untrained = evaluate(net, train_d, test_d, cfg.trainer.eval_batch_size)
    if job.resumed is None:
        recorder.begin(*untrained)
    try:
        history = fit(
            net, trainer, train_d, test_d,
            epochs=cfg.trainer.epochs, batch_size=cfg.data.batch_size, seed=cfg.seed,
            eval_chunk=cfg.trainer.eval_batch_size, on_epoch=lambda m: recorder.epoch(m, net, trainer, rng),
            stop_on_nonfinite=cfg.trainer.stop_on_nonfinite, start_epoch=start_epoch, rng=rng,
        )
    except NonFiniteLoss as exc:
        return recorder.nonfinite(str(exc))
    return recorder.finish(net, test_d, history)


def stack_key(job: Job) -> tuple:
    """Jobs with equal keys see the same batch stream and can train as one stack: same data files,
    batch size, seed, epochs, context, scoring and divergence rule, model width and momentum (one
    value per update kernel call). lr, sigma and wd vary freely inside a stack."""
    cfg = job.cfg
    return (job.files.digest(), cfg.data.batch_size, cfg.seed, cfg.trainer.epochs, str(job.ctx),
            cfg.trainer.eval_batch_size, cfg.trainer.stop_on_nonfinite, cfg.model.num_outputs,
            cfg.optim.momentum)


def train_stack(jobs: Sequence[Job], group: str) -> list[dict[str, Any] | Exception]:
    """Train prepared, not-skipped jobs that share a stack_key as one Stack. Each gets its own run,
    tagged with the group, with the records `train` would give it; the result (or the exception
    that ended it) of each, in order. Ctrl-C or SIGTERM ends every run KILLED and is re-raised."""
    from .stack import MemberSpec, Stack
    from .training import to_device

    assert len({stack_key(j) for j in jobs}) == 1, "train_stack needs jobs with one stack_key"
    results: list[dict[str, Any] | Exception | None] = [None] * len(jobs)
    signals = StopSignals()
    tags = {"stack.group": group, "stack.size": str(len(jobs))}
    with contextlib.ExitStack() as ends:
        recorders = []
        for job in jobs:
            recorder = open_run(job, signals, {**tags, "stack.index": str(len(recorders))})
            ends.enter_context(recorder.running())
            recorders.append(recorder)
        ends.enter_context(signals.installed())
        first, cfg = jobs[0], jobs[0].cfg
        with first.clock("setup"):
            seed_everything(cfg.seed)
            train_d, test_d = to_device(first.train_split, first.ctx), to_device(first.test_split, first.ctx)
            specs = [MemberSpec(j.cfg.model.sigma, j.cfg.optim.lr, j.cfg.optim.momentum, j.cfg.optim.wd)
                     for j in jobs]
            stack = Stack(specs, cfg.model.num_outputs, first.ctx, cfg.seed)
            untrained = stack.evaluate(train_d, test_d, cfg.trainer.eval_batch_size)
        for recorder, accs in zip(recorders, untrained):
            recorder.begin(*accs)
        rng = np.random.default_rng(cfg.seed)

        def on_nonfinite(member, reason: str) -> None:
            results[member.index] = recorders[member.index].nonfinite(reason)

        stack.fit(
            train_d, test_d, epochs=cfg.trainer.epochs, batch_size=cfg.data.batch_size, seed=cfg.seed,
            eval_chunk=cfg.trainer.eval_batch_size, stop_on_nonfinite=cfg.trainer.stop_on_nonfinite, rng=rng,
            on_epoch=lambda member, m: recorders[member.index].epoch(m, member.net, member.trainer, rng),
            on_nonfinite=on_nonfinite,
        )
        for member, recorder in zip(stack.members, recorders):
            if member.failed is None:
                try:
                    results[member.index] = recorder.finish(member.net, test_d, member.history)
                except Exception as exc:  # this run ends FAILED; the others still finish
                    recorder.log.error("run %s: %s", recorder.run.run_id, exc)
                    results[member.index] = exc
    return results  # type: ignore[return-value]


def objective(result: dict[str, Any]) -> float:
    """What a job returns to Hydra (the optuna sweeper's objective): the final test accuracy."""
    return result.get("test_acc", float("nan"))


def main(cfg: DictConfig) -> dict[str, Any]:
    """run.py's entry. Outside a multirun, bad input exits with one line (Hydra would add its own)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .errors import exit_on_error

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        with exit_on_error():
            return train(cfg)
    try:
        return train(cfg)
    except KeyboardInterrupt:
        _leave_worker_quietly()
        raise


def _leave_worker_quietly() -> None:
    """In a joblib (loky) worker, a stopped job has ended its run KILLED; the worker then exits at
    once, instead of unwinding into MXNet's teardown, which prints tracebacks while the launching
    process prints its one line."""
    import multiprocessing
    import os
    import sys

    if multiprocessing.current_process().name.startswith("LokyProcess"):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
