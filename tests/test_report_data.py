"""orchestrate/report.py's data assembly on a hand-made experiment directory: an Optuna
journal, a ledger and Tune's result.json files written here, with no sweep run. (The
report of a real sweep, in a real browser, is tests/test_report.py.)"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from conftest import REPO
from orchestrate import report
from orchestrate.space import load_space, trial_config
from psdet.errors import UserError
from psdet.optim import lr_curve, momentum_curve

SMOKE = REPO / "search_spaces" / "smoke.yaml"
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
DISTRIBUTIONS = {"optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
                 "optim.warmup": CategoricalDistribution(["none", "linear"])}


def frozen(number: int, tune_id: str, state: TrialState, params: dict, curve: dict[int, float],
           start_s: float, end_s: float | None, baseline: bool = False) -> FrozenTrial:
    finished = state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return FrozenTrial(
        number=number, state=state, value=curve[max(curve)] if state == TrialState.COMPLETE else None,
        values=None, datetime_start=T0 + dt.timedelta(seconds=start_s),
        datetime_complete=T0 + dt.timedelta(seconds=end_s) if finished and end_s is not None else None,
        params=params, distributions={k: DISTRIBUTIONS[k] for k in params},
        user_attrs={"tune_trial_id": tune_id, **({"baseline": True} if baseline else {})},
        system_attrs={}, intermediate_values=curve, trial_id=number)


def record(tune_id: str, status: str, params: dict, epochs: int, point_ap: float, baseline: bool = False) -> dict:
    final = {"epoch": epochs, "point_ap": point_ap, "slot_ap": point_ap / 2, "step": 2 * epochs}
    return {"trial_id": tune_id, "params": params, "baseline": baseline, "status": status, "epochs": epochs,
            "total_epochs": 3, "final": final, "best": final, "checkpoint": None, "restarts": 0,
            "worker_restarts": 0, "worker_restarts_base": 0, "wall_time_s": 10.0, "wall_base_s": 0.0,
            "engine_s": 4.0, "error": None}


def make_experiment(root: Path, completed_others: int = 1) -> Path:
    """A 'smoke' sweep: baseline (completed), `completed_others` completed trials, one
    pruned after epoch 1, and an older FAIL Optuna trial of the pruned one (as --resume leaves)."""
    experiment = root / "smoke"
    experiment.mkdir(parents=True)
    (experiment / "sweep.json").write_text(json.dumps({
        "name": "smoke", "experiment": str(experiment), "space_path": str(SMOKE), "space_text": SMOKE.read_text(),
        "data_root": str(root / "no-data"), "synthetic": True, "optuna_storage": str(experiment / "optuna.journal"),
        "created": "2026-01-01 12:00:00"}))
    base = {"optim.lr": 0.003, "optim.warmup": "none"}
    trials = [frozen(0, "base0001", TrialState.COMPLETE, base, {1: 0.1, 2: 0.2, 3: 0.3}, 0, 30, baseline=True),
              frozen(1, "prun0001", TrialState.FAIL, {"optim.lr": 0.006, "optim.warmup": "none"}, {1: 0.05}, 0, 20)]
    ledger = {"base0001": record("base0001", "completed", base, 3, 0.3, baseline=True),
              "prun0001": record("prun0001", "pruned", {"optim.lr": 0.006, "optim.warmup": "none"}, 1, 0.05)}
    for index in range(completed_others):
        tid, params = f"good{index:04d}", {"optim.lr": 0.001 * (index + 1), "optim.warmup": "none"}
        trials.append(frozen(2 + index, tid, TrialState.COMPLETE, params, {1: 0.2, 2: 0.4, 3: 0.5 + index / 10},
                             40 + 10 * index, 70 + 10 * index))
        ledger[tid] = record(tid, "completed", params, 3, 0.5 + index / 10)
    trials.append(frozen(len(trials), "prun0001", TrialState.PRUNED, {"optim.lr": 0.006, "optim.warmup": "none"},
                         {1: 0.05}, 100, 110))
    backend = optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))
    storage = optuna.storages.JournalStorage(backend)
    study = optuna.create_study(study_name="smoke", storage=storage, direction="maximize")
    study.add_trials(trials)
    (experiment / "trials.json").write_text(json.dumps(ledger))
    for tid, rec in ledger.items():
        lines = [json.dumps({"epoch": e, "step": 2 * e, "point_ap": rec["final"]["point_ap"] * e / 3,
                             "slot_ap": rec["final"]["slot_ap"] * e / 3}) for e in range(1, rec["epochs"] + 1)]
        (experiment / f"trial_{tid}").mkdir()
        (experiment / f"trial_{tid}" / "result.json").write_text("\n".join(lines) + "\n")
    return experiment


def test_records_come_from_the_ledger_when_the_sweep_left_no_parquet(tmp_path):
    records = report.load_records(str(make_experiment(tmp_path)))
    assert records.rows_source == "trials.json"
    assert [row["trial_id"] for row in records.rows] == ["good0000", "base0001", "prun0001"]
    # One Optuna trial per Tune trial: the latest (the PRUNED one, not its older FAIL one).
    view = {t.user_attrs["tune_trial_id"]: t for t in records.study.trials}
    assert len(records.study.trials) == 3 and view["prun0001"].state == TrialState.PRUNED
    assert [r["epoch"] for r in records.epochs["base0001"]] == [1, 2, 3]


def test_results_parquet_is_read_unless_the_ledger_is_newer(tmp_path):
    import os

    import pyarrow.parquet as pq

    from orchestrate.results import read_ledger, rows, to_table

    experiment = make_experiment(tmp_path)
    table = rows(read_ledger(str(experiment)), "point_ap", "max")
    table[0]["final_slot_ap"] = 0.123  # tells the parquet's rows from the ledger's
    pq.write_table(to_table(table), experiment / "results.parquet")
    os.utime(experiment / "trials.json", (1_000_000, 1_000_000))
    records = report.load_records(str(experiment))
    assert records.rows_source == "results.parquet" and records.rows[0]["final_slot_ap"] == 0.123
    os.utime(experiment / "trials.json")  # a resumed driver updated the ledger since
    records = report.load_records(str(experiment))
    assert records.rows_source == "trials.json" and records.rows[0]["final_slot_ap"] != 0.123


def test_a_resumed_trials_repeated_epoch_keeps_its_latest_report(tmp_path):
    experiment = make_experiment(tmp_path)
    path = experiment / "trial_base0001" / "result.json"
    path.write_text(path.read_text() + json.dumps({"epoch": 2, "step": 4, "slot_ap": 0.99}) + "\n")
    reports = report.trial_reports(str(experiment), "base0001")
    assert [r["epoch"] for r in reports] == [1, 2, 3] and reports[1]["slot_ap"] == 0.99


def test_no_sweep_there_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"no sweep at .*nothing.*check --storage and --name"):
        report.load_records(str(tmp_path / "nothing"))


def test_session_from_the_study_counts_wall_time_when_some_trial_ran(tmp_path):
    records = report.load_records(str(make_experiment(tmp_path, completed_others=2)))
    # Intervals: [0, 30] baseline, [40, 70] and [50, 80] two at once, [100, 110] pruned.
    session = report.derived_session(records)
    assert session == {"wall_s": 30 + 40 + 10, "engine_s": 4.0 * 4, "slots": 2}
    items = dict(report.summary_items(records, None))
    assert items["goodput"].startswith("10% (16 s of engine training + evaluation over 80 s wall x 2 trial slots)")
    assert items["trials"] == "4 of 3 planned: 3 completed, 1 pruned"
    assert items["best against baseline"].startswith("trial good0001 point_ap 0.6000, baseline base0001 0.3000")


def test_asha_rungs_of_the_smoke_space():
    assert report.asha_rungs(load_space(SMOKE)) == [1, 2]


def test_too_few_completed_trials_for_importances_is_a_note_not_a_crash(tmp_path):
    records = report.load_records(str(make_experiment(tmp_path, completed_others=0)))
    section = report.importance_section(records)
    assert section.figure is None
    assert "needs at least 2 completed trials and this sweep has 1" in section.note


def test_importances_of_completed_trials_only_say_so(tmp_path):
    records = report.load_records(str(make_experiment(tmp_path, completed_others=3)))
    section = report.importance_section(records)
    assert section.figure is not None and "PED-ANOVA" in section.note
    assert "4 completed trials only" in section.note


def test_learning_curves_draw_pruned_trials_dotted_and_mark_the_rungs(tmp_path):
    records = report.load_records(str(make_experiment(tmp_path)))
    for section in (report.learning_curve_section(records), report.slot_ap_section(records)):
        dashes = {trace.name: trace.line.dash for trace in section.figure.data}
        assert set(dashes) == {"base0001 (baseline)", "good0000", "prun0001 (pruned)"}
        assert dashes["prun0001 (pruned)"] == "dot", dashes
        assert {d for name, d in dashes.items() if "pruned" not in name} == {"solid"}, dashes
        rungs = sorted(shape.x0 for shape in section.figure.layout.shapes)
        assert rungs == [1, 2]


def test_schedules_are_psdet_optims_curves_up_to_the_last_step_run(tmp_path):
    records = report.load_records(str(make_experiment(tmp_path)))
    spec = records.spec
    pruned = next(row for row in records.rows if row["trial_id"] == "prun0001")
    curves = report.schedule_curves(records, pruned)
    cfg = trial_config(spec, {"optim.lr": 0.006, "optim.warmup": "none"})
    assert len(curves["lr"]) == 2  # one epoch of two steps
    np.testing.assert_allclose(curves["lr"], lr_curve(cfg.optim, 2, cfg.train.epochs)[:2])
    np.testing.assert_allclose(curves["momentum"], momentum_curve(cfg.optim, 2, cfg.train.epochs)[:2])
    section = report.schedule_section(records)
    assert len(section.figure.data) == 2 * 3  # LR and momentum of each of the three trials


def test_the_page_holds_the_figures_it_claims_and_a_sortable_leaderboard(tmp_path):
    experiment = make_experiment(tmp_path, completed_others=0)  # one completed trial: no importances
    uri = report.write_report(str(experiment))
    page = Path(uri).read_text()
    claimed = int(re.search(r"<meta name='psdet-figures' content='(\d+)'>", page)[1])
    # history, point_ap curves, slot AP curves, parallel coordinates, LR/momentum; importances need 2 completed.
    assert claimed == 5 == page.count('class="plotly-graph-div"')
    assert page.count("<script>/**\n* plotly.js v") == 1  # plotly.js inlined, once
    assert "src=\"https://cdn" not in page and "needs at least 2 completed trials" in page
    table = page[page.index("<table id='leaderboard'>"):]
    assert table.count("<tr class=") == 2 and "onclick='sortBy(this)'" in table
    assert "No finished trial with a checkpoint yet." in page


PARETO = REPO / "search_spaces" / "pareto.yaml"


def make_pareto_experiment(root: Path) -> Path:
    """A 'pareto' sweep (slot AP max, latency min): the baseline and three others completed
    (two on the front with the baseline dominated by one of them), one pruned."""
    from optuna.distributions import IntDistribution

    experiment = root / "pareto"
    experiment.mkdir(parents=True)
    (experiment / "sweep.json").write_text(json.dumps({
        "name": "pareto", "experiment": str(experiment), "space_path": str(PARETO), "space_text": PARETO.read_text(),
        "data_root": str(root / "no-data"), "synthetic": True, "optuna_storage": str(experiment / "optuna.journal"),
        "created": "2026-01-01 12:00:00"}))
    distributions = {"model.depth_factor": IntDistribution(2, 8, step=2),
                     "data.image_size": IntDistribution(128, 320, step=64),
                     "optim.lr": FloatDistribution(1e-3, 1e-2, log=True)}
    points = [("base0001", (4, 256, 0.003), (0.50, 40.0), True), ("fast0001", (2, 128, 0.004), (0.40, 10.0), False),
              ("good0001", (4, 256, 0.006), (0.60, 39.0), False), ("slow0001", (8, 320, 0.002), (0.45, 90.0), False)]
    trials, ledger = [], {}
    for number, (tid, (width, size, lr), (ap, latency), baseline) in enumerate(points):
        params = {"model.depth_factor": width, "data.image_size": size, "optim.lr": lr}
        trials.append(FrozenTrial(
            number=number, state=TrialState.COMPLETE, value=None, values=[ap, latency],
            datetime_start=T0 + dt.timedelta(seconds=10 * number), datetime_complete=T0 + dt.timedelta(seconds=10 * number + 9),
            params=params, distributions=distributions,
            user_attrs={"tune_trial_id": tid, **({"baseline": True} if baseline else {})}, system_attrs={},
            intermediate_values={}, trial_id=number))
        final = {"epoch": 8, "slot_ap": ap, "latency_ms": latency, "point_ap": ap, "step": 16}
        ledger[tid] = {**record(tid, "completed", params, 8, ap, baseline=baseline), "final": final, "best": final,
                       "total_epochs": 8}
    params = {"model.depth_factor": 6, "data.image_size": 192, "optim.lr": 0.009}
    trials.append(FrozenTrial(number=4, state=TrialState.PRUNED, value=None, values=None, datetime_start=T0,
                              datetime_complete=T0 + dt.timedelta(seconds=50), params=params,
                              distributions=distributions, user_attrs={"tune_trial_id": "prun0001"}, system_attrs={},
                              intermediate_values={}, trial_id=4))
    pruned = {"epoch": 3, "slot_ap": 0.05, "latency_ms": 50.0, "point_ap": 0.1, "step": 6}
    ledger["prun0001"] = {**record("prun0001", "pruned", params, 3, 0.1), "final": pruned, "best": pruned,
                          "total_epochs": 8}
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal")))
    optuna.create_study(study_name="pareto", storage=storage, directions=["maximize", "minimize"]).add_trials(trials)
    (experiment / "trials.json").write_text(json.dumps(ledger))
    for tid, rec in ledger.items():
        lines = [json.dumps({"epoch": e, "step": 2 * e, "slot_ap": rec["final"]["slot_ap"] * e / rec["epochs"],
                             "latency_ms": rec["final"]["latency_ms"]}) for e in range(1, rec["epochs"] + 1)]
        (experiment / f"trial_{tid}").mkdir()
        (experiment / f"trial_{tid}" / "result.json").write_text("\n".join(lines) + "\n")
    return experiment


def test_a_multi_objective_sweep_draws_its_pareto_front_with_the_baseline(tmp_path):
    records = report.load_records(str(make_pareto_experiment(tmp_path)))
    sections = {section.title: section for section in report.build_sections(records)}
    front = sections["Pareto front"]
    assert front.figure is not None and "slot_ap (max), latency_ms (min)" in front.note
    drawn = {(round(x, 3), round(y, 3)) for trace in front.figure.data if trace.name != "baseline"
             for x, y in zip(trace.x, trace.y)}
    assert drawn == {(0.5, 40.0), (0.4, 10.0), (0.6, 39.0), (0.45, 90.0)}  # the four completed, not the pruned
    (star,) = [trace for trace in front.figure.data if trace.name == "baseline"]
    assert (star.x[0], star.y[0]) == (0.5, 40.0)
    assert sections["Optimization history"].figure is not None  # on the first objective
    assert "keeps no per-epoch values" in sections["Learning curves: slot_ap per epoch"].note
    assert sections["Learning curves: slot AP per epoch"].figure is not None  # from Tune's result.json
    page = report.render(records)
    declared = int(re.search(r"name='psdet-figures' content='(\d+)'", page)[1])
    assert declared == sum(section.figure is not None for section in sections.values()) and declared >= 4
