"""benchmarks/search_quality.py's replays (`replay`, `replay-mo`) at their smallest, on hand-made
tables, through the sweep's own Tuner on a local Ray; every figure worked out again by hand.
No timing is asserted."""
from __future__ import annotations

import json
import math
import re

import pytest

from test_search_quality import (LAST_LINE, LAST_MO_LINE, _brute_force_hypervolume, _cli, _hand_pareto_table,
                                 _hand_table, sq)


@pytest.mark.timeout(240)
def test_replay_runs_every_strategy_and_counts_epochs_by_hand(tmp_path):
    table, runs_json = tmp_path / "hand.parquet", tmp_path / "runs.json"
    slot_ap = _hand_table(table)
    target = 0.4 + 0.85 * (0.9 - 0.4)  # 95th percentile of the finals 0.2, 0.3, 0.4, 0.9
    budget = 2 * 3

    stdout = _cli(["replay", "--table", str(table), "--small", "--runs-json", str(runs_json)], timeout=230).stdout
    last = LAST_LINE.match(stdout.strip().splitlines()[-1])
    assert last, stdout[-2000:]
    values = {key: float(value) for key, value in (pair.split("=", 1) for pair in last["pairs"].split())}
    assert values["target"] == pytest.approx(target, abs=1e-3) and values["budget_epochs"] == budget
    assert values["seeds"] == 2
    for strategy in sq.STRATEGIES:
        assert re.search(rf"^{re.escape(strategy)} +2 +\d/2 ", stdout, re.MULTILINE), stdout

    saved = json.loads(runs_json.read_text())
    assert set(saved["runs"]) == set(sq.STRATEGIES) and all(len(runs) == 2 for runs in saved["runs"].values())
    recorded = sq.read_table(table)
    lookup = sq.NearestConfig(recorded.spec.search, recorded.configs)
    for strategy, runs in saved["runs"].items():
        for run in runs:
            log = run["trial_log"]
            assert len(log) == 6 and log[0]["config_id"] == 0  # every strategy starts with the baseline
            assert all(trial["config_id"] == lookup.nearest(trial["params"]) for trial in log)
            if strategy.endswith("fifo"):
                assert all(trial["epochs"] == 3 for trial in log)  # no early stopping
            # by hand: one trial at a time, so its epochs are spent back to back
            spent, best, to_target, at_budget = 0, -math.inf, math.inf, None
            for trial in log:
                for value in slot_ap[trial["config_id"]][:trial["epochs"]]:
                    spent += 1
                    best = max(best, value)
                    if best >= target and to_target == math.inf:
                        to_target = spent
                    if spent == budget:
                        at_budget = best
            at_budget = best if at_budget is None else at_budget
            assert run["epochs_to_target"] == to_target and run["best_at_budget"] == at_budget
            assert run["epochs"] == spent and (to_target == math.inf or to_target >= 3 + 3)
            sweep = log[:recorded.spec.experiment.num_samples]  # the space's own sweep: its first trials
            assert run["best_in_sweep"] == max(max(slot_ap[t["config_id"]][:t["epochs"]]) for t in sweep)
            assert run["sweep_epochs"] == sum(t["epochs"] for t in sweep)
    for strategy in ("random+fifo", "tpe+asha"):  # the last line's count of sweeps reaching 0.5, by hand
        reached = sum(1 for run in saved["runs"][strategy] if run["best_in_sweep"] >= 0.5)
        assert values[f"{strategy.replace('+', '_')}_sweep_reached"] == reached and values["sweep_goal"] == 0.5


@pytest.mark.timeout(300)
def test_replay_asha_variants_stop_trials_at_their_own_rungs(tmp_path):
    """`--asha-variants` end to end: every variant that fits a 3-epoch trial is replayed for
    random and TPE search, and its trials stop only at its own rung."""
    table, runs_json = tmp_path / "hand.parquet", tmp_path / "runs.json"
    _hand_table(table)
    stdout = _cli(["replay", "--table", str(table), "--small", "--asha-variants", "--runs-json", str(runs_json)],
                  timeout=290).stdout
    variants = sq.scheduler_variants(sq.read_table(table).spec)
    assert list(variants) == ["grace 1, reduction 2 (the space's)", "grace 1, reduction 3", "grace 2, reduction 3",
                              "grace 3, reduction 3"]  # grace 4-6 do not fit in 3 epochs
    assert "ASHA with other rungs, random and TPE" in stdout
    runs = json.loads(runs_json.read_text())["runs"]
    assert set(runs) == set(sq.STRATEGIES) | {f"{search}+asha {label}" for label in list(variants)[1:]
                                             for search in ("random", "tpe")}
    for label in variants:  # the variant table has a row for each, the space's own included
        for search in ("random", "tpe"):
            assert re.search(rf"^{re.escape(f'{search}+asha {label}')} +2 +\d/2 ", stdout, re.MULTILINE), stdout
    stopped_at = {}
    for label, asha in list(variants.items())[1:]:
        for search in ("random", "tpe"):
            for run in runs[f"{search}+asha {label}"]:
                log = run["trial_log"]
                assert log[0]["config_id"] == 0 and log[0]["epochs"] == 3  # the baseline is never stopped
                assert {trial["epochs"] for trial in log} <= {asha.grace_period, 3}, (label, log)
                stopped_at.setdefault(label, set()).update(t["epochs"] for t in log if t["epochs"] < 3)
    # grace 2 stops some trial at epoch 2, which the space's own rung (epoch 1) never does; grace 3
    # is the trial's length, so nothing stops
    assert stopped_at["grace 2, reduction 3"] == {2} and stopped_at["grace 3, reduction 3"] == set()


@pytest.mark.timeout(540)
def test_replay_mo_computes_every_strategys_hypervolume_by_hand(tmp_path):
    table, runs_json = tmp_path / "hand_pareto.parquet", tmp_path / "runs.json"
    curves = _hand_pareto_table(table)
    reference = [0.0, 160.0]  # the worst slot AP and latency of any epoch
    finals = [[curve["slot_ap"][-1], curve["latency_ms"][-1]] for curve in curves.values()]
    # the recorded finals' front from (0, 160 ms), a staircase down slot AP: 0.7 (155 ms), 0.5 (41 ms),
    # 0.2 (9.5 ms); 0.3 at 65 ms is dominated by 0.5 at 41 ms
    table_hv = 0.7 * 5 + 0.5 * (155 - 41) + 0.2 * (41 - 9.5)

    stdout = _cli(["replay-mo", "--table", str(table), "--small", "--runs-json", str(runs_json)], timeout=530).stdout
    last = LAST_MO_LINE.match(stdout.strip().splitlines()[-1])
    assert last, stdout[-2000:]
    values = dict(pair.split("=", 1) for pair in last["pairs"].split())
    assert float(values["table_front"]) == pytest.approx(table_hv, abs=1e-3)
    assert values["budget_epochs"] == "6" and values["seeds"] == "2" and values["reference"] == "0,160"
    saved = json.loads(runs_json.read_text())
    assert saved["reference"] == reference and saved["table_hypervolume"] == pytest.approx(table_hv)
    assert set(saved["runs"]) == {"MO-ASHA", "FIFO", "ASHA(slot_ap)"}
    recorded = sq.read_table(table)
    lookup = sq.NearestConfig(recorded.spec.search, recorded.configs)
    for label, runs in saved["runs"].items():
        assert re.search(rf"^{re.escape(label)} +2 ", stdout, re.MULTILINE), stdout
        assert 0 <= float(values[label]) <= table_hv
        assert len(runs) == 2
        for run in runs:
            log = run["trial_log"]
            assert len(log) == 6 and log[0]["config_id"] == 0  # ceil(6 / grace 1) trials, the baseline first
            assert all(trial["config_id"] == lookup.nearest(trial["params"]) for trial in log)
            if label == "FIFO":
                assert all(trial["epochs"] == 3 for trial in log)
            # by hand: one trial at a time, so a trial completes after the epochs of those before it
            spent, points = 0, []
            for trial in log:
                spent += trial["epochs"]
                if trial["epochs"] == 3 and spent <= 6:
                    points.append(finals[trial["config_id"]])
            assert run["points_at_budget"] == points
            assert math.isfinite(run["hypervolume"]) and 0 <= run["hypervolume"] <= table_hv
            assert run["hypervolume"] == pytest.approx(_brute_force_hypervolume(
                [(ap, -latency) for ap, latency in points], (reference[0], -reference[1])))
