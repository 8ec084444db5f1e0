"""How psdet.engine's reports reach Ray: a `Reporter` for the Train workers and a
controller-side callback that forwards them to Tune.

Worker side (`RayReporter`): every rank calls `report` once per evaluation, as the engine
contract says; `ray.train.report` is a barrier across ranks, and only rank 0 hands over a
checkpoint directory, which Ray copies into the run's storage. Where to resume from is
whatever Ray Train registered last (`ray.train.get_checkpoint()`), so a restarted worker
group and a trial re-run by a resumed driver both continue from the newest checkpoint.

Controller side (`TuneReport`): Ray's `TuneReportCallback` plus the number of times Ray
Train restarted this run's worker group.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
from ray.tune.integration.ray_train import TuneReportCallback

WORKER_RESTARTS = "worker_restarts"
TOTAL_EPOCHS = "total_epochs"


class RayReporter:
    """The engine's `Reporter` inside a Ray Train worker.

    `extra_metrics` are added to every report (the trial's planned epoch count, so the
    searcher can tell a finished trial from one the scheduler stopped).
    """

    def __init__(self, extra_metrics: dict[str, Any] | None = None) -> None:
        self.extra_metrics = dict(extra_metrics or {})
        self._downloaded: tempfile.TemporaryDirectory | None = None

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(checkpoint.path)  # read in place: the engine only reads it
        self._downloaded = tempfile.TemporaryDirectory(prefix="psdet-resume-")
        return Path(checkpoint.to_directory(self._downloaded.name))

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        metrics = {**metrics, **self.extra_metrics}
        ray_checkpoint = ray.train.Checkpoint.from_directory(checkpoint) if checkpoint is not None else None
        # The engine prunes its own local copies (train.keep_checkpoints); Ray keeps
        # CheckpointConfig(num_to_keep) in storage.
        ray.train.report(metrics, checkpoint=ray_checkpoint, delete_local_checkpoint_after_upload=False)


class TuneReport(TuneReportCallback):
    """`TuneReportCallback` that adds `worker_restarts`: how often this run's worker group
    failed and was restarted by Ray Train (`FailureConfig(max_failures)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.worker_failures = 0

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.worker_failures += 1

    def after_report(self, run_context, metrics, checkpoint) -> None:
        metrics = [{**worker_metrics, WORKER_RESTARTS: self.worker_failures} for worker_metrics in metrics]
        super().after_report(run_context, metrics, checkpoint)
