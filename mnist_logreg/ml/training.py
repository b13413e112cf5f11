"""The one training loop, `fit`, for one model (`Lone`) or many on one batch stream (`stack.Stack`).

The tutorial's maths on preloaded device arrays, with one device sync per phase. Each model of the
loop is a `Member`: its own Dense and gluon.Trainer, its history and, once its loss diverged, why.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from .data import Split
from .model import NetWithLoss


@dataclass(frozen=True)
class DeviceSplit:
    """A split held on the training context: x (N, 784) float32, y (N,) float32."""

    x: nd.NDArray
    y: nd.NDArray

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch logs at step `epoch`."""

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    epoch_seconds: float
    eval_seconds: float
    examples_per_second: float
    val_acc: float | None = None  # with a validation split (data.val_size)

    def as_metrics(self) -> dict[str, float]:
        """The loggable values (all but the step; val_acc only with a validation split)."""
        d = asdict(self)
        d.pop("epoch")
        if d["val_acc"] is None:
            d.pop("val_acc")
        return d


# (id of the host split, context) -> (the host split, its device copy). Holding the split keeps
# its id from being reused by another object while the entry lives.
_DEVICE_CACHE: dict[tuple[int, str], tuple[Split, DeviceSplit]] = {}


def to_device(split: Split, ctx: mx.Context) -> DeviceSplit:
    """Copy a split onto ctx once per process (the jobs of a sweep share it)."""
    key = (id(split), str(ctx))
    if key not in _DEVICE_CACHE:
        if len(_DEVICE_CACHE) >= 4:  # an old dataset or context: let it go
            _DEVICE_CACHE.clear()
        # Scaled on the device: float32(v) / 255 there is bit-identical to numpy's for all 256 bytes
        # (tests/test_training.py checks), and the host keeps only the uint8 pixels.
        # Divided in place: a second float32 copy of the images would stay in MXNet's memory pool
        # (140 MB of peak memory for 60,000 images), and the quotient is the same to the bit.
        pixels = nd.array(split.images, ctx=ctx, dtype=np.uint8).astype(np.float32)
        pixels /= 255
        device = DeviceSplit(pixels, nd.array(split.labels, ctx=ctx, dtype=np.uint8).astype(np.float32))
        _DEVICE_CACHE[key] = (split, device)
    return _DEVICE_CACHE[key][1]


def accuracy_count(net: gluon.HybridBlock, split: DeviceSplit, chunk: int) -> nd.NDArray:
    """Number of correctly classified examples, as a 1-element NDArray (no device sync)."""
    correct = nd.zeros((1,), ctx=split.x.context)
    for start in range(0, len(split), chunk):
        out = net(split.x[start : start + chunk])
        correct += (nd.argmax(out, axis=1) == split.y[start : start + chunk]).sum()
    return correct


def predicted_labels(net: gluon.HybridBlock, split: DeviceSplit, chunk: int) -> np.ndarray:
    """The net's label for every example of split, chunk by chunk as it is scored (int64)."""
    return np.concatenate([nd.argmax(net(split.x[start : start + chunk]), axis=1).asnumpy()
                           for start in range(0, len(split), chunk)]).astype(np.int64)


def evaluate(net: gluon.HybridBlock, train: DeviceSplit, test: DeviceSplit, chunk: int,
             val: DeviceSplit | None = None) -> tuple[float, ...]:
    """Accuracy on the train and the test split (and the validation split, if any), with a single
    device sync."""
    splits = [train, test] + ([val] if val is not None else [])
    counts = nd.concat(*(accuracy_count(net, split, chunk) for split in splits), dim=0).asnumpy().tolist()
    return tuple(c / len(split) for c, split in zip(counts, splits))


def make_trainer(net: gluon.Block, lr: float, momentum: float = 0.0, wd: float = 0.0) -> gluon.Trainer:
    """gluon.Trainer with SGD, as in the tutorial (momentum and weight decay default to off)."""
    params = {"learning_rate": lr}
    if momentum:
        params["momentum"] = momentum
    if wd:
        params["wd"] = wd
    return gluon.Trainer(net.collect_params(), "sgd", params, kvstore=None)


def run_epoch(loss_block: gluon.HybridBlock, update: Callable[[int], None], train: DeviceSplit, batch_size: int,
              rng: np.random.Generator) -> tuple[nd.NDArray, float]:
    """One epoch of mini-batches in the order rng.permutation(n): for each batch, the loss under
    autograd, backward, update(batch_size). Returns the per-example losses, concatenated on the
    device (nothing waits for them), and the time the epoch started.

    The shuffled examples are gathered a few thousand at a time (whole batches each): the same
    batches as one gather of the whole split, without a second copy of the images (188 MB for
    60,000) held through the epoch."""
    order = nd.array(rng.permutation(len(train)), ctx=train.x.context, dtype=np.int64)
    per = max(1, GATHER_ROWS // batch_size) * batch_size
    losses = []
    t0 = time.perf_counter()
    for lo in range(0, len(train), per):
        rows = order[lo : lo + per]
        xs, ys = nd.take(train.x, rows), nd.take(train.y, rows)
        for start in range(0, len(rows), batch_size):
            xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
            with autograd.record():
                loss = loss_block(xb, yb)
            loss.backward()
            update(batch_size)
            losses.append(loss)
    return nd.concat(*losses, dim=0), t0


GATHER_ROWS = 8192  # shuffled training examples gathered at once (rounded down to whole batches)


@dataclass
class Member:
    """One model of a loop: a Dense and its gluon.Trainer, so checkpoints, scoring and export see an
    ordinary Gluon model; `failed` says why it stopped (its loss went NaN or infinite), `stopped`
    why it was told to stop (a search pruned it)."""

    index: int
    net: gluon.nn.Dense
    trainer: gluon.Trainer
    failed: str | None = None
    stopped: str | None = None
    history: list[EpochMetrics] = field(default_factory=list)


class Models(Protocol):
    """What `fit` trains: members on one batch stream, one loss block and one update for all of them."""

    members: Sequence[Member]
    block: gluon.HybridBlock  # (x, y) -> per-example losses: (B,) for one model, (B, K) for K

    def step(self, batch_size: int) -> None: ...

    def mean_losses(self, losses: nd.NDArray) -> list[float]: ...

    def evaluate(self, train: DeviceSplit, test: DeviceSplit, chunk: int,
                 val: DeviceSplit | None = None) -> list[tuple[float, ...]]: ...

    def predictions(self, split: DeviceSplit, chunk: int, which: Sequence[int]) -> dict[int, np.ndarray]:
        """The labels members `which` give every example of split, as evaluate counts them."""


class Lone:
    """One model through gluon.Trainer, as the tutorial trains it."""

    def __init__(self, net: gluon.HybridBlock, trainer: gluon.Trainer) -> None:
        self.members = [Member(0, net, trainer)]
        self.block = NetWithLoss(net)
        self.block.hybridize(static_alloc=True)
        self.step = trainer.step

    def mean_losses(self, losses: nd.NDArray) -> list[float]:
        """The epoch's mean loss: one sum over the per-example losses, in float64, and the epoch's only wait."""
        return [losses.astype(np.float64).sum().asscalar() / len(losses)]

    def evaluate(self, train: DeviceSplit, test: DeviceSplit, chunk: int,
                 val: DeviceSplit | None = None) -> list[tuple[float, ...]]:
        return [evaluate(self.members[0].net, train, test, chunk, val)]

    def predictions(self, split: DeviceSplit, chunk: int, which: Sequence[int]) -> dict[int, np.ndarray]:
        return {0: predicted_labels(self.members[0].net, split, chunk)} if 0 in which else {}


def fit(
    models: Models,
    train: DeviceSplit,
    test: DeviceSplit,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    eval_chunk: int = 10000,
    on_epoch: Callable[[Member, EpochMetrics], str | None] = lambda member, m: None,
    on_nonfinite: Callable[[Member, str], None] = lambda member, why: None,
    on_epoch_done: Callable[[int, list[Member]], None] = lambda epoch, going: None,
    stop_on_nonfinite: bool = True,
    start_epoch: int = 1,
    rng: np.random.Generator | None = None,
    val: DeviceSplit | None = None,
) -> Sequence[Member]:
    """Train epochs start_epoch..epochs of shuffled mini-batches; return the members, each with its history.

    The batch order of each epoch is rng.permutation(n) (rng default: np.random.default_rng(seed));
    a resumed run passes the generator restored from its checkpoint. Each batch does what the
    tutorial does: forward and softmax cross-entropy under autograd, backward, one SGD step. The
    losses stay on the device until the epoch ends; the host waits once after training an epoch
    and once after scoring it.

    After each epoch, on_epoch(member, metrics) runs for every member still going, then
    on_epoch_done(epoch, those members) once. When on_epoch returns a reason, the member stops there
    (`member.stopped`): it gets no more callbacks, and in a stack its rows keep training harmlessly,
    as a diverged member's do. A member whose
    epoch loss is NaN or infinite (with stop_on_nonfinite) gets on_nonfinite(member, reason) once and
    no more callbacks; in a stack its rows keep training harmlessly (rows never mix), and the others
    are unchanged to the bit. The loop ends early when no member is left.
    """
    n = len(train)
    rng = rng if rng is not None else np.random.default_rng(seed)
    for epoch in range(start_epoch, epochs + 1):
        losses, t0 = run_epoch(models.block, models.step, train, batch_size, rng)
        train_losses = models.mean_losses(losses)
        epoch_seconds = time.perf_counter() - t0
        going = []
        for member in models.members:
            if member.failed is not None or member.stopped is not None:
                continue
            if stop_on_nonfinite and not math.isfinite(train_losses[member.index]):
                member.failed = f"epoch {epoch}: mean training loss is {train_losses[member.index]}"
                on_nonfinite(member, member.failed)
            else:
                going.append(member)
        if not going:
            break
        t1 = time.perf_counter()
        accs = models.evaluate(train, test, eval_chunk, val)
        eval_seconds = time.perf_counter() - t1
        for member in going:
            train_acc, test_acc, *val_acc = accs[member.index]
            metrics = EpochMetrics(epoch, train_losses[member.index], train_acc, test_acc, epoch_seconds,
                                   eval_seconds, n / epoch_seconds, val_acc[0] if val_acc else None)
            member.history.append(metrics)
            member.stopped = on_epoch(member, metrics) or None
        on_epoch_done(epoch, going)
        if all(m.failed is not None or m.stopped is not None for m in models.members):
            break
    return models.members
