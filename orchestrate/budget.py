"""A sweep's budget (`experiment.budget`) in the units people pay: GPU- or CPU-hours, epochs,
hours of wall time; counted from the sweep's own record, so that it survives `--resume`.

What is spent:
- `gpu_hours` / `cpu_hours`: over trials, the GPUs / CPUs a trial holds (`trial_resources`)
  times its wall time (`wall_time_s` in the ledger, trials.json), in hours;
- `epochs`: the epochs the trials ran, summed (the ledger's `epochs`);
- `wall_hours`: the sweep drivers' own wall time, summed over drivers: each driver (a
  `--resume` is a new one) keeps its seconds in a file of its own, `<experiment>/budget/<id>.json`.
  (Not one file in the experiment's root: a restored Tune copies every .json there into
  its staging directory and syncs that copy back over the file while it runs.)

A new trial starts only while the spending projected with it stays within every limit:
what is spent, plus what the running trials would still spend if they ran all their
planned epochs, plus the next trial's `max_epochs`, priced at the mean wall time per epoch
so far (for wall hours: only the next trial's, which runs beside the others). Until an
epoch has been measured there is nothing to price with, and trials start. With
`budget.stop_running`, once a limit is reached, the scheduler stops every running trial at
its next rung (without rungs: its next evaluation).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

import pyarrow.fs

from orchestrate import storage
from orchestrate.space import SweepSpec

BUDGET_DIR = "budget"  # one <driver id>.json per driver: {"wall_s": seconds, "stopped": why, if it stopped}
TICK_S = 1.0  # the least seconds between two writes of a driver's wall time
LEDGER = "trials.json"  # orchestrate.results.LEDGER (not imported: results imports Ray's tune)
UNIT_NAMES = {"gpu_hours": "GPU-hours", "cpu_hours": "CPU-hours", "epochs": "epochs", "wall_hours": "wall hours"}


def trial_resources(spec: SweepSpec, use_gpu: bool) -> dict[str, float]:
    """{"cpu", "gpu"} one trial holds while it runs: its one worker when it trains in
    process, else its driver and all its workers."""
    r = spec.resources
    gpus = r.workers * r.gpus_per_worker if use_gpu else 0.0
    if r.workers == 1:
        return {"cpu": r.cpus_per_worker, "gpu": gpus}
    return {"cpu": r.driver_cpus + r.workers * r.cpus_per_worker, "gpu": gpus}


def spent(records: dict[str, dict[str, Any]], spec: SweepSpec, use_gpu: bool, wall_s: float) -> dict[str, float]:
    """Every unit's spending so far, from the ledger's records and the drivers' wall seconds."""
    held = trial_resources(spec, use_gpu)
    trial_s = sum(record.get("wall_time_s", 0.0) for record in records.values())
    return {
        "gpu_hours": trial_s * held["gpu"] / 3600,
        "cpu_hours": trial_s * held["cpu"] / 3600,
        "epochs": float(sum(record.get("epochs", 0) for record in records.values())),
        "wall_hours": wall_s / 3600,
    }


def projected(records: dict[str, dict[str, Any]], spec: SweepSpec, use_gpu: bool,
              wall_s: float) -> dict[str, float] | None:
    """Spending if one more trial started now and every trial ran all its epochs (module
    docstring); None while no epoch has been measured."""
    measured = [record for record in records.values() if record.get("epochs", 0) > 0]
    epochs_done = sum(record["epochs"] for record in measured)
    if not epochs_done:
        return None
    epoch_s = sum(record.get("wall_time_s", 0.0) for record in measured) / epochs_done
    held = trial_resources(spec, use_gpu)
    remaining = sum(max((record.get("total_epochs") or spec.max_epochs) - record.get("epochs", 0), 0)
                    for record in records.values() if record.get("status") in ("running", "pending"))
    epochs = remaining + spec.max_epochs
    now = spent(records, spec, use_gpu, wall_s)
    return {
        "gpu_hours": now["gpu_hours"] + epochs * epoch_s * held["gpu"] / 3600,
        "cpu_hours": now["cpu_hours"] + epochs * epoch_s * held["cpu"] / 3600,
        "epochs": now["epochs"] + epochs,
        "wall_hours": now["wall_hours"] + spec.max_epochs * epoch_s / 3600,
    }


def describe(amount: float, unit: str) -> str:
    return f"{amount:.0f} {UNIT_NAMES[unit]}" if unit == "epochs" else f"{amount:.3g} {UNIT_NAMES[unit]}"


class BudgetGuard:
    """The sweep's budget as the searcher and the scheduler see it, read from the sweep's
    record in `experiment_uri` (trials.json, budget/) each time it is asked.

    The searcher's guard also keeps this driver's wall seconds in budget/<driver id>.json
    (`tick`) and notes there why it stopped starting trials. A guard pickles with Tune's searcher or
    scheduler state; a driver that unpickles it (a `--resume`) counts as a new driver."""

    def __init__(self, spec: SweepSpec, experiment_uri: str, use_gpu: bool) -> None:
        self.spec = spec
        self.experiment_uri = experiment_uri
        self.use_gpu = use_gpu
        self._new_session()

    def _new_session(self) -> None:
        self.session = uuid.uuid4().hex[:8]
        self.session_started = time.monotonic()
        self.last_tick = -math.inf

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._new_session()

    @property
    def limits(self) -> dict[str, float]:
        return self.spec.experiment.budget.limits()

    def _read(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        ledger_uri = storage.join(self.experiment_uri, LEDGER)
        records = json.loads(storage.read_bytes(ledger_uri)) if storage.exists(ledger_uri) else {}
        return records, read_budget_file(self.experiment_uri)

    def _write(self, **fields: Any) -> None:
        uri = storage.join(self.experiment_uri, BUDGET_DIR, f"{self.session}.json")
        mine = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
        mine.update(fields)
        storage.write_bytes(uri, json.dumps(mine).encode())

    def tick(self) -> None:
        """Write this driver's wall seconds so far into its budget/<id>.json, at most once a
        second (the searcher hears each result twice: from the limiter and from StudySync)."""
        now = time.monotonic()
        if now - self.last_tick >= TICK_S:
            self._write(wall_s=now - self.session_started)
            self.last_tick = now

    def refusal(self) -> str | None:
        """Why no new trial may start now, or None."""
        self.tick()
        records, state = self._read()
        live = {tid: r for tid, r in records.items() if r.get("status") != "abandoned"}
        wall_s = sum(state["sessions"].values())
        now = spent(live, self.spec, self.use_gpu, wall_s)
        ahead = projected(live, self.spec, self.use_gpu, wall_s)
        for unit, limit in self.limits.items():
            if now[unit] >= limit:
                return f"{describe(now[unit], unit)} spent of {describe(limit, unit)}"
            if ahead is not None and ahead[unit] > limit:
                return (f"one more trial would bring the spending to {describe(ahead[unit], unit)}, "
                        f"over {describe(limit, unit)}")
        return None

    def note_stop(self, reason: str) -> None:
        if not read_budget_file(self.experiment_uri).get("stopped"):
            self._write(stopped=reason)

    def exhausted(self) -> bool:
        """A limit is reached (for `budget.stop_running`)."""
        records, state = self._read()
        live = {tid: r for tid, r in records.items() if r.get("status") != "abandoned"}
        now = spent(live, self.spec, self.use_gpu, sum(state["sessions"].values()))
        return any(now[unit] >= limit for unit, limit in self.limits.items())


def read_budget_file(experiment_uri: str) -> dict[str, Any]:
    """{"sessions": {driver id: wall seconds}, "stopped": the first driver's reason to stop
    starting trials, if one did} from every driver's budget/<id>.json."""
    fs, root = storage.filesystem(storage.join(experiment_uri, BUDGET_DIR))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    state: dict[str, Any] = {"sessions": {}}
    for info in sorted(infos, key=lambda info: info.mtime_ns or 0):
        if info.type != pyarrow.fs.FileType.File or not info.base_name.endswith(".json"):
            continue
        mine = json.loads(storage.read_file(fs, info.path))
        state["sessions"][info.base_name.removesuffix(".json")] = mine.get("wall_s", 0.0)
        if mine.get("stopped") and not state.get("stopped"):
            state["stopped"] = mine["stopped"]
    return state


def summary_line(spec: SweepSpec, experiment_uri: str, records: dict[str, dict[str, Any]], use_gpu: bool) -> str:
    """What the sweep spent against each limit, and why it stopped starting trials (if it did)."""
    state = read_budget_file(experiment_uri)
    live = {tid: r for tid, r in records.items() if r.get("status") != "abandoned"}
    now = spent(live, spec, use_gpu, sum(state["sessions"].values()))
    parts = [f"{describe(now[unit], unit)} of {describe(limit, unit)}" for unit, limit in spec.experiment.budget.limits().items()]
    line = "budget: spent " + ", ".join(parts)
    if state.get("stopped"):
        line += f"; no new trial after that: {state['stopped']}"
    return line
