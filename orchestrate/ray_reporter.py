"""How psdet.engine meets Ray Train: where a worker resumes from (`RayResume`), where its
reports go (`RayReporter`), and a controller-side callback that forwards them to Tune.

Where to resume from (`RayResume`): the newer (by global step) of two candidates, chosen
on rank 0 and broadcast to all ranks:
- what Ray Train registered last (`ray.train.get_checkpoint()`): what a trial re-run by a
  resumed driver continues from;
- the engine's own newest valid checkpoint in its run directory, when that directory is
  on the experiment's shared storage (not for remote storage, where it is node-local
  scratch). After a worker dies, the restarted group finds there the checkpoint of a
  report Ray had not registered yet (Train V2 registers reports when its controller next
  polls the workers, every 2 s) and the engine's mid-epoch checkpoints
  (`train.ckpt_every_steps`), which are never reported. So the work lost to a worker
  failure is at most one checkpoint interval.

Reports (`RayReporter`): every rank calls `report` once per evaluation, as the engine
contract says; `ray.train.report` is a barrier across ranks, and only rank 0 hands over a
checkpoint directory, which Ray copies into the run's storage.

Controller side (`TuneReport`): Ray's `TuneReportCallback` plus the number of times Ray
Train restarted this run's worker group.

Preemption (`take_sigterm`): a SIGTERM to a worker is handed to the engine's preemption
notice (psdet/preemption.py), which checkpoints the step in flight and stops.
"""
from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.collective
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrate import storage
from psdet import checkpoint as ckpt
from psdet.errors import CheckpointError
from psdet.preemption import deliver_notice
from psdet.reporting import TOTAL_EPOCHS  # noqa: F401 - re-exported for the benchmarks

log = logging.getLogger("psdet")

WORKER_RESTARTS = "worker_restarts"
FROM_RAY = "ray"  # rank 0's choice, broadcast: resume from Ray's registered checkpoint


def newer_checkpoint(from_ray: Path | None, engine_checkpoints: Path | None) -> Path | None:
    """The checkpoint to resume from: the newer by global step of Ray's registered one
    (`from_ray`, a local directory) and the newest valid one under `engine_checkpoints`.
    Ray's wins a tie; a corrupt one of Ray's loses to any valid engine checkpoint."""
    found = ckpt.latest_valid_meta(engine_checkpoints) if engine_checkpoints is not None else None
    return newer_of(from_ray, found)


def newer_of(from_ray: Path | None, engine: tuple[Path, dict] | None) -> Path | None:
    """`newer_checkpoint` on an engine checkpoint already found and verified: (path, meta)."""
    if engine is None:
        return from_ray
    engine_path, engine_meta = engine
    if from_ray is None:
        return engine_path
    try:
        ray_step = ckpt.read_meta(from_ray)["step"]
    except CheckpointError:
        return engine_path
    return engine_path if engine_meta["step"] > ray_step else from_ray


def verified_checkpoint(checkpoint: ray.train.Checkpoint, downloads: Path) -> Path | None:
    """Ray's (or Tune's) registered `checkpoint` as a local, verified directory; when it is
    corrupt (a truncated upload, a flipped bit in storage), the newest verified one of the
    older checkpoints beside it in the run's storage, with a warning; None if none verifies.
    Local storage is read in place, remote checkpoints are downloaded under `downloads`."""
    filesystem = checkpoint.filesystem
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    siblings = filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    candidates = sorted((info.path for info in siblings if info.type == pyarrow.fs.FileType.Directory
                         and info.base_name.startswith("checkpoint_") and info.base_name <= name), reverse=True)
    for path in candidates:
        if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
            local = Path(path)  # read in place: the engine only reads it
        else:
            local = downloads / Path(path).name
            ray.train.Checkpoint(path, filesystem=filesystem).to_directory(str(local))
        try:
            ckpt.read_meta(local)
        except CheckpointError as exc:
            log.warning("%s; trying the previous one", exc)
            continue
        if path != candidates[0]:
            log.warning("resuming from the older checkpoint %s instead", path)
        return local
    return None


def take_sigterm() -> None:
    """In a Ray Train worker, before the engine starts: SIGTERM goes to the engine's
    preemption notice (`psdet.preemption.deliver_notice`) instead of Ray's handler, which
    would end the process at once; with no training loop running, Ray's handler still does.

    Only the main thread may set a signal handler, and the loop runs in a thread of Ray
    Train's. The worker actor's main thread runs the actor's tasks and is idle while the
    loop trains, so the handler is set by a task on the actor itself (`__ray_call__`, which
    runs a function in the actor's process)."""
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.__ray_call__.remote(_hand_sigterm_to_the_engine), timeout=120)


def _hand_sigterm_to_the_engine(_actor) -> None:
    rays = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        if deliver_notice():
            return
        if callable(rays):
            rays(signum, frame)
        else:  # the default action: end the process
            signal.signal(signum, rays)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


class RayResume:
    """The engine's `ResumeSource` inside a Ray Train worker (every rank asks; rank 0 chooses).

    `engine_checkpoints`: the engine's checkpoint folder, when every worker can read it
    (shared or single-node storage); None to resume from Ray's checkpoints alone. Keep
    the object until the engine has loaded the checkpoint: a remote one is downloaded into
    a temporary directory that lives as long as it does.
    """

    def __init__(self, engine_checkpoints: Path | None = None) -> None:
        self.engine_checkpoints = engine_checkpoints
        self._downloaded: tempfile.TemporaryDirectory | None = None
        self._verified: Path | None = None

    def latest_checkpoint(self) -> Path | None:
        choice = None
        if ray.train.get_context().get_world_rank() == 0:
            choice = self._choose()
        choice = ray.train.collective.broadcast_from_rank_zero(choice)
        if choice == FROM_RAY:
            return self._ray_checkpoint()
        return Path(choice) if choice is not None else None

    def _choose(self) -> str | None:
        """Rank 0: FROM_RAY, the path of the engine's checkpoint, or None (start fresh)."""
        registered = ray.train.get_checkpoint()
        if self.engine_checkpoints is None:
            return FROM_RAY if registered is not None else None
        from_ray = self._ray_checkpoint() if registered is not None else None
        chosen = newer_checkpoint(from_ray, self.engine_checkpoints)
        if chosen is None:
            return None
        return FROM_RAY if chosen == from_ray else str(chosen)

    def _ray_checkpoint(self) -> Path | None:
        """Ray's registered checkpoint as a local verified directory (`verified_checkpoint`, once)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if self._downloaded is None:
            self._downloaded = tempfile.TemporaryDirectory(prefix="psdet-resume-")
            self._verified = storage.patiently(lambda: verified_checkpoint(checkpoint, Path(self._downloaded.name)),
                                               "fetching the run's checkpoint")
        return self._verified


class RayReporter:
    """The engine's `Reporter` inside a Ray Train worker: each evaluation to `ray.train.report`.

    `extra_metrics` are added to every report (the benchmarks' no-op loops use it for the
    planned epoch count, which the engine itself reports).
    """

    def __init__(self, extra_metrics: dict[str, Any] | None = None) -> None:
        self.extra_metrics = dict(extra_metrics or {})

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
