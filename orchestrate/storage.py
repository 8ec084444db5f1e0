"""Where a sweep lives: a local path or any pyarrow filesystem URI (s3://, gs://, ...).

The same `--storage` holds Ray's experiment state and checkpoints and the sweep's own
files (sweep.json, trials.json, results.parquet, best_config.yaml). URIs may carry a
query (`s3://bucket/sweeps?endpoint_override=http://127.0.0.1:9000`); `join` keeps it.
"""
from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs

log = logging.getLogger("psdet")
T = TypeVar("T")
# How long a trial waits for its storage to answer before it fails: longer than an endpoint's
# restart, shorter than a trial. A trial that fails at once instead spends one of Tune's
# retries per attempt, and Tune retries at once: a 20 s outage took all of them.
OUTAGE_WAIT_S = 180.0


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than file://."""
    scheme = urlsplit(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def normalize(uri: str) -> str:
    """A remote URI unchanged; a local path made absolute (Ray needs absolute local paths)."""
    if is_remote(uri):
        return str(uri).rstrip("/")
    path = urlsplit(str(uri)).path if str(uri).startswith("file://") else str(uri)
    return str(Path(path).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """`uri`/`parts`, with any query string kept at the end."""
    if not is_remote(uri):
        return str(Path(uri, *parts))
    split = urlsplit(uri)
    return urlunsplit(split._replace(path=posixpath.join(split.path or "/", *parts)))


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI."""
    if not is_remote(uri):
        return pyarrow.fs.LocalFileSystem(), normalize(uri)  # file:// URIs included
    return pyarrow.fs.FileSystem.from_uri(uri)


def local_path(uri: str) -> Path | None:
    """The local directory of `uri`, or None when it is remote."""
    return None if is_remote(uri) else Path(normalize(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


# How many times a read is tried again while a writer keeps replacing the object under it.
READ_TRIES = 5


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return read_file(fs, path)


def read_file(fs: pyarrow.fs.FileSystem, path: str) -> bytes:
    """One whole version of the file at `path`, even while another process replaces it.

    On an object store pyarrow asks for the size first (HEAD) and then for the bytes (a ranged
    GET): an object replaced in between reads as the new version's bytes cut to the old size
    (a driver killed in CI read Tune's experiment state that way). So the size and time are
    read before and after, and the read is tried again unless the bytes match both."""
    for _ in range(READ_TRIES):
        before = fs.get_file_info(path)
        if before.type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(path)
        try:
            with fs.open_input_stream(path) as stream:
                data = stream.readall()
        except OSError:  # a range past the end of a shorter new version; a file deleted under the read
            if _version(fs.get_file_info(path)) == _version(before):
                raise
            continue
        if len(data) == before.size and _version(fs.get_file_info(path)) == _version(before):
            return data
    raise OSError(f"{path}: replaced during each of {READ_TRIES} reads; no whole version could be read")


def _version(info: pyarrow.fs.FileInfo) -> tuple[object, int | None, int | None]:
    return info.type, info.size, info.mtime_ns


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file whole. Locally it goes to a temporary name first and is renamed into
    place, so a killed driver never leaves it half written."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:  # object stores replace an object atomically
        stream.write(data)


def display(uri: str, fs_path: str) -> str:
    """A path on the storage filesystem (as Ray reports it) as a URI the user can reuse."""
    if not is_remote(uri):
        return fs_path
    split = urlsplit(uri)
    return f"{split.scheme}://{fs_path.lstrip('/')}"


def patiently(call: Callable[[], T], what: str, wait_s: float = OUTAGE_WAIT_S) -> T:
    """`call()`, tried again (after 1, 2, 4 ... 16 s) while storage does not answer (an
    OSError other than a missing file), for up to `wait_s`; then its error."""
    deadline = time.monotonic() + wait_s
    pause = 1.0
    while True:
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("storage did not answer while %s (%s); trying again in %.0f s", what,
                        " ".join(str(exc).split())[:200], pause)
            time.sleep(pause)
            pause = min(2 * pause, 16.0)
