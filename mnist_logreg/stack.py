"""K models on one batch stream, in one graph, with one update per batch: bit-identical to `fit`.

K `Dense(10)` models that see the same batches (same data, batch size, seed, epochs) are held as
the rows of one wide `Dense(10*K)`. Each batch runs one forward pass, one softmax cross-entropy
over the (B, K, 10) scores, and one backward pass. The update then calls the very kernel that
`gluon.Trainer` calls for SGD, `multi_sgd_update` (or `multi_sgd_mom_update`), once for all
models: its inputs are each model's rows of the wide weight, bias and gradients (views, no
copies), each with the model's own learning rate and weight decay. Momentum is one value per
kernel call, so models with different momentum are never stacked together (see `job.stack_key`).

That each model's numbers then equal `fit`'s to the bit is a property of MXNet's CPU kernels on
this machine, not a law: tests/test_stack.py checks it for K = 1, 3 and 9, and `reproduce` checks
every run it is given.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon, nd

from .model import NUM_INPUTS, build_net
from .training import DeviceSplit, EpochMetrics, make_trainer, run_epoch


@dataclass(frozen=True)
class MemberSpec:
    """What may differ between the models of one stack."""

    sigma: float
    lr: float
    momentum: float = 0.0
    wd: float = 0.0


@dataclass
class Member:
    """One model of a stack: its own Dense(10) and gluon.Trainer, filled from the wide arrays on demand
    (for checkpoints, scoring plots, export), so everything downstream sees an ordinary `fit` model."""

    index: int
    spec: MemberSpec
    net: gluon.nn.Dense
    trainer: gluon.Trainer
    failed: str | None = None
    history: list[EpochMetrics] = field(default_factory=list)


# Arrays one multi_sgd kernel call takes at most (MultiSGDKernelParam::N is 60 in MXNet 1.9).
_KERNEL_ARRAYS = 60


class StackedLoss(gluon.HybridBlock):
    """Wide Dense(num_outputs * k), then each model's softmax cross-entropy: (B, k) losses."""

    def __init__(self, k: int, num_outputs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k, self.num_outputs = k, num_outputs
        with self.name_scope():
            self.dense = gluon.nn.Dense(num_outputs * k, in_units=NUM_INPUTS)

    def hybrid_forward(self, F, x, y):  # noqa: N803 (Gluon's signature)
        scores = self.dense(x).reshape((0, self.k, self.num_outputs))
        labels = F.broadcast_axis(y.reshape((-1, 1)), axis=1, size=self.k)
        return -F.pick(F.log_softmax(scores, axis=-1), labels, axis=-1)


class Stack:
    """K models of shape Dense(num_outputs) trained together. `members[i]` is model i."""

    def __init__(self, specs: Sequence[MemberSpec], num_outputs: int, ctx: mx.Context, seed: int) -> None:
        self.k, self.num_outputs, self.ctx = len(specs), num_outputs, ctx
        self.members: list[Member] = []
        for i, spec in enumerate(specs):  # each model drawn exactly as build_net draws it alone
            net = build_net(num_outputs, spec.sigma, ctx, seed)
            net.hybridize(static_alloc=True)  # as fit's NetWithLoss leaves it: net.export needs a graph
            net(nd.zeros((1, NUM_INPUTS), ctx=ctx))
            self.members.append(Member(i, spec, net, make_trainer(net, spec.lr, spec.momentum, spec.wd)))
        self.block = StackedLoss(self.k, num_outputs)
        self.block.initialize(ctx=ctx)
        self.weight, self.bias = self.block.dense.weight, self.block.dense.bias
        self.weight.set_data(nd.concat(*[m.net.weight.data() for m in self.members], dim=0))
        self.bias.set_data(nd.concat(*[m.net.bias.data() for m in self.members], dim=0))
        self.block.hybridize(static_alloc=True)

        self.momentum = specs[0].momentum
        if any(spec.momentum != self.momentum for spec in specs):
            raise ValueError("a stack mixes momentum values: group them apart (see job.stack_key)")
        if int(os.environ.get("MXNET_OPTIMIZER_AGGREGATION_SIZE", "4")) <= 1:
            raise ValueError("MXNET_OPTIMIZER_AGGREGATION_SIZE <= 1 makes gluon.Trainer call sgd_update, "
                             "whose rounding the stacked step does not reproduce: unset it or use "
                             "hydra/launcher=basic")
        rows = num_outputs

        def views(array: nd.NDArray) -> list[nd.NDArray]:  # each model's rows, sharing memory
            return [array[i * rows : (i + 1) * rows] for i in range(self.k)]

        w, b, gw, gb = self.weight.data(), self.bias.data(), self.weight.grad(), self.bias.grad()
        # In the order gluon.Trainer hands a lone Dense's parameters to the kernel: weight, bias.
        self._weights = [x for pair in zip(views(w), views(b)) for x in pair]
        self._grads = [x for pair in zip(views(gw), views(gb)) for x in pair]
        self._lrs = [spec.lr for spec in specs for _ in (0, 1)]
        self._wds = [spec.wd for spec in specs for _ in (0, 1)]
        self._moms = None
        if self.momentum > 0:
            self._mom_w, self._mom_b = nd.zeros(w.shape, ctx=ctx), nd.zeros(b.shape, ctx=ctx)
            self._moms = [x for pair in zip(views(self._mom_w), views(self._mom_b)) for x in pair]

    # -- the shared pass ------------------------------------------------------------------------
    def _step(self, batch_size: int) -> None:
        """One SGD update of every model, as Trainer.step(batch_size) updates a lone one."""
        for lo in range(0, len(self._weights), _KERNEL_ARRAYS):
            hi = lo + _KERNEL_ARRAYS
            weights, grads = self._weights[lo:hi], self._grads[lo:hi]
            common = dict(out=weights, num_weights=len(weights), lrs=self._lrs[lo:hi], wds=self._wds[lo:hi],
                          rescale_grad=1.0 / batch_size)
            if self._moms is None:
                nd.multi_sgd_update(*[x for pair in zip(weights, grads) for x in pair], **common)
            else:
                nd.multi_sgd_mom_update(*[x for t in zip(weights, grads, self._moms[lo:hi]) for x in t],
                                        momentum=self.momentum, **common)

    def accuracy_counts(self, split: DeviceSplit, chunk: int) -> nd.NDArray:
        """Correct predictions of every model on split: (k,) float32, one forward pass per chunk."""
        correct = nd.zeros((self.k,), ctx=split.x.context)
        for start in range(0, len(split), chunk):
            scores = self.block.dense(split.x[start : start + chunk]).reshape((0, self.k, self.num_outputs))
            hits = nd.broadcast_equal(nd.argmax(scores, axis=2), split.y[start : start + chunk].reshape((-1, 1)))
            correct += hits.sum(axis=0)
        return correct

    def evaluate(self, train: DeviceSplit, test: DeviceSplit, chunk: int) -> list[tuple[float, float]]:
        """(train_acc, test_acc) of every model, with one device sync."""
        counts = nd.stack(self.accuracy_counts(train, chunk), self.accuracy_counts(test, chunk)).asnumpy()
        return [(float(counts[0, i]) / len(train), float(counts[1, i]) / len(test)) for i in range(self.k)]

    def sync_members(self) -> None:
        """Copy each model's rows (and momentum) into its own Dense and Trainer."""
        rows = self.num_outputs
        for m in self.members:
            lo, hi = m.index * rows, (m.index + 1) * rows
            m.net.weight.set_data(self.weight.data()[lo:hi])
            m.net.bias.set_data(self.bias.data()[lo:hi])
            if self._moms is not None:
                _set_momentum(m, self._mom_w[lo:hi], self._mom_b[lo:hi])

    def fit(
        self,
        train: DeviceSplit,
        test: DeviceSplit,
        *,
        epochs: int,
        batch_size: int,
        seed: int,
        eval_chunk: int = 10000,
        on_epoch: Callable[[Member, EpochMetrics], None] = lambda member, m: None,
        on_nonfinite: Callable[[Member, str], None] = lambda member, why: None,
        stop_on_nonfinite: bool = True,
        start_epoch: int = 1,
        rng: np.random.Generator | None = None,
    ) -> None:
        """Train every model for epochs start_epoch..epochs, as `fit` would train each alone.

        After each epoch, sync_members() runs, then on_epoch(member, metrics) for every model still
        going. A model whose epoch loss is NaN or infinite gets on_nonfinite(member, reason) once
        and no more callbacks; its rows keep training harmlessly (rows never mix), and the others
        are unchanged to the bit.
        """
        n = len(train)
        rng = rng if rng is not None else np.random.default_rng(seed)
        for epoch in range(start_epoch, epochs + 1):
            epoch_losses, t0 = run_epoch(self.block, self._step, train, batch_size, rng)
            # Each model's mean, summed exactly as fit sums its own 1-D loss vector.
            sums = [epoch_losses[:, i].astype(np.float64).sum() for i in range(self.k)]
            train_losses = [s.asscalar() / n for s in sums]
            epoch_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            accs = self.evaluate(train, test, eval_chunk)
            eval_seconds = time.perf_counter() - t1
            self.sync_members()
            for m in self.members:
                if m.failed is not None:
                    continue
                loss_i = train_losses[m.index]
                if stop_on_nonfinite and not math.isfinite(loss_i):
                    m.failed = f"epoch {epoch}: mean training loss is {loss_i}"
                    on_nonfinite(m, m.failed)
                    continue
                metrics = EpochMetrics(epoch, loss_i, *accs[m.index], epoch_seconds, eval_seconds,
                                       n / epoch_seconds)
                m.history.append(metrics)
                on_epoch(m, metrics)


def _set_momentum(member: Member, mom_w: nd.NDArray, mom_b: nd.NDArray) -> None:
    """Put a model's momentum buffers where gluon.Trainer keeps them, so its checkpoint is a Trainer's."""
    trainer = member.trainer
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    updater = trainer._updaters[0]
    for param, value in ((member.net.weight, mom_w), (member.net.bias, mom_b)):
        j = trainer._param2idx[param.name]  # the index the Trainer's updater keys this parameter by
        if j not in updater.states:
            updater.states[j] = updater.optimizer.create_state_multi_precision(j, param.data())
            updater.states_synced[j] = True
        updater.states[j][:] = value
