"""Stacked training gives every model exactly the bits that `fit` gives it alone, through gluon.Trainer,
at the width the probe proves on this machine; and the probe refuses widths that would not."""

import itertools
import json

import mxnet as mx
import numpy as np
import pytest

from mnist_logreg.ml import probe
from mnist_logreg.ml.model import build_net, params_hash
from mnist_logreg.ml.stack import MemberSpec, Stack, StackedScores
from mnist_logreg.ml.training import Lone, fit, make_trainer, predicted_labels

SEED = 7
# 4,000 training digits: 96 does not divide them, so every epoch ends on a short batch of 64.
BATCH = 96
CHUNK = 700  # scoring chunks of 700: 4,000 and 1,000 rows both end on a short one
SHAPES = probe.run_shapes(4000, 1000, BATCH, CHUNK)


def alone(spec, splits, epochs, batch_size=BATCH):
    """The reference: one model through fit with gluon.Trainer (Lone), as a lone job trains it: its
    history, failure, weights' hash and test-set labels (what its pictures show)."""
    train, test = splits
    net = build_net(10, spec.sigma, mx.cpu(), SEED)
    trainer = make_trainer(net, spec.lr, spec.momentum, spec.wd)
    [member] = fit(Lone(net, trainer), train, test, epochs=epochs, batch_size=batch_size, seed=SEED, eval_chunk=CHUNK)
    if member.failed is not None:
        return None, member.failed, None, None
    return member.history, None, params_hash(net), predicted_labels(net, test, CHUNK)


def stacked(specs, splits, epochs, batch_size=BATCH, width=None, stack_class=Stack):
    train, test = splits
    if width is None:
        width = probe.widest_exact(len(specs), 10, mx.cpu(), probe.run_shapes(4000, 1000, batch_size, CHUNK)).width
    stack = stack_class(specs, 10, mx.cpu(), SEED, width)
    failures = {}
    fit(stack, train, test, epochs=epochs, batch_size=batch_size, seed=SEED, eval_chunk=CHUNK,
        on_nonfinite=lambda m, why: failures.setdefault(m.index, why))
    return stack, failures


def differences(specs, splits, epochs=2, batch_size=BATCH, **how) -> list:
    """The members whose failure, metrics at any step (timings aside), weights or test-set labels
    (the stack's one pass for every member's pictures) differ from their lone fit."""
    stack, failures = stacked(specs, splits, epochs, batch_size, **how)
    labels = stack.predictions(splits[1], CHUNK, [m.index for m in stack.members if m.failed is None])
    differ = []
    for member, spec in zip(stack.members, specs):
        history, failure, weights, predicted = alone(spec, splits, epochs, batch_size)
        got = [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in member.history]
        expect = [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in history or []]
        if failures.get(member.index) != failure or got != expect or (failure is None and (
                params_hash(member.net) != weights or not np.array_equal(labels[member.index], predicted))):
            differ.append(spec)
    return differ


def assert_identical(specs, splits, **how):
    assert differences(specs, splits, **how) == []


# 4 lr x 4 sigma x 2 wd: every member differs from its neighbours in lr, sigma or wd.
GRID = [MemberSpec(sigma, lr, wd=wd) for lr, sigma, wd in itertools.product((0.05, 0.1, 0.3, 0.5), (0.01, 0.1, 0.5, 1.0),
                                                                              (0.0, 1e-3))]


@pytest.mark.parametrize("k", [1, 3, 9, 17, 32])
def test_stack_at_the_probed_width_equals_fit_bit_for_bit(digit_splits, k):
    specs = GRID[:: len(GRID) // k][:k] if k < len(GRID) else GRID
    assert len({s.lr for s in specs}) > 1 or k == 1
    assert len({s.sigma for s in specs}) > 1 or k == 1
    assert len({s.wd for s in specs}) > 1 or k < 9
    assert_identical(specs, digit_splits, epochs=2)


def test_a_momentum_stack_is_bit_identical(digit_splits):
    specs = [MemberSpec(sigma, lr, 0.9, wd) for sigma, lr, wd in itertools.product((1.0, 0.1), (0.1, 0.05, 0.5), (0.0, 3e-2))]
    assert_identical(specs, digit_splits)


def test_every_width_the_probe_accepts_is_bit_identical_with_a_smaller_last_group(digit_splits):
    """17 models at each width the probe accepts below the widest (a last group of 17 mod w models)."""
    accepted = [w for w in (2, 4, 5, 6) if probe.rounds_as_lone(w, 10, mx.cpu(), SHAPES)
                and (17 % w <= 1 or probe.rounds_as_lone(17 % w, 10, mx.cpu(), SHAPES))]
    assert accepted, "no width above 1 rounds as a lone model here: the stack would be one product per model"
    for w in accepted:
        assert_identical(GRID[:17], digit_splits, epochs=1, width=w)


def test_a_width_the_probe_refuses_does_differ_in_training(digit_splits):
    """The probe is not over-cautious, and a probe that always said 'full width' would be caught: 32
    models in one product round differently from lone ones on the CPUs measured so far."""
    if probe.rounds_as_lone(32, 10, mx.cpu(), SHAPES):
        pytest.skip("on this CPU one product of 32 models rounds as lone ones")
    assert probe.widest_exact(32, 10, mx.cpu(), SHAPES).width < 32
    assert differences(GRID, digit_splits, epochs=1, width=32) != []


class SkewedScores(StackedScores):
    """A product that rounds differently from a lone one in groups of more than 4 models (an operator
    perturbed on purpose: the scores scaled by 1 + 2**-20)."""

    def hybrid_forward(self, F, x, **params):  # noqa: N803
        scores = super().hybrid_forward(F, x, **params)
        return scores * (1 + 2**-20) if max(hi - lo for lo, hi in self.groups) > 4 else scores


class SkewedStack(Stack):
    scores_class = SkewedScores


def test_the_probe_narrows_a_product_that_rounds_otherwise_and_the_stack_stays_exact(digit_splits):
    width = probe.widest_exact(9, 10, mx.cpu(), SHAPES,
                               rounds=lambda w, n, ctx, shapes: probe.probe(w, n, ctx, shapes, stack_factory=SkewedStack))
    assert 1 < width.width <= 4  # 9 -> 5 refused (skewed), 3 accepted (9 mod 3 = 0)
    specs = GRID[:9]
    assert_identical(specs, digit_splits, epochs=1, width=width.width, stack_class=SkewedStack)
    assert differences(specs, digit_splits, epochs=1, width=9, stack_class=SkewedStack) == specs


def test_the_probe_is_cached_in_the_process_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(probe, "_ANSWERS", {})
    shapes = probe.run_shapes(500, 300, 50, 200)
    calls = []
    real = probe.probe
    monkeypatch.setattr(probe, "probe", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = probe.rounds_as_lone(4, 10, mx.cpu(), shapes)
    assert calls == [4] and probe.rounds_as_lone(4, 10, mx.cpu(), shapes) == first and calls == [4]
    [entry] = (tmp_path / "mnist_logreg" / "width-probe").glob("*.json")
    assert json.loads(entry.read_text()) == {"rounds_as_lone": first}
    probe._ANSWERS.clear()  # a new process: answered from the disk
    assert probe.rounds_as_lone(4, 10, mx.cpu(), shapes) == first and calls == [4]
    probe._ANSWERS.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # another thread setting: another key, probed again
    probe.rounds_as_lone(4, 10, mx.cpu(), shapes)
    assert calls == [4, 4] and len(list(entry.parent.glob("*.json"))) == 2
    probe._ANSWERS.clear()
    entry.write_text("{not json")  # a damaged answer is probed again, never trusted
    monkeypatch.delenv("OMP_NUM_THREADS")
    probe.rounds_as_lone(4, 10, mx.cpu(), shapes)
    assert calls == [4, 4, 4]


def test_run_shapes_candidates_and_the_log_words():
    assert probe.run_shapes(60000, 10000, 64, 10000) == probe.RunShapes((64, 32), (10000,))
    assert probe.run_shapes(4000, 1000, 96, 700) == probe.RunShapes((96, 64), (700, 500, 300))
    assert probe.run_shapes(50, 30, 64, 10000) == probe.RunShapes((50,), (50, 30))
    assert probe.candidates(32) == [32, 16, 11, 8, 7, 6, 5, 4, 3, 2, 1]
    assert probe.candidates(1) == [1]
    assert probe.Width(32, 8, 0.1).describe() == "4 products of 8 models (the widest this CPU rounds as one model)"
    assert probe.Width(32, 10, 0.1).products() == [10, 10, 10, 2]
    assert probe.Width(32, 10, 0.1).describe() == "3 products of 10 models and 1 of 2 models (the widest this CPU rounds as one model)"
    assert probe.Width(3, 1, 0.1).describe() == "3 products of 1 model (no wider product rounds as one model on this CPU)"


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
    stack, saved = Stack(specs, 10, mx.cpu(), SEED, width=2), {}
    rng = np.random.default_rng(SEED)

    def keep(member, m):
        saved[member.index] = checkpoint.save(tmp_path / str(member.index), m.epoch, member.net, member.trainer, rng)

    fit(stack, train, test, epochs=1, batch_size=BATCH, seed=SEED, eval_chunk=CHUNK, rng=rng, on_epoch=keep)
    for member, spec in zip(stack.members, specs):
        net = build_net(10, spec.sigma, mx.cpu(), SEED)
        trainer = make_trainer(net, spec.lr, spec.momentum, spec.wd)
        done, restored = checkpoint.load(saved[member.index], net, trainer)
        [alone_member] = fit(Lone(net, trainer), train, test, epochs=3, batch_size=BATCH, seed=SEED,
                             eval_chunk=CHUNK, start_epoch=done + 1, rng=restored)
        rest = alone_member.history
        history, _, weights, _ = alone(spec, digit_splits, 3)
        got = [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in member.history + rest]
        assert got == [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in history], spec
        assert params_hash(net) == weights, spec


def test_a_stack_restored_from_its_members_checkpoints_goes_on_bit_identical(digit_splits, tmp_path):
    """What a continued sweep does with a stopped momentum stack: a new Stack restores each member's
    checkpoint (weights into its group's rows, the Trainer's momentum, the batch order) and fit goes on."""
    import numpy as np

    from mnist_logreg.ml import checkpoint

    train, test = digit_splits
    specs = [MemberSpec(1.0, 0.1, 0.9, 1e-3), MemberSpec(0.1, 0.05, 0.9), MemberSpec(0.5, 0.3, 0.9, 3e-2)]
    first, saved, rng = Stack(specs, 10, mx.cpu(), SEED, width=3), {}, np.random.default_rng(SEED)

    def keep(member, m):
        saved[member.index] = checkpoint.save(tmp_path / str(member.index), m.epoch, member.net, member.trainer, rng)

    fit(first, train, test, epochs=1, batch_size=BATCH, seed=SEED, eval_chunk=CHUNK, rng=rng, on_epoch=keep)
    states = []

    def restore(member):
        states.append(checkpoint.load(saved[member.index], member.net, member.trainer)[1])

    again = Stack(specs, 10, mx.cpu(), SEED, width=3, restore=restore)
    fit(again, train, test, epochs=3, batch_size=BATCH, seed=SEED, eval_chunk=CHUNK, start_epoch=2, rng=states[0])
    for member, earlier, spec in zip(again.members, first.members, specs):
        history, _, weights, _ = alone(spec, digit_splits, 3)
        got = [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in earlier.history + member.history]
        assert got == [(m.epoch, m.train_loss, m.train_acc, m.test_acc) for m in history], spec
        assert params_hash(member.net) == weights, spec


def test_a_checkpoints_bytes_are_what_gluon_writes_for_lone_and_stacked_models(digit_splits, tmp_path):
    """checkpoint.contents (the bytes a record writer writes) against Block.save_parameters and
    Trainer.save_states, for a lone model and each member of a momentum stack (whose weights are
    views of its group's)."""
    from mnist_logreg.ml import checkpoint

    train, test = digit_splits
    lone = build_net(10, 0.1, mx.cpu(), SEED)
    lone_trainer = make_trainer(lone, 0.1)
    fit(Lone(lone, lone_trainer), train, test, epochs=1, batch_size=BATCH, seed=SEED, eval_chunk=CHUNK)
    stack, _ = stacked([MemberSpec(0.1, lr, 0.9) for lr in (0.05, 0.1, 0.5)], digit_splits, 1)
    rng = np.random.default_rng(3)
    for net, trainer in [(lone, lone_trainer)] + [(m.net, m.trainer) for m in stack.members]:
        net.save_parameters(str(tmp_path / "net.params"))
        trainer.save_states(str(tmp_path / "trainer.states"))
        files = checkpoint.contents(1, net, trainer, rng, {"test_acc": 0.5})
        assert files["net.params"] == (tmp_path / "net.params").read_bytes()
        assert files["trainer.states"] == (tmp_path / "trainer.states").read_bytes()
        written = checkpoint.write(tmp_path / "ckpt", 1, files)
        assert checkpoint.epoch_of(written) == 1 and checkpoint.metrics_of(written) == {"test_acc": 0.5}


@pytest.mark.parametrize("groups, alike", [(3, 3), (6, 1)])
def test_the_untrained_scores_of_a_stack_are_each_lone_models_own(digit_splits, groups, alike):
    """Step 0 of every member equals a lone job's step 0 (its fresh net scored before training),
    whether the stack scores each distinct untrained model alone (9 members, 3 distinct) or the
    whole stack (6 members, all distinct). The same seed draws every sigma's weights as one pattern
    scaled (they all score alike), so each group of members gets weights of its own here."""
    from mxnet import nd

    from mnist_logreg.ml.training import evaluate

    train, test = digit_splits
    specs = [MemberSpec(0.1, lr) for _ in range(groups) for lr in (0.05, 0.1, 0.5)[:alike]]
    width = probe.widest_exact(len(specs), 10, mx.cpu(), SHAPES).width
    stack = Stack(specs, 10, mx.cpu(), SEED, width)
    drawn = [np.random.default_rng(i // alike).normal(0, 0.1, (10, 784)).astype(np.float32) for i in range(len(specs))]
    lone = []
    for member, weights in zip(stack.members, drawn):
        member.net.weight.set_data(nd.array(weights))  # into the member's rows of its group
        net = build_net(10, 0.1, mx.cpu(), SEED)
        net.weight.set_data(nd.array(weights))
        lone.append(evaluate(net, train, test, CHUNK))
    assert len(set(lone)) == groups  # the groups score apart, so a member given another's scores fails
    assert stack.evaluate_untrained(train, test, CHUNK) == lone
    # A later stack drawing the same models gets the same scores, and on other splits their own.
    again = Stack(specs, 10, mx.cpu(), SEED, width)
    for member, weights in zip(again.members, drawn):
        member.net.weight.set_data(nd.array(weights))
    assert again.evaluate_untrained(train, test, CHUNK) == lone
    swapped = []
    for weights in drawn:
        net = build_net(10, 0.1, mx.cpu(), SEED)
        net.weight.set_data(nd.array(weights))
        swapped.append(evaluate(net, test, train, CHUNK))
    assert swapped != lone and again.evaluate_untrained(test, train, CHUNK) == swapped
