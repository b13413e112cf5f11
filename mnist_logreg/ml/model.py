"""The tutorial's model: one Dense layer, Normal(sigma) weights, softmax cross-entropy, on a context."""

from __future__ import annotations

import mxnet as mx
from mxnet import gluon

from ..errors import ContextError

NUM_INPUTS = 28 * 28

GPU_FIX = (
    "install the CUDA build of MXNet in place of the CPU one "
    "(pip install mxnet-cu112==1.9.1, or the mxnet-cu1xx wheel matching your CUDA; "
    "its kernels cover sm_50 to sm_86, so Hopper cards such as H100/H200 cannot run it), "
    "or train with context=cpu"
)


def make_context(device: str, index: int = 0) -> mx.Context:
    """mx.cpu() or mx.gpu(index); raise ContextError with the fix when MXNet sees no such GPU."""
    if device == "cpu":
        return mx.cpu()
    if device != "gpu":
        raise ContextError(f"context.device={device!r} is unknown: use context=cpu or context=gpu")
    try:
        count = mx.context.num_gpus()
    except mx.base.MXNetError as exc:  # a CUDA build with a broken driver or no card
        raise ContextError(f"context=gpu: MXNet cannot query the GPUs ({exc}); {GPU_FIX}") from exc
    if count == 0:
        raise ContextError(f"context=gpu: MXNet {mx.__version__} sees no GPU; {GPU_FIX}")
    if index >= count:
        raise ContextError(
            f"context.index={index}: MXNet sees {count} GPU(s) (indices 0..{count - 1}); "
            f"set context.index to one of them"
        )
    return mx.gpu(index)


def build_net(num_outputs: int, sigma: float, ctx: mx.Context, seed: int) -> gluon.nn.Dense:
    """Dense(num_outputs) with weights drawn from Normal(sigma) under mx.random.seed(seed).

    The bias keeps Gluon's default zero initializer, exactly as in the tutorial.
    """
    mx.random.seed(seed)
    net = gluon.nn.Dense(num_outputs, in_units=NUM_INPUTS)
    net.collect_params().initialize(mx.init.Normal(sigma=sigma), ctx=ctx)
    return net


class NetWithLoss(gluon.HybridBlock):
    """net followed by softmax cross-entropy, so one hybridized graph runs a training forward pass."""

    def __init__(self, net: gluon.HybridBlock, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.net = net
            self.loss = gluon.loss.SoftmaxCrossEntropyLoss()

    def hybrid_forward(self, F, x, y):  # noqa: N803 (Gluon's signature)
        return self.loss(self.net(x), y)


def params_hash(net) -> str:
    """sha256 over every parameter's name, shape and float32 bytes, in name order (the weights' hash)."""
    import hashlib

    h = hashlib.sha256()
    params = net.collect_params()
    for name in sorted(params.keys()):
        arr = params[name].data().asnumpy()
        # Strip Gluon's per-process prefix (dense0_, dense3_...) so names match across jobs.
        h.update(name.split("_", 1)[-1].encode() + str(arr.shape).encode() + arr.tobytes())
    return h.hexdigest()
