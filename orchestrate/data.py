"""The sweep's dataset: the user's `--data`, or a small synthetic one made once and cached.

The cache key holds the image counts, the seed and a hash of the generator's source, so
a changed generator never serves stale images. Generation goes to a temporary directory
renamed into place under a file lock: concurrent drivers or workers never see half a
dataset. A worker on a node without the cache regenerates it there (the generator is
seeded, so every node gets the same images).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import shutil
from pathlib import Path

from filelock import FileLock

from orchestrate.space import SyntheticData
from psdet.errors import DataError

LABEL_DIR = "ps_json_label"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "psdet" / "synth"


def synthetic_root(synth: SyntheticData) -> Path:
    from psdet.data import synth as generator

    digest = hashlib.sha256(inspect.getsource(generator).encode()).hexdigest()[:10]
    return cache_root() / f"train{synth.train}-val{synth.val}-seed{synth.seed}-{digest}"


def ensure_synthetic(synth: SyntheticData, root: Path | None = None, workers: int = 1) -> tuple[Path, bool]:
    """(dataset root, whether it was made now); `root` defaults to the cache entry; `workers`
    processes render it (forked: pass more than 1 only from a process that runs no Ray
    or torch threads yet, as the driver before it connects). Idempotent and safe to race."""
    root = Path(root) if root is not None else synthetic_root(synth)
    if root.is_dir():
        return root, False
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock", timeout=600):
        if root.is_dir():
            return root, False
        from psdet.data.synth import generate

        staging = root.with_name(root.name + f".tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        generate(staging, synth.train, synth.val, synth.seed, progress=False, workers=workers)
        staging.rename(root)
    return root, True


def check_dataset(root: str | Path) -> Path:
    """A user-given dataset root must be in one of the layouts psdet reads (json labels,
    ps2.0 .mat, PSV .mat: psdet.data.labels.detect_format); DataError naming it otherwise."""
    from psdet.data.labels import detect_format

    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"--data {root}: no such dataset directory")
    try:
        detect_format(root)
    except DataError as exc:
        raise DataError(f"--data {exc}") from None
    return root
