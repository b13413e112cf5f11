"""The width probe: the widest group of models one matrix product of a `Stack` may hold, on the
machine at hand, and still round every model exactly as a lone `Dense(10)` through gluon.Trainer.

A stack of K models runs ceil(K / w) products per batch. Whether a product over w models rounds each
of them as a lone one depends on which micro-kernels and thread split oneDNN (or cuBLAS) picks for
its shape, so it is tried, never assumed: for a candidate w, a real `Stack` of w models (one group,
its own graph and operators) and w lone models with the same random weights and biases run the
same random inputs at every row count the run will use (the training batch, the epoch's last short
batch, every scoring chunk and the last one), and the training losses, the weight and bias
gradients and the scores must be equal bit for bit. A smaller last group (K mod w models) is probed
as well. The order of accumulation of a BLAS kernel does not depend on the values, so a difference
anywhere shows, almost surely, among the 10 * rows scores and 7,850 gradient values per model.

Answers are cached per process, and on disk (one small file per answer, under the user's cache
folder) keyed by everything the kernels depend on: the CPU's model and flags, the MXNet build, the
thread settings and every OMP_*, MXNET_*, KMP_*, MKL_*, DNNL_* and OPENBLAS_* variable, and by the
probe's and the stack's own source (changed code never reuses an answer). A GPU's answers stay in the
process (its model is not part of the key).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mxnet as mx
import numpy as np
from mxnet import autograd, nd

from ..project import user_cache
from . import machine
from .model import NetWithLoss, build_net
from .stack import MemberSpec, Stack
from .training import make_trainer


@dataclass(frozen=True)
class RunShapes:
    """The row counts a run feeds its products: training batches, and scoring chunks."""

    train_rows: tuple[int, ...]
    score_rows: tuple[int, ...]


def run_shapes(n_train: int, n_test: int, batch_size: int, chunk: int, n_val: int = 0) -> RunShapes:
    """The training batch and the epoch's last short batch; each split's full scoring chunk and its
    last one (a split shorter than a chunk is scored in one piece), the validation split's too."""

    def sizes(n: int, step: int) -> set[int]:
        return {min(step, n)} | ({n % step} if n > step and n % step else set())

    return RunShapes(tuple(sorted(sizes(n_train, batch_size), reverse=True)),
                     tuple(sorted(sizes(n_train, chunk) | sizes(n_test, chunk) | (sizes(n_val, chunk) if n_val else set()),
                                  reverse=True)))


@dataclass(frozen=True)
class Width:
    """What the probe decided for a stack of k models."""

    k: int
    width: int
    seconds: float  # spent probing for this stack (about 0 when every answer was cached)
    device: str = "cpu"

    def products(self) -> list[int]:
        """Models per product, in order."""
        return [min(self.width, self.k - lo) for lo in range(0, self.k, self.width)]

    def describe(self) -> str:
        sizes = self.products()
        if self.width == 1:
            return f"{self.k} product{'s' if self.k > 1 else ''} of 1 model" + (
                "" if self.k == 1 else f" (no wider product rounds as one model on this {self.device.upper()})")
        text = f"{sizes.count(self.width)} product{'s' if sizes.count(self.width) > 1 else ''} of {self.width} models"
        if sizes[-1] != self.width:
            text += f" and 1 of {sizes[-1]}" + (" model" if sizes[-1] == 1 else " models")
        return text + f" (the widest this {'CPU' if self.device == 'cpu' else 'GPU'} rounds as one model)"


def candidates(k: int) -> list[int]:
    """The widths worth trying for k models, widest first: for each number of products g, the
    narrowest width that needs no more than g (ceil(k / g)); 1 last."""
    return sorted({-(-k // g) for g in range(1, k + 1)}, reverse=True)


# (width, num_outputs, shapes, context) -> whether that width rounds as lone models.
_ANSWERS: dict[tuple, bool] = {}


def widest_exact(k: int, num_outputs: int, ctx: mx.Context, shapes: RunShapes,
                 rounds: Callable[[int, int, mx.Context, RunShapes], bool] | None = None) -> Width:
    """The widest w <= k whose products (w models, and the last group's k mod w) round every model
    as a lone one at every shape of shapes. `rounds` is the one-width test (default: the cached probe)."""
    rounds = rounds or rounds_as_lone
    t0 = time.perf_counter()
    chosen = 1
    for w in candidates(k):
        if w == 1 or (rounds(w, num_outputs, ctx, shapes) and (k % w <= 1 or rounds(k % w, num_outputs, ctx, shapes))):
            chosen = w
            break
    return Width(k, chosen, time.perf_counter() - t0, ctx.device_type)


def rounds_as_lone(w: int, num_outputs: int, ctx: mx.Context, shapes: RunShapes) -> bool:
    """probe(w, ...), answered from the process's cache, then the disk's, then by running it."""
    key = (w, num_outputs, shapes, str(ctx))
    if key in _ANSWERS:
        return _ANSWERS[key]
    path = _disk_entry(key) if ctx.device_type == "cpu" else None
    answer = _read_answer(path)
    if answer is None:
        answer = probe(w, num_outputs, ctx, shapes)
        _write_answer(path, answer)
    _ANSWERS[key] = answer
    return answer


def probe(w: int, num_outputs: int, ctx: mx.Context, shapes: RunShapes, seed: int = 12345,
          stack_factory: Callable[..., Stack] = Stack) -> bool:
    """Run w random models as one group of a real Stack and as w lone models, at every shape of
    shapes: True when every loss, gradient and score is equal bit for bit."""
    rng = np.random.default_rng(seed + w)
    stack = stack_factory([MemberSpec(1.0, 0.1)] * w, num_outputs, ctx, seed, width=w)
    weight, bias = stack.scores.group_params(0)
    weight.set_data(nd.array(rng.normal(0, 0.1, weight.shape), ctx=ctx, dtype=np.float32))
    bias.set_data(nd.array(rng.normal(0, 0.1, bias.shape), ctx=ctx, dtype=np.float32))
    lone = []
    for m in stack.members:
        net = build_net(num_outputs, 1.0, ctx, seed)
        net.weight.set_data(m.net.weight.data().copy())
        net.bias.set_data(m.net.bias.data().copy())
        make_trainer(net, 0.1)  # gradients are allocated as a lone job's are
        lone.append(net)
    inputs = {rows: nd.array(rng.random((rows, weight.shape[1]), dtype=np.float32), ctx=ctx)
              for rows in set(shapes.train_rows) | set(shapes.score_rows)}
    blocks = [NetWithLoss(net) for net in lone]  # hybridized as Lone hybridizes a lone job's
    for block in blocks:
        block.hybridize(static_alloc=True)
    # Training shapes first: where a width fails, it fails there (and cheaply).
    for rows in shapes.train_rows:
        x = inputs[rows]
        y = nd.array(rng.integers(0, num_outputs, rows), ctx=ctx, dtype=np.float32)
        with autograd.record():
            losses = stack.block(x, y)
        losses.backward()
        stacked_losses = losses.asnumpy()
        for i, (m, net, block) in enumerate(zip(stack.members, lone, blocks)):
            with autograd.record():
                loss = block(x, y)
            loss.backward()
            if not (_same(stacked_losses[:, i], loss.asnumpy())
                    and _same(m.net.weight.grad().asnumpy(), net.weight.grad().asnumpy())
                    and _same(m.net.bias.grad().asnumpy(), net.bias.grad().asnumpy())):
                return False
    for rows in shapes.score_rows:
        stacked = stack.scores(inputs[rows]).asnumpy()
        if not all(_same(stacked[:, i, :], net(inputs[rows]).asnumpy()) for i, net in enumerate(lone)):
            return False
    return True


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _disk_entry(key: tuple) -> Path:
    w, num_outputs, shapes, ctx = key
    facts = {"code": _code_digest(), "width": w, "num_outputs": num_outputs, "train_rows": shapes.train_rows,
             "score_rows": shapes.score_rows, "context": ctx, "mxnet": mx.__version__,
             "mxnet_features": sorted(f.name for f in mx.runtime.Features().values() if f.enabled),
             **machine.kernel_facts()}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]
    return user_cache() / "width-probe" / f"{digest}.json"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The probe's and the stack's own code: an answer is never reused by code that computes otherwise."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / f).read_bytes() for f in ("probe.py", "stack.py", "model.py",
                                                                       "training.py"))).hexdigest()


def _read_answer(path: Path | None) -> bool | None:
    if path is None:
        return None
    try:
        answer = json.loads(path.read_text())["rounds_as_lone"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return answer if isinstance(answer, bool) else None


def _write_answer(path: Path | None, answer: bool) -> None:
    """One file per answer, appearing whole (parallel jobs may write the same one)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"rounds_as_lone": answer}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next process a probe
