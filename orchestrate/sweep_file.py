"""`<experiment>/sweep.json`: how a sweep was started, which `--resume` holds it to, and
where its Optuna study lives.

sweep.json is written once, by the first driver, after the cluster accepted the sweep and
before its Tuner starts; it holds the experiment URI, the space file's text, the dataset
root (and whether it is the synthetic cache), and the study's storage URL or journal path.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrate import storage

SWEEP_FILE = "sweep.json"
JOURNAL = "optuna.journal"


def read(experiment: str) -> dict[str, Any] | None:
    """The sweep.json of `experiment`, or None when no sweep was started there."""
    uri = storage.join(experiment, SWEEP_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def write(experiment: str, *, name: str, space_path: str, space_text: str, data_root: str, synthetic: bool,
          optuna_storage: str) -> None:
    storage.write_bytes(storage.join(experiment, SWEEP_FILE), json.dumps({
        "name": name, "experiment": experiment, "space_path": space_path, "space_text": space_text,
        "data_root": data_root, "synthetic": synthetic, "optuna_storage": optuna_storage,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=1).encode())


def default_optuna_storage(experiment: str, name: str) -> str:
    """The journal in the experiment directory; with remote storage a local file (a journal
    needs a real file system) that JournalMirror copies to the experiment directory."""
    local = storage.local_path(experiment)
    if local is not None:
        return str(local / JOURNAL)
    digest = hashlib.sha256(experiment.encode()).hexdigest()[:10]
    return str(Path(tempfile.gettempdir(), "psdet-optuna", f"{name}-{digest}.journal"))


def mirrored_journal(experiment: str, study_url: str) -> tuple[str, str] | None:
    """(local journal, its copy in storage) when a journal file backs a sweep on remote
    storage; a missing local journal (a driver on a new host) is fetched from the copy."""
    if not storage.is_remote(experiment) or "://" in study_url:
        return None
    remote = storage.join(experiment, JOURNAL)
    if not Path(study_url).is_file() and storage.exists(remote):
        Path(study_url).parent.mkdir(parents=True, exist_ok=True)
        Path(study_url).write_bytes(storage.read_bytes(remote))
    return study_url, remote
