"""The one lifecycle of a job, alone or in a stack: open its run, train, record every epoch, finish, end.

    train_jobs([job])            one model through gluon.Trainer (run.py, reproduce, resume, per-job launchers)
    train_jobs(jobs, group)      jobs that share a stack_key as one Stack
    Training(jobs, group)        the same, step by step, for the stacked launcher, which trains the next
                                 stack while a record writer writes one stack's last records

Either way each job gets its own MLflow run with the same records; only the models `fit` trains differ.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np

from ..tracking import writer
from ..tracking.writer import WriteFailed
from .prepare import Job, seed_everything
from .recorder import Recorder, open_run
from .signals import JobSignals


def batch_stream(cfg, data_digest: str, device: str, start_epoch: int) -> tuple:
    """What jobs must share to train as one stack, from their config: the same data files, batch
    size, seed, epochs, device, scoring and divergence rule, model width and momentum (one value per
    update kernel call), the same validation split, and the same epochs already done (a continued job starts where its
    checkpoint ends; its batch order is then the same generator state as its stack-mates'). lr,
    sigma and wd vary freely inside a stack."""
    return (data_digest, cfg.data.batch_size, cfg.seed, cfg.trainer.epochs, device, cfg.trainer.eval_batch_size,
            cfg.trainer.stop_on_nonfinite, cfg.model.num_outputs, cfg.optim.momentum, start_epoch,
            cfg.data.get("val_size", 0), cfg.data.get("val_seed", 0))


def stack_key(job: Job) -> tuple:
    """A prepared job's batch stream (jobs with equal keys train as one stack)."""
    return batch_stream(job.cfg, job.files.digest(), str(job.ctx), job.start_epoch)


class Objective(float):
    """What a job returns to Hydra: its objective, a float as any sweeper reads it, that also names
    its MLflow run and the run's status (the optuna sweeper links each trial to its run)."""

    run_id: str | None
    status: str | None

    def __new__(cls, value: float, run_id: str | None = None, status: str | None = None) -> "Objective":
        made = super().__new__(cls, value)
        made.run_id, made.status = run_id, status
        return made

    def __reduce__(self):  # a joblib worker or a Slurm task sends it back pickled
        return (Objective, (float(self), self.run_id, self.status))


def objective(result: dict[str, Any]) -> Objective:
    """A job's result as what it returns to Hydra: the final validation accuracy with a validation
    split (data.val_size), else the final test accuracy (NaN for a run that did not finish), with
    the run's id and status."""
    value = result.get("val_acc", result.get("test_acc", float("nan")))
    return Objective(value, result.get("run_id"), result.get("status"))


# A search's say over its trials after each epoch (sweep.search sets it in the launching process):
# judge(job, metrics) returns a reason to stop that job's run there (it is pruned), or None.
_epoch_judge: Callable[[Job, Any], str | None] | None = None


def set_epoch_judge(judge: Callable[[Job, Any], str | None] | None) -> None:
    global _epoch_judge
    _epoch_judge = judge


def train_jobs(jobs: Sequence[Job], group: str | None = None, extra_tags: dict[str, str] | None = None,
               run_name: str | None = None, on_stack: Callable[[str], None] | None = None,
               on_epoch_done: Callable[[int, dict[int, Any]], None] | None = None
               ) -> list[dict[str, Any] | Exception]:
    """Train prepared, not-skipped jobs: one alone (group None), or several that share a stack_key as
    one stack tagged with `group`, whose products are as wide as the width probe allows (on_stack is
    told how many, in words). After each epoch, once every run has recorded it, on_epoch_done(epoch,
    {job index: its EpochMetrics}) hears of the jobs still going. Returns each job's result, or the
    exception that ended its run (a lone job raises it instead). Ctrl-C or SIGTERM ends every run
    KILLED and is re-raised."""
    training = Training(jobs, group, extra_tags, run_name, on_stack, on_epoch_done)
    # The handlers stay installed until every run has ended, so that a stop is never cut short.
    with training.signals.installed():
        try:
            training.open()
            training.train()
            training.send()
        except BaseException as exc:
            training.end(exc)
            raise
        results = training.end()
    if group is None and isinstance(results[0], Exception):
        raise results[0]
    return results


class Training:
    """The runs of one job alone (group None) or of one stack, from their opening to their end, in
    steps that a launcher may interleave with the next stack's:

        open()    the runs asked for (with a record writer, created while the stack sets up)
        train()   set up, the untrained scores, every epoch trained and recorded
        send()    each run's last records: its weights' hash and files (and with a record writer
                  its end, written once they are)
        end(exc)  what was sent waited for, every run ended (KILLED, FAILED or FINISHED), and each
                  job's result returned; with exc (what stopped an earlier step), every unfinished
                  run ends by it

    `signals` (JobSignals) must be installed by the caller around every step, end included: one
    instance for every stack a launcher has going at once."""

    def __init__(self, jobs: Sequence[Job], group: str | None = None, extra_tags: dict[str, str] | None = None,
                 run_name: str | None = None, on_stack: Callable[[str], None] | None = None,
                 on_epoch_done: Callable[[int, dict[int, Any]], None] | None = None,
                 signals: JobSignals | None = None) -> None:
        if group is None and len(jobs) != 1:
            raise ValueError("train_jobs trains one job alone, or a named group as a stack")
        if group is not None and len({stack_key(j) for j in jobs}) != 1:
            raise ValueError("a stack needs jobs with one stack_key")
        self.jobs, self.group, self.run_name = jobs, group, run_name
        self.on_stack, self.on_epoch_done = on_stack, on_epoch_done
        self.signals = signals or JobSignals()
        self.results: list[dict[str, Any] | Exception | None] = [None] * len(jobs)
        self.tags = dict(extra_tags or {})
        self.width = None
        self.openings: list[Callable[[], Recorder]] = []
        self.recorders: list[Recorder] = []
        self.ends = contextlib.ExitStack()  # each recorder's running(): the run's end
        self.models = self.test = self.untrained = None
        self._started = False  # whether the runs were opened and given their first records
        self._ended = False

    def open(self) -> None:
        jobs, group = self.jobs, self.group
        if group is not None:
            self.width = stack_width(jobs)
            self.tags.update({"stack.group": group, "stack.size": str(len(jobs)),
                              "stack.width": str(self.width.width)})
            if self.on_stack is not None:
                self.on_stack(self.width.describe())
        with self.signals.deferred():  # a signal while the runs are created ends them KILLED, once they exist
            self.openings = [open_run(job, self.signals, {**self.tags, **({"stack.index": str(i)} if group else {})},
                                      self.run_name) for i, job in enumerate(jobs)]

    def train(self) -> None:
        """Set up and train. With a record writer, the new runs are created while the stack sets up
        and trains its first epoch: they are opened (and their params and step 0 written) as that
        epoch ends; otherwise before it starts."""
        try:
            ready = _setup(self.jobs, self._width())
        except BaseException:
            self._collect()  # every run that was asked for is opened, so that each one ends
            raise
        self.models, self.test, self.untrained = ready[3], ready[1], ready[4]
        lazy = ready[4] is not None and isinstance(writer.deferring(self.jobs[0].client), writer.Deferring)
        _fit(self.jobs, self._width(), self._start, self.results, ready, self.on_epoch_done, lazy)

    def _start(self) -> list[Recorder]:
        """The runs, opened, with their first records written (params and step 0, or where a
        resumed run stood): once."""
        if not self._started:
            self._started = True
            failure = self._collect()
            if failure is not None:
                raise failure
            if self.untrained is not None:
                for recorder, accs in zip(self.recorders, self.untrained):
                    recorder.begin(*accs)
            else:
                for recorder in self.recorders:
                    recorder.resume()
        return self.recorders

    def send(self, last: bool = True) -> None:
        """Each run's weights hash and artifacts, sent one after another (a record writer writes
        them while the caller goes on). last: nothing trains after this stack, so this process
        stages most runs' files (pictures, environment, logged model) itself while the writer
        uploads (a quarter of the runs the writer stages too, first, so that both finish about
        together; without last, the writer stages them all). Called again after a stop cut it
        short, it sends the rest."""
        members = self.models.members if self.models is not None else []
        todo = [(m, r) for m, r in zip(members, self.recorders) if m.failed is None and not r.sent]
        if not todo:
            return
        predicted = self.models.predictions(self.test, self.jobs[0].cfg.trainer.eval_batch_size,
                                            [m.index for m, _ in todo])
        if not last:  # the next stack's epochs are written first
            writer.background(todo[0][1].run.client, [r.run.run_id for _, r in todo])
        staged_there = len(todo) // 4 if last else len(todo)
        for n, (member, recorder) in enumerate(todo):
            try:
                if member.stopped is not None and "pruned" not in recorder.result:
                    recorder.pruned(member.stopped, member.history[-1].epoch)
                recorder.finish(member.net, self.test, member.history, predicted.get(member.index),
                                stage=n >= staged_there)
            except Exception as exc:  # this run ends FAILED; the others of its stack still finish
                member.failed = member.failed or str(exc)
                _failed(self.width is not None, member, recorder, exc, self.results)

    def written(self) -> bool:
        """Whether a record writer has written everything send() sent (end() would not wait)."""
        marks = [r.sent_upto for r in self.recorders if r.sent and r.sent_upto is not None]
        return not marks or writer.written(self.recorders[0].run.client, max(marks))

    def end(self, exc: BaseException | None = None) -> list[dict[str, Any] | Exception]:
        if self._ended:
            return self.results  # type: ignore[return-value]
        self._ended = True
        if exc is not None and self.models is not None and not self._started:
            try:  # stopped before its first epoch ended: its runs still get their params and step 0
                self._start()
            except Exception:  # noqa: BLE001 - the runs end by exc either way
                pass
        self._collect()
        try:
            if exc is None:
                members = self.models.members if self.models is not None else []
                for member, recorder in zip(members, self.recorders):
                    if recorder.sent:  # confirmed: a record writer wrote them meanwhile
                        try:
                            self.results[member.index] = recorder.finished()
                        except Exception as caught:
                            _failed(self.width is not None, member, recorder, caught, self.results)
        except BaseException as caught:
            exc = caught
            raise
        finally:
            self._close(exc)
        return self.results  # type: ignore[return-value]

    def _width(self) -> int | None:
        return self.width.width if self.width is not None else None

    def _collect(self) -> Exception | None:
        """Open every run asked for (waiting for a record writer's creation of it), and enter its
        end; the first opening that failed."""
        failure = None
        with self.signals.deferred():
            for opening in self.openings:
                try:
                    recorder = opening()
                except Exception as exc:
                    failure = failure or exc
                    continue
                self.ends.enter_context(recorder.running())
                self.recorders.append(recorder)
            self.openings = []
        return failure

    def _close(self, exc: BaseException | None) -> None:
        """End every run (each recorder's running() sees exc, as a with block's body raising it)."""
        if exc is None:
            self.ends.close()
            return
        try:
            self.ends.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException as raised:
            if raised is not exc:
                raise


def _failed(stacked: bool, member, recorder: Recorder, exc: Exception, results: list) -> None:
    """This run ends FAILED, its stack goes on (a lone job raises it instead, and its caller tells it)."""
    if stacked:
        recorder.log.error("run %s: %s", recorder.run.run_id, exc)
        recorder.reported = True
    results[member.index] = exc


def stack_width(jobs: Sequence[Job]):
    """The width probe's answer for these jobs as one stack (`ml.probe.Width`), at the shapes they run."""
    from ..ml.probe import run_shapes, widest_exact

    first, cfg = jobs[0], jobs[0].cfg
    with first.clock("setup"):
        val = first.val_split
        shapes = run_shapes(len(first.train_split.labels), len(first.test_split.labels), cfg.data.batch_size,
                            cfg.trainer.eval_batch_size, len(val.labels) if val is not None else 0)
        return widest_exact(len(jobs), cfg.model.num_outputs, first.ctx, shapes)


def _setup(jobs: Sequence[Job], width: int | None) -> tuple:
    """The data on the device, the models, the untrained accuracies (None on resume), the first epoch
    and the batch-order generator."""
    from ..ml.training import to_device

    first, cfg = jobs[0], jobs[0].cfg
    with first.clock("setup"):
        seed_everything(cfg.seed)
        train_d, test_d = to_device(first.train_split, first.ctx), to_device(first.test_split, first.ctx)
        val_d = to_device(first.val_split, first.ctx) if first.val_split is not None else None
        return (train_d, test_d, val_d, *_models(jobs, width, train_d, test_d, val_d))


def _fit(jobs: Sequence[Job], width: int | None, start: Callable[[], list[Recorder]], results: list,
         ready: tuple, on_epoch_done: Callable[[int, dict[int, Any]], None] | None = None, lazy: bool = False) -> None:
    """fit the models, recording each epoch in the runs start() opens and begins (lazy: once the
    first epoch has trained, when a record writer has had it to create them)."""
    from ..ml.training import fit

    cfg = jobs[0].cfg
    train_d, test_d, val_d, models, _, start_epoch, rng = ready
    if not lazy:
        start()

    def on_nonfinite(member, reason: str) -> None:
        results[member.index] = start()[member.index].nonfinite(reason)

    def on_epoch(member, m) -> str | None:
        recorder = start()[member.index]
        recorder.signals.check()  # a stop that a finaliser swallowed takes effect here, before this epoch's records
        try:
            recorder.epoch(m, member.net, member.trainer, rng)
        except WriteFailed as exc:  # a record writer could not write this run's records
            member.failed = str(exc)
            _failed(width is not None, member, recorder, exc, results)
            return None
        return _epoch_judge(jobs[member.index], m) if _epoch_judge is not None else None

    fit(models, train_d, test_d, epochs=cfg.trainer.epochs, batch_size=cfg.data.batch_size, seed=cfg.seed,
        eval_chunk=cfg.trainer.eval_batch_size, stop_on_nonfinite=cfg.trainer.stop_on_nonfinite,
        start_epoch=start_epoch, rng=rng, on_nonfinite=on_nonfinite, on_epoch=on_epoch, val=val_d,
        on_epoch_done=lambda epoch, going: on_epoch_done and on_epoch_done(
            epoch, {member.index: member.history[-1] for member in going}))
    start()  # (a fit of no epoch)


def _models(jobs: Sequence[Job], width: int | None, train_d, test_d, val_d=None):
    """What fit trains, the untrained accuracies (None on resume), the first epoch and the batch-order
    generator: a Lone model (restored from its checkpoint on resume), or a Stack of products `width` wide."""
    from ..ml import checkpoint
    from ..ml.model import build_net
    from ..ml.stack import MemberSpec, Stack
    from ..ml.training import Lone, evaluate, make_trainer

    cfg, job = jobs[0].cfg, jobs[0]
    rng, start_epoch = np.random.default_rng(cfg.seed), job.start_epoch + 1
    if width is not None:
        specs = [MemberSpec(j.cfg.model.sigma, j.cfg.optim.lr, j.cfg.optim.momentum, j.cfg.optim.wd) for j in jobs]
        states = []

        def restore(member) -> None:
            done, member_rng = checkpoint.load(jobs[member.index].resumed.checkpoint, member.net, member.trainer)
            states.append(member_rng.bit_generator.state)

        stack = Stack(specs, cfg.model.num_outputs, job.ctx, cfg.seed, width, restore if start_epoch > 1 else None)
        if start_epoch == 1:
            untrained = stack.evaluate_untrained(train_d, test_d, cfg.trainer.eval_batch_size, val_d)
            return stack, untrained, start_epoch, rng
        if any(state != states[0] for state in states):
            raise ValueError("a stack's members continue from different batch orders (see stack_key)")
        rng.bit_generator.state = states[0]
        job.log.info("continuing %d runs of this stack after epoch %d", len(jobs), start_epoch - 1)
        return stack, None, start_epoch, rng
    net = build_net(cfg.model.num_outputs, cfg.model.sigma, job.ctx, cfg.seed)
    trainer = make_trainer(net, cfg.optim.lr, cfg.optim.momentum, cfg.optim.wd)
    untrained = None
    if start_epoch > 1:
        done_epochs, rng = checkpoint.load(job.resumed.checkpoint, net, trainer)
        job.log.info("resuming run %s after epoch %d", job.resumed.run.info.run_id, done_epochs)
    else:  # scored before Lone hybridizes the net, as every logged run's step 0 was
        untrained = [evaluate(net, train_d, test_d, cfg.trainer.eval_batch_size, val_d)]
    return Lone(net, trainer), untrained, start_epoch, rng
