"""Which of a one-worker trial's Tune checkpoints to delete, and when.

Tune's own `CheckpointConfig(num_to_keep)` deletes a trial's oldest checkpoint the moment a
new one arrives, before the experiment state (which names each trial's newest checkpoint)
is saved again. A driver killed in between leaves a state whose checkpoint is gone, and
`--resume` then fails the trial ("Could not recover from checkpoint as it does not exist
on storage anymore"). So Tune keeps every checkpoint (`num_to_keep=None`) and
`CheckpointKeeper` deletes them instead: a trial keeps its newest `keep`, and every
checkpoint from the oldest one that the last `SAVES` experiment states name onwards (the
newest state may not have reached remote storage yet when the driver dies). Its record
is saved with the experiment state, so a resumed driver goes on deleting what the dead
one kept. When the sweep ends, each trial keeps its newest `keep`.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any

from ray import tune

from orchestrate import storage

log = logging.getLogger(__name__)

SAVES = 2


class CheckpointKeeper(tune.Callback):
    def __init__(self, experiment_uri: str, keep: int) -> None:
        self.experiment_uri = experiment_uri
        self.keep = keep
        self.paths: dict[str, list[str]] = {}  # trial id -> its checkpoints on storage, oldest first
        self.saved: deque[dict[str, str]] = deque(maxlen=SAVES)  # per state save: trial id -> newest checkpoint

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.paths.setdefault(trial.trial_id, []).append(checkpoint.path)
        self._prune(trial.trial_id, self._protected(trial.trial_id))

    def get_state(self) -> dict[str, Any]:
        # Tune calls this while it saves the experiment state, after the trials' part is written.
        self.saved.append({trial_id: paths[-1] for trial_id, paths in self.paths.items() if paths})
        for trial_id in self.paths:
            self._prune(trial_id, self._protected(trial_id))
        return {"paths": {trial_id: list(paths) for trial_id, paths in self.paths.items()},
                "saved": list(self.saved)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.paths = {trial_id: list(paths) for trial_id, paths in state["paths"].items()}
        self.saved = deque(state["saved"], maxlen=SAVES)

    def on_experiment_end(self, trials, **info) -> None:
        # The final state is saved: no trial is restored from an older checkpoint now.
        for trial_id in self.paths:
            self._prune(trial_id, protected=0)

    def _protected(self, trial_id: str) -> int:
        """The number of `trial_id`'s checkpoints, newest first, that must stay."""
        paths = self.paths[trial_id]
        named = [paths.index(save[trial_id]) for save in self.saved if save.get(trial_id) in paths]
        return len(paths) - min(named) if named else 0

    def _prune(self, trial_id: str, protected: int) -> None:
        paths = self.paths[trial_id]
        stale = paths[:max(0, len(paths) - max(self.keep, protected))]
        if not stale:
            return
        fs, _ = storage.filesystem(self.experiment_uri)
        for path in stale:
            try:
                fs.delete_dir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a storage hiccup: try again at the next checkpoint
                log.warning("could not delete the old checkpoint %s: %s", path, exc)
                continue
            paths.remove(path)
