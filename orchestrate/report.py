"""`report.html`: one self-contained page per sweep, for a person to look at.

    python orchestrate/tune.py --space search_spaces/lr.yaml --report     # at the end of the sweep
    python orchestrate/tune.py report --storage runs --name lr             # any time after, finished or not

It reads only what the sweep left in its experiment directory (local or any pyarrow URI,
through orchestrate.storage): sweep.json (how it was started, the space), trials.json and
results.parquet (the leaderboard), the Optuna study (the journal, or the RDB the sweep used),
each trial's `trial_<id>/result.json` (Tune's one line per report) and the best checkpoint.
It writes `<experiment>/report.html`, plotly.js inlined once, images as data URIs: it opens
offline, from a laptop or straight from a bucket.

Plots come from `optuna.visualization` where Optuna has them (optimization history, the
metric's learning curves, parallel coordinates, parameter importances by PED-ANOVA) and are drawn
here where it has none (slot AP per epoch, the LR and momentum schedules of `psdet.optim`).
Optuna's plots see one Optuna trial per Tune trial: the latest of each (a trial continued
by `--resume` has an older FAIL one). Importing this module imports Ray (through
orchestrate.results): call `orchestrate.ray_env.prepare` first.
"""
from __future__ import annotations

import base64
import html
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import optuna
import plotly.graph_objects as go
import pyarrow.fs
import pyarrow.parquet as pq
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from orchestrate import storage, sweep_file
from orchestrate.data import LABEL_DIR
from orchestrate.results import BEST_CHECKPOINT, LEDGER, RESULTS, read_ledger, rows as ledger_rows, sweep_summary
from orchestrate.search import TUNE_TRIAL_ID, optuna_storage
from orchestrate.space import SweepSpec, load_space, trial_config
from psdet.errors import DataError, UserError
from psdet.optim import base_momentum, lr_curve, momentum_curve

REPORT = "report.html"
TUNE_RESULT = "result.json"  # Tune's per-trial log: one JSON line per report
SLOT_AP = "slot_ap"
TOP_SCHEDULES = 5
PREDICTION_IMAGES = 3
MIN_TRIALS_FOR_IMPORTANCE = 2
PRUNED_DASH = "dot"
ERRORED_DASH = "dashdot"
PREDICT_TIMEOUT_S = 600


@dataclass
class SweepRecords:
    """Everything the report shows, read from the experiment directory."""

    experiment: str
    name: str
    spec: SweepSpec
    saved: dict[str, Any]  # sweep.json
    rows: list[dict[str, Any]]  # the leaderboard rows, ranked (orchestrate.results.rows)
    rows_source: str  # which file the rows came from
    study: optuna.Study | None  # one Optuna trial per Tune trial (see study_view)
    study_note: str | None  # why there is no study, when there is none
    epochs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # trial id -> reports, by epoch

    @property
    def metric(self) -> str:
        return self.spec.experiment.metric


# ----------------------------------------------------------------------------- reading


def load_records(experiment: str) -> SweepRecords:
    """The sweep at `experiment`; UserError naming the place when there is none."""
    try:
        saved = sweep_file.read(experiment)
    except (OSError, ValueError) as exc:  # pyarrow: a bucket that is not there, an unknown scheme
        raise UserError(f"report: cannot read {experiment}: {' '.join(str(exc).split())}") from None
    if saved is None:
        raise UserError(f"report: no sweep at {experiment} (no {sweep_file.SWEEP_FILE} there): "
                        "check --storage and --name")
    spec = _spec_of(saved)
    rows, source = _leaderboard_rows(experiment, spec)
    study, note = _study(experiment, saved, spec)
    epochs = {row["trial_id"]: trial_reports(experiment, row["trial_id"]) for row in rows}
    return SweepRecords(experiment=experiment, name=saved["name"], spec=spec, saved=saved, rows=rows,
                        rows_source=source, study=study, study_note=note, epochs=epochs)


def _spec_of(saved: dict[str, Any]) -> SweepSpec:
    """The space the sweep started with (sweep.json keeps its text), loaded under the file's
    own name (the study is named after it) and, when still there, from its own directory."""
    original = Path(saved["space_path"])
    if original.is_file() and original.read_text() == saved["space_text"]:
        return load_space(original)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp, original.name)
        copy.write_text(saved["space_text"])
        return load_space(copy)


def _leaderboard_rows(experiment: str, spec: SweepSpec) -> tuple[list[dict[str, Any]], str]:
    """results.parquet when the sweep's last driver wrote it after its last ledger update;
    else (a sweep interrupted, or resumed and running) the same rows made from trials.json."""
    ledger = read_ledger(experiment)
    parquet_uri, ledger_uri = storage.join(experiment, RESULTS), storage.join(experiment, LEDGER)
    fs, parquet_path = storage.filesystem(parquet_uri)
    parquet_info = fs.get_file_info(parquet_path)
    if parquet_info.type == pyarrow.fs.FileType.File:
        ledger_info = fs.get_file_info(storage.filesystem(ledger_uri)[1])
        if ledger_info.type != pyarrow.fs.FileType.File or parquet_info.mtime >= ledger_info.mtime:
            return pq.read_table(parquet_path, filesystem=fs).to_pylist(), RESULTS
    return ledger_rows(ledger, spec.experiment.metric, spec.experiment.mode), LEDGER


def trial_reports(experiment: str, trial_id: str) -> list[dict[str, Any]]:
    """The trial's reports from Tune's result.json, one per epoch (the latest when a
    resumed run reported an epoch again), by epoch."""
    uri = storage.join(experiment, f"trial_{trial_id}", TUNE_RESULT)
    if not storage.exists(uri):
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in storage.read_bytes(uri).decode().splitlines():
        if line.strip():
            result = json.loads(line)
            if isinstance(result.get("epoch"), (int, float)):
                by_epoch[int(result["epoch"])] = result
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _study(experiment: str, saved: dict[str, Any], spec: SweepSpec) -> tuple[optuna.Study | None, str | None]:
    url = saved["optuna_storage"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        if "://" in url and not url.startswith("file://"):  # an RDB the sweep shared
            study_storage = optuna_storage(url)
        else:
            # A copy: the report never takes the journal's lock, and a remote sweep's journal
            # lives in the experiment directory (JournalMirror), not on this host.
            source = storage.join(experiment, sweep_file.JOURNAL) if storage.is_remote(experiment) else url
            if not storage.exists(source):
                return None, f"no Optuna journal at {source}"
            copy = Path(tmp, sweep_file.JOURNAL)
            copy.write_bytes(storage.read_bytes(source))
            study_storage = optuna_storage(str(copy))
        try:
            loaded = optuna.load_study(study_name=spec.name, storage=study_storage)
        except KeyError:
            return None, f"the Optuna storage {url} holds no study '{spec.name}'"
        return study_view(loaded), None


def study_view(study: optuna.Study) -> optuna.Study:
    """An in-memory study holding, per Tune trial, its latest Optuna trial: the older
    Optuna trial of a trial a resumed driver continued is FAIL and would draw twice."""
    latest: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        key = trial.user_attrs.get(TUNE_TRIAL_ID, f"optuna-{trial.number}")
        latest[key] = trial  # get_trials is in trial-number order
    view = optuna.create_study(storage=optuna.storages.InMemoryStorage(), directions=study.directions,
                               study_name=study.study_name)
    view.add_trials(sorted(latest.values(), key=lambda t: t.number))
    return view


# ----------------------------------------------------------------------------- what the page says


def asha_rungs(spec: SweepSpec) -> list[int]:
    """The epochs at which ASHA compares trials (Ray's ASHA: grace_period x reduction_factor^k,
    below max_t); none for FIFO."""
    if spec.scheduler.type != "asha":
        return []
    rungs, epoch = [], spec.scheduler.grace_period
    while epoch < spec.max_epochs:
        rungs.append(int(epoch))
        epoch *= spec.scheduler.reduction_factor
    return rungs


def trial_intervals(study: optuna.Study | None) -> list[tuple[float, float]]:
    """(start, end) in epoch seconds of every finished Optuna trial of the view."""
    if study is None:
        return []
    return [(t.datetime_start.timestamp(), t.datetime_complete.timestamp())
            for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]


def derived_session(records: SweepRecords) -> dict[str, float] | None:
    """The sweep's time on record, for `sweep_summary`: wall seconds during which some trial
    ran (the union of the Optuna trials' start-to-end intervals, so the gap while a sweep
    was down is not counted), the engine seconds of every trial, and as slots the most
    trials that ran at once."""
    intervals = sorted(trial_intervals(records.study))
    if not intervals:
        return None
    wall, (start, end) = 0.0, intervals[0]
    for s, e in intervals[1:]:
        if s > end:
            wall, start, end = wall + end - start, s, e
        else:
            end = max(end, e)
    wall += end - start
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    running = slots = 0
    for _, step in events:
        running += step
        slots = max(slots, running)
    return {"wall_s": wall, "engine_s": sum(row.get("engine_s") or 0.0 for row in records.rows), "slots": slots}


def summary_items(records: SweepRecords, session: dict[str, float] | None) -> list[tuple[str, str]]:
    """(label, text) pairs of the page's summary."""
    counts = Counter(row["status"] for row in records.rows)
    order = ["completed", "pruned", "errored", "running", "pending"]
    statuses = ", ".join(f"{counts[s]} {s}" for s in order + sorted(set(counts) - set(order)) if counts[s])
    how = "this driver's session" if session is not None else "the Optuna study's trial times"
    session = session if session is not None else derived_session(records)
    lines = sweep_summary(records.rows, records.spec, session)
    items = [("sweep", f"'{records.name}' at {records.experiment}, started {records.saved.get('created', '?')}; "
                       f"{records.spec.experiment.mode} {records.metric}"),
             ("trials", f"{len(records.rows)} of {records.spec.experiment.num_samples} planned: {statuses or 'none'}")]
    for line in lines:
        label, _, text = line.partition(": ")
        items.append((label, text + (f" (from {how})" if label == "goodput" else "")))
    if session is not None:
        items.append(("wall time", f"{session['wall_s']:.0f} s ({how})"))
    versions = {name: _version(name) for name in ("ray", "optuna", "plotly")}
    items.append(("versions", ", ".join(f"{name} {v}" for name, v in versions.items())
                  + " (the environment that wrote this report)"))
    items.append(("records", f"leaderboard from {records.rows_source}"
                  + (f"; {records.study_note}" if records.study_note else "")))
    return items


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def trial_label(row: dict[str, Any], spec: SweepSpec) -> str:
    params = ", ".join(_fmt(row.get(p.key), p.key) for p in spec.search if row.get(p.key) is not None)
    return f"{row['trial_id']}{' (baseline)' if row.get('baseline') else ''}: {params}"


def _fmt(value: Any, key: str | None = None) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{key.split('.')[-1]}={text}" if key else text


# ----------------------------------------------------------------------------- figures


@dataclass
class Section:
    """One part of the page: a heading, a figure or HTML, and a line on what it shows."""

    title: str
    note: str
    figure: go.Figure | None = None
    body: str = ""


def _tune_ids(study: optuna.Study) -> dict[int, str]:
    return {t.number: t.user_attrs.get(TUNE_TRIAL_ID, str(t.number)) for t in study.get_trials(deepcopy=False)}


def _multi_objective(records: SweepRecords) -> bool:
    return records.study is not None and len(records.study.directions) > 1


def _first_objective(trial: FrozenTrial) -> float:
    """What the single-objective plots draw for a multi-objective study: its first objective."""
    return trial.values[0]


def pareto_section(records: SweepRecords) -> Section:
    """A multi-objective sweep's completed trials in objective space, the front highlighted."""
    title = "Pareto front"
    study = records.study
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return Section(title, "No completed trial yet: there is no front to draw.")
    names = [name for name, _ in records.spec.objectives]
    shown = names[:3]  # Optuna draws two or three objectives
    figure = optuna.visualization.plot_pareto_front(
        study, targets=lambda trial: tuple(trial.values[:3]), target_names=shown)
    note = (f"Optuna's plot_pareto_front over the {len(complete)} completed trials: "
            f"{', '.join(f'{name} ({mode})' for name, mode in records.spec.objectives)}; the front "
            "(pareto_rank 0 in results.parquet) in the darker colour. Pruned trials have no final values.")
    if len(names) > 3:
        note += f" Only the first three objectives are drawn ({', '.join(names[3:])} left out)."
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    if baseline is not None and len(shown) == 2:
        figure.add_trace(go.Scatter(x=[baseline.values[0]], y=[baseline.values[1]], mode="markers", name="baseline",
                                    marker={"symbol": "star", "size": 16, "color": "crimson"}))
        note += f" The star is the baseline (Optuna trial {baseline.number})."
    return Section(title, note, figure)


def history_section(records: SweepRecords) -> Section:
    title = "Optimization history"
    study = records.study
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))] if study else []
    if not complete:
        return Section(title, "No completed trial yet: Optuna's optimization history has nothing to draw.")
    multi = _multi_objective(records)
    figure = optuna.visualization.plot_optimization_history(
        study, target=_first_objective if multi else None, target_name=records.metric)
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    note = (f"Optuna's plot_optimization_history over the {len(complete)} completed trials (final {records.metric}"
            f"{', the first objective' if multi else ''}; pruned trials have no final value).")
    if baseline is not None:
        value = baseline.values[0] if multi else baseline.value
        figure.add_trace(go.Scatter(x=[baseline.number], y=[value], mode="markers", name="baseline",
                                    marker={"symbol": "star", "size": 16, "color": "crimson"}))
        note += f" The star is the baseline (Optuna trial {baseline.number})."
    else:
        note += " The baseline has not completed, so it is not marked."
    return Section(title, note, figure)


def learning_curve_section(records: SweepRecords) -> Section:
    """The sweep metric per epoch: Optuna's plot_intermediate_values (what ASHA compared),
    pruned trials dotted, ASHA's rungs as vertical lines."""
    title = f"Learning curves: {records.metric} per epoch"
    study = records.study
    if _multi_objective(records):
        return Section(title, "An Optuna multi-objective study keeps no per-epoch values (Optuna cannot prune one); "
                              f"MO-ASHA ranked the trials on Tune's results, drawn below as {SLOT_AP} per epoch.")
    if study is None or not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        return Section(title, "No trial has reported an epoch yet.")
    figure = optuna.visualization.plot_intermediate_values(study)
    ids = _tune_ids(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for trace in figure.data:
        number = int(str(trace.name).removeprefix("Trial"))
        how = {TrialState.PRUNED: " (pruned)", TrialState.FAIL: " (errored)",
               TrialState.RUNNING: " (running)"}.get(trials[number].state, "")
        trace.name = f"{ids[number]}{how}{' (baseline)' if trials[number].user_attrs.get('baseline') else ''}"
        trace.line = {"dash": {" (pruned)": PRUNED_DASH, " (errored)": ERRORED_DASH}.get(how, "solid")}
        trace.showlegend = True
    _mark_rungs(figure, records.spec)
    figure.update_layout(xaxis_title="epoch", yaxis_title=records.metric, showlegend=True)
    return Section(title, "Optuna's plot_intermediate_values: the value each trial reported per epoch, which ASHA "
                          f"compared. {_styles_text(records.spec)}", figure)


def _mark_rungs(figure: go.Figure, spec: SweepSpec, **where: Any) -> None:
    for rung in asha_rungs(spec):
        figure.add_vline(x=rung, line_dash="dash", line_color="grey", annotation_text=f"ASHA rung {rung}", **where)


def _styles_text(spec: SweepSpec) -> str:
    return f"Pruned trials are dotted, errored ones dash-dotted; {_rung_text(spec)}"


def _rung_text(spec: SweepSpec) -> str:
    rungs = asha_rungs(spec)
    if not rungs:
        return "no early stopping in this sweep (scheduler: none)."
    return f"dashed lines are ASHA's rungs (epochs {', '.join(map(str, rungs))}), where a trial may be stopped."


def slot_ap_section(records: SweepRecords) -> Section:
    """Slot AP per epoch from Tune's result.json (Optuna holds only the sweep metric)."""
    title = "Learning curves: slot AP per epoch"
    figure = go.Figure()
    for row in records.rows:
        reports = [r for r in records.epochs.get(row["trial_id"], []) if isinstance(r.get(SLOT_AP), (int, float))]
        if not reports:
            continue
        status = row["status"]
        how = f" ({status})" if status in ("pruned", "errored", "running") else ""
        figure.add_trace(go.Scatter(
            x=[r["epoch"] for r in reports], y=[r[SLOT_AP] for r in reports], mode="lines+markers",
            name=f"{row['trial_id']}{how}{' (baseline)' if row.get('baseline') else ''}",
            line={"dash": {"pruned": PRUNED_DASH, "errored": ERRORED_DASH}.get(status, "solid")},
            hovertext=trial_label(row, records.spec)))
    if not figure.data:
        return Section(title, "No trial has reported an epoch yet.")
    _mark_rungs(figure, records.spec)
    figure.update_layout(xaxis_title="epoch", yaxis_title=SLOT_AP)
    return Section(title, f"From each trial's {TUNE_RESULT}. {_styles_text(records.spec)}", figure)


def parallel_section(records: SweepRecords) -> Section:
    title = "Parallel coordinates"
    study = records.study
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study else []
    if not complete:
        return Section(title, "No completed trial yet.")
    final_slot_ap = {row["trial_id"]: row.get(f"final_{SLOT_AP}") for row in records.rows}

    def target(trial: FrozenTrial) -> float:
        value = final_slot_ap.get(trial.user_attrs.get(TUNE_TRIAL_ID))
        return math.nan if value is None else float(value)

    # Optuna refuses a parameter no completed trial has (a conditional one only pruned trials took).
    seen = {key for trial in complete for key in trial.params}
    params = [p.key for p in records.spec.search if p.key in seen]
    figure = optuna.visualization.plot_parallel_coordinate(study, params=params, target=target,
                                                           target_name=f"final {SLOT_AP}")
    return Section(title, f"Optuna's plot_parallel_coordinate over the {len(complete)} completed trials and the "
                          f"searched parameters they took, coloured by final {SLOT_AP}. A trial without a "
                          "conditional parameter (warmup settings without warmup) is drawn at that axis's "
                          "'missing' mark.", figure)


def importance_section(records: SweepRecords) -> Section:
    title = "Parameter importances"
    study = records.study
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study else []
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return Section(title, f"Not computed: PED-ANOVA needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials "
                              f"and this sweep has {len(complete)}.")
    # PED-ANOVA (scipy) rather than fANOVA, which needs scikit-learn; it warns about regimes
    # with few trials, which the note below says for every small sweep.
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    multi = _multi_objective(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            figure = optuna.visualization.plot_param_importances(
                study, evaluator=evaluator, target=_first_objective if multi else None, target_name=records.metric)
    except (ValueError, RuntimeError) as exc:  # e.g. no parameter common to every completed trial
        return Section(title, f"Not computed: Optuna's PED-ANOVA evaluator declined: {exc}")
    if not figure.data:
        return Section(title, "Not computed: no parameter takes more than one value across the completed trials.")
    return Section(title, f"Optuna's PED-ANOVA (PedAnovaImportanceEvaluator, default quantiles) on the "
                          f"{len(complete)} completed trials only, for final {records.metric}"
                          f"{' (the first objective)' if multi else ''}. "
                          f"{'With this few trials the shares are rough.' if len(complete) < 20 else ''}", figure)


def schedule_curves(records: SweepRecords, row: dict[str, Any]) -> dict[str, Any] | None:
    """The LR and momentum (or Adam's beta1) a trial got, step by step, from psdet.optim:
    its config (the space and its parameters), steps per epoch from its own reports
    (`step` / `epoch`), up to the last step it ran."""
    reports = records.epochs.get(row["trial_id"], [])
    if not reports or not reports[0].get("step"):
        return None
    steps_per_epoch = int(reports[0]["step"]) // int(reports[0]["epoch"])
    params = {p.key: row[p.key] for p in records.spec.search if row.get(p.key) is not None}
    cfg = trial_config(records.spec, params)
    ran = min(int(reports[-1]["step"]), steps_per_epoch * cfg.train.epochs)
    steps = list(range(ran))
    lr = lr_curve(cfg.optim, steps_per_epoch, cfg.train.epochs, steps=steps)
    momentum = momentum_curve(cfg.optim, steps_per_epoch, cfg.train.epochs, steps=steps)
    if momentum is None:
        momentum = [base_momentum(cfg.optim)] * len(steps)
    epochs = [s / steps_per_epoch for s in steps]
    return {"epoch": epochs, "lr": list(map(float, lr)), "momentum": list(map(float, momentum))}


def schedule_section(records: SweepRecords) -> Section:
    title = f"LR and momentum of the top {TOP_SCHEDULES}"
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=("learning rate", "momentum (SGD) / beta1 (Adam, AdamW)"))
    shown = 0
    for row in records.rows:
        if shown == TOP_SCHEDULES:
            break
        curves = schedule_curves(records, row)
        if curves is None:
            continue
        shown += 1
        label = f"#{row['rank']} {trial_label(row, records.spec)}"
        colour = f"hsl({(shown - 1) * 67 % 360}, 70%, 45%)"
        figure.add_trace(go.Scatter(x=curves["epoch"], y=curves["lr"], name=label, legendgroup=label,
                                    line={"color": colour}, mode="lines"), row=1, col=1)
        figure.add_trace(go.Scatter(x=curves["epoch"], y=curves["momentum"], name=label, legendgroup=label,
                                    showlegend=False, line={"color": colour}, mode="lines"), row=2, col=1)
    if shown == 0:
        return Section(title, "No trial has reported an epoch yet.")
    figure.update_xaxes(title_text="epoch", row=2, col=1)
    figure.update_yaxes(type="log", row=1, col=1)
    figure.update_layout(height=620)
    return Section(title, f"The schedule each of the {shown} best-ranked trials really got, computed by psdet.optim "
                          "(warmup included) from its config, up to the last step it ran.", figure)


# ----------------------------------------------------------------------------- predictions


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial the sweep calls best (results.write_results): the first completed one,
    else the first pruned one."""
    for status in ("completed", "pruned"):
        row = next((r for r in rows if r["status"] == status), None)
        if row is not None:
            return row
    return None


def prediction_section(records: SweepRecords) -> Section:
    title = "Predictions of the best checkpoint"
    best = best_row(records.rows)
    if best is None or not best.get("checkpoint"):
        return Section(title, "No finished trial with a checkpoint yet.")
    pointer = storage.join(records.experiment, BEST_CHECKPOINT)
    checkpoint = storage.read_bytes(pointer).decode().strip() if storage.exists(pointer) else best["checkpoint"]
    data_root = Path(records.saved["data_root"])
    split = records.spec.base_tree["data"]["val_split"]
    images = sorted((data_root / split).glob("*.jpg"))[:PREDICTION_IMAGES]
    if not images:
        return Section(title, f"Not drawn: no validation images at {data_root / split} on this machine.")
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_checkpoint(checkpoint, records.experiment, Path(tmp, "checkpoint"))
        drawn = Path(tmp, "predicted.png")
        command = [sys.executable, "-m", "psdet", "predict", "--ckpt", str(local), "--draw", str(drawn),
                   *map(str, images)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                              timeout=PREDICT_TIMEOUT_S)
        if done.returncode != 0:
            return Section(title, f"Not drawn: psdet predict failed: {_last_line(done.stderr)}")
        outputs = json.loads(done.stdout)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        cells = []
        for index, (image, output) in enumerate(zip(images, outputs)):
            predicted = drawn if len(images) == 1 else drawn.with_name(f"{drawn.stem}-{index}{drawn.suffix}")
            truth = Path(tmp, f"truth-{index}.png")
            try:
                _draw_truth(image, data_root / LABEL_DIR / split / f"{image.stem}.json", truth)
                truth_cell = (f"<figure><img alt='ground truth {html.escape(image.name)}' src='{_data_uri(truth)}'>"
                              f"<figcaption>{html.escape(image.name)}: ground truth</figcaption></figure>")
            except DataError as exc:  # a missing or malformed label: say so where the truth would be
                truth_cell = f"<figure><figcaption>{html.escape(str(exc))}</figcaption></figure>"
            cells.append(
                truth_cell +
                f"<figure><img alt='prediction {html.escape(image.name)}' src='{_data_uri(predicted)}'>"
                f"<figcaption>predicted: {len(output['points'])} marks, {len(output['slots'])} slots "
                f"(score &ge; 0.5)</figcaption></figure>")
    body = "".join(f"<div class='pair'>{cell}</div>" for cell in cells)
    return Section(title, f"Trial {best['trial_id']}'s checkpoint {checkpoint} on the first "
                          f"{len(images)} validation images, drawn by `psdet predict --draw` (marks red, slot "
                          "entrances green with their scores) beside the labelled truth.", body=body)


def _local_checkpoint(checkpoint: str, experiment: str, scratch: Path) -> Path:
    """The checkpoint on this machine: itself when local, else a copy in `scratch`. A
    remote path as Ray reports it has no query: it is the experiment's storage, so it
    takes the experiment URI's query (an endpoint, say)."""
    if not storage.is_remote(checkpoint):
        return Path(checkpoint)
    ours, theirs = urlsplit(checkpoint), urlsplit(experiment)
    if not ours.query and ours.scheme == theirs.scheme:
        checkpoint = urlunsplit(ours._replace(query=theirs.query))
    fs, path = storage.filesystem(checkpoint)
    scratch.mkdir(parents=True)
    pyarrow.fs.copy_files(path, str(scratch), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return scratch


def _draw_truth(image: Path, label_path: Path, out: Path) -> None:
    """The label drawn as `psdet predict --draw` draws detections (each at score 1)."""
    from psdet.data.labels import read_label
    from psdet.draw import draw_detections

    label = read_label(label_path)
    points = [[x1, y1, 1.0] for x1, y1, *_ in label.marks.tolist()]
    slots = [[*label.marks[i, :2].tolist(), *label.marks[j, :2].tolist(), 1.0] for i, j in label.entrance_pairs]
    draw_detections(image, points, slots, out)


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# ----------------------------------------------------------------------------- the page


def leaderboard_html(records: SweepRecords) -> str:
    metric, keys = records.metric, [p.key for p in records.spec.search]
    columns = [("#", "rank"), ("trial", "trial_id"), ("status", "status"), ("epochs", "epochs"),
               (f"final {metric}", f"final_{metric}"), (f"best {metric}", f"best_{metric}"),
               (f"final {SLOT_AP}", f"final_{SLOT_AP}"), ("restarts", "restarts"), ("wall s", "wall_time_s"),
               *[(key, key) for key in keys]]
    head = "".join(f"<th onclick='sortBy(this)' title='click to sort'>{html.escape(label)}</th>"
                   for label, _ in columns)
    body = []
    for row in records.rows:
        cells = []
        for _, key in columns:
            value = row.get(key)
            sort = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            text = "" if value is None else _fmt(value)
            if key == "trial_id" and row.get("baseline"):
                text += " (baseline)"
            if key == "epochs":
                text = f"{row['epochs']}/{row.get('total_epochs') or '?'}"
            attr = f" data-sort='{sort}'" if sort is not None else ""
            cells.append(f"<td{attr}>{html.escape(text)}</td>")
        body.append(f"<tr class='{html.escape(row['status'])}'>{''.join(cells)}</tr>")
    return (f"<table id='leaderboard'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


SORT_SCRIPT = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0];
  const column = Array.from(th.parentNode.children).indexOf(th);
  const ascending = th.dataset.order !== 'asc';
  th.dataset.order = ascending ? 'asc' : 'desc';
  const key = row => {
    const cell = row.children[column];
    return cell.dataset.sort !== undefined ? parseFloat(cell.dataset.sort) : cell.textContent;
  };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    const order = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return ascending ? order : -order;
  });
  rows.forEach(row => body.appendChild(row));
}
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
p.note { color: #555; } dl { display: grid; grid-template-columns: 12em 1fr; gap: 0.3em 1em; }
dt { font-weight: 600; } table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { cursor: pointer; background: #f4f4f4; } tr.pruned td { color: #777; } tr.errored td { color: #b00; }
.pair { display: flex; gap: 1em; } figure { margin: 0.5em 0; } figure img { max-width: 380px; }
"""


def build_sections(records: SweepRecords) -> list[Section]:
    multi = _multi_objective(records)
    sections = [*([pareto_section(records)] if multi else []), history_section(records), learning_curve_section(records)]
    if records.metric != SLOT_AP or multi:
        sections.append(slot_ap_section(records))
    sections += [parallel_section(records), importance_section(records), schedule_section(records),
                 prediction_section(records),
                 Section("Leaderboard", "Every trial, ranked as in the terminal; click a column to sort.",
                         body=leaderboard_html(records))]
    return sections


def render(records: SweepRecords, session: dict[str, float] | None = None) -> str:
    """The whole page as one string: plotly.js inlined with the first figure, once."""
    sections = build_sections(records)
    summary = "".join(f"<dt>{html.escape(label)}</dt><dd>{html.escape(text)}</dd>"
                      for label, text in summary_items(records, session))
    parts, inlined = [], False
    for section in sections:
        content = section.body
        if section.figure is not None:
            content = section.figure.to_html(full_html=False, include_plotlyjs=not inlined,
                                             config={"displaylogo": False})
            inlined = True
        parts.append(f"<section><h2>{html.escape(section.title)}</h2><p class='note'>{html.escape(section.note)}"
                     f"</p>{content}</section>")
    figures = sum(section.figure is not None for section in sections)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='psdet-figures' content='{figures}'>"
            f"<title>sweep {html.escape(records.name)}</title><style>{STYLE}</style>"
            f"<script>{SORT_SCRIPT}</script></head><body><h1>Sweep '{html.escape(records.name)}'</h1>"
            f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M:%S')} by orchestrate/report.py.</p>"
            f"<section><h2>Summary</h2><dl>{summary}</dl></section>{''.join(parts)}</body></html>")


def write_report(experiment: str, session: dict[str, float] | None = None) -> str:
    """Write `<experiment>/report.html` and return its URI. `session` (wall_s, engine_s,
    slots of the driver that just ran) gives the goodput of that run; without it the
    goodput is of the study's trial times (`derived_session`)."""
    records = load_records(experiment)
    page = render(records, session)
    uri = storage.join(experiment, REPORT)
    storage.write_bytes(uri, page.encode())
    return uri
