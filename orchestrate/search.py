"""The searcher: Ray's OptunaSearch, made honest about early-stopped trials and restarts.

Ray's stock `OptunaSearch` tells Optuna that a trial ASHA stopped is COMPLETE with its
last score, keys intermediate values by `training_iteration` (which restarts at 0 after
a driver restore) and forgets trials asked for just before a driver died. TPE then
learns from truncated runs as if they had finished. `SweepSearch` fixes each of these:

- intermediate values are keyed by the reported `epoch`, each epoch reported once;
- a trial that ends before its planned epochs (reported as `total_epochs`) without an
  error is told PRUNED (Optuna keeps its last intermediate value), an errored one FAIL,
  and only a trial that ran all its epochs COMPLETE;
- every Optuna trial carries its Tune trial id (`user_attrs["tune_trial_id"]`);
- on restore, Optuna trials left RUNNING by a dead driver and never seen by Tune are
  told FAIL, and an errored trial (which `--resume` runs again) gets a fresh Optuna
  trial with the same parameters (a finished Optuna trial cannot be reopened).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from orchestrate import storage
from orchestrate.ray_reporter import TOTAL_EPOCHS
from orchestrate.space import DefineByRun, SweepSpec

log = logging.getLogger(__name__)

TUNE_TRIAL_ID = "tune_trial_id"
ERRORED = "errored"  # user attr of a trial told FAIL because its Tune trial errored
EPOCH = "epoch"


def optuna_storage(url_or_path: str) -> optuna.storages.BaseStorage:
    """A journal file (a path; optuna-dashboard opens it directly) or an RDB URL
    (sqlite:///..., postgresql://..., mysql://...) shared by drivers on different hosts."""
    if "://" in url_or_path and not url_or_path.startswith("file://"):
        return optuna.storages.RDBStorage(url_or_path)
    path = Path(url_or_path.removeprefix("file://")).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def build_searcher(spec: SweepSpec, storage: optuna.storages.BaseStorage) -> "SweepSearch":
    return SweepSearch(
        space=DefineByRun(spec.search),
        metric=spec.experiment.metric,
        mode=spec.experiment.mode,
        sampler=optuna.samplers.TPESampler(seed=spec.experiment.seed),
        study_name=spec.name,
        storage=storage,
    )


class SweepSearch(OptunaSearch):
    """OptunaSearch that records ASHA-stopped trials as PRUNED, with intermediate values by epoch."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._completed_trials.add(trial_id)
        ot_trial = self._ot_trials[trial_id]
        if self._frozen(ot_trial.number).state.is_finished():
            return  # told before the driver restarted
        value = (result or {}).get(self.metric)
        if error or value is None or not math.isfinite(float(value)):
            state, told = TrialState.FAIL, None
            if error:
                ot_trial.set_user_attr(ERRORED, True)
        else:
            self._report(trial_id, result)
            planned = result.get(TOTAL_EPOCHS)
            finished = planned is None or result.get(EPOCH, 0) >= planned
            state, told = (TrialState.COMPLETE, float(value)) if finished else (TrialState.PRUNED, None)
        try:
            self._ot_study.tell(ot_trial, told, state=state)
        except Exception as exc:  # noqa: BLE001 - one bad trial must not stop the sweep
            log.warning("could not record trial %s in Optuna: %s", trial_id, exc)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {ot_trial.number for ot_trial in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in known:
                log.info("Optuna trial %d was asked for by a driver that died before Tune kept it: FAIL",
                         frozen.number)
                self._ot_study.tell(frozen.number, state=TrialState.FAIL)
        for trial_id, ot_trial in list(self._ot_trials.items()):
            frozen = self._frozen(ot_trial.number)
            if frozen.state == TrialState.FAIL and frozen.user_attrs.get(ERRORED):
                self._reopen(trial_id, frozen)  # resume_errored=True runs it again

    def _reopen(self, trial_id: str, frozen: optuna.trial.FrozenTrial) -> None:
        """A fresh Optuna trial with `frozen`'s parameters for a Tune trial that will run again."""
        self._ot_study.enqueue_trial(frozen.params, user_attrs={"retry_of": frozen.number})
        ot_trial = self._ot_study.ask()
        self._space(ot_trial)  # the define-by-run space takes the enqueued values
        ot_trial.set_user_attr(TUNE_TRIAL_ID, trial_id)
        self._ot_trials[trial_id] = ot_trial
        self._completed_trials.discard(trial_id)

    def _report(self, trial_id: str, result: dict) -> None:
        value, epoch = result.get(self.metric), result.get(EPOCH)
        if value is None or epoch is None or not math.isfinite(float(value)):
            return
        frozen = self._frozen(self._ot_trials[trial_id].number)
        if frozen.state.is_finished():  # told before a driver restart: Optuna's record stands
            self._completed_trials.add(trial_id)
            return
        if int(epoch) not in frozen.intermediate_values:
            self._ot_trials[trial_id].report(float(value), int(epoch))

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        for frozen in self._ot_study.get_trials(deepcopy=False):
            if frozen.number == number:
                return frozen
        raise KeyError(f"Optuna trial {number} is not in study {self._ot_study.study_name}")


class JournalMirror(tune.Callback):
    """With remote `--storage`, the journal is written on the driver's disk and copied to
    `<experiment>/optuna.journal`, so a driver on another host can resume from the copy.

    It is copied whenever Tune saves the experiment state (`get_state`: Tune calls it
    right after the searcher's own state is saved and before the state is synced to
    storage, so the copy always holds every Optuna trial the synced searcher state names),
    after every finished trial, and at most every `period_s` on results."""

    def __init__(self, local_path: str, remote_uri: str, period_s: float = 60.0) -> None:
        self.local_path = local_path
        self.remote_uri = remote_uri
        self.period_s = period_s
        self._last = 0.0

    def upload(self) -> None:
        if Path(self.local_path).is_file():
            storage.write_bytes(self.remote_uri, Path(self.local_path).read_bytes())
            self._last = time.monotonic()

    def get_state(self) -> None:
        self.upload()
        return None  # nothing to restore: the journal itself is the state

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if time.monotonic() - self._last > self.period_s:
            self.upload()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.upload()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.upload()

    def on_experiment_end(self, trials, **info) -> None:
        self.upload()
