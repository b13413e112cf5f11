"""The trained Gluon model as an MLflow 3 logged model: a `pyfunc` around the exported symbol and params.

MLflow 3 has no Gluon flavour. `GluonClassifier` loads the `net.export` files (model-symbol.json,
model-0000.params) with `gluon.SymbolBlock.imports` and predicts, for rows of 784 float32 pixels
in [0, 1], the class probabilities (`prob_0` .. `prob_9`) and the label (the argmax of the scores,
as the harness scores its test accuracy).

    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    model.predict(x)          # x: (N, 784) float32 -> DataFrame prob_0..prob_9, label
"""

from __future__ import annotations

import functools
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


def stage_model(export_dir: Path, example: np.ndarray, staging: Path) -> None:
    """The pyfunc (with its signature and an input example of real test images) for the export in
    export_dir, saved into `staging` (emptied first), which must stay until upload_model has run.

    Every run of a process gets the same MLmodel, environment files and input example but its own
    weights: MLflow writes them once (`Template`), and each run copies them with its own export and
    its own model uuid, creation time, size and export paths in the MLmodel."""
    import shutil

    template = _template(example.tobytes(), example.shape, str(example.dtype))
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(template.folder, staging)
    for source in ("model-symbol.json", "model-0000.params"):
        shutil.copyfile(export_dir / source, staging / "artifacts" / source)
    (staging / "MLmodel").write_text(template.mlmodel(export_dir))


def upload_model(client, model_id: str, staging: Path) -> None:
    """The staged pyfunc into the logged model `model_id`, whose metrics the run has been logging,
    marked READY."""
    client.log_model_artifacts(model_id, str(staging))
    client.finalize_logged_model(model_id, "READY")


class Template:
    """A pyfunc saved by MLflow around an empty placeholder export: its MLmodel names the
    placeholder's folder, a uuid, a creation time and a size, each once, which `mlmodel` replaces
    with a run's own."""

    def __init__(self, folder: Path, placeholder: Path) -> None:
        from mlflow.models import Model

        self.folder, self.placeholder = folder, placeholder
        self.text = (folder / "MLmodel").read_text()
        meta = Model.load(str(folder / "MLmodel"))
        self.uuid, self.created, self.size = meta.model_uuid, meta.utc_time_created, meta.model_size_bytes or 0
        for value in (str(placeholder), self.uuid, self.created, f"model_size_bytes: {self.size}\n"):
            if self.text.count(value) != (2 if value == str(placeholder) else 1):
                raise RuntimeError(f"MLflow's MLmodel no longer holds {value!r} as expected: update pyfunc.Template")

    def mlmodel(self, export_dir: Path) -> str:
        import datetime
        import uuid

        size = self.size + sum((export_dir / f).stat().st_size for f in ("model-symbol.json", "model-0000.params"))
        return (self.text.replace(str(self.placeholder), str(export_dir)).replace(self.uuid, uuid.uuid4().hex)
                .replace(self.created, str(datetime.datetime.utcnow()))
                .replace(f"model_size_bytes: {self.size}\n", f"model_size_bytes: {size}\n"))


@functools.lru_cache(maxsize=2)
def _template(example: bytes, shape: tuple, dtype: str) -> Template:
    """mlflow.pyfunc.save_model of a placeholder export, once per process and input example: the
    files every run's logged model shares (its empty weights are swapped for the run's by stage_model)."""
    import atexit
    import shutil
    from importlib import metadata

    import mlflow

    root = Path(tempfile.mkdtemp(prefix="mnist_logreg_pyfunc_"))
    atexit.register(shutil.rmtree, root, True)
    placeholder = root / "export"
    placeholder.mkdir()
    artifacts = {}
    for name, source in ((SYMBOL, "model-symbol.json"), (PARAMS, "model-0000.params")):
        (placeholder / source).write_bytes(b"")
        artifacts[name] = str(placeholder / source)
    mlflow.pyfunc.save_model(  # "models from code": this file, not a pickled object
        root / "model", python_model=__file__, artifacts=artifacts, signature=signature(),
        input_example=np.frombuffer(example, dtype=dtype).reshape(shape),
        pip_requirements=[f"mxnet=={metadata.version('mxnet')}", f"numpy=={np.__version__}",
                          f"mlflow=={mlflow.__version__}", "pandas"],
    )
    return Template(root / "model", placeholder)


# What MLflow loads when it runs this file as the model's code (see stage_model).
try:
    from mlflow.models import set_model

    set_model(GluonClassifier())
except ImportError:  # pragma: no cover - mlflow is a dependency
    pass
