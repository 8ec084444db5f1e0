"""One Tune trial: psdet.engine on `resources.workers` workers.

Every trial is a function trainable (`run_trial`). How it trains depends on its size:

- **several workers**: it builds a Ray Train `TorchTrainer` (Ray 2.60 runs Train V2,
  where a trainer cannot be handed to `Tuner` directly) and calls `fit()`; `TuneReport`
  (in the trainer's callbacks) forwards rank 0's metrics and the checkpoint to Tune. A
  dead worker is restarted by Ray Train (`worker_max_failures`).
- **one worker**: the engine runs in the trial's own process, reporting to Tune through
  `TuneReporter` (resuming through `TuneResume`), as Ray's guidance for non-distributed
  trials has it. A trainer would add a controller and a worker group, about 14 s of
  start and teardown per trial (benchmarks/sweep_overhead.py), for nothing it does with
  one worker. The trial process is the worker, so a dead worker is a failed trial that
  Tune retries from its newest checkpoint (`worker_max_failures + trial_max_failures`
  times in all); Tune reuses the process for the next trial (`reuse_actors`), which
  keeps torch imported.

Layout of one trial, under the experiment directory `<storage>/<name>`:

    trial_<id>/                 Tune's trial directory (result.json, progress.csv)
      train/checkpoint_*/       several workers: the Train run's checkpoints (RunConfig(storage_path=trial dir, name="train"))
      checkpoint_*/             one worker: the checkpoints reported to Tune
      run-<time>-<id>/          one per run of the trial (a resumed driver starts another), local storage
                                only: the engine's train.log and staging checkpoints/
      lr=0.003,warmup=none/     the engine's TensorBoard events, every run of the trial (tensorboard_run_name),
                                so `tensorboard --logdir <experiment>` names each trial's run by id and parameters

The Train run's name and place are a pure function of the Tune trial id, so the same
trial re-run by a resumed driver, or retried by Tune, finds its checkpoints and the
engine continues from the newest one.
"""
from __future__ import annotations

import logging
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import ray.train
from ray import tune
from ray.train.torch import TorchTrainer

from orchestrate import storage
from orchestrate.ray_reporter import (PREEMPTED_DIR, RayReporter, RayResume, TuneReport, UploadPreemption,
                                      adopted_checkpoint, fetch_preempted, newer_of, take_sigterm,
                                      verified_checkpoint)
from orchestrate.results import FINISHED, adoptable, read_ledger
from orchestrate.search import strip_baseline
from orchestrate.space import SweepSpec, SyntheticData, trial_config
from psdet import checkpoint as ckpt
from psdet.config import Config, config_from_dict, to_dict
from psdet.reporting import TOTAL_EPOCHS

if TYPE_CHECKING:
    from psdet.hooks import Hook

TRAIN_RUN_NAME = "train"

log = logging.getLogger("psdet")  # the engine's logger: lines land in the run's train.log


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its sampled parameters; the same on --resume."""

    spec: SweepSpec
    experiment_uri: str  # <storage>/<name>, local path or URI
    data_root: str
    synthetic: SyntheticData | None  # set when data_root is the synthetic cache: regenerate on other nodes
    use_gpu: bool

    @property
    def in_process(self) -> bool:
        """One worker: the engine runs in the trial's own process, without a TorchTrainer."""
        return self.spec.resources.workers == 1

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for the trial process: the worker itself when in process,
        else the driver that only waits on its trainer's workers."""
        resources = self.spec.resources
        if not self.in_process:
            return {"CPU": resources.driver_cpus}
        return {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if self.use_gpu else {})}

    def scaling_config(self) -> ray.train.ScalingConfig:
        resources = self.spec.resources
        per_worker = {"CPU": resources.cpus_per_worker}
        if self.use_gpu:
            per_worker["GPU"] = resources.gpus_per_worker
        return ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=self.use_gpu,
                                       resources_per_worker=per_worker)


def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator`: short and a function of the trial id alone."""
    return f"trial_{trial.trial_id}"


def trial_uri(setup: TrialSetup, trial_id: str) -> str:
    return storage.join(setup.experiment_uri, f"trial_{trial_id}")


def engine_trial_dir(setup: TrialSetup, trial_id: str) -> Path:
    """Where the trial's engine runs write: its trial directory when storage is local, else
    `trial_<id>` in local scratch."""
    uri = trial_uri(setup, trial_id)
    if storage.is_remote(uri):
        return Path(tempfile.gettempdir(), "psdet-sweeps", setup.spec.name, f"trial_{trial_id}")
    return Path(uri)


def tensorboard_run_name(params: dict[str, Any]) -> str:
    """The name of a trial's engine run in TensorBoard, under `trial_<id>/`: its searched
    parameters by key, short and readable (`lr=0.00312,warmup=linear`). Each is named by the last
    part of its key (the whole key where two share it), numbers to 3 significant digits,
    characters other than letters, digits and `.+-_=,` made `_`, at most 120 characters
    (a file name may have 255)."""
    shown = {key: params[key] for key in sorted(params) if params[key] is not None}
    last = [key.rsplit(".", 1)[-1] for key in shown]
    parts = []
    for (key, value), short in zip(shown.items(), last):
        name = short if last.count(short) == 1 else key
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{name}={text}")
    return re.sub(r"[^A-Za-z0-9.+\-_=,]", "_", ",".join(parts))[:120] or "engine"


def engine_out_dir(setup: TrialSetup, trial_id: str) -> str:
    """The engine's working directory for this run of the trial (train.log, its staging copy
    of each checkpoint): `run-<time>-<random>` in `engine_trial_dir`.

    A new one per run of the trial: when a resumed driver starts the trial again, workers
    of the dead driver may still be alive for a moment, and two engines must never prune
    each other's checkpoints. A restarted worker group of the same run resumes from the newer
    of Ray's copy (train/checkpoint_*) and the engine's own here (see RayResume); a new
    run of the trial, from Ray's.
    """
    run = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    return str(engine_trial_dir(setup, trial_id) / run)


def set_tensorboard(cfg: Config, setup: TrialSetup, trial_id: str, params: dict[str, Any]) -> None:
    """The trial's engine writes TensorBoard events to `trial_<id>/<tensorboard_run_name>` in
    `engine_trial_dir`, every run of the trial into the same one (a restored run purges what a
    dead one logged past its checkpoint), with the searched parameters as HParams."""
    cfg.train.tensorboard_dir = str(engine_trial_dir(setup, trial_id) / tensorboard_run_name(params))
    cfg.train.tensorboard_hparams = sorted(key for key, value in params.items() if value is not None)


def engine_dirs(setup: TrialSetup, trial_id: str) -> dict[str, Any]:
    """The loop config's `out_dir` (engine_out_dir), `resume_from_engine`: whether a
    restarted worker group may resume from the engine's own checkpoints there (not with
    remote storage, where out_dir is node-local scratch that other workers cannot read), and
    `preempted_uri`: with remote storage, where a preempted run leaves its last checkpoint
    (orchestrate.ray_reporter.UploadPreemption)."""
    remote = storage.is_remote(trial_uri(setup, trial_id))
    return {"out_dir": engine_out_dir(setup, trial_id), "resume_from_engine": not remote,
            "preempted_uri": storage.join(trial_uri(setup, trial_id), PREEMPTED_DIR) if remote else None}


def build_trainer(setup: TrialSetup, trial_id: str, train_loop_config: dict[str, Any],
                  train_loop: Callable[[dict], None] | None = None) -> TorchTrainer:
    """The TorchTrainer of trial `trial_id` (also used by benchmarks/sweep_overhead.py)."""
    faults = setup.spec.fault_tolerance
    run_config = ray.train.RunConfig(
        name=TRAIN_RUN_NAME,
        storage_path=trial_uri(setup, trial_id),
        failure_config=ray.train.FailureConfig(max_failures=faults.worker_max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=faults.checkpoints_kept),
        callbacks=[TuneReport()],
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=setup.scaling_config(),
        run_config=run_config,
    )


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: resolve this trial's config, then train it, in this
    process (one worker) or on a Ray Train worker group."""
    trial_id = tune.get_context().get_trial_id()
    finished = storage.patiently(lambda: finished_result(setup, trial_id), "reading the trial's records")
    if finished is not None:
        tune.report(finished)
        return
    params, baseline = strip_baseline(config)
    cfg = trial_config(setup.spec, params, setup.data_root)
    # Ray keeps the trial's checkpoints (fault_tolerance.checkpoints_kept); the engine's own
    # copy is only needed until Ray has taken it.
    cfg.train.keep_checkpoints = 1
    set_tensorboard(cfg, setup, trial_id, params)
    twin = storage.patiently(lambda: adoptable(read_ledger(setup.experiment_uri), trial_id, params, baseline),
                             "reading the trial's records")
    adopt_from = reported_checkpoints_uri(setup, twin) if twin is not None else None
    if setup.in_process:
        train_in_process(setup, trial_id, cfg, adopt_from)
        return
    loop_config = {
        "config": to_dict(cfg),
        **engine_dirs(setup, trial_id),
        "adopt_from": adopt_from,
        "synthetic": setup.synthetic,
    }
    build_trainer(setup, trial_id, loop_config).fit()


def reported_checkpoints_uri(setup: TrialSetup, trial_id: str) -> str:
    """Where trial `trial_id`'s reported checkpoints are: Tune's (one worker) or its Train run's."""
    uri = trial_uri(setup, trial_id)
    return uri if setup.in_process else storage.join(uri, TRAIN_RUN_NAME)


def train_in_process(setup: TrialSetup, trial_id: str, cfg: Config, adopt_from: str | None = None) -> None:
    """The one-worker trial: psdet.engine here, reporting each evaluation to Tune
    (`adopt_from`: an abandoned twin's checkpoints, for a trial that has none of its own)."""
    from psdet.engine import train

    if setup.synthetic is not None and not Path(cfg.data.root).is_dir():
        from orchestrate.data import ensure_synthetic

        ensure_synthetic(setup.synthetic, Path(cfg.data.root))
    cfg.train.device = "cuda" if setup.use_gpu else "cpu"
    dirs = engine_dirs(setup, trial_id)
    earlier_runs = Path(trial_uri(setup, trial_id)) if dirs["resume_from_engine"] else None
    preempted = dirs["preempted_uri"]
    train(cfg, Path(dirs["out_dir"]), TuneReporter(), resume=TuneResume(earlier_runs, preempted, adopt_from),
          hooks=[UploadPreemption(preempted)] if preempted else [])


class TuneReporter:
    """The engine's `Reporter` in a one-worker trial: each evaluation and its checkpoint go
    to `tune.report`."""

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)


class TuneResume:
    """The engine's `ResumeSource` in a one-worker trial: a retried or resumed trial continues
    from the newest (by global step) of the checkpoint Tune restored and the engine's newest
    valid one in the trial's earlier runs (`trial_dir`, local storage only: a mid-epoch
    checkpoint, or one whose report Tune had not taken when the process died), or with remote
    storage the preempted run's copy (`preempted`, orchestrate.ray_reporter.UploadPreemption);
    with none of these, the newest reported checkpoint under `adopt_from` (an abandoned twin's,
    orchestrate.results.adoptable). A corrupt checkpoint of Tune's gives way to the previous one
    (`verified_checkpoint`). Keep the object until the engine has loaded the checkpoint (a
    remote one is downloaded into a temporary directory that lives as long as it does)."""

    def __init__(self, trial_dir: Path | None, preempted: str | None = None, adopt_from: str | None = None) -> None:
        self.trial_dir = trial_dir
        self.preempted = preempted
        self.adopt_from = adopt_from
        self._downloaded: tempfile.TemporaryDirectory | None = None

    def latest_checkpoint(self) -> Path | None:
        self._downloaded = tempfile.TemporaryDirectory(prefix="psdet-resume-")
        from_tune = self._tune_checkpoint(Path(self._downloaded.name))
        found = []
        if self.trial_dir is not None:
            found += [meta for meta in (ckpt.latest_valid_meta(run / "checkpoints")
                                        for run in sorted(self.trial_dir.glob("run-*"))) if meta is not None]
        if self.preempted is not None:
            copy = storage.patiently(lambda: fetch_preempted(self.preempted, Path(self._downloaded.name)),
                                     "fetching the preempted run's checkpoint")
            found += [copy] if copy is not None else []
        newest = max(found, key=lambda one: one[1]["step"]) if found else None
        chosen = newer_of(from_tune, newest)  # each verified once, above
        if chosen is None and self.adopt_from is not None:
            adopted = storage.patiently(lambda: adopted_checkpoint(self.adopt_from, Path(self._downloaded.name)),
                                        "fetching the abandoned twin's checkpoint")
            log.info("no checkpoint of its own: continuing the abandoned trial under %s from %s", self.adopt_from,
                     adopted)
            return adopted
        return chosen

    def _tune_checkpoint(self, downloads: Path) -> Path | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        return storage.patiently(lambda: verified_checkpoint(checkpoint, downloads), "fetching the trial's checkpoint")


def finished_result(setup: TrialSetup, trial_id: str) -> dict[str, Any] | None:
    """The final result of a trial that already finished, else None.

    Ray saves its experiment state every few seconds, so a driver killed just after a
    trial ended resumes it as unfinished. Such a trial is not trained again (an ASHA-stopped
    one would carry on); Tune gets its final result once more instead. Finished means: the
    sweep's ledger says completed or pruned, or its Train run reported all its epochs
    before the driver heard of it.
    """
    record = read_ledger(setup.experiment_uri).get(trial_id)
    if record is not None and record["status"] in FINISHED:
        return {**record["final"], TOTAL_EPOCHS: record["total_epochs"]}
    run = storage.join(trial_uri(setup, trial_id), TRAIN_RUN_NAME)
    if not storage.exists(run):
        return None
    try:
        result = ray.train.Result.from_path(run)
    except RuntimeError:  # no checkpoint registered yet
        return None
    metrics = result.metrics or {}
    if metrics.get("epoch", 0) < metrics.get(TOTAL_EPOCHS, float("inf")):
        return None
    return {**metrics, "checkpoint_path": result.checkpoint.path}


def train_loop_per_worker(loop_config: dict[str, Any], hooks: Sequence[Hook] = ()) -> None:
    """Every Ray Train worker: make sure the data is on this node, then run psdet.engine
    (`hooks` too: benchmarks/recovery.py watches the loop with them)."""
    from psdet.engine import train

    cfg = config_from_dict(loop_config["config"], source="trial config")
    if loop_config["synthetic"] is not None and not Path(cfg.data.root).is_dir():
        from orchestrate.data import ensure_synthetic

        ensure_synthetic(loop_config["synthetic"], Path(cfg.data.root))
    out_dir = Path(loop_config["out_dir"])
    preempted = loop_config.get("preempted_uri")
    resume = RayResume(out_dir / "checkpoints" if loop_config.get("resume_from_engine") else None, preempted,
                       loop_config.get("adopt_from"))
    take_sigterm()  # a SIGTERM (a spot notice) becomes a checkpoint of the step in flight
    train(cfg, out_dir, RayReporter(), resume=resume,
          hooks=[*([UploadPreemption(preempted)] if preempted else []), *hooks])


def trainable(setup: TrialSetup):
    """The object handed to `Tuner` (and again to `Tuner.restore`)."""
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), setup.trial_resources())
