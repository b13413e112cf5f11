"""A job's train and test splits as MLflow dataset inputs."""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

from ..ml.data import DatasetFiles, Split
from .fingerprint import sha256_text


def dataset_inputs(name: str, files: DatasetFiles, splits: Mapping[str, Split]) -> list:
    """The splits (train, test, and val when data.val_size holds one out) as MLflow dataset
    inputs: name, a digest of the files' sha256 (of a subset, its labels too), the folder as source,
    the schema (uint8 pixels and labels) and the number of rows."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    hashes = files.sha256()
    out = []
    for context, split in splits.items():
        part = "train" if context == "val" else context  # the validation rows come from the training files
        names = [files.paths[f"{part}_{kind}"].name for kind in ("images", "labels")]
        digest = sha256_text("".join(hashes[n] for n in names))[:16]
        if "val" in splits and part == "train":
            # a subset of the files (the held-out rows, or the training rows left): named by its labels too
            digest = sha256_text(digest + context + hashlib.sha256(split.labels.tobytes()).hexdigest())[:16]
        schema = {"mlflow_tensorspec": {
            "features": json.dumps([{"name": "image", "type": "tensor",
                                     "tensor-spec": {"dtype": "uint8", "shape": [-1, split.images.shape[1]]}}]),
            "targets": json.dumps([{"name": "label", "type": "tensor",
                                    "tensor-spec": {"dtype": "uint8", "shape": [-1]}}]),
        }}
        profile = {"num_rows": int(len(split.labels)), "files": names}
        dataset = Dataset(f"{name}/{context}", digest, "local", json.dumps({"uri": str(files.root)}),
                          json.dumps(schema), json.dumps(profile))
        out.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    return out

