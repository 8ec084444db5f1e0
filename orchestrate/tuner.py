"""The `tune.Tuner` of a sweep, built from its validated space: searcher, scheduler,
concurrency, retries and storage. `orchestrate/tune.py` runs it over the real trainable;
`benchmarks/search_quality.py` runs the very same construction over a replayed one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from orchestrate import storage
from orchestrate.budget import BudgetGuard
from orchestrate.checkpoint_keeper import CheckpointKeeper
from orchestrate.moasha import MOASHA, BudgetFIFO, BudgetStop, is_last_report, rung_milestones
from orchestrate.search import BASELINE, StudySync, build_searcher
from orchestrate.space import SweepSpec


class BaselineASHA(ASHAScheduler, BudgetStop):
    """Ray's ASHA, except that the baseline trial is never stopped: its results still
    enter the rungs (they set the cutoffs others are stopped by), but it runs all its
    epochs, because every other trial is measured against its final score. With
    `budget.stop_running` (a `budget` guard given), a trial that reaches a rung once the
    budget is spent stops there. No trial is stopped on its last report (Ray's ASHA stops
    it at `max_t`): it ends by itself (orchestrate.moasha.is_last_report)."""

    def __init__(self, *, time_attr: str, max_t: int, budget: BudgetGuard | None = None, **asha: Any) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, **asha)
        self.time_attr, self.max_t = time_attr, max_t
        self._init_budget(budget, time_attr, rung_milestones(asha.get("grace_period", 1), max_t,
                                                             asha.get("reduction_factor", 4)))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if is_last_report(result, self.time_attr, self.max_t):
            return TrialScheduler.CONTINUE
        if self._budget_stops(trial, result):
            return TrialScheduler.STOP
        spared = trial.config.get(BASELINE) and result.get(self.time_attr, 0) < self.max_t
        if decision == TrialScheduler.STOP and spared:
            return TrialScheduler.CONTINUE
        return decision


def build_scheduler(spec: SweepSpec, budget: BudgetGuard | None = None) -> TrialScheduler:
    """ASHA on the reported `epoch` (Ray's `training_iteration` restarts after a driver
    restore), up to the trials' epochs, sparing the baseline: Ray's ASHA for one objective
    (`BaselineASHA`), MO-ASHA for several (orchestrate.moasha); or no early stopping
    (`scheduler.type: none`). `budget`: the sweep's guard, for `budget.stop_running`."""
    s = spec.scheduler
    if s.type != "asha":
        return BudgetFIFO(budget) if budget is not None else FIFOScheduler()
    if spec.multi_objective:
        return MOASHA(time_attr="epoch", objectives=spec.objectives, max_t=spec.max_epochs,
                      grace_period=s.grace_period, reduction_factor=s.reduction_factor, budget=budget)
    return BaselineASHA(time_attr="epoch", metric=spec.experiment.metric, mode=spec.experiment.mode,
                        max_t=spec.max_epochs, grace_period=s.grace_period,
                        reduction_factor=s.reduction_factor, budget=budget)


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
                trial_dirname: Callable[[Any], str] | None = None, use_gpu: bool = False,
                warm_start: Sequence[optuna.trial.FrozenTrial] = (),
                scheduler: TrialScheduler | None = None) -> tune.Tuner:
    """The sweep's Tuner: `spec`'s searcher (Optuna, `sampler` section, baseline first,
    `warm_start` trials added to a new study) and scheduler, `concurrency` trials at once,
    results and checkpoints under `storage_root/name`, `experiment.budget` kept by a
    `BudgetGuard` there (`use_gpu`: whether trials hold GPUs). One-worker trials keep
    `fault_tolerance.checkpoints_kept` Tune checkpoints (deleted by a `CheckpointKeeper`)
    and reuse their process for the next trial. `scheduler` replaces `build_scheduler(spec)`:
    the search-quality benchmark's ASHA on one objective of a multi-objective space (a sweep
    never passes one)."""
    e = spec.experiment
    in_process = spec.resources.workers == 1
    experiment_uri = storage.join(storage_root, name)
    guard = (lambda: BudgetGuard(spec, experiment_uri, use_gpu)) if e.budget.limits() else (lambda: None)
    searcher = build_searcher(spec, study_storage, budget=guard(), warm_start=warm_start)
    keeper = [CheckpointKeeper(experiment_uri, spec.fault_tolerance.checkpoints_kept)] if in_process else []
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler if scheduler is not None else build_scheduler(spec, guard()),
            num_samples=e.num_samples, max_concurrent_trials=concurrency, time_budget_s=e.time_budget_s,
            trial_dirname_creator=trial_dirname, reuse_actors=in_process,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_root, verbose=0,
            failure_config=tune.FailureConfig(max_failures=trial_retries(spec)),
            # result.json and progress.csv per trial; TensorBoard's events are the engine's
            # (orchestrate.trial.set_tensorboard; ray_env.prepare keeps Tune from adding its own).
            # Tune keeps every checkpoint; the keeper deletes old ones once no saved state names them.
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), *callbacks, StudySync(searcher), *keeper],
        ),
    )
