"""K models on one batch stream, in one graph, with one update per batch: bit-identical to `Lone`.

K `Dense(10)` models that see the same batches (same data, batch size, seed, epochs) train in one
hybridized graph. Their weights live in groups of `width` models, each group one contiguous
(width * 10, 784) array whose row blocks are the members' own weight arrays (views, no copy): each
batch runs one `FullyConnected` per group, then one softmax cross-entropy over the (B, K, 10)
scores, row by row as a lone model's, and one backward pass for all of them. The update then calls
the very kernel that `gluon.Trainer` calls for SGD, `multi_sgd_update` (or `multi_sgd_mom_update`,
on the momentum arrays each model's own Trainer keeps), on every member's own views, each with its
own learning rate and weight decay. Momentum is one value per kernel call, so models with different
momentum are never stacked together (see `lifecycle.train.stack_key`). `training.fit` trains a Stack
as it trains a `Lone` model.

Why groups, and how wide: a wide matrix product may run other BLAS micro-kernels, or split its work
between threads elsewhere, than a 10-column one, and then round a model differently from a lone
Dense. Where it stops rounding alike depends on the CPU (9 models on an AVX2 EPYC already differed,
16 on an AVX-512 one). `probe.widest_exact` finds, on the machine at hand, the widest group that
rounds every model as a lone one at every shape a run uses; width 1 is always exact (every product
then has a lone model's shapes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import mxnet as mx
import numpy as np
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
    """One FullyConnected per group of models, over the group's contiguous weights and biases,
    side by side: (B, K, num_outputs) scores. `groups` are the (first, end) member indices."""

    def __init__(self, groups: Sequence[tuple[int, int]], num_outputs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups, self.num_outputs, self.k = list(groups), num_outputs, groups[-1][1]
        with self.name_scope():
            for g, (lo, hi) in enumerate(self.groups):
                rows = (hi - lo) * num_outputs
                setattr(self, f"weight{g}", self.params.get(f"weight{g}", shape=(rows, NUM_INPUTS), init="zeros"))
                setattr(self, f"bias{g}", self.params.get(f"bias{g}", shape=(rows,), init="zeros"))

    def group_params(self, g: int) -> tuple[gluon.Parameter, gluon.Parameter]:
        return getattr(self, f"weight{g}"), getattr(self, f"bias{g}")

    def hybrid_forward(self, F, x, **params):  # noqa: N803 (Gluon's signature)
        outs = [F.FullyConnected(x, params[f"weight{g}"], params[f"bias{g}"], num_hidden=(hi - lo) * self.num_outputs,
                                 no_bias=False, flatten=True)
                for g, (lo, hi) in enumerate(self.groups)]
        scores = outs[0] if len(outs) == 1 else F.concat(*outs, dim=1)
        return scores.reshape((0, self.k, self.num_outputs))


def groups_of(k: int, width: int) -> list[tuple[int, int]]:
    """Members 0..k-1 in groups of `width`, the last one smaller when width does not divide k."""
    if width < 1:
        raise ValueError(f"a stack's group width must be >= 1, not {width}")
    return [(lo, min(lo + width, k)) for lo in range(0, k, width)]


class StackedLoss(gluon.HybridBlock):
    """Each model's softmax cross-entropy over its own scores, as a lone model's loss computes it row
    by row: (B, K) losses."""

    def __init__(self, scores: StackedScores, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = scores.k
        self.scores = scores

    def hybrid_forward(self, F, x, y):  # noqa: N803 (Gluon's signature)
        labels = F.broadcast_axis(y.reshape((-1, 1)), axis=1, size=self.k)
        return -F.pick(F.log_softmax(self.scores(x), axis=-1), labels, axis=-1)


class Stack:
    """K models of shape Dense(num_outputs) trained together, in products of `width` models (the
    last one smaller when width does not divide K). `members[i]` is model i."""

    scores_class = StackedScores  # the scoring block (a test swaps in a perturbed one)

    def __init__(self, specs: Sequence[MemberSpec], num_outputs: int, ctx: mx.Context, seed: int,
                 width: int = 1, restore: Callable[[Member], None] | None = None) -> None:
        """restore(member), when given, loads a member's checkpoint into its net and Trainer once its
        weights are rows of its group (before the stack takes hold of the Trainer's momentum)."""
        self.k, self.num_outputs, self.ctx = len(specs), num_outputs, ctx
        self.momentum = specs[0].momentum
        if any(spec.momentum != self.momentum for spec in specs):
            raise ValueError("a stack mixes momentum values: group them apart (see lifecycle.train.stack_key)")
        if int(os.environ.get("MXNET_OPTIMIZER_AGGREGATION_SIZE", "4")) <= 1:
            raise ValueError("MXNET_OPTIMIZER_AGGREGATION_SIZE <= 1 makes gluon.Trainer call sgd_update, "
                             "whose rounding the stacked step does not reproduce: unset it or use "
                             "hydra/launcher=basic")
        self.width = min(width, self.k)
        self.members: list[Member] = []
        for i, spec in enumerate(specs):  # each model drawn exactly as build_net draws it alone
            net = build_net(num_outputs, spec.sigma, ctx, seed)
            self.members.append(Member(i, net, make_trainer(net, spec.lr, spec.momentum, spec.wd)))
        self.scores = self.scores_class(groups_of(self.k, self.width), num_outputs)
        self.scores.initialize(ctx=ctx)
        for g, (lo, hi) in enumerate(self.scores.groups):
            for group_param, name in zip(self.scores.group_params(g), ("weight", "bias")):
                own = [getattr(m.net, name) for m in self.members[lo:hi]]
                group_param.set_data(nd.concat(*[p.data() for p in own], dim=0))
                rows = num_outputs
                for j, p in enumerate(own):  # the member's arrays become its rows of the group's
                    _share(p, group_param.data()[j * rows : (j + 1) * rows], group_param.grad()[j * rows : (j + 1) * rows])
        for m in self.members if restore is not None else ():
            restore(m)
        self.block = StackedLoss(self.scores)
        self.block.hybridize(static_alloc=True)
        for m in self.members:  # each net's own graph (as Lone leaves a lone one), which net.export writes
            m.net.hybridize(static_alloc=True)
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

    def evaluate(self, train: DeviceSplit, test: DeviceSplit, chunk: int,
                 val: DeviceSplit | None = None) -> list[tuple[float, ...]]:
        """(train_acc, test_acc[, val_acc]) of every model, with one device sync."""
        splits = [train, test] + ([val] if val is not None else [])
        counts = nd.stack(*(self.accuracy_counts(split, chunk) for split in splits)).asnumpy().tolist()
        return [tuple(counts[j][i] / len(split) for j, split in enumerate(splits)) for i in range(self.k)]


    def evaluate_untrained(self, train: DeviceSplit, test: DeviceSplit, chunk: int,
                           val: DeviceSplit | None = None) -> list[tuple[float, ...]]:
        """evaluate() of the untrained members. Members drawn alike (the same sigma under the same
        seed, as in a sweep over lr or wd) start from the same weights and so score the same: when
        at most a third of the members are distinct, each distinct model is scored once, alone, as
        a lone job scores itself (a lone model costs about twice a stacked one here, so that is
        cheaper), and its scores are its twins' too."""
        from .model import params_hash
        from .training import evaluate

        drawn = [params_hash(m.net) for m in self.members]
        first = {}
        for member, weights in zip(self.members, drawn):
            first.setdefault(weights, member)
        if 3 * len(first) > self.k:
            return self.evaluate(train, test, chunk, val)
        scores = {}
        for weights, member in first.items():  # a later stack of the sweep draws the same models again
            seen = _UNTRAINED.get((weights, chunk))
            if seen is not None and seen[0] is train and seen[1] is test and seen[2] is val:
                scores[weights] = seen[3]
            else:
                scores[weights] = evaluate(member.net, train, test, chunk, val)
                if len(_UNTRAINED) >= 64:
                    _UNTRAINED.clear()
                _UNTRAINED[(weights, chunk)] = (train, test, val, scores[weights])
        return [scores[weights] for weights in drawn]

    def predictions(self, split: DeviceSplit, chunk: int, which: Sequence[int]) -> dict[int, np.ndarray]:
        """Every member's labels for split in one pass, chunk by chunk as accuracy_counts finds them."""
        if not which:
            return {}
        labels = nd.concat(*(nd.argmax(self.scores(split.x[start : start + chunk]), axis=2)
                             for start in range(0, len(split), chunk)), dim=0).asnumpy().astype(np.int64)
        return {i: np.ascontiguousarray(labels[:, i]) for i in which}


# Untrained models scored alone in this process: (weights' hash, chunk) -> (the splits they were scored
# on, held so that their ids stay theirs, and the scores). A sweep's stacks over lr or wd draw the same
# few models, one per sigma, in every stack.
_UNTRAINED: dict[tuple[str, int], tuple] = {}


def _share(param: gluon.Parameter, data: nd.NDArray, grad: nd.NDArray) -> None:
    """Make data and grad (views into a group's arrays, with param's shape and values) param's own
    arrays: the member's net, Trainer, checkpoints and export then read and write the group's rows."""
    assert data.shape == param.shape and len(param.list_ctx()) == 1
    param._data, param._grad = [data], [grad]


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
