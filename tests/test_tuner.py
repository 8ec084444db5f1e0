"""The sweep's scheduler: Ray's ASHA on the reported epoch, sparing the baseline."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from conftest import REPO
from orchestrate.search import BASELINE
from orchestrate.space import load_space
from orchestrate.tuner import BaselineASHA, build_scheduler
from psdet.reporting import TOTAL_EPOCHS


def _trial(trial_id: str, baseline: bool = False) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"optim.lr": 0.01, **({BASELINE: True} if baseline else {})})


def test_asha_stops_below_the_top_third_at_epoch_3_but_never_the_baseline():
    lr = load_space(REPO / "search_spaces" / "lr.yaml")  # with grace 3, reduction 3, 8 epochs: one rung, epoch 3
    spec = dataclasses.replace(lr, scheduler=dataclasses.replace(lr.scheduler, grace_period=3, reduction_factor=3.0))
    scheduler = build_scheduler(spec)
    assert isinstance(scheduler, BaselineASHA)
    first, second, baseline, poor = _trial("a"), _trial("b"), _trial("base", baseline=True), _trial("c")
    for trial in (first, second, baseline, poor):
        scheduler.on_trial_add(None, trial)

    def result(trial, epoch, value):
        return scheduler.on_trial_result(None, trial, {"epoch": epoch, "slot_ap": value})

    assert result(first, 2, 0.0) == TrialScheduler.CONTINUE  # before the rung
    assert result(first, 3, 0.5) == TrialScheduler.CONTINUE  # the first at the rung sets it
    assert result(second, 3, 0.6) == TrialScheduler.CONTINUE  # above the cutoff 0.5
    # The cutoff is now the 67th percentile of (0.5, 0.6), 0.567: the baseline is below it, but runs on.
    assert result(baseline, 3, 0.1) == TrialScheduler.CONTINUE
    assert result(poor, 3, 0.1) == TrialScheduler.STOP  # below the 67th percentile of (0.5, 0.6, 0.1)
    assert result(baseline, 7, 0.3) == TrialScheduler.CONTINUE
    # A trial's last report never stops it: it ends by itself, and its trainer's fit() returns first.
    assert result(baseline, 8, 0.4) == TrialScheduler.CONTINUE
    assert result(first, 8, 0.7) == TrialScheduler.CONTINUE
    short = _trial("d")  # 3 epochs planned: its last report is at the rung, below the cutoff
    scheduler.on_trial_add(None, short)
    assert scheduler.on_trial_result(None, short, {"epoch": 3, "slot_ap": 0.0, TOTAL_EPOCHS: 3}) \
        == TrialScheduler.CONTINUE
    late = _trial("e")  # 8 planned: the same result at the rung stops it
    scheduler.on_trial_add(None, late)
    assert scheduler.on_trial_result(None, late, {"epoch": 3, "slot_ap": 0.0, TOTAL_EPOCHS: 8}) \
        == TrialScheduler.STOP


def test_no_scheduler_is_fifo():
    spec = load_space(REPO / "search_spaces" / "lr.yaml")
    fifo = dataclasses.replace(spec, scheduler=dataclasses.replace(spec.scheduler, type="none"))
    assert isinstance(build_scheduler(fifo), FIFOScheduler)
