"""Finding, downloading, checking and loading MNIST-format datasets into memory."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import DataError
from .idx import read_idx

SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DatasetFiles:
    """The four IDX files of one dataset, as found on disk."""

    name: str
    root: Path
    paths: Mapping[str, Path]

    def sha256(self) -> dict[str, str]:
        """Return the sha256 of each file, keyed by file name."""
        return {p.name: file_sha256(p) for p in self.paths.values()}

    def digest(self) -> str:
        """One sha256 over the four files' sha256s: a fingerprint of the dataset as used."""
        joined = "\n".join(f"{name} {h}" for name, h in sorted(self.sha256().items()))
        return hashlib.sha256(joined.encode()).hexdigest()


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels as the tutorial feeds them: float32 in [0, 1]."""
    return images.astype(np.float32) / 255


@dataclass(frozen=True)
class Split:
    """One split in memory as its uint8 bytes: images (N, 784), labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def x(self) -> np.ndarray:
        """Pixels as the tutorial feeds them: float32 in [0, 1] (computed on each access)."""
        return pixels(self.images)

    @property
    def y(self) -> np.ndarray:
        """Labels as float32, as in the tutorial."""
        return self.labels.astype(np.float32)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) so a sweep hashes each file once."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _find_in(folder: Path) -> dict[str, Path] | None:
    """The four files in folder (each gzip or raw), or None when any is missing."""
    found = {}
    for key, stem in SPLIT_FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _missing_in(folder: Path) -> list[str]:
    return [
        f"{stem}.gz"
        for stem in SPLIT_FILES.values()
        if not (folder / f"{stem}.gz").is_file() and not (folder / stem).is_file()
    ]


def locate(
    name: str,
    root: str | None,
    cache: str,
    search: Sequence[str] = (),
    mirrors: Sequence[str] = (),
    md5: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> DatasetFiles:
    """Find the dataset's four IDX files, downloading them when they are missing.

    With root set, only that folder is used (and downloaded into). Without it, the cache folder
    and then each search folder are tried, and a download goes into the cache folder.
    """
    if root:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"data.root={root} does not exist: create it, point data.root at the folder "
                "holding the IDX files, or leave data.root unset to use the cache"
            )
        candidates = [folder]
    else:
        folder = Path(cache).expanduser()
        candidates = [folder, *(Path(s) for s in search)]
    for candidate in candidates:
        paths = _find_in(candidate)
        if paths is not None:
            return DatasetFiles(name, candidate, paths)
    download(folder, mirrors, md5 or {}, name, timeout=timeout, searched=candidates)
    paths = _find_in(folder)
    assert paths is not None, "download() returns only when every file is in place"
    return DatasetFiles(name, folder, paths)


def download(
    folder: Path,
    mirrors: Sequence[str],
    md5: Mapping[str, str],
    name: str,
    timeout: float = 30.0,
    searched: Sequence[Path] = (),
) -> None:
    """Download each missing file from the first mirror that serves it with the published md5.

    Each file is written to a temporary file in the same folder and renamed into place only
    after its checksum matched, so an interrupted download never leaves a bad file behind.
    """
    missing = _missing_in(folder)
    where = ", ".join(str(p) for p in searched) or str(folder)
    if missing and not mirrors:
        raise DataError(
            f"{name}: missing {', '.join(missing)} in {where} and no download mirror is configured; "
            "set data.root=/folder/with/the/idx/files"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for filename in missing:
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + filename
            try:
                _fetch(url, folder / filename, md5.get(filename), timeout)
                break
            except (OSError, http.client.HTTPException, DataError) as exc:
                reason = str(getattr(exc, "reason", exc))
                if reason not in errors:
                    errors.append(reason)
        else:
            raise DataError(
                f"{name}: missing {', '.join(missing)} in {where}, and none of the "
                f"{len(mirrors)} mirrors could serve {filename} ({'; '.join(errors)}); put the files "
                f"in {folder} by hand or set data.root=/folder/with/the/idx/files"
            )


def _fetch(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while block := resp.read(1 << 20):
                digest.update(block)
                out.write(block)
        if md5 and digest.hexdigest() != md5:
            raise DataError(f"checksum mismatch: md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_split(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{img_path} holds images of shape {images.shape[1:]}, expected {IMAGE_SHAPE}")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path} holds labels of shape {labels.shape}, expected one dimension")
    if len(images) != len(labels):
        raise DataError(
            f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DataError(f"{lbl_path} holds label {labels.max()}, expected 0..{NUM_CLASSES - 1}")


_SPLIT_CACHE: dict[tuple, tuple[Split, Split]] = {}


def load(files: DatasetFiles) -> tuple[Split, Split]:
    """Read, check and convert the train and test splits; cached per process, keyed by the files."""
    key = tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files.paths.values()
    )
    if key not in _SPLIT_CACHE:
        splits = []
        for part in ("train", "test"):
            img_path, lbl_path = files.paths[f"{part}_images"], files.paths[f"{part}_labels"]
            images, labels = read_idx(img_path), read_idx(lbl_path)
            _check_split(images, labels, img_path, lbl_path)
            splits.append(Split(images.reshape(len(images), -1), labels))
        _SPLIT_CACHE.clear()  # keep one dataset in memory, not every one a process has seen
        _SPLIT_CACHE[key] = (splits[0], splits[1])
    return _SPLIT_CACHE[key]


_HELD_OUT: dict[tuple, tuple[Split, Split]] = {}


def hold_out(train: Split, size: int, seed: int) -> tuple[Split, Split | None]:
    """The training split without `size` examples held out for validation, and those examples: a
    fixed subset drawn by numpy's generator from `seed` (the same seed and size always hold out the
    same rows), both in their original order. size 0 returns the split itself and None. Cached per
    process, so the jobs of a sweep share one copy."""
    if size == 0:
        return train, None
    if not 0 < size < len(train.labels):
        raise DataError(f"data.val_size={size} must be below the {len(train.labels)} training examples")
    key = (id(train), size, seed)
    if key not in _HELD_OUT:
        held = np.zeros(len(train.labels), dtype=bool)
        held[np.random.default_rng(seed).choice(len(train.labels), size=size, replace=False)] = True
        _HELD_OUT.clear()
        _HELD_OUT[key] = (Split(train.images[~held], train.labels[~held]), Split(train.images[held], train.labels[held]))
    return _HELD_OUT[key]
