"""The `tune.Tuner` of a sweep, built from its validated space: searcher, scheduler,
concurrency, retries and storage. `orchestrate/tune.py` runs it over the real trainable;
`benchmarks/search_quality.py` runs the very same construction over a replayed one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from orchestrate.search import BASELINE, build_searcher
from orchestrate.space import SweepSpec


class BaselineASHA(ASHAScheduler):
    """Ray's ASHA, except that the baseline trial is never stopped: its results still
    enter the rungs (they set the cutoffs others are stopped by), but it runs all its
    epochs, because every other trial is measured against its final score."""

    def __init__(self, *, time_attr: str, max_t: int, **asha: Any) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, **asha)
        self.time_attr, self.max_t = time_attr, max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        spared = trial.config.get(BASELINE) and result.get(self.time_attr, 0) < self.max_t
        if decision == TrialScheduler.STOP and spared:
            return TrialScheduler.CONTINUE
        return decision


def build_scheduler(spec: SweepSpec) -> TrialScheduler:
    """ASHA on the reported `epoch` (Ray's `training_iteration` restarts after a driver
    restore), up to the trials' epochs, sparing the baseline (`BaselineASHA`); or FIFO
    (`scheduler.type: none`)."""
    if spec.scheduler.type != "asha":
        return FIFOScheduler()
    return BaselineASHA(time_attr="epoch", metric=spec.experiment.metric, mode=spec.experiment.mode,
                        max_t=spec.max_epochs, grace_period=spec.scheduler.grace_period,
                        reduction_factor=spec.scheduler.reduction_factor)


def trial_retries(spec: SweepSpec) -> int:
    """Tune's `FailureConfig(max_failures)`. A one-worker trial runs in its own process,
    which is also its worker: a dead worker is a failed trial, so Tune retries it for
    both budgets. -1 is unlimited."""
    faults = spec.fault_tolerance
    if spec.resources.workers > 1:
        return faults.trial_max_failures
    if -1 in (faults.worker_max_failures, faults.trial_max_failures):
        return -1
    return faults.worker_max_failures + faults.trial_max_failures


def build_tuner(spec: SweepSpec, trainable: Any, *, name: str, storage_root: str,
                study_storage: optuna.storages.BaseStorage, concurrency: int,
                callbacks: Sequence[tune.Callback] = (),
                trial_dirname: Callable[[Any], str] | None = None) -> tune.Tuner:
    """The sweep's Tuner: `spec`'s searcher (Optuna, `sampler` section, baseline first) and
    scheduler, `concurrency` trials at once, results and checkpoints under
    `storage_root/name`. One-worker trials keep `fault_tolerance.checkpoints_kept` Tune
    checkpoints and reuse their process for the next trial."""
    e = spec.experiment
    in_process = spec.resources.workers == 1
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(spec, study_storage), scheduler=build_scheduler(spec),
            num_samples=e.num_samples, max_concurrent_trials=concurrency, time_budget_s=e.time_budget_s,
            trial_dirname_creator=trial_dirname, reuse_actors=in_process,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_root, verbose=0,
            failure_config=tune.FailureConfig(max_failures=trial_retries(spec)),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.fault_tolerance.checkpoints_kept)
            if in_process else None,
            callbacks=list(callbacks),
        ),
    )
