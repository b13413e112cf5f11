"""A finished run's files: the exported model, two plots, the environment and Hydra's record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..config import redact
from ..errors import TrackingError
from ..tracking.runlog import RunLog


def _write_artifacts(cfg: DictConfig, net, test, out: Path, names) -> Path:
    """Exported model, sample predictions and confusion matrix, under out/."""
    from mxnet import nd

    from .plots import confusion_matrix, plot_confusion, plot_predictions

    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    net.export(str(model_dir / "model"), epoch=0)  # model-symbol.json + model-0000.params

    preds = np.concatenate([
        nd.argmax(net(test.x[i : i + cfg.trainer.eval_batch_size]), axis=1).asnumpy()
        for i in range(0, len(test), cfg.trainer.eval_batch_size)
    ])
    true = test.y.asnumpy()
    pick = np.random.default_rng(cfg.seed).choice(len(true), size=min(10, len(true)), replace=False)
    plot_predictions(test.x[nd.array(pick, dtype=np.int64, ctx=test.x.context)].asnumpy(),
                     true[pick], preds[pick], out / "predictions.png", names)
    counts = confusion_matrix(true, preds, cfg.model.num_outputs)
    plot_confusion(counts, out / "confusion_matrix.png", names,
                   title=f"{cfg.data.name} test set: accuracy {np.trace(counts) / counts.sum():.4f}")
    return out


MODEL_STAGING = ".logged_model"  # in a run's work folder, until its upload is written


def log_artifacts(run: RunLog, cfg: DictConfig, net, test, out_dir: Path | None, work_dir: Path) -> None:
    """Model, plots, frozen requirements, git diff and Hydra's files: staged in work_dir/artifacts,
    then uploaded in one call, and the same export as the run's logged model (staged in
    work_dir/MODEL_STAGING). With a record writer the uploads are queued, so the staged files stay
    until the run has ended. When the disk fills up (or any write fails), the files already copied
    are removed again, so no half-written artifact is left looking complete."""
    from ..tracking.fingerprint import frozen_requirements, git_diff

    art = work_dir / "artifacts"
    try:
        _write_artifacts(cfg, net, test, art, list(cfg.data.get("classes") or []) or None)
        (art / "environment").mkdir(exist_ok=True)
        (art / "environment" / "requirements.txt").write_text(frozen_requirements())
        if git_diff():
            (art / "environment" / "git.diff").write_text(git_diff())
        if out_dir is not None and (out_dir / ".hydra").is_dir():
            (art / "hydra").mkdir(exist_ok=True)
            for f in (out_dir / ".hydra").iterdir():  # Hydra's record, passwords hidden
                (art / "hydra" / f.name).write_text(redact(f.read_text()))
        run.log_artifacts(art)
        if run.model_id is not None:  # the same export, as an MLflow logged model (pyfunc)
            from ..tracking.pyfunc import log_model

            log_model(run.client, run.run_id, run.model_id, art / "model", test.x[:5].asnumpy(),
                      work_dir / MODEL_STAGING)
    except OSError as exc:
        remove_uploaded(run, art)
        raise TrackingError(f"could not store the artifacts of run {run.run_id} ({exc.strerror or exc}): "
                            "free space where outputs/ and the experiment's artifacts live, then rerun "
                            "the job") from exc


def remove_uploaded(run: RunLog, staged: Path) -> None:
    """Delete from a local artifact store the files of `staged` that an interrupted upload wrote."""
    from urllib.parse import unquote, urlparse

    uri = run.client.get_run(run.run_id).info.artifact_uri
    if not uri.startswith("file:"):
        return
    dest = Path(unquote(urlparse(uri).path))
    for f in staged.rglob("*") if staged.is_dir() else []:
        target = dest / f.relative_to(staged)
        if target.is_file():
            target.unlink()
