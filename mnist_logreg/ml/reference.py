"""The tutorial's own training loop, written once: the yardstick for the fast path's maths (tests)
and its speed (bench).

As in the tutorial: a DataLoader over uint8 NDArray images with a per-sample transform to float32
in [0, 1], softmax cross-entropy under autograd, `trainer.step(batch_size)` and a sync per batch
(`asscalar` of the batch loss), then `metric.Accuracy` over both splits after every epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from .data import Split


@dataclass(frozen=True)
class ReferenceEpoch:
    train_loss: float
    train_acc: float
    test_acc: float
    train_seconds: float
    eval_seconds: float


class HarnessOrder(gluon.data.Sampler):
    """Epoch after epoch, the batch order the harness promises for a seed: a permutation drawn
    from np.random.default_rng(seed) per epoch (what training.fit uses)."""

    def __init__(self, seed: int, n: int) -> None:
        self._rng, self._n = np.random.default_rng(seed), n

    def __iter__(self):
        return iter(self._rng.permutation(self._n).tolist())

    def __len__(self) -> int:
        return self._n


def tutorial_net(sigma: float, seed: int, ctx: mx.Context = mx.cpu()) -> gluon.nn.Dense:
    """The tutorial's model: Dense(10) with Normal(sigma) weights, its input size left to Gluon."""
    mx.random.seed(seed)
    net = gluon.nn.Dense(10)
    net.collect_params().initialize(mx.init.Normal(sigma=sigma), ctx=ctx)
    return net


def tutorial_loop(net: gluon.Block, train: Split, test: Split, *, epochs: int, batch_size: int, lr: float,
                  seed: int) -> list[ReferenceEpoch]:
    """Train net the tutorial's way, with the harness's batch order for seed; one record per epoch."""

    def transform(data, label):
        return data.astype(np.float32) / 255, label.astype(np.float32)

    def dataset(split: Split):
        images = nd.array(split.images.reshape(-1, 28, 28, 1), dtype=np.uint8)
        return gluon.data.ArrayDataset(images, split.labels.astype(np.int32)).transform(transform)

    train_ds, test_ds = dataset(train), dataset(test)
    train_data = gluon.data.DataLoader(train_ds, batch_size, sampler=HarnessOrder(seed, len(train.labels)))
    train_eval = gluon.data.DataLoader(train_ds, batch_size, shuffle=False)
    test_data = gluon.data.DataLoader(test_ds, batch_size, shuffle=False)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr})

    def evaluate_accuracy(data_iterator) -> float:
        acc = mx.metric.Accuracy()
        for data, label in data_iterator:
            acc.update(preds=nd.argmax(net(data.reshape((-1, 784))), axis=1), labels=label)
        return acc.get()[1]

    history = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        cumulative_loss = 0.0
        for data, label in train_data:
            with autograd.record():
                loss = loss_fn(net(data.reshape((-1, 784))), label)
            loss.backward()
            trainer.step(batch_size)
            cumulative_loss += nd.sum(loss).asscalar()
        t1 = time.perf_counter()
        train_acc, test_acc = evaluate_accuracy(train_eval), evaluate_accuracy(test_data)
        history.append(ReferenceEpoch(cumulative_loss / len(train.labels), train_acc, test_acc, t1 - t0,
                                      time.perf_counter() - t1))
    return history
