"""The bench's peer: K logistic-regression models trained in one pass with JAX, as a researcher who
wants many configs at once would write it (`jit` over a `lax.scan` of `vmap`-ed SGD steps, batch 64,
60,000 random images), timed per model-epoch at K = 1, 8 and 32, and checked for whether each
vmapped model is bit-identical to its own K = 1 training after one epoch.

JAX needs numpy 2 and MXNet needs numpy < 1.24, so this file imports nothing of the harness and runs
in its own environment; the bench starts it as

    uv run --no-project --with 'jax[cpu]' python mnist_logreg/jax_peer.py

and reads the one JSON line it prints.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

SIZES = (1, 8, 32)
N, D, C, BATCH = 60000, 784, 10, 64


def main() -> int:
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(0)
    steps = N // BATCH  # lax.scan needs one batch shape: the last short batch is left out
    xs = jnp.asarray(rng.random((steps, BATCH, D), dtype=np.float32))
    ys = jnp.asarray(rng.integers(0, C, (steps, BATCH)))
    k_max = max(SIZES)
    w0 = jnp.asarray(rng.normal(0, 0.1, (k_max, D, C)).astype(np.float32))
    b0 = jnp.zeros((k_max, C), jnp.float32)
    lrs = jnp.asarray(np.linspace(0.05, 0.5, k_max, dtype=np.float32))

    def loss(params, x, y):
        w, b = params
        logp = jax.nn.log_softmax(x @ w + b)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def sgd(params, lr, x, y):
        grads = jax.grad(loss)(params, x, y)
        return tuple(p - lr * g for p, g in zip(params, grads))

    many = jax.vmap(sgd, in_axes=(0, 0, None, None))

    @jax.jit
    def epoch(params, lr):
        return lax.scan(lambda p, batch: (many(p, lr, *batch), None), params, (xs, ys))[0]

    out = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "model_epoch_s": {}, "identical": {}}
    trained = {}
    for k in SIZES:
        params = (w0[:k], b0[:k])
        jax.block_until_ready(epoch(params, lrs[:k]))  # compiled once, outside the timing
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            trained[k] = jax.block_until_ready(epoch(params, lrs[:k]))
            best = min(best, time.perf_counter() - t0)
        out["model_epoch_s"][str(k)] = best / k
    for k in SIZES[1:]:  # each vmapped model against its own K = 1 epoch, bit for bit
        same = 0
        for i in range(k):
            alone = jax.block_until_ready(epoch((w0[i : i + 1], b0[i : i + 1]), lrs[i : i + 1]))
            same += all(np.asarray(a[0]).tobytes() == np.asarray(t[i]).tobytes() for a, t in zip(alone, trained[k]))
        out["identical"][str(k)] = f"{same} of {k}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
