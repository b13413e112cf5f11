"""The trained Gluon model as an MLflow 3 logged model: a `pyfunc` around the exported symbol and params.

MLflow 3 has no Gluon flavour. `GluonClassifier` loads the `net.export` files (model-symbol.json,
model-0000.params) with `gluon.SymbolBlock.imports` and predicts, for rows of 784 float32 pixels
in [0, 1], the class probabilities (`prob_0` .. `prob_9`) and the label (the argmax of the scores,
as the harness scores its test accuracy).

    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    model.predict(x)          # x: (N, 784) float32 -> DataFrame prob_0..prob_9, label
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    PythonModel = object  # type: ignore[misc,assignment]

SYMBOL, PARAMS = "symbol", "params"


class GluonClassifier(PythonModel):
    """pyfunc: (N, 784) float32 pixels -> DataFrame of class probabilities and the predicted label."""

    def load_context(self, context) -> None:
        import mxnet as mx

        self.net = mx.gluon.SymbolBlock.imports(context.artifacts[SYMBOL], ["data"], context.artifacts[PARAMS])

    def predict(self, context, model_input: np.ndarray, params=None):
        import mxnet as mx
        import pandas as pd

        x = np.asarray(model_input.values if hasattr(model_input, "values") else model_input, dtype=np.float32)
        scores = self.net(mx.nd.array(x.reshape(len(x), -1))).asnumpy()
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
        out = pd.DataFrame({f"prob_{k}": probs[:, k] for k in range(probs.shape[1])})
        out["label"] = scores.argmax(axis=1).astype(np.int64)
        return out


def signature(num_classes: int = 10):
    """784 float32 pixels in; the class probabilities (float32) and the label (int64) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 784))])
    outputs = Schema([ColSpec("float", f"prob_{k}") for k in range(num_classes)] + [ColSpec("long", "label")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(client, run_id: str, model_id: str, export_dir: Path, example: np.ndarray) -> None:
    """Save the pyfunc (with its signature and an input example of real test images) into the
    logged model `model_id`, whose metrics the run has been logging, and mark it READY."""
    import mlflow
    import mxnet

    artifacts = {SYMBOL: str(export_dir / "model-symbol.json"), PARAMS: str(export_dir / "model-0000.params")}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "model"
        mlflow.pyfunc.save_model(  # "models from code": this file, not a pickled object
            saved, python_model=__file__, artifacts=artifacts, signature=signature(),
            input_example=example,
            pip_requirements=[f"mxnet=={mxnet.__version__}", f"numpy=={np.__version__}",
                              f"mlflow=={mlflow.__version__}", "pandas"],
        )
        client.log_model_artifacts(model_id, str(saved))
    client.finalize_logged_model(model_id, "READY")


# What MLflow loads when it runs this file as the model's code (see log_model).
try:
    from mlflow.models import set_model

    set_model(GluonClassifier())
except ImportError:  # pragma: no cover - mlflow is a dependency
    pass
