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
from psdet import userfiles
from psdet.errors import UserError

SWEEP_FILE = "sweep.json"
JOURNAL = "optuna.journal"
LEDGER = "trials.json"  # orchestrate.results.TrialLedger's record of every trial
JOURNAL_MAX_BYTES = 1 << 30  # read whole to check it: a journal of thousands of trials is tens of MB


KEYS = ("name", "experiment", "space_text", "data_root", "synthetic", "optuna_storage")


def _read_json(uri: str, what: str) -> Any | None:
    """The JSON at `uri` (local or remote), None when there is none; a UserError naming it
    when it cannot be read back."""
    local = storage.local_path(uri)
    if local is not None:
        if not local.exists() and not local.is_symlink():
            return None
        return userfiles.read_json(local, what, UserError)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{uri}: cannot read the {what}: {' '.join(str(exc).split())}") from None


def read(experiment: str) -> dict[str, Any] | None:
    """The sweep.json of `experiment`, or None when no sweep was started there; a UserError
    naming the file when it cannot be read back."""
    uri = storage.join(experiment, SWEEP_FILE)
    saved = _read_json(uri, "sweep record")
    if saved is None:
        return None
    missing = [key for key in KEYS if key not in saved] if isinstance(saved, dict) else list(KEYS)
    if missing:
        raise UserError(f"{storage.local_path(uri) or uri}: not a sweep record (no '{missing[0]}'); it was written "
                        "by another tool or damaged: start the sweep under a new --name")
    return saved


def read_ledger(experiment: str) -> dict[str, dict[str, Any]]:
    """The sweep's ledger (`trials.json`: trial id -> record), {} before its first trial; a
    UserError naming the file when it cannot be read back."""
    uri = storage.join(experiment, LEDGER)
    records = _read_json(uri, "trial ledger")
    if records is None:
        return {}
    if not isinstance(records, dict) or not all(isinstance(record, dict) for record in records.values()):
        raise UserError(f"{storage.local_path(uri) or uri}: not a trial ledger (a JSON object of trial records)")
    return records


def check_journal(study_url: str, name: str, trials_started: int) -> None:
    """--resume over a journal file: it reads back as Optuna's journal, its records are whole,
    and it holds the study `name` with at least the `trials_started` trials of the sweep's
    ledger (Optuna asks before Tune starts a trial). A missing file is fetched from the
    experiment's mirror later; an RDB URL is Optuna's to check."""
    if "://" in study_url and not study_url.startswith("file://"):
        return
    path = Path(study_url.removeprefix("file://")).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    text = userfiles.read_text(path, "Optuna journal", UserError, max_bytes=JOURNAL_MAX_BYTES)
    lines = text.split("\n")
    if lines[-1]:
        raise UserError(f"{path}: the Optuna journal's last record (line {len(lines)}) is cut off: the file was "
                        "truncated or damaged; restore it from a copy (with remote storage, the experiment's "
                        f"{JOURNAL}) before --resume")
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict) or "op_code" not in record:
            raise UserError(f"{path}: line {number} is not an Optuna journal record: the file is damaged "
                            "or not a journal")
    import optuna

    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    studies = {study.study_name: study for study in optuna.get_all_study_summaries(journal, include_best_trial=False)}
    if name not in studies:
        raise UserError(f"{path}: the Optuna journal holds no study '{name}' (it has: "
                        f"{', '.join(sorted(studies)) or 'none'}): it is not this sweep's journal")
    if studies[name].n_trials < trials_started:
        raise UserError(f"{path}: the study '{name}' holds {studies[name].n_trials} trials but the sweep started "
                        f"{trials_started}: the journal was truncated or replaced")


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
