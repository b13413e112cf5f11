"""Stacked training gives every model exactly the bits that `fit` gives it alone, through gluon.Trainer."""

import itertools

import mxnet as mx
import pytest

from mnist_logreg.ml.model import params_hash
from mnist_logreg.ml.model import build_net
from mnist_logreg.ml.stack import MemberSpec, Stack
from mnist_logreg.ml.training import Lone, fit, make_trainer

SEED = 7
# 4,000 training digits: 96 does not divide them, so every epoch ends on a short batch of 64.
BATCH = 96


def alone(spec, splits, epochs, batch_size=BATCH):
    """The reference: one model through fit with gluon.Trainer (Lone), as a lone job trains it."""
    train, test = splits
    net = build_net(10, spec.sigma, mx.cpu(), SEED)
    trainer = make_trainer(net, spec.lr, spec.momentum, spec.wd)
    [member] = fit(Lone(net, trainer), train, test, epochs=epochs, batch_size=batch_size, seed=SEED, eval_chunk=700)
    if member.failed is not None:
        return None, member.failed, None
    return member.history, None, params_hash(net)


def stacked(specs, splits, epochs, batch_size=BATCH):
    train, test = splits
    stack = Stack(specs, 10, mx.cpu(), SEED)
    failures = {}
    fit(stack, train, test, epochs=epochs, batch_size=batch_size, seed=SEED, eval_chunk=700,
        on_nonfinite=lambda m, why: failures.setdefault(m.index, why))
    return stack, failures


def assert_identical(specs, splits, epochs=2, batch_size=BATCH):
    stack, failures = stacked(specs, splits, epochs, batch_size)
    for member, spec in zip(stack.members, specs):
        history, failure, weights = alone(spec, splits, epochs, batch_size)
        assert failures.get(member.index) == failure, spec
        if failure is None:
            # Every metric at every step, compared as exact floats (timings aside).
            expect = [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in history]
            got = [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in member.history]
            assert got == expect, spec
            assert params_hash(member.net) == weights, spec


GRID = [MemberSpec(sigma, lr) for lr, sigma in itertools.product((0.05, 0.1, 0.5), (0.01, 0.1, 1.0))]


@pytest.mark.parametrize("k", [1, 3, 9])
def test_stack_equals_fit_bit_for_bit(digit_splits, k):
    specs = GRID[:: 9 // k][:k] if k < 9 else GRID  # mixed lr and sigma for k = 3 too
    assert len({(s.lr, s.sigma) for s in specs}) == k
    assert_identical(specs, digit_splits, epochs=2 if k == 9 else 3)


def test_weight_decay_and_momentum_are_bit_identical(digit_splits):
    assert_identical([MemberSpec(1.0, 0.1, wd=1e-3), MemberSpec(0.1, 0.05, wd=3e-2), MemberSpec(0.01, 0.5)],
                     digit_splits)
    assert_identical([MemberSpec(1.0, 0.1, 0.9, 1e-3), MemberSpec(0.1, 0.5, 0.9), MemberSpec(0.01, 0.05, 0.9, 3e-2)],
                     digit_splits)


def test_stack_refuses_to_mix_momentum_values():
    with pytest.raises(ValueError, match="group them apart"):
        Stack([MemberSpec(1.0, 0.1, 0.9), MemberSpec(1.0, 0.1)], 10, mx.cpu(), SEED)


def test_a_diverging_member_fails_alone_and_the_others_are_unchanged(digit_splits):
    specs = [MemberSpec(1.0, 0.1), MemberSpec(1.0, 1e38), MemberSpec(0.1, 0.5)]
    stack, failures = stacked(specs, digit_splits, 2)
    assert list(failures) == [1] and failures[1].startswith("epoch 1: mean training loss is")
    assert stack.members[1].history == [] and stack.members[1].failed == failures[1]
    assert_identical(specs, digit_splits)


def test_a_stacked_members_checkpoint_resumes_alone_bit_identical(digit_splits, tmp_path):
    """What resume=RUN_ID does with a stacked run: its checkpoint (weights, the Trainer's momentum,
    the batch-order generator) is loaded into a lone net and Trainer, and fit continues."""
    import numpy as np

    from mnist_logreg.ml import checkpoint

    train, test = digit_splits
    specs = [MemberSpec(1.0, 0.1, 0.9, 1e-3), MemberSpec(0.1, 0.05, 0.9)]
    stack, saved = Stack(specs, 10, mx.cpu(), SEED), {}
    rng = np.random.default_rng(SEED)

    def keep(member, m):
        saved[member.index] = checkpoint.save(tmp_path / str(member.index), m.epoch, member.net, member.trainer, rng)

    fit(stack, train, test, epochs=1, batch_size=BATCH, seed=SEED, eval_chunk=700, rng=rng, on_epoch=keep)
    for member, spec in zip(stack.members, specs):
        net = build_net(10, spec.sigma, mx.cpu(), SEED)
        trainer = make_trainer(net, spec.lr, spec.momentum, spec.wd)
        done, restored = checkpoint.load(saved[member.index], net, trainer)
        [alone_member] = fit(Lone(net, trainer), train, test, epochs=3, batch_size=BATCH, seed=SEED,
                             eval_chunk=700, start_epoch=done + 1, rng=restored)
        rest = alone_member.history
        history, _, weights = alone(spec, digit_splits, 3)
        got = [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in member.history + rest]
        assert got == [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in history], spec
        assert params_hash(net) == weights, spec
