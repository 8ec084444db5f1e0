"""The searcher: Optuna's ask-and-tell interface as a Ray Tune `Searcher`.

Only Optuna's public API is used (`create_study`, `enqueue_trial`, `ask`, `tell`,
`Trial.report`, `Study.get_trials`), and none of Ray's `OptunaSearch` internals. It differs
from Ray's `OptunaSearch` where that one misleads TPE:

- intermediate values are keyed by the reported `epoch`, each epoch reported once (Ray's
  `training_iteration` restarts at 0 after a driver restore);
- a trial that ends before its planned epochs (reported as `total_epochs`) without an
  error is told PRUNED (Optuna keeps its last intermediate value), an errored one FAIL,
  and only a trial that ran all its epochs COMPLETE (Ray's tells a stopped trial COMPLETE
  with its last, truncated score);
- the first trial of a new study is the baseline, the base config's own values
  (`experiment.baseline`), enqueued and marked with `user_attrs["baseline"]`;
- every Optuna trial carries its Tune trial id (`user_attrs["tune_trial_id"]`).

With several objectives (`experiment.objectives`) the study has one direction per
objective and a COMPLETE trial is told all of them. Optuna takes no intermediate values in a
multi-objective study, so PRUNED trials carry none (TPE counts them among the bad ones);
MO-ASHA (orchestrate/moasha.py) does the early stopping from Tune's results instead.

A new study can be warm-started: the finished trials of an earlier sweep
(orchestrate/warm_start.py) are added to it before the first suggestion, so TPE starts
informed. With `experiment.budget`, `suggest` ends the search (`Searcher.FINISHED`) once
the next trial would cross the budget (orchestrate/budget.py).

State across a driver restart: the study itself (journal or RDB), whose trials each name
their Tune trial, and the sampler's random state in the searcher's checkpoint. Tune saves
its trials, this searcher and its `ConcurrencyLimiter` in separate files, so a driver killed
mid-save (or before a remote copy caught up) can leave them disagreeing. So nothing is
decided from the checkpoint: once Tune has restored its trials, `StudySync` (a Tune
callback, built with the searcher) hands their ids and statuses to `settle`, which matches
them against the study. Optuna trials left RUNNING that no restored Tune trial will run are
told FAIL; a Tune trial that will run on (it was running, or it errored and `--resume`
runs it again) gets a fresh Optuna trial with the same parameters and the intermediate
values already reported (`user_attrs["continues"]` or `["retry_of"]` names the old one,
which is told FAIL: a finished Optuna trial cannot be reopened, and Optuna offers no
public way to report to a trial another process asked for). `StudySync` also passes every
trial event on to the searcher, so a trial the limiter's restored state missed is still
told; the searcher acts on each event once, however often it hears of it.
"""
from __future__ import annotations

import logging
import math
import pickle
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.search import Searcher

from orchestrate import storage
from orchestrate.budget import BudgetGuard
from orchestrate.space import DefineByRun, SweepSpec, baseline_params
from psdet.reporting import TOTAL_EPOCHS

log = logging.getLogger(__name__)

TUNE_TRIAL_ID = "tune_trial_id"
BASELINE = "baseline"  # user attr of the baseline's Optuna trial, and a flag in its Tune config
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


def build_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The space's `sampler` section as an Optuna sampler, seeded by `experiment.seed`."""
    settings, seed = spec.sampler, spec.experiment.seed
    if settings.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.type == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=settings.population_size, seed=seed)
    with warnings.catch_warnings():  # multivariate, group and constant_liar are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.n_startup_trials,
                                          multivariate=settings.multivariate, group=settings.group,
                                          constant_liar=settings.constant_liar)


def build_searcher(spec: SweepSpec, study_storage: optuna.storages.BaseStorage, *,
                   budget: BudgetGuard | None = None,
                   warm_start: Sequence[optuna.trial.FrozenTrial] = ()) -> "SweepSearch":
    return SweepSearch(
        space=DefineByRun(spec.search),
        metric=spec.experiment.metric,
        mode=spec.experiment.mode,
        sampler=build_sampler(spec),
        study_name=spec.name,
        study_storage=study_storage,
        baseline=baseline_params(spec) if spec.experiment.baseline else None,
        objectives=spec.objectives,
        budget=budget,
        warm_start=warm_start,
    )


def strip_baseline(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the trial's config keys, whether it is the baseline) from a Tune trial config."""
    params = {key: value for key, value in config.items() if key != BASELINE}
    return params, bool(config.get(BASELINE, False))


class SweepSearch(Searcher):
    """A Tune searcher over one persistent Optuna study, asked and told per trial."""

    def __init__(self, space: DefineByRun, metric: str, mode: str, sampler: optuna.samplers.BaseSampler,
                 study_name: str, study_storage: optuna.storages.BaseStorage,
                 baseline: dict[str, Any] | None = None, objectives: tuple[tuple[str, str], ...] = (),
                 budget: BudgetGuard | None = None,
                 warm_start: Sequence[optuna.trial.FrozenTrial] = ()) -> None:
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.sampler = sampler
        self.study_name = study_name
        self.study_storage = study_storage
        self.baseline = baseline
        self.objectives = tuple(objectives) or ((metric, mode),)
        self.budget = budget
        self.study = self._open_study()
        self.warm_started = 0  # trials of an earlier sweep added to this study
        if warm_start and not self.study.get_trials(deepcopy=False):
            self.study.add_trials(list(warm_start))
            self.warm_started = len(warm_start)
        self.running: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial, until told
        self.unsettled = False  # restored, and not yet matched to Tune's restored trials
        self.reported: dict[str, set[int]] = {}  # epochs already reported per running trial

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def _open_study(self) -> optuna.Study:
        directions = ["maximize" if mode == "max" else "minimize" for _, mode in self.objectives]
        return optuna.create_study(study_name=self.study_name, storage=self.study_storage, sampler=self.sampler,
                                   directions=directions, load_if_exists=True)

    # The study is reopened from its storage after unpickling (Tune pickles the searcher
    # with the Tuner); running trials are rebuilt by `restore`.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(study=None, running={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.study = self._open_study()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return True  # metric and mode come from the space file

    # -- asking

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.budget is not None:
            refusal = self.budget.refusal()
            if refusal is not None:
                log.warning("budget: no new trial: %s", refusal)
                self.budget.note_stop(refusal)
                return Searcher.FINISHED
        trials = self.study.get_trials(deepcopy=False)
        if self.baseline is not None and not any(t.user_attrs.get(BASELINE) for t in trials):
            self.study.enqueue_trial(self.baseline, user_attrs={BASELINE: True})
        ot_trial = self._ask(user_attrs={TUNE_TRIAL_ID: trial_id})
        self._track(trial_id, ot_trial, reported=set())
        config = dict(ot_trial.params)
        if ot_trial.user_attrs.get(BASELINE):
            config[BASELINE] = True
        return config

    def _ask(self, user_attrs: dict[str, Any]) -> optuna.Trial:
        ot_trial = self.study.ask()
        self.space(ot_trial)  # define-by-run: an enqueued trial takes its fixed values here
        for key, value in user_attrs.items():
            ot_trial.set_user_attr(key, value)
        return ot_trial

    def _track(self, trial_id: str, ot_trial: optuna.Trial, reported: set[int]) -> None:
        self.running[trial_id] = ot_trial
        self.reported[trial_id] = reported

    # -- telling

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.budget is not None:
            self.budget.tick()
        if trial_id in self.running:
            self._report(trial_id, result)

    def _values(self, result: dict | None) -> list[float] | None:
        """Every objective's finite value in `result`, else None."""
        values = [(result or {}).get(metric) for metric, _ in self.objectives]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            return None
        return [float(v) for v in values]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self.running.pop(trial_id, None)
        if ot_trial is None:
            return  # told before the driver restarted, or never asked here
        values = self._values(result)
        if error or values is None:
            state, told = TrialState.FAIL, None
            if error:
                ot_trial.set_user_attr(ERRORED, True)
        else:
            self._report(trial_id, result, ot_trial)
            planned = result.get(TOTAL_EPOCHS)
            finished = planned is None or result.get(EPOCH, 0) >= planned
            told_values = values if self.multi_objective else values[0]
            state, told = (TrialState.COMPLETE, told_values) if finished else (TrialState.PRUNED, None)
        try:
            self.study.tell(ot_trial, told, state=state)
        except Exception as exc:  # noqa: BLE001 - one bad trial must not stop the sweep
            log.warning("could not record trial %s in Optuna: %s", trial_id, exc)

    def _report(self, trial_id: str, result: dict, ot_trial: optuna.Trial | None = None) -> None:
        if self.multi_objective:
            return  # Optuna keeps no intermediate values in a multi-objective study
        value, epoch = result.get(self.metric), result.get(EPOCH)
        if value is None or epoch is None or not math.isfinite(float(value)):
            return
        if int(epoch) not in self.reported[trial_id]:
            (ot_trial or self.running[trial_id]).report(float(value), int(epoch))
            self.reported[trial_id].add(int(epoch))

    # -- a driver restart

    def save(self, checkpoint_path: str) -> None:
        # The sampler's random state, so that a resumed driver does not draw the startup
        # trials it drew before all over again.
        with open(checkpoint_path, "wb") as handle:
            pickle.dump({"sampler": self.sampler}, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.sampler = pickle.load(handle)["sampler"]
        self.study = self._open_study()
        self.running, self.reported = {}, {}
        self.unsettled = True  # until `settle` has seen the trials Tune restored

    def settle(self, tune_trials: dict[str, tuple[str, dict]]) -> None:
        """Match the study to the trials Tune restored (trial id -> (status, last result)),
        once, before any of them runs again."""
        self.unsettled = False
        will_run = {trial_id for trial_id, (status, _) in tune_trials.items()
                    if status not in (Trial.TERMINATED, Trial.ERROR)}
        latest: dict[str, optuna.trial.FrozenTrial] = {}  # Tune trial id -> its newest Optuna trial
        for frozen in self.study.get_trials(deepcopy=False):
            trial_id = frozen.user_attrs.get(TUNE_TRIAL_ID)
            if trial_id is not None:
                latest[trial_id] = frozen
            if frozen.state == TrialState.RUNNING and trial_id not in will_run:
                log.info("Optuna trial %d was asked for by a driver that died before Tune kept it: FAIL",
                         frozen.number)
                self.study.tell(frozen.number, state=TrialState.FAIL)
        for trial_id in sorted(will_run & latest.keys()):
            frozen = latest[trial_id]
            if frozen.state == TrialState.RUNNING:
                self.study.tell(frozen.number, state=TrialState.FAIL)
                self._continue(trial_id, frozen, "continues")
            elif frozen.state == TrialState.FAIL and frozen.user_attrs.get(ERRORED):
                self._continue(trial_id, frozen, "retry_of")  # resume_errored=True runs it again

    def _continue(self, trial_id: str, frozen: optuna.trial.FrozenTrial, link: str) -> None:
        """A fresh Optuna trial with `frozen`'s parameters and intermediate values, for a
        Tune trial that runs on."""
        attrs = {key: value for key, value in frozen.user_attrs.items() if key in (BASELINE, TUNE_TRIAL_ID)}
        self.study.enqueue_trial(frozen.params, user_attrs={**attrs, link: frozen.number})
        ot_trial = self._ask(user_attrs={TUNE_TRIAL_ID: trial_id})
        for epoch, value in sorted(frozen.intermediate_values.items()):
            ot_trial.report(value, epoch)
        self._track(trial_id, ot_trial, reported=set(frozen.intermediate_values))


class StudySync(tune.Callback):
    """Settles `searcher` against the trials Tune restored, at the first step after a driver
    restart, and passes every trial event on to it (Tune's own calls reach a searcher only
    for trials its `ConcurrencyLimiter` knows, and the limiter's restored state may miss some)."""

    def __init__(self, searcher: SweepSearch) -> None:
        self.searcher = searcher

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.searcher.unsettled:
            self.searcher.settle({trial.trial_id: (trial.status, trial.last_result) for trial in trials})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.searcher.on_trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.searcher.on_trial_complete(trial.trial_id, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.searcher.on_trial_complete(trial.trial_id, error=True)


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
        self._pending = False  # the last copy failed: copy again on the next trial event

    def upload(self) -> None:
        """Copy the journal; a storage outage is a warning, not the sweep's end: the copy is
        made again on the next trial event (Tune's own sync of its state fails alike)."""
        if not Path(self.local_path).is_file():
            return
        try:
            storage.write_bytes(self.remote_uri, Path(self.local_path).read_bytes())
        except OSError as exc:
            if not self._pending:
                log.warning("could not copy the Optuna journal to %s (%s); trying again on the next trial event",
                            self.remote_uri, " ".join(str(exc).split())[:200])
            self._pending = True
            return
        self._pending = False
        self._last = time.monotonic()

    def get_state(self) -> None:
        self.upload()
        return None  # nothing to restore: the journal itself is the state

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self._pending or time.monotonic() - self._last > self.period_s:
            self.upload()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.upload()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.upload()

    def on_experiment_end(self, trials, **info) -> None:
        self.upload()
