"""What a sweep leaves behind: a per-trial ledger while it runs; a leaderboard,
`results.parquet`, `best_config.yaml` and `best_checkpoint.txt` when it ends. A
multi-objective sweep's leaderboard ends with its Pareto front instead of one best trial,
`results.parquet` has a `pareto_rank` column (0 = on the front, among completed trials),
and `pareto/<trial>.yaml` (one per front member) with `pareto/checkpoints.txt` take the
place of the best config and checkpoint.

`TrialLedger` is a Tune callback that keeps one record per trial (params, last and best
evaluation, status, epochs, restarts, wall time) in `<experiment>/trials.json`,
rewritten on every event. It is the sweep's memory across drivers: a driver killed
mid-sweep and resumed (`--resume`) reloads it, and a trial's record is only ever
updated, never rebuilt from scratch.

Status: `completed` ran all its planned epochs, `pruned` ended earlier without an
error (ASHA stopped it, or the time budget ran out), `errored` failed for good,
`running` was cut off (only seen if the sweep did not finish). A trial a killed driver
started after Ray last saved its experiment state is unknown to the resumed sweep (Ray
starts a new one in its place): its record is marked `abandoned` at the resumed driver's
first step and left out of the results. A new trial with the same parameters (the restored
sampler draws them again) `continues` it: it starts from the abandoned trial's newest
reported checkpoint (`adoptable`, orchestrate/trial.py), so its work is not done twice.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from orchestrate import budget, storage
from orchestrate.pareto import gains, pareto_ranks, selection_keys
from orchestrate.ray_reporter import WORKER_RESTARTS
from orchestrate.search import strip_baseline
from orchestrate.space import SweepSpec, trial_config
from orchestrate.sweep_file import LEDGER, read_ledger
from psdet.config import dump_yaml
from psdet.reporting import ENGINE_SECONDS, REPORTED, TOTAL_EPOCHS

log = logging.getLogger(__name__)

RESULTS = "results.parquet"
BEST_CONFIG = "best_config.yaml"
BEST_CHECKPOINT = "best_checkpoint.txt"
PARETO_DIR = "pareto"
PARETO_CHECKPOINTS = "checkpoints.txt"
STATUS_ORDER = {"completed": 0, "pruned": 1, "running": 2, "pending": 2, "errored": 3}
FINISHED = ("completed", "pruned")


def _better(mode: str, a: float, b: float | None) -> bool:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return True
    return a > b if mode == "max" else a < b


class TrialLedger(tune.Callback):
    """One record per trial, kept in `<experiment>/trials.json` and echoed as progress lines
    (each printed after the record is on disk).

    `in_process`: one-worker trials, whose process is their worker, so that a Tune retry
    of the trial is what counts as a worker restart."""

    def __init__(self, experiment_uri: str, metric: str, mode: str, in_process: bool = False) -> None:
        self.experiment_uri = experiment_uri
        self.metric = metric
        self.mode = mode
        self.in_process = in_process
        self.records: dict[str, dict[str, Any]] = {}
        self._session_start: dict[str, float] = {}
        self._unsaved = False  # the last write failed (storage outage)

    # -- Tune hooks

    def setup(self, **info) -> None:
        self.records = read_ledger(self.experiment_uri)
        self._session_start = {}
        self._settled = False

    def on_step_begin(self, iteration, trials, **info) -> None:
        """At a resumed driver's first step, before Tune asks for new trials: the records of
        trials Tune did not restore are abandoned (a new trial may continue one)."""
        if self._settled:
            return
        self._settled = True
        known = {trial.trial_id for trial in trials}
        left = sorted(tid for tid, record in self.records.items()
                      if tid not in known and record["status"] != "abandoned")
        for trial_id in left:
            self.records[trial_id]["status"] = "abandoned"
            print(f"trial {trial_id} abandoned: the dead driver started it after Tune last saved its state",
                  flush=True)
        if left:
            self._save(trials[0] if trials else None)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        if record["status"] in FINISHED:  # Ray's state predates its end; run_trial will not train it
            print(f"trial {trial.trial_id} already {record['status']} before the driver restarted", flush=True)
            return
        twin = (adoptable(self.records, trial.trial_id, record["params"], record["baseline"])
                if record["status"] == "pending" else None)
        if twin is not None:
            record["continues"] = twin
            self.records[twin]["continued_by"] = trial.trial_id
            print(f"trial {trial.trial_id} continues abandoned trial {twin} (the same parameters) from its "
                  "checkpoint", flush=True)
        record["status"] = "running"
        record["wall_base_s"] = record["wall_time_s"]
        record["worker_restarts_base"] = record["worker_restarts"]
        self._session_start[trial.trial_id] = time.time()
        self._save(trial)
        print(f"trial {trial.trial_id} started: {_params_text(record['params'])}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        record = self._record(trial)
        metrics = {key: result[key] for key in REPORTED if isinstance(result.get(key), (int, float))}
        if "epoch" not in metrics:
            return
        record["final"] = metrics
        record["epochs"] = int(metrics["epoch"])
        record["total_epochs"] = int(result.get(TOTAL_EPOCHS, record["total_epochs"] or 0)) or None
        record["restarts"] = int(metrics.get("restarts", 0))
        record["engine_s"] = record.get("engine_s", 0.0) + sum(metrics.get(key, 0.0) for key in ENGINE_SECONDS)
        # TuneReport counts per trainer; a resumed driver starts a new one on top of the old count.
        record["worker_restarts"] = max(record["worker_restarts"],
                                        record["worker_restarts_base"] + int(result.get(WORKER_RESTARTS, 0)))
        if result.get("checkpoint_path"):
            record["checkpoint"] = storage.display(self.experiment_uri, result["checkpoint_path"])
        value = metrics.get(self.metric)
        if value is not None and not math.isnan(value) and _better(self.mode, value, record["best"].get(self.metric)):
            record["best"] = dict(metrics)
        self._tick(trial, record)
        self._save(trial)
        print(f"trial {trial.trial_id} epoch {record['epochs']}/{record['total_epochs']}: "
              f"{self.metric} {_fmt(value)}, loss {_fmt(metrics.get('loss'))}", flush=True)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        if self.in_process:  # the checkpoint Tune kept of a one-worker trial's report
            record = self._record(trial)
            record["checkpoint"] = storage.display(self.experiment_uri, checkpoint.path)
            self._save(trial)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        if self.in_process:
            record["worker_restarts"] += 1
        self._tick(trial, record)
        self._save(trial)
        print(f"trial {trial.trial_id} failed after {record['epochs']} epochs; retrying from its checkpoint",
              flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        total = record["total_epochs"]
        record["status"] = "completed" if total and record["epochs"] >= total else "pruned"
        self._tick(trial, record)
        self._save(trial)
        print(f"trial {trial.trial_id} {record['status']} after {record['epochs']}/{total} epochs: "
              f"{self.metric} {_fmt(record['final'].get(self.metric))}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        record["status"] = "errored"
        record["error"] = _error_summary(trial)
        # Retries left: Tune did not end it for having used them all (see `stranded`).
        record["retries_left"] = trial.should_recover()
        self._tick(trial, record)
        self._save(trial)
        print(f"trial {trial.trial_id} errored after {record['epochs']} epochs: {record['error']}", flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        known = {trial.trial_id for trial in trials}
        for trial_id, record in self.records.items():
            if trial_id not in known:
                record["status"] = "abandoned"
        self._save(trials[0] if trials else None)

    # -- bookkeeping

    def _record(self, trial) -> dict[str, Any]:
        if trial.trial_id not in self.records:
            params, baseline = strip_baseline(trial.config)
            self.records[trial.trial_id] = {
                "trial_id": trial.trial_id, "params": params, "baseline": baseline, "status": "pending",
                "epochs": 0, "total_epochs": None, "final": {}, "best": {}, "checkpoint": None,
                "restarts": 0, "worker_restarts": 0, "worker_restarts_base": 0,
                "wall_time_s": 0.0, "wall_base_s": 0.0, "engine_s": 0.0, "error": None,
            }
        return self.records[trial.trial_id]

    def _tick(self, trial, record: dict[str, Any]) -> None:
        started = self._session_start.get(trial.trial_id)
        if started is not None:
            record["wall_time_s"] = record["wall_base_s"] + time.time() - started

    def _save(self, trial) -> None:
        """Write the whole ledger; in a storage outage, warn once and leave it to the next event's write.

        Also into Tune's driver staging directory (`trial`'s): a restored Tuner copies every
        .json of the experiment directory there, this one included, and uploads that directory
        whenever it saves its state, so a stale copy left there would overwrite the ledger in
        storage with the one the driver started from (found by benchmarks/chaos.py: a trial
        completed under a resumed driver was `running` again after the next one)."""
        ledger = json.dumps(self.records, indent=1, sort_keys=True).encode()
        if trial is not None:
            storage.write_bytes(str(Path(trial.storage.experiment_driver_staging_path, LEDGER)), ledger)
        try:
            storage.write_bytes(storage.join(self.experiment_uri, LEDGER), ledger)
        except OSError as exc:
            if not self._unsaved:
                log.warning("could not write %s to %s (%s); it is written again on the next trial event", LEDGER,
                            self.experiment_uri, " ".join(str(exc).split())[:200])
            self._unsaved = True
            return
        self._unsaved = False


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_fmt(value)}" for key, value in params.items()) or "(no parameters)"


def adoptable(records: dict[str, dict[str, Any]], trial_id: str, params: dict[str, Any],
              baseline: bool) -> str | None:
    """The abandoned trial that the new trial `trial_id` (with `params`) continues: one with the
    same parameters and baseline flag that reported a checkpoint and that no other trial
    continues; the one furthest on if several. None if there is none."""
    twins = [(record["epochs"], tid) for tid, record in records.items()
             if tid != trial_id and record["status"] == "abandoned" and record.get("checkpoint")
             and record["params"] == params and record["baseline"] == baseline
             and record.get("continued_by") in (None, trial_id)]
    return max(twins)[1] if twins else None


def stranded(records: dict[str, dict[str, Any]]) -> list[str]:
    """The trials Tune errored with retries left. Ray 2.60 retries a failed trial only while
    it is RUNNING: once one failure has put it back to PENDING, a second failure event of the
    same lost actor (its reused successor on a node that just died fails its `reset`) errors
    it, however many retries remain (`TuneController._process_trial_failure`). Found by
    benchmarks/chaos.py; `orchestrate.sweep.fit` runs such trials again."""
    return sorted(trial_id for trial_id, record in records.items()
                  if record["status"] == "errored" and record.get("retries_left"))


def _error_summary(trial) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return "unknown error (see the trial directory)"


# ----------------------------------------------------------------------------- the end of a sweep


def ranked(records: dict[str, dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Completed trials by final metric, then pruned ones by their best, then the rest."""
    sign = -1 if mode == "max" else 1

    def key(record: dict[str, Any]):
        source = record["final"] if record["status"] == "completed" else record["best"]
        value = source.get(metric)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return STATUS_ORDER.get(record["status"], 9), missing, 0 if missing else sign * value

    return sorted(records.values(), key=key)


def pareto_keys(records: dict[str, dict[str, Any]],
                objectives: tuple[tuple[str, str], ...]) -> dict[str, tuple[int, float]]:
    """Completed trials with every objective's final value -> (Pareto rank, -crowding
    distance within its front): rank 0 is the front."""
    scored = {tid: record for tid, record in records.items() if record["status"] == "completed"
              and all(_finite(record["final"].get(metric)) for metric, _ in objectives)}
    ids = list(scored)
    points = [gains([scored[tid]["final"][m] for m, _ in objectives], [mode for _, mode in objectives]) for tid in ids]
    return dict(zip(ids, selection_keys(points)))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def rows(records: dict[str, dict[str, Any]], metric: str, mode: str,
         objectives: tuple[tuple[str, str], ...] = ()) -> list[dict[str, Any]]:
    """One flat row per trial: params under their config keys (which hold a dot),
    metrics as `final_<key>` and `best_<key>` (the evaluation with the best `metric`).
    With several `objectives`, completed trials come first by Pareto rank (then crowding
    distance) and every row has `pareto_rank` (None unless completed with every objective)."""
    out = []
    kept = {tid: record for tid, record in records.items() if record["status"] != "abandoned"}
    order = ranked(kept, metric, mode)
    fronts = pareto_keys(kept, objectives) if len(objectives) > 1 else None
    if fronts is not None:
        position = {record["trial_id"]: i for i, record in enumerate(order)}
        order.sort(key=lambda record: (fronts.get(record["trial_id"], (math.inf, 0.0)), position[record["trial_id"]]))
    for rank, record in enumerate(order, start=1):
        row = {
            "rank": rank, "trial_id": record["trial_id"], "baseline": bool(record.get("baseline", False)),
            "status": record["status"],
            "epochs": record["epochs"], "total_epochs": record["total_epochs"],
            "restarts": record["restarts"], "worker_restarts": record["worker_restarts"],
            "wall_time_s": round(record["wall_time_s"], 3), "engine_s": round(record.get("engine_s", 0.0), 3),
            "checkpoint": record["checkpoint"],
            "error": record["error"],
        }
        if fronts is not None:
            front = fronts.get(record["trial_id"])
            row["pareto_rank"] = None if front is None else front[0]
        row.update(record["params"])
        row.update({f"final_{k}": v for k, v in record["final"].items()})
        row.update({f"best_{k}": v for k, v in record["best"].items()})
        out.append(row)
    return out


def to_table(table_rows: list[dict[str, Any]]) -> pa.Table:
    columns: dict[str, list] = {}
    for row in table_rows:
        for key in row:
            columns.setdefault(key, [])
    for key in columns:
        values = [row.get(key) for row in table_rows]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            values = [None if v is None else str(v) for v in values]  # a choice mixing types
        elif kinds == {int, float}:
            values = [None if v is None else float(v) for v in values]
        columns[key] = values
    return pa.table(columns)


def leaderboard(table_rows: list[dict[str, Any]], spec: SweepSpec, limit: int = 20) -> str:
    metric = spec.experiment.metric
    param_keys = [p.key for p in spec.search]
    if spec.multi_objective:
        scores = ["front", *[f"final {m}" for m, _ in spec.objectives]]
    else:
        scores = [f"final {metric}", f"best {metric}"]
    header = ["#", "trial", "status", "epochs", *scores, "restarts", "wall s", *param_keys, ""]
    lines = []
    for row in table_rows[:limit]:
        if spec.multi_objective:
            cells = [_fmt(row.get("pareto_rank")), *[_fmt(row.get(f"final_{m}")) for m, _ in spec.objectives]]
        else:
            cells = [_fmt(row.get(f"final_{metric}")), _fmt(row.get(f"best_{metric}"))]
        lines.append([
            str(row["rank"]), row["trial_id"], row["status"], f"{row['epochs']}/{row['total_epochs'] or '?'}",
            *cells, f"{row['restarts']}/{row['worker_restarts']}", f"{row['wall_time_s']:.0f}",
            *[_fmt(row.get(key)) for key in param_keys], "<- baseline" if row.get("baseline") else "",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    render = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip()]
    render += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    if len(table_rows) > limit:
        render.append(f"... and {len(table_rows) - limit} more in {RESULTS}")
    return "\n".join(render)


def goodput(engine_s: float, wall_s: float, slots: int) -> float:
    """The share of the sweep's trial slots spent in the engine's training and evaluation:
    engine seconds over (wall seconds x concurrent trial slots)."""
    return engine_s / max(wall_s * slots, 1e-9)


def sweep_summary(table_rows: list[dict[str, Any]], spec: SweepSpec,
                  session: dict[str, float] | None = None) -> list[str]:
    """The leaderboard's last lines: the best trial against the baseline, the epochs spent
    against a sweep without early stopping, and (given this driver's `session`: wall_s,
    engine_s, slots) the goodput."""
    metric = spec.experiment.metric
    lines = []
    best = next((row for row in table_rows if row["status"] == "completed"), None)
    baseline = next((row for row in table_rows if row.get("baseline")), None)
    if spec.multi_objective:
        lines += _front_against_baseline(table_rows, spec, baseline)
    elif best is not None and baseline is not None:
        base_value = baseline.get(f"final_{metric}" if baseline["status"] == "completed" else f"best_{metric}")
        best_value = best.get(f"final_{metric}")
        if base_value is not None and best_value is not None:
            how = "" if baseline["status"] == "completed" else f", {baseline['status']} after {baseline['epochs']} epochs"
            lines.append(f"best against baseline: trial {best['trial_id']} {metric} {best_value:.4f}, baseline "
                         f"{baseline['trial_id']} {base_value:.4f}{how} (delta {best_value - base_value:+.4f})")
    elif best is not None:
        lines.append(f"best against baseline: no baseline trial in this sweep (experiment.baseline is off)")
    spent = sum(row["epochs"] for row in table_rows)
    planned = sum(row["total_epochs"] or spec.max_epochs for row in table_rows)
    stopped = sum(row["status"] == "pruned" for row in table_rows)
    lines.append(f"epochs: {spent} spent, against {planned} without early stopping ({planned - spent} saved, "
                 f"{(planned - spent) / max(planned, 1):.0%}); {stopped} of {len(table_rows)} trials stopped early")
    if session is not None:
        share = goodput(session["engine_s"], session["wall_s"], int(session["slots"]))
        lines.append(f"goodput: {share:.0%} ({session['engine_s']:.0f} s of engine training + evaluation over "
                     f"{session['wall_s']:.0f} s wall x {int(session['slots'])} trial slots)")
    return lines


def _front_against_baseline(table_rows: list[dict[str, Any]], spec: SweepSpec,
                            baseline: dict[str, Any] | None) -> list[str]:
    """A multi-objective sweep's line on its baseline: on the front, or dominated by whom."""
    if baseline is None:
        return ["front against baseline: no baseline trial in this sweep (experiment.baseline is off)"]
    if baseline.get("pareto_rank") is None:
        return [f"front against baseline: the baseline {baseline['trial_id']} did not complete with every objective"]
    if baseline["pareto_rank"] == 0:
        return [f"front against baseline: the baseline {baseline['trial_id']} is on the Pareto front"]
    modes = [mode for _, mode in spec.objectives]

    def point(row: dict[str, Any]) -> tuple[float, ...]:
        return gains([row[f"final_{m}"] for m, _ in spec.objectives], modes)

    front = [row for row in table_rows if row.get("pareto_rank") == 0]
    better = [row["trial_id"] for row in front if pareto_ranks([point(row), point(baseline)]) == [0, 1]]
    return [f"front against baseline: {len(better)} of the {len(front)} front trials dominate the baseline "
            f"{baseline['trial_id']} ({', '.join(better)})"]


def engine_seconds(records: dict[str, dict[str, Any]]) -> float:
    return sum(record.get("engine_s", 0.0) for record in records.values())


def write_results(spec: SweepSpec, experiment_uri: str, data_root: str,
                  records: dict[str, dict[str, Any]] | None = None,
                  session: dict[str, float] | None = None, use_gpu: bool = False) -> dict[str, Any]:
    """Write results.parquet, best_config.yaml and best_checkpoint.txt (several objectives:
    pareto/); print the leaderboard, ending with `sweep_summary` (and, with a budget, what
    was spent; `use_gpu`: whether trials held GPUs). Returns {"rows", "best" (row or None;
    several objectives: the first front member), "paths", "summary", "budget_stopped"}."""
    if records is None:
        records = read_ledger(experiment_uri)
    metric, mode = spec.experiment.metric, spec.experiment.mode
    table_rows = rows(records, metric, mode, spec.objectives)
    buffer = io.BytesIO()
    pq.write_table(to_table(table_rows), buffer)
    paths = {"results": storage.join(experiment_uri, RESULTS)}
    storage.write_bytes(paths["results"], buffer.getvalue())

    goal = (", ".join(f"{m_mode} {m}" for m, m_mode in spec.objectives) + "; front = Pareto rank"
            if spec.multi_objective else f"{mode} {metric}")
    print(f"\nleaderboard of '{spec.name}' ({goal}; restarts = from checkpoint / of the worker group):")
    print(leaderboard(table_rows, spec))
    if spec.multi_objective:
        best = _write_front(spec, experiment_uri, data_root, records, table_rows, paths)
    else:
        best = _write_best(spec, experiment_uri, data_root, records, table_rows, paths)
    print(f"results          {paths['results']}")
    summary = sweep_summary(table_rows, spec, session)
    stopped = False
    if spec.experiment.budget.limits():
        summary.append(budget.summary_line(spec, experiment_uri, records, use_gpu))
        stopped = bool(budget.read_budget_file(experiment_uri).get("stopped"))
    print("\n".join(summary))
    return {"rows": table_rows, "best": best, "paths": paths, "summary": summary, "budget_stopped": stopped}


def _write_best(spec: SweepSpec, experiment_uri: str, data_root: str, records: dict[str, dict[str, Any]],
                table_rows: list[dict[str, Any]], paths: dict[str, str]) -> dict[str, Any] | None:
    metric = spec.experiment.metric
    best = next((row for row in table_rows if row["status"] == "completed"), None)
    if best is None:
        best = next((row for row in table_rows if row["status"] == "pruned"), None)
        if best is not None:
            print(f"no trial completed; the best pruned one is {best['trial_id']}")
    if best is not None:
        params = records[best["trial_id"]]["params"]
        cfg = trial_config(spec, params, data_root)
        cfg.name = f"{spec.name}_best"
        paths["best_config"] = storage.join(experiment_uri, BEST_CONFIG)
        storage.write_bytes(paths["best_config"], dump_yaml(cfg).encode())
        paths["best_checkpoint"] = storage.join(experiment_uri, BEST_CHECKPOINT)
        storage.write_bytes(paths["best_checkpoint"], f"{best['checkpoint']}\n".encode())
        print(f"best trial {best['trial_id']}: {metric} {_fmt(best.get(f'final_{metric}'))}, {_params_text(params)}")
        print(f"best config      {paths['best_config']}  (psdet train -c {paths['best_config']})")
        print(f"best checkpoint  {best['checkpoint']}")
    return best


def _write_front(spec: SweepSpec, experiment_uri: str, data_root: str, records: dict[str, dict[str, Any]],
                 table_rows: list[dict[str, Any]], paths: dict[str, str]) -> dict[str, Any] | None:
    """pareto/<trial>.yaml for each front member (loadable by `psdet train -c`) and
    pareto/checkpoints.txt; print the front. -> its first member, or None."""
    front = [row for row in table_rows if row.get("pareto_rank") == 0]
    if not front:
        print("no trial completed with every objective: no Pareto front")
        return None
    print(f"Pareto front ({len(front)} of {len(table_rows)} trials; "
          + ", ".join(f"{mode} {m}" for m, mode in spec.objectives) + "):")
    checkpoints = []
    for row in front:
        params = records[row["trial_id"]]["params"]
        cfg = trial_config(spec, params, data_root)
        cfg.name = f"{spec.name}_{row['trial_id']}"
        path = storage.join(experiment_uri, PARETO_DIR, f"{row['trial_id']}.yaml")
        storage.write_bytes(path, dump_yaml(cfg).encode())
        checkpoints.append(f"{row['trial_id']} {row['checkpoint']}")
        scores = ", ".join(f"{m} {_fmt(row.get(f'final_{m}'))}" for m, _ in spec.objectives)
        print(f"  trial {row['trial_id']}: {scores}; {_params_text(params)}  -> {path}")
    paths["pareto"] = storage.join(experiment_uri, PARETO_DIR)
    paths["pareto_checkpoints"] = storage.join(experiment_uri, PARETO_DIR, PARETO_CHECKPOINTS)
    storage.write_bytes(paths["pareto_checkpoints"], ("\n".join(checkpoints) + "\n").encode())
    print(f"front configs    {paths['pareto']}/<trial>.yaml  (psdet train -c ...); "
          f"checkpoints in {paths['pareto_checkpoints']}")
    return front[0]
