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
notice (psdet/preemption.py), which checkpoints the step in flight and stops. With remote
storage, where that checkpoint is node-local scratch, rank 0 copies it to the trial's
storage (`UploadPreemption`) and the next attempt takes it from there (`fetch_preempted`):
a report made while Ray stops the process does not reach Tune or Train's controller
(tried: the retry resumed from the epoch's checkpoint before).
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
from psdet import distributed
from psdet.errors import CheckpointError
from psdet.hooks import Hook
from psdet.preemption import deliver_notice
from psdet.reporting import TOTAL_EPOCHS  # noqa: F401 - re-exported for the benchmarks

log = logging.getLogger("psdet")

WORKER_RESTARTS = "worker_restarts"
FROM_RAY = "ray"  # rank 0's choice, broadcast: resume from Ray's registered checkpoint
FROM_PREEMPTED = "preempted"  # ... from the preempted run's copy in remote storage (each rank fetches it)
FROM_TWIN = "twin"  # ... from an abandoned twin's newest reported checkpoint (each rank fetches it)
PREEMPTED_DIR = "preempted"  # in a trial's remote storage: the checkpoint of a preempted run's last step


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


class UploadPreemption(Hook):
    """Rank 0 copies the checkpoint of a preempted run's last step to `uri` (the trial's
    `preempted/` in remote storage), then deletes the older copies there; the other ranks wait
    for it, since the first rank to exit ends the worker group (rank 0's copy with it). A
    storage that does not answer costs the steps since the last report, with a warning, not the run."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def on_preemption(self, run, checkpoint: Path | None, step: int) -> None:
        if checkpoint is not None:  # rank 0
            self._upload(checkpoint)
        distributed.barrier(run.ctx)

    def _upload(self, checkpoint: Path) -> None:
        fs, root = storage.filesystem(self.uri)
        target = f"{root}/{checkpoint.name}"
        try:
            fs.create_dir(target, recursive=True)  # local and shared storage need it; S3 has no directories
            pyarrow.fs.copy_files(str(checkpoint), target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
            for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
                if info.type == pyarrow.fs.FileType.Directory and info.path.rstrip("/") != target:
                    fs.delete_dir(info.path)
        except OSError as exc:
            log.warning("preemption: could not copy %s to the trial's storage (%s); the next attempt resumes "
                        "from the last reported checkpoint", checkpoint, " ".join(str(exc).split())[:200])
            return
        log.info("preemption: copied %s to %s", checkpoint, storage.display(self.uri, target))


def fetch_preempted(uri: str, downloads: Path) -> tuple[Path, dict] | None:
    """The newest verified checkpoint under `uri` (`UploadPreemption`'s), downloaded under
    `downloads`, with its meta; None when there is none. A copy cut short by the kill that
    followed the notice fails verification and is passed over."""
    fs, root = storage.filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    for path in sorted((info.path for info in infos if info.type == pyarrow.fs.FileType.Directory), reverse=True):
        local = downloads / f"preempted-{Path(path).name}"
        local.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(path, str(local), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        try:
            return local, ckpt.read_meta(local)
        except CheckpointError as exc:
            log.warning("%s; passed over", exc)
    return None


def adopted_checkpoint(uri: str, downloads: Path) -> Path | None:
    """The newest reported checkpoint under `uri` (another trial's `checkpoint_*`: an abandoned
    twin's, orchestrate.results.adoptable) as a local verified directory
    (`verified_checkpoint`); None if there is none."""
    fs, root = storage.filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = sorted(info.path for info in infos
                   if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"))
    if not names:
        return None
    downloads.mkdir(parents=True, exist_ok=True)
    return verified_checkpoint(ray.train.Checkpoint(names[-1], filesystem=fs), downloads)


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
    (shared or single-node storage); None to resume from Ray's checkpoints alone.
    `preempted`: with remote storage, the trial's `preempted/` (`UploadPreemption`), taken
    when it is newer than Ray's. `adopt_from`: an abandoned twin's reported checkpoints
    (orchestrate.results.adoptable), taken when the run has none of its own. Keep the object
    until the engine has loaded the checkpoint: a remote one is downloaded into a temporary
    directory that lives as long as it does.
    """

    def __init__(self, engine_checkpoints: Path | None = None, preempted: str | None = None,
                 adopt_from: str | None = None) -> None:
        self.engine_checkpoints = engine_checkpoints
        self.preempted = preempted
        self.adopt_from = adopt_from
        self._downloaded: tempfile.TemporaryDirectory | None = None
        self._verified: Path | None = None
        self._preempted: tuple[Path | None, dict | None] | None = None
        self._twin: tuple[Path | None] | None = None

    def latest_checkpoint(self) -> Path | None:
        choice = None
        if ray.train.get_context().get_world_rank() == 0:
            choice = self._choose()
        choice = ray.train.collective.broadcast_from_rank_zero(choice)
        if choice == FROM_RAY:
            return self._ray_checkpoint()
        if choice == FROM_PREEMPTED:
            return self._preempted_checkpoint()[0]
        if choice == FROM_TWIN:
            log.info("no checkpoint of its own: continuing the abandoned trial under %s", self.adopt_from)
            return self._twin_checkpoint()
        return Path(choice) if choice is not None else None

    def _choose(self) -> str | None:
        """Rank 0: FROM_RAY, FROM_PREEMPTED, the path of the engine's checkpoint, FROM_TWIN, or
        None (start fresh)."""
        chosen = self._choose_own()
        if chosen is None and self.adopt_from is not None and self._twin_checkpoint() is not None:
            return FROM_TWIN
        return chosen

    def _twin_checkpoint(self) -> Path | None:
        if self._twin is None:
            self._twin = (storage.patiently(lambda: adopted_checkpoint(self.adopt_from, self._downloads()),
                                            "fetching the abandoned twin's checkpoint"),)
        return self._twin[0]

    def _choose_own(self) -> str | None:
        registered = ray.train.get_checkpoint()
        if self.engine_checkpoints is None and self.preempted is None:
            return FROM_RAY if registered is not None else None
        from_ray = self._ray_checkpoint() if registered is not None else None
        if self.preempted is not None:
            preempted = self._preempted_checkpoint()
            chosen = newer_of(from_ray, preempted if preempted[0] is not None else None)
            if chosen is not None and chosen != from_ray:
                return FROM_PREEMPTED
        else:
            chosen = newer_checkpoint(from_ray, self.engine_checkpoints)
        if chosen is None:
            return None
        return FROM_RAY if chosen == from_ray else str(chosen)

    def _preempted_checkpoint(self) -> tuple[Path | None, dict | None]:
        """The preempted run's copy (`fetch_preempted`, once): (local directory, meta), or (None, None)."""
        if self._preempted is None:
            found = storage.patiently(lambda: fetch_preempted(self.preempted, self._downloads()),
                                      "fetching the preempted run's checkpoint")
            self._preempted = found or (None, None)
        return self._preempted

    def _downloads(self) -> Path:
        if self._downloaded is None:
            self._downloaded = tempfile.TemporaryDirectory(prefix="psdet-resume-")
        return Path(self._downloaded.name)

    def _ray_checkpoint(self) -> Path | None:
        """Ray's registered checkpoint as a local verified directory (`verified_checkpoint`, once)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if self._verified is None:
            self._verified = storage.patiently(lambda: verified_checkpoint(checkpoint, self._downloads()),
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
