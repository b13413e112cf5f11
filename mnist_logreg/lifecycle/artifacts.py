"""A finished run's files: the exported model, two plots, the environment and Hydra's record.

The training process exports the weights and scores the test set (it holds the model). The rest is
staged (`stage_files`: the pictures, the environment files, Hydra's record, the logged model's
folder) and uploaded (`write_files`), by a record writer in its own process while the next stack
trains; after the last stack, the training process stages most runs' files itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..config import redact
from ..errors import TrackingError
from ..ml.data import Split, pixels
from ..tracking import writer
from ..tracking.runlog import RunLog
from .plots import confusion_matrix

MODEL_STAGING = ".logged_model"  # in a run's work folder, until its upload is written


@dataclass
class RunFiles:
    """What stage_files and write_files need of a run, small enough to send to a record writer
    (some 10 kB)."""

    run_id: str
    model_id: str | None
    art: Path  # the run's staged artifacts (the export already in art/model)
    staging: Path  # where its logged model is staged
    hydra_dir: Path | None  # the job's .hydra folder, copied with passwords hidden
    shown: np.ndarray  # the pictured test images, uint8 (N, 784)
    shown_true: np.ndarray
    shown_pred: np.ndarray
    counts: np.ndarray  # the test set's confusion matrix
    names: list[str] | None
    title: str
    example: np.ndarray  # the logged model's input example: the first test images, uint8
    staged: bool = False  # whether stage_files has run


def log_artifacts(run: RunLog, cfg: DictConfig, net, test, test_split: Split, out_dir: Path | None, work_dir: Path,
                  predicted: np.ndarray | None = None, stage: bool = True) -> None:
    """Model, plots, frozen requirements, git diff and Hydra's files: staged in work_dir/artifacts,
    then uploaded in one call, and the same export as the run's logged model (staged in
    work_dir/MODEL_STAGING). Here the net is exported and scored on the test set (`test`, on its
    device; predicted: its labels, when the caller has them), and with `stage` the rest is staged
    here too (stage_files; else a record writer stages it while this process trains on). The
    upload is write_files, queued to the record writer when there is one, which fails the run if
    it cannot be written."""
    from ..ml.training import predicted_labels

    art = work_dir / "artifacts"
    try:
        (art / "model").mkdir(parents=True, exist_ok=True)
        net.export(str(art / "model" / "model"), epoch=0)  # model-symbol.json + model-0000.params
    except OSError as exc:
        raise _no_room(run.run_id, exc) from exc
    preds = predicted if predicted is not None else predicted_labels(net, test, cfg.trainer.eval_batch_size)
    true = test_split.labels.astype(np.int64)
    pick = np.random.default_rng(cfg.seed).choice(len(true), size=min(10, len(true)), replace=False)
    counts = confusion_matrix(true, preds, cfg.model.num_outputs)
    files = RunFiles(run.run_id, run.model_id, art, work_dir / MODEL_STAGING,
                     out_dir / ".hydra" if out_dir is not None and (out_dir / ".hydra").is_dir() else None,
                     test_split.images[pick], true[pick], preds[pick], counts,
                     list(cfg.data.get("classes") or []) or None,
                     f"{cfg.data.name} test set: accuracy {np.trace(counts) / counts.sum():.4f}",
                     test_split.images[:5])
    if stage:
        try:
            stage_files(files)
        except OSError as exc:
            raise _no_room(run.run_id, exc) from exc
    writer.write(run.client, run.run_id, write_files, files)


def stage_files(files: RunFiles) -> None:
    """Everything a run's files need besides its weights, on disk: the pictures, the environment,
    Hydra's record and the logged model's folder. Once."""
    from ..tracking.fingerprint import frozen_requirements, git_diff
    from ..tracking.pyfunc import stage_model
    from .plots import plot_confusion, plot_predictions

    if files.staged:
        return
    art = files.art
    plot_predictions(pixels(files.shown), files.shown_true, files.shown_pred, art / "predictions.png", files.names)
    plot_confusion(files.counts, art / "confusion_matrix.png", files.names, title=files.title)
    (art / "environment").mkdir(exist_ok=True)
    (art / "environment" / "requirements.txt").write_text(frozen_requirements())
    if git_diff():
        (art / "environment" / "git.diff").write_text(git_diff())
    if files.hydra_dir is not None:
        (art / "hydra").mkdir(exist_ok=True)
        for f in files.hydra_dir.iterdir():  # Hydra's record, passwords hidden
            (art / "hydra" / f.name).write_text(redact(f.read_text()))
    if files.model_id is not None:  # the same export, as an MLflow logged model (pyfunc)
        stage_model(art / "model", pixels(files.example), files.staging)
    files.staged = True


def write_files(client, run_id: str, files: RunFiles) -> None:
    """A run's files staged (if they are not yet) and uploaded: the artifacts in one call, then the
    logged model (marked READY). When the disk fills up (or any write fails), the files already
    copied are removed again, so no half-written artifact is left looking complete."""
    from ..tracking.pyfunc import upload_model

    try:
        stage_files(files)
        client.log_artifacts(run_id, str(files.art))
        if files.model_id is not None:
            upload_model(client, files.model_id, files.staging)
    except OSError as exc:
        remove_uploaded(client, run_id, files.art)
        raise _no_room(run_id, exc) from exc


def _no_room(run_id: str, exc: OSError) -> TrackingError:
    return TrackingError(f"could not store the artifacts of run {run_id} ({exc.strerror or exc}): free space "
                         "where outputs/ and the experiment's artifacts live, then rerun the job")


def remove_uploaded(client, run_id: str, staged: Path) -> None:
    """Delete from a local artifact store the files of `staged` that an interrupted upload wrote."""
    from urllib.parse import unquote, urlparse

    uri = client.get_run(run_id).info.artifact_uri
    if not uri.startswith("file:"):
        return
    dest = Path(unquote(urlparse(uri).path))
    for f in staged.rglob("*") if staged.is_dir() else []:
        target = dest / f.relative_to(staged)
        if target.is_file():
            target.unlink()
