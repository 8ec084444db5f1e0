"""The live sweep: connect to Ray, place the trials, start a new Tuner or restore the
interrupted one, fit it, and write the results. `orchestrate/tune.py` checks the command
line and hands over a `SweepPlan`.

Importing this module imports Ray: call `orchestrate.ray_env.prepare` first.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from orchestrate import connection, placement, sweep_file, trial
from orchestrate.results import TrialLedger, engine_seconds, read_ledger, stranded, write_results
from orchestrate.search import JournalMirror, optuna_storage
from orchestrate.space import SweepSpec, SyntheticData
from orchestrate.status import StatusBlock
from orchestrate.tuner import build_tuner
from psdet.errors import UserError

STRANDED_PASSES = 3  # fits after the first that `fit` may add for trials errored with retries left


@dataclass(frozen=True)
class SweepPlan:
    """A sweep the command line has checked: what to run, where, on which data."""

    spec: SweepSpec
    space_text: str  # the space file as given: kept in sweep.json, which --resume holds it to
    name: str
    storage_root: str  # --storage, normalised
    experiment: str  # storage_root/name
    address: str | None  # the cluster to join; None starts a local Ray
    data_root: str
    synthetic: SyntheticData | None  # set when data_root is the synthetic cache
    study_url: str  # the Optuna study: a journal path or an RDB URL
    resume: bool  # restore Tune's experiment state in `experiment` instead of starting one
    warm_start: tuple = ()  # Optuna trials of an earlier sweep that seed a new study (orchestrate/warm_start.py)


def run(plan: SweepPlan) -> dict[str, Any]:
    """Run the sweep (or the rest of it) to the end; returns `write_results`' summary, with
    this driver's `session` (wall_s, engine_s, slots) added."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # experiment state at most 5 s old for --resume
    spec = plan.spec
    print(connection.connect(plan.address))
    try:
        nodes = connection.alive_nodes()
        use_gpu = placement.use_gpu(spec, nodes)
        concurrency = placement.concurrency(spec, nodes, use_gpu, joined=bool(plan.address))
        setup = trial.TrialSetup(spec=spec, experiment_uri=plan.experiment, data_root=plan.data_root,
                                 synthetic=plan.synthetic, use_gpu=use_gpu)
        trainable = trial.trainable(setup)
        mirror = sweep_file.mirrored_journal(plan.experiment, plan.study_url)
        connection.check_shared(plan.experiment)
        if plan.resume:
            if not tune.Tuner.can_restore(plan.experiment):
                raise UserError(f"--resume: {plan.experiment} has no Ray experiment state to restore "
                                "(the first driver died before saving any); start it again under a new --name")
            print(f"resuming sweep '{plan.name}' from {plan.experiment} (study in {plan.study_url})")
            tuner = tune.Tuner.restore(plan.experiment, trainable, resume_unfinished=True, resume_errored=True)
        else:
            sweep_file.write(plan.experiment, name=plan.name, space_path=spec.path, space_text=plan.space_text,
                             data_root=plan.data_root, synthetic=plan.synthetic is not None,
                             optuna_storage=plan.study_url)
            print(f"sweep '{plan.name}': {spec.experiment.num_samples} trials, {concurrency} at a time, "
                  f"{'GPU' if use_gpu else 'CPU'}; writing to {plan.experiment}; Optuna study in {plan.study_url}")
            tuner = _new_tuner(plan, trainable, concurrency, mirror, use_gpu)
        engine_before = engine_seconds(read_ledger(plan.experiment))
        fit_started = time.monotonic()
        fit(tuner, plan.experiment, trainable)
        wall_s = time.monotonic() - fit_started
        records = read_ledger(plan.experiment)
        session = {"wall_s": wall_s, "engine_s": engine_seconds(records) - engine_before, "slots": concurrency}
        return {**write_results(spec, plan.experiment, plan.data_root, records, session, use_gpu=use_gpu),
                "session": session}
    finally:
        ray.shutdown()


def fit(tuner: tune.Tuner, experiment: str, trainable: Any, passes: int = STRANDED_PASSES) -> None:
    """`tuner.fit()`, then, while Tune has errored trials with retries left
    (`orchestrate.results.stranded`), up to `passes` more fits of the saved experiment with its
    errored trials resumed from their checkpoints, as `--resume` resumes them. Each such pass
    runs every errored trial again: one that had used all its retries (a non-finite loss, say)
    ends on its first failure. The experiment needs a `TrialLedger` among its callbacks."""
    tuner.fit()
    for _ in range(passes):
        ids = stranded(read_ledger(experiment))
        if not ids:
            return
        print(f"{len(ids)} trial(s) errored with retries left ({', '.join(ids)}): Ray ended them on a second "
              "failure of a lost actor; running the sweep's errored trials again from their checkpoints", flush=True)
        tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True).fit()


def _new_tuner(plan: SweepPlan, trainable: Any, concurrency: int, mirror: tuple[str, str] | None,
               use_gpu: bool) -> tune.Tuner:
    e = plan.spec.experiment
    ledger = TrialLedger(plan.experiment, e.metric, e.mode, in_process=plan.spec.resources.workers == 1)
    status = StatusBlock(ledger, name=plan.name, metric=e.metric, mode=e.mode, num_samples=e.num_samples,
                         max_epochs=plan.spec.max_epochs)  # drawn on a terminal only
    callbacks = [status.erase, ledger, *([JournalMirror(*mirror)] if mirror else []), status]
    return build_tuner(plan.spec, trainable, name=plan.name, storage_root=plan.storage_root,
                       study_storage=optuna_storage(plan.study_url), concurrency=concurrency, callbacks=callbacks,
                       trial_dirname=trial.trial_dirname, use_gpu=use_gpu, warm_start=plan.warm_start)
