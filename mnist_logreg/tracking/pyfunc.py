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
    """mlflow.pyfunc.save_model of a placeholder export: the files every run's logged model shares
    (its empty weights are swapped for the run's by stage_model). Made once per user, input example
    and environment (MLflow, MXNet, numpy, pandas, Python, this file), and kept in the user cache:
    save_model takes 0.35 s here, most of it MLflow checking the pinned requirements against every
    installed distribution, which each process that writes models (a sweep's and its record writer)
    paid again. A process that makes it moves it into place whole, so no other sees half of one."""
    import hashlib
    import sys
    from importlib import metadata

    from ..project import user_cache

    pins = [f"{name}=={metadata.version(name)}" for name in ("mxnet", "numpy", "mlflow", "pandas")]
    key = hashlib.sha256(b"\0".join([example, repr((shape, dtype, pins, sys.version)).encode(),
                                      Path(__file__).read_bytes()])).hexdigest()[:20]
    folder = user_cache() / f"pyfunc-template-{key}"
    if not (folder / "placeholder").is_file():
        _make_template(folder, np.frombuffer(example, dtype=dtype).reshape(shape), pins[:3] + ["pandas"])
    return Template(folder / "model", Path((folder / "placeholder").read_text()))


def _make_template(folder: Path, example: np.ndarray, pip_requirements: list[str]) -> None:
    """The template folder: the pyfunc in model/, its placeholder export in export/, and in
    `placeholder` that export's path as the MLmodel names it (the folder it was made in)."""
    import os
    import shutil

    import mlflow

    folder.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        placeholder = root / "export"
        placeholder.mkdir()
        artifacts = {}
        for name, source in ((SYMBOL, "model-symbol.json"), (PARAMS, "model-0000.params")):
            (placeholder / source).write_bytes(b"")
            artifacts[name] = str(placeholder / source)
        mlflow.pyfunc.save_model(  # "models from code": this file, not a pickled object
            root / "model", python_model=__file__, artifacts=artifacts, signature=signature(),
            input_example=example, pip_requirements=pip_requirements)
        (root / "placeholder").write_text(str(placeholder))
        try:
            os.rename(root, folder)
        except OSError:  # another process put its own in place first: the same files
            if not (folder / "placeholder").is_file():
                raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


# What MLflow loads when it runs this file as the model's code (see stage_model).
try:
    from mlflow.models import set_model

    set_model(GluonClassifier())
except ImportError:  # pragma: no cover - mlflow is a dependency
    pass
