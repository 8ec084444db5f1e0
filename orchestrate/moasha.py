"""Early stopping for multi-objective sweeps: MO-ASHA (Schmucker, Donini, Zafar, Salinas and
Archambeau, "Multi-objective Asynchronous Successive Halving", 2021) as a Ray Tune
`TrialScheduler`.

It is ASHA with the rung's ranking replaced. Rungs sit where Ray's ASHA puts them
(`rung_milestones`: `grace_period * reduction_factor**k` epochs, below `max_t`). When a
trial first reports at or past a rung's epoch, its objective vector is recorded there, and
every vector recorded at that rung (this one included) is ranked as NSGA-II ranks a
population: by non-dominated front, then, within a front, by crowding distance (larger
first). The trial goes on when it is among the best `ceil(n / reduction_factor)` of the
`n` recorded there; a trial tied with the last of those (same front, same crowding
distance: two extremes of one front are both at infinity) goes on too, as Ray's ASHA lets a
trial equal to its cutoff go on. A trial's last report (`is_last_report`) never stops it:
it ends by itself.

A trial whose result lacks an objective (or has NaN) is neither recorded nor stopped there.
The baseline trial is never stopped early (its result still enters the rungs), as in
orchestrate.tuner.BaselineASHA. With `budget.stop_running`, a trial that reaches a rung
once the budget is spent stops (`BudgetStop`).
"""
from __future__ import annotations

import math
import pickle

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrate.budget import BudgetGuard
from orchestrate.pareto import gains, selection_keys
from orchestrate.search import BASELINE
from psdet.reporting import TOTAL_EPOCHS


def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[float]:
    """The epochs of ASHA's rungs, ascending: Ray's `_Bracket` for bracket 0."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)]


def is_last_report(result: dict, time_attr: str, max_t: float) -> bool:
    """Whether `result` is its trial's last: at its planned epochs (TOTAL_EPOCHS, else `max_t`).

    The sweep's schedulers let such a trial go on, as it ends by itself right after. A STOP
    would kill the trial's process at once, before its trainer's `fit()` returns, so Ray
    Train would never record the run as FINISHED (the dashboard's Train page would call it
    ABORTED), and nothing would be gained: no epoch is left to save.
    """
    return time_attr in result and result[time_attr] >= result.get(TOTAL_EPOCHS, max_t)


class BudgetStop:
    """With `budget.stop_running`: whether a result at a new rung must stop its trial because
    the budget is spent. Mixed into the sweep's schedulers; `milestones` empty (FIFO) means
    every evaluation is a rung."""

    def _init_budget(self, budget: BudgetGuard | None, time_attr: str, milestones: list[float]) -> None:
        self.budget = budget if budget is not None and budget.spec.experiment.budget.stop_running else None
        self.budget_time_attr = time_attr
        self.budget_milestones = milestones
        self._last_seen: dict[str, float] = {}

    def _budget_stops(self, trial, result: dict) -> bool:
        if self.budget is None or self.budget_time_attr not in result:
            return False
        now = result[self.budget_time_attr]
        before = self._last_seen.get(trial.trial_id, 0)
        self._last_seen[trial.trial_id] = now
        at_rung = not self.budget_milestones or any(before < m <= now for m in self.budget_milestones)
        return at_rung and self.budget.exhausted()


class BudgetFIFO(FIFOScheduler, BudgetStop):
    """No early stopping, but with `budget.stop_running` a trial stops at its next evaluation
    once the budget is spent."""

    def __init__(self, budget: BudgetGuard | None, time_attr: str = "epoch") -> None:
        super().__init__()
        self._init_budget(budget, time_attr, [])

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if is_last_report(result, self.budget_time_attr, float("inf")):
            return TrialScheduler.CONTINUE
        return TrialScheduler.STOP if self._budget_stops(trial, result) else TrialScheduler.CONTINUE


class MOASHA(FIFOScheduler, BudgetStop):
    """ASHA whose rung decision is NSGA-II's ranking over several objectives (module docstring).

    `objectives`: (metric, mode) pairs, mode max or min."""

    def __init__(self, *, time_attr: str, objectives: tuple[tuple[str, str], ...], max_t: int,
                 grace_period: int, reduction_factor: float, budget: BudgetGuard | None = None) -> None:
        if len(objectives) < 2:
            raise ValueError("MO-ASHA needs two or more objectives; use ASHA for one")
        if not (0 < grace_period <= max_t) or reduction_factor <= 1:
            raise ValueError(f"need 0 < grace_period <= max_t and reduction_factor > 1, got "
                             f"{grace_period}, {max_t}, {reduction_factor}")
        super().__init__()
        self.time_attr = time_attr
        self.objectives = tuple(objectives)
        self.max_t = max_t
        self.reduction_factor = reduction_factor
        self.milestones = rung_milestones(grace_period, max_t, reduction_factor)
        # milestone -> {trial id: gains}, in the order the trials reached it
        self.rungs: dict[float, dict[str, tuple[float, ...]]] = {m: {} for m in self.milestones}
        self.num_stopped = 0
        self._init_budget(budget, time_attr, self.milestones)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives come from the space file

    def _gains(self, result: dict) -> tuple[float, ...] | None:
        values = [result.get(metric) for metric, _ in self.objectives]
        if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
            return None
        return gains(values, [mode for _, mode in self.objectives])

    def _record(self, trial_id: str, epoch: float, point: tuple[float, ...]) -> float | None:
        """Record `point` at the highest rung at or below `epoch` the trial has not reached
        before; -> that rung's milestone, or None."""
        for milestone in reversed(self.milestones):
            if epoch < milestone or trial_id in self.rungs[milestone]:
                continue
            self.rungs[milestone][trial_id] = point
            return milestone
        return None

    def keeps(self, milestone: float, trial_id: str) -> bool:
        """Whether `trial_id`, recorded at `milestone`, is among those that rung lets go on."""
        recorded = self.rungs[milestone]
        ids = list(recorded)
        keys = selection_keys([recorded[i] for i in ids])
        kept = max(1, math.ceil(len(ids) / self.reduction_factor))
        cutoff = sorted(keys)[kept - 1]
        return keys[ids.index(trial_id)] <= cutoff

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result:
            return TrialScheduler.CONTINUE
        epoch = result[self.time_attr]
        if is_last_report(result, self.time_attr, self.max_t):
            decision = TrialScheduler.CONTINUE
        elif self._budget_stops(trial, result):
            decision = TrialScheduler.STOP
        else:
            decision = TrialScheduler.CONTINUE
            point = self._gains(result)
            milestone = self._record(trial.trial_id, epoch, point) if point is not None else None
            if milestone is not None and not self.keeps(milestone, trial.trial_id):
                decision = TrialScheduler.CONTINUE if trial.config.get(BASELINE) else TrialScheduler.STOP
        if decision == TrialScheduler.STOP:
            self.num_stopped += 1
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        point = self._gains(result or {})
        if point is not None and self.time_attr in result:
            self._record(trial.trial_id, result[self.time_attr], point)

    def debug_string(self) -> str:
        rungs = " | ".join(f"epoch {m:g}: {len(r)} recorded" for m, r in self.rungs.items())
        return f"MO-ASHA over {', '.join(f'{mode} {m}' for m, mode in self.objectives)}: " \
               f"{self.num_stopped} stopped; {rungs}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
