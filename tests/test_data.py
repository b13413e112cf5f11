"""Finding dataset files, and downloading them from mirrors over real HTTP on 127.0.0.1."""

import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from mnist_logreg.ml.data import SPLIT_FILES, download, locate
from mnist_logreg.errors import DataError
from mnist_logreg.ml.idx import write_idx

NAMES = [f"{stem}.gz" for stem in SPLIT_FILES.values()]


def _write_set(folder: Path) -> dict[str, str]:
    """Write four small IDX files into folder; return their md5s (what a dataset publishes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name in NAMES:
        shape = (20, 28, 28) if "images" in name else (20,)
        write_idx(folder / name, rng.integers(0, 10, shape, dtype=np.uint8))
    return {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in NAMES}


@pytest.fixture
def mirror(tmp_path):
    """A real HTTP server with three mirrors: /good/ serves the files, /bad/ serves wrong bytes,
    /cut/ closes the connection halfway through each file."""
    source = tmp_path / "source"
    md5 = _write_set(source)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            kind, _, name = self.path.strip("/").partition("/")
            path = source / name
            if not path.is_file() or kind not in ("good", "bad", "cut"):
                self.send_error(404)
                return
            body = path.read_bytes()
            if kind == "bad":
                body = body[::-1]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if kind == "cut" else body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", md5
    server.shutdown()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_tries_mirrors_in_turn_and_checks_md5(tmp_path, mirror):
    base, md5 = mirror
    dest = tmp_path / "cache"
    files = locate("tiny", None, str(dest), mirrors=[f"{base}/missing/", f"{base}/bad/", f"{base}/good/"], md5=md5)
    assert files.root == dest
    assert _leftovers(dest) == sorted(NAMES)  # no temporary files left
    for name in NAMES:
        assert hashlib.md5((dest / name).read_bytes()).hexdigest() == md5[name]


@pytest.mark.parametrize("kind, match", [("bad", "checksum mismatch"), ("cut", "none of the 1 mirrors")])
def test_failed_download_leaves_no_file(tmp_path, mirror, kind, match):
    """Wrong bytes everywhere, or a connection cut halfway: an error, and nothing left behind."""
    base, md5 = mirror
    dest = tmp_path / "cache"
    with pytest.raises(DataError, match=match):
        download(dest, [f"{base}/{kind}/"], md5, "tiny")
    assert _leftovers(dest) == []


def test_offline_error_names_files_folder_and_override(tmp_path):
    dest = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        locate("mnist", None, str(dest), mirrors=["http://127.0.0.1:9/"], md5={}, timeout=2)
    message = str(info.value)
    assert "\n" not in message
    assert "train-images-idx3-ubyte.gz" in message and str(dest) in message and "data.root=" in message


def test_cache_first_then_search_folders(tmp_path):
    cache, system = tmp_path / "cache", tmp_path / "system"
    _write_set(system)
    assert locate("tiny", None, str(cache), search=[str(system)]).root == system
    _write_set(cache)
    assert locate("tiny", None, str(cache), search=[str(system)]).root == cache


def test_raw_files_are_found_too(tmp_path):
    _write_set(tmp_path / "gz")
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in NAMES:
        write_idx(raw / name[:-3], np.zeros(3, np.uint8), compress=False)
    files = locate("tiny", str(raw), str(tmp_path / "unused"))
    assert all(p.suffix != ".gz" for p in files.paths.values())


def test_data_root_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*nope does not exist"):
        locate("tiny", str(tmp_path / "nope"), str(tmp_path / "cache"))


def test_digest_changes_when_a_file_changes(tmp_path):
    _write_set(tmp_path)
    files = locate("tiny", str(tmp_path), str(tmp_path))
    before = files.digest()
    write_idx(tmp_path / NAMES[1], np.ones(20, np.uint8))
    assert files.digest() != before
