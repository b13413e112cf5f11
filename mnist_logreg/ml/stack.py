"""K models on one batch stream, in one graph, with one update per batch: bit-identical to `Lone`.

K `Dense(10)` models that see the same batches (same data, batch size, seed, epochs) train in one
hybridized graph: each batch runs every model's own Dense (a lone model's matrix product, with its
shapes), then one softmax cross-entropy over the (B, K, 10) scores, row by row as a lone model's,
and one backward pass for all of them. The update then calls the very kernel that `gluon.Trainer` calls for SGD,
`multi_sgd_update` (or `multi_sgd_mom_update`, on the momentum arrays each model's own Trainer
keeps), once for all models, each with its own learning rate and weight decay. Momentum is one value
per kernel call, so models with different momentum are never stacked together (see
`lifecycle.train.stack_key`). `training.fit` trains a Stack as it trains a `Lone` model.

Why not one wide `Dense(10*K)`: a wide matrix product runs other BLAS micro-kernels than a
10-column one, and on some CPUs (AMD EPYC with AVX2, here) they round differently; every matrix
product here has a lone model's shapes, and the rest works row by row, so the bits cannot depend on K. tests/test_stack.py checks
K = 1, 3 and 9 against lone models, and `reproduce` checks every run it is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import mxnet as mx
from mxnet import gluon, nd

from .model import NUM_INPUTS, build_net
from .training import DeviceSplit, Member, make_trainer


@dataclass(frozen=True)
class MemberSpec:
    """What may differ between the models of one stack."""

    sigma: float
    lr: float
    momentum: float = 0.0
    wd: float = 0.0


# Arrays one multi_sgd kernel call takes at most (MultiSGDKernelParam::N is 60 in MXNet 1.9).
_KERNEL_ARRAYS = 60


class StackedScores(gluon.HybridBlock):
    """Every model's own Dense on one batch (each a lone model's matrix product, with its shapes),
    side by side: (B, K, num_outputs) scores."""

    def __init__(self, nets: Sequence[gluon.HybridBlock], num_outputs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nets, self.num_outputs = list(nets), num_outputs
        for i, net in enumerate(self.nets):
            self.register_child(net, f"model{i}")

    def hybrid_forward(self, F, x):  # noqa: N803 (Gluon's signature)
        return F.concat(*[net(x) for net in self.nets], dim=1).reshape((0, len(self.nets), self.num_outputs))


class StackedLoss(gluon.HybridBlock):
    """Each model's softmax cross-entropy over its own scores, as a lone model's loss computes it row
    by row: (B, K) losses."""

    def __init__(self, scores: StackedScores, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = len(scores.nets)
        self.scores = scores

    def hybrid_forward(self, F, x, y):  # noqa: N803 (Gluon's signature)
        labels = F.broadcast_axis(y.reshape((-1, 1)), axis=1, size=self.k)
        return -F.pick(F.log_softmax(self.scores(x), axis=-1), labels, axis=-1)


class Stack:
    """K models of shape Dense(num_outputs) trained together. `members[i]` is model i."""

    def __init__(self, specs: Sequence[MemberSpec], num_outputs: int, ctx: mx.Context, seed: int) -> None:
        self.k, self.num_outputs, self.ctx = len(specs), num_outputs, ctx
        self.momentum = specs[0].momentum
        if any(spec.momentum != self.momentum for spec in specs):
            raise ValueError("a stack mixes momentum values: group them apart (see lifecycle.train.stack_key)")
        if int(os.environ.get("MXNET_OPTIMIZER_AGGREGATION_SIZE", "4")) <= 1:
            raise ValueError("MXNET_OPTIMIZER_AGGREGATION_SIZE <= 1 makes gluon.Trainer call sgd_update, "
                             "whose rounding the stacked step does not reproduce: unset it or use "
                             "hydra/launcher=basic")
        self.members: list[Member] = []
        for i, spec in enumerate(specs):  # each model drawn exactly as build_net draws it alone
            net = build_net(num_outputs, spec.sigma, ctx, seed)
            self.members.append(Member(i, net, make_trainer(net, spec.lr, spec.momentum, spec.wd)))
        self.scores = StackedScores([m.net for m in self.members], num_outputs)
        self.block = StackedLoss(self.scores)
        self.block.hybridize(static_alloc=True)  # the members' nets too, as NetWithLoss leaves a lone one
        for m in self.members:  # each net's own graph, which net.export writes
            m.net(nd.zeros((1, NUM_INPUTS), ctx=ctx))

        # In the order gluon.Trainer hands a lone Dense's parameters to the kernel: weight, bias.
        params = [(m, p) for m in self.members for p in (m.net.weight, m.net.bias)]
        self._weights = [p.data() for _, p in params]
        self._grads = [p.grad() for _, p in params]
        self._lrs = [spec.lr for spec in specs for _ in (0, 1)]
        self._wds = [spec.wd for spec in specs for _ in (0, 1)]
        self._moms = [_momentum_state(m.trainer, p) for m, p in params] if self.momentum > 0 else None

    def step(self, batch_size: int) -> None:
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

    def mean_losses(self, losses: nd.NDArray) -> list[float]:
        """Each model's mean over its column of (N, K) losses, summed exactly as a lone model sums its own."""
        sums = [losses[:, i].astype("float64").sum() for i in range(self.k)]
        return [s.asscalar() / losses.shape[0] for s in sums]

    def accuracy_counts(self, split: DeviceSplit, chunk: int) -> nd.NDArray:
        """Correct predictions of every model on split: (K,) float32, chunk by chunk as a lone model counts."""
        correct = nd.zeros((self.k,), ctx=split.x.context)
        for start in range(0, len(split), chunk):
            predicted = nd.argmax(self.scores(split.x[start : start + chunk]), axis=2)
            correct += nd.broadcast_equal(predicted, split.y[start : start + chunk].reshape((-1, 1))).sum(axis=0)
        return correct

    def evaluate(self, train: DeviceSplit, test: DeviceSplit, chunk: int) -> list[tuple[float, float]]:
        """(train_acc, test_acc) of every model, with one device sync."""
        counts = nd.stack(self.accuracy_counts(train, chunk), self.accuracy_counts(test, chunk)).asnumpy().tolist()
        return [(counts[0][i] / len(train), counts[1][i] / len(test)) for i in range(self.k)]


def _momentum_state(trainer: gluon.Trainer, param: gluon.Parameter) -> nd.NDArray:
    """The momentum array the Trainer keeps for param (made now if it has none yet), so that the
    stacked update moves it in place and the model's checkpoint is an ordinary Trainer's."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    updater = trainer._updaters[0]
    j = trainer._param2idx[param.name]  # the index the Trainer's updater keys this parameter by
    if j not in updater.states:
        updater.states[j] = updater.optimizer.create_state_multi_precision(j, param.data())
        updater.states_synced[j] = True
    return updater.states[j]
