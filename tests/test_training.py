"""The fast training path computes what the tutorial's loop computes."""

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon, nd

from mnist_logreg.ml.data import Split
from mnist_logreg.ml.model import build_net
from mnist_logreg.ml.reference import tutorial_loop
from mnist_logreg.ml.training import Lone, evaluate, fit, make_trainer, to_device

from conftest import mnist5k_arrays


@pytest.fixture(scope="module")
def digits():
    images, labels = mnist5k_arrays()
    test = np.arange(len(labels)) % 5 == 4
    return (images[~test], labels[~test]), (images[test], labels[test])


def as_split(images, labels):
    return Split(images.reshape(len(images), -1), labels)


def test_device_scaling_is_bit_identical_to_numpy():
    every_byte = np.arange(256, dtype=np.uint8)
    on_device = to_device(Split(every_byte.reshape(1, -1), np.zeros(1, np.uint8)), mx.cpu()).x.asnumpy()
    np.testing.assert_array_equal(on_device[0], every_byte.astype(np.float32) / 255)


# 4,000 training digits: batches of 64 end each epoch on a short one of 32; batches of 100 do not.
@pytest.mark.parametrize("batch_size, lr, sigma", [(64, 0.1, 1.0), (100, 0.5, 0.1)])
def test_fast_path_matches_the_tutorial_loop(digits, batch_size, lr, sigma):
    (train_img, train_lbl), (test_img, test_lbl) = digits
    ctx, seed, epochs = mx.cpu(), 7, 3
    net = build_net(10, sigma, ctx, seed)
    reference = gluon.nn.Dense(10)
    reference.initialize(ctx=ctx)
    reference(nd.zeros((1, 784)))
    for mine, theirs in zip(net.collect_params().values(), reference.collect_params().values()):
        theirs.set_data(mine.data().copy())  # the same starting weights

    expected = tutorial_loop(reference, as_split(train_img, train_lbl), as_split(test_img, test_lbl),
                             epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    train_d, test_d = to_device(as_split(train_img, train_lbl), ctx), to_device(as_split(test_img, test_lbl), ctx)
    [member] = fit(Lone(net, make_trainer(net, lr)), train_d, test_d, epochs=epochs, batch_size=batch_size, seed=seed)
    got = member.history

    assert len(got) == epochs
    for m, ref in zip(got, expected):
        assert m.train_loss == pytest.approx(ref.train_loss, abs=1e-5)
        assert m.train_acc == pytest.approx(ref.train_acc, abs=1e-5)
        assert m.test_acc == pytest.approx(ref.test_acc, abs=1e-5)
    assert got[-1].test_acc > 0.5  # far above chance (0.1)


def test_untrained_accuracy_is_near_chance_and_training_improves_it(digits):
    (train_img, train_lbl), (test_img, test_lbl) = digits
    ctx = mx.cpu()
    train_d, test_d = to_device(as_split(train_img, train_lbl), ctx), to_device(as_split(test_img, test_lbl), ctx)
    net = build_net(10, 0.01, ctx, seed=1)
    train_acc, test_acc = evaluate(net, train_d, test_d, chunk=999)
    assert 0.0 < train_acc < 0.3 and 0.0 < test_acc < 0.3
    [member] = fit(Lone(net, make_trainer(net, 0.1)), train_d, test_d, epochs=2, batch_size=64, seed=1)
    assert member.history[-1].test_acc > 0.85 > test_acc + 0.5


def test_same_seed_same_weights_other_seed_other_weights():
    a = build_net(10, 1.0, mx.cpu(), seed=3).weight.data().asnumpy()
    b = build_net(10, 1.0, mx.cpu(), seed=3).weight.data().asnumpy()
    c = build_net(10, 1.0, mx.cpu(), seed=4).weight.data().asnumpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(a.std() - 1.0) < 0.05
    small = build_net(10, 0.01, mx.cpu(), seed=3)
    assert abs(small.weight.data().asnumpy().std() - 0.01) < 0.001
    assert not small.bias.data().asnumpy().any()  # Gluon's zero bias, as in the tutorial


def test_divergence_stops_the_model_after_its_first_nonfinite_epoch(digits):
    (train_img, train_lbl), (test_img, test_lbl) = digits
    ctx = mx.cpu()
    train_d, test_d = to_device(as_split(train_img, train_lbl), ctx), to_device(as_split(test_img, test_lbl), ctx)
    net = build_net(10, 1.0, ctx, seed=1)
    told, epochs_run = [], []
    [member] = fit(Lone(net, make_trainer(net, 1e38)), train_d, test_d, epochs=3, batch_size=64, seed=1,
                   on_nonfinite=lambda m, why: told.append(why), on_epoch=lambda m, e: epochs_run.append(e))
    assert member.failed is not None and member.failed.startswith("epoch 1: mean training loss is")
    assert told == [member.failed] and epochs_run == [] and member.history == []


def test_mxnet_loads_without_what_the_harness_never_uses_and_others_still_get_it():
    """Through mnist_logreg, `import mxnet` skips scikit-learn and scipy.stats (0.5 s of each process's
    start); mxnet falls back as if they were absent, and anyone else still imports them."""
    import subprocess
    import sys

    code = ("import sys, mnist_logreg, mxnet; print('sklearn' in sys.modules, 'scipy.stats' in sys.modules, "
            "mxnet.model.BASE_ESTIMATOR.__name__); import sklearn.base, scipy.stats; print(sklearn.base.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "object", "sklearn.base"]


def test_a_validation_split_is_a_fixed_seeded_subset_never_in_the_training_rows(digits):
    from mnist_logreg.ml.data import hold_out

    (images, labels), _ = digits
    train = as_split(images, labels)
    rest, val = hold_out(train, 500, seed=3)
    again_rest, again_val = hold_out(as_split(images.copy(), labels.copy()), 500, seed=3)  # another process's copy
    np.testing.assert_array_equal(val.images, again_val.images)
    np.testing.assert_array_equal(rest.labels, again_rest.labels)
    other = hold_out(as_split(images.copy(), labels.copy()), 500, seed=4)[1]
    assert not np.array_equal(other.images, val.images)
    assert len(val.labels) == 500 and len(rest.labels) == len(labels) - 500
    # Every training row is either trained on or held out, never both, in its original order.
    rows = {row.tobytes(): i for i, row in enumerate(train.images)}
    trained = [rows[r.tobytes()] for r in rest.images]
    held = [rows[r.tobytes()] for r in val.images]
    assert not set(trained) & set(held) and sorted(trained + held) == list(range(len(labels)))
    assert trained == sorted(trained) and held == sorted(held)
    assert hold_out(train, 0, seed=3) == (train, None)
    with pytest.raises(Exception, match="data.val_size"):
        hold_out(train, len(labels), seed=3)


@pytest.mark.parametrize("rows", [64, 1000])  # at batch 64: one batch a gather, or 15 of them
def test_the_shuffle_gathered_in_parts_trains_bit_identical_to_one_gather(digits, monkeypatch, rows):
    from mnist_logreg.ml import training

    (train_img, train_lbl), (test_img, test_lbl) = digits
    ctx = mx.cpu()
    train_d, test_d = to_device(as_split(train_img, train_lbl), ctx), to_device(as_split(test_img, test_lbl), ctx)

    def trained(gather_rows: int):
        monkeypatch.setattr(training, "GATHER_ROWS", gather_rows)
        net = build_net(10, 0.1, ctx, 3)
        [member] = fit(Lone(net, make_trainer(net, 0.5)), train_d, test_d, epochs=2, batch_size=64, seed=3)
        weights = [p.data().asnumpy().tobytes() for p in net.collect_params().values()]
        return [(m.train_loss, m.train_acc, m.test_acc) for m in member.history], weights

    assert trained(rows) == trained(len(train_img))  # the whole split at once, as before
