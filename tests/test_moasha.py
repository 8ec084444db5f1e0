"""Pareto ranking and MO-ASHA on hand-made rung states; every expected answer below is
worked out by hand in the comments (gains: larger is better, a `min` objective negated)."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from conftest import REPO
from orchestrate.moasha import MOASHA, BudgetFIFO, rung_milestones
from orchestrate.pareto import crowding_distances, dominates, gains, pareto_ranks, selection_keys
from orchestrate.search import BASELINE
from orchestrate.space import load_space
from orchestrate.tuner import BaselineASHA, build_scheduler

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
OBJECTIVES = (("slot_ap", "max"), ("latency_ms", "min"))


def test_dominance_and_fronts():
    assert gains([0.5, 10.0], ["max", "min"]) == (0.5, -10.0)
    assert dominates((1, 1), (1, 0)) and not dominates((1, 1), (1, 1)) and not dominates((2, 0), (1, 1))
    # (3,3) dominates all; (2,1) and (1,2) are front 1; (1,1) is dominated by both.
    assert pareto_ranks([(1, 1), (2, 1), (3, 3), (1, 2)]) == [2, 1, 0, 1]


def test_crowding_distance_worked_by_hand():
    # One front: (1,5) (2,3) (3,2) (5,0). Objective 0 spans 4, objective 1 spans 5.
    # (2,3): (3-1)/4 + (5-2)/5 = 0.5 + 0.6 = 1.1;  (3,2): (5-2)/4 + (3-0)/5 = 0.75 + 0.6 = 1.35.
    distances = crowding_distances([(1, 5), (2, 3), (3, 2), (5, 0)])
    assert distances[0] == distances[3] == math.inf
    assert distances[1] == pytest.approx(1.1) and distances[2] == pytest.approx(1.35)
    assert crowding_distances([(0, 0), (1, 1)]) == [math.inf, math.inf]
    assert selection_keys([(1, 5), (2, 3), (3, 2), (5, 0), (0, 0)])[1:3] == [(0, pytest.approx(-1.1)),
                                                                             (0, pytest.approx(-1.35))]


def _trial(trial_id: str, baseline: bool = False) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"optim.lr": 0.01, **({BASELINE: True} if baseline else {})})


def _moasha(**extra) -> MOASHA:
    return MOASHA(time_attr="epoch", objectives=OBJECTIVES, max_t=8, grace_period=1, reduction_factor=2, **extra)


def _result(scheduler, trial, epoch, ap, latency=None):
    result = {"epoch": epoch, "slot_ap": ap, **({"latency_ms": latency} if latency is not None else {})}
    return scheduler.on_trial_result(None, trial, result)


def test_rungs_are_where_ray_asha_puts_them():
    assert rung_milestones(1, 8, 2) == [1, 2, 4, 8]
    assert rung_milestones(3, 8, 3) == [3]
    assert rung_milestones(4, 8, 2) == [4, 8]  # grace 4: a rung at epoch 4 (8 is the end)
    assert rung_milestones(5, 8, 2) == [5]  # search_spaces/lr.yaml: one rung, at epoch 5


def test_moasha_keeps_the_best_by_front_then_crowding_at_each_rung():
    scheduler = _moasha()
    a, b, c, d, e = (_trial(name) for name in "abcde")
    base = _trial("base", baseline=True)
    # Rung at epoch 1, (slot_ap, latency_ms):
    assert _result(scheduler, a, 1, 0.5, 10) == CONTINUE  # alone: kept (1 of ceil(1/2) = 1)
    assert _result(scheduler, b, 1, 0.4, 12) == STOP  # dominated by a; 2 recorded keep 1: a
    # c trades AP for latency against a: front {a, c}, two points, both at infinite crowding;
    # 3 recorded keep ceil(3/2) = 2 = a and c.
    assert _result(scheduler, c, 1, 0.6, 20) == CONTINUE
    # d lies between a and c on the front: front {a, d, c}, d's crowding distance
    # (0.6-0.5)/(0.6-0.5) + (20-10)/(20-10) = 2 < infinity; 4 recorded keep 2 = a and c.
    assert _result(scheduler, d, 1, 0.55, 15) == STOP
    # e is dominated by a, c and d (front 1 with b); 5 recorded keep 3 = a, c, d.
    assert _result(scheduler, e, 1, 0.45, 30) == STOP
    # The baseline is dominated too, yet runs on; its result enters the rung.
    assert _result(scheduler, base, 1, 0.1, 50) == CONTINUE
    assert set(scheduler.rungs[1]) == {"a", "b", "c", "d", "e", "base"}
    assert scheduler.rungs[1]["a"] == (0.5, -10.0)

    assert _result(scheduler, a, 2, 0.6, 10) == CONTINUE  # first at the epoch-2 rung
    assert _result(scheduler, c, 2, 0.5, 20) == STOP  # now dominated by a's (0.6, 10)
    assert _result(scheduler, a, 3, 0.7, 10) == CONTINUE  # between rungs: nothing recorded
    assert set(scheduler.rungs[2]) == {"a", "c"} and not scheduler.rungs[4]
    # max_t: the last report never stops a trial, which ends by itself (orchestrate.moasha.is_last_report).
    assert _result(scheduler, a, 8, 0.8, 10) == CONTINUE
    assert _result(scheduler, base, 8, 0.2, 50) == CONTINUE


def test_moasha_skips_results_without_every_objective_and_records_at_the_highest_rung_reached():
    scheduler = _moasha()
    a, b = _trial("a"), _trial("b")
    assert _result(scheduler, a, 1, 0.9) == CONTINUE  # no latency_ms: not recorded
    assert _result(scheduler, a, 1, float("nan"), 5) == CONTINUE
    assert not scheduler.rungs[1]
    # b's first result comes at epoch 2 (evaluations every 2 epochs): it enters rung 2 only.
    assert _result(scheduler, b, 2, 0.5, 10) == CONTINUE
    assert "b" in scheduler.rungs[2] and "b" not in scheduler.rungs[1]
    assert _result(scheduler, a, 2, 0.4, 11) == STOP  # dominated by b at rung 2
    scheduler.on_trial_complete(None, a, {"epoch": 4, "slot_ap": 0.3, "latency_ms": 11})
    assert "a" in scheduler.rungs[4]  # a final result still enters its rung, as Ray's ASHA does


def test_moasha_ties_at_the_cutoff_go_on():
    scheduler = MOASHA(time_attr="epoch", objectives=OBJECTIVES, max_t=9, grace_period=1, reduction_factor=3)
    a, b = _trial("a"), _trial("b")
    assert _result(scheduler, a, 1, 0.5, 10) == CONTINUE
    # 2 recorded keep ceil(2/3) = 1, but b ties a (front 0, both extremes at infinity).
    assert _result(scheduler, b, 1, 0.6, 20) == CONTINUE


def _budget(stop_running: bool, exhausted: bool) -> SimpleNamespace:
    budget = SimpleNamespace(stop_running=stop_running)
    return SimpleNamespace(spec=SimpleNamespace(experiment=SimpleNamespace(budget=budget)), exhausted=lambda: exhausted)


def test_a_spent_budget_with_stop_running_stops_trials_at_their_next_rung():
    scheduler = _moasha(budget=_budget(stop_running=True, exhausted=True))
    a = _trial("a", baseline=True)
    assert _result(scheduler, a, 1, 0.5, 10) == STOP  # rung 1, even the baseline
    b = _trial("b")
    scheduler.on_trial_result(None, b, {"epoch": 2, "slot_ap": 0.5})  # reaches rung 2
    assert _result(scheduler, b, 3, 0.5, 10) == CONTINUE  # epoch 3 is no rung
    assert _result(scheduler, b, 4, 0.5, 10) == STOP
    unspent = _moasha(budget=_budget(stop_running=True, exhausted=False))
    assert _result(unspent, a, 1, 0.5, 10) == CONTINUE
    finish = _moasha(budget=_budget(stop_running=False, exhausted=True))  # running trials finish
    assert _result(finish, a, 1, 0.5, 10) == CONTINUE

    fifo = BudgetFIFO(_budget(stop_running=True, exhausted=True))  # no rungs: the next evaluation
    assert fifo.on_trial_result(None, b, {"epoch": 1, "slot_ap": 0.1}) == STOP

    lr = load_space(REPO / "search_spaces" / "lr.yaml")  # Ray's ASHA, one rung at epoch 5
    asha = build_scheduler(lr, _budget(stop_running=True, exhausted=True))
    for trial in (a, b):
        asha.on_trial_add(None, trial)
    rung = lr.scheduler.grace_period
    assert asha.on_trial_result(None, b, {"epoch": rung - 1, "slot_ap": 0.5}) == CONTINUE
    assert asha.on_trial_result(None, b, {"epoch": rung, "slot_ap": 0.5}) == STOP


def test_single_objective_keeps_ray_asha_and_several_objectives_get_moasha():
    assert type(build_scheduler(load_space(REPO / "search_spaces" / "lr.yaml"))) is BaselineASHA
    pareto = load_space(REPO / "search_spaces" / "pareto.yaml")
    scheduler = build_scheduler(pareto)
    assert isinstance(scheduler, MOASHA) and scheduler.objectives == OBJECTIVES
    assert scheduler.milestones == rung_milestones(pareto.scheduler.grace_period, pareto.max_epochs,
                                                   pareto.scheduler.reduction_factor)
    no_rungs = dataclasses.replace(pareto, scheduler=dataclasses.replace(pareto.scheduler, type="none"))
    assert type(build_scheduler(no_rungs)) is FIFOScheduler
