"""Search quality: how many epochs the sweep's searcher and scheduler spend to find a good
configuration, against random search without early stopping, on recorded training curves.

    python benchmarks/search_quality.py record [--space search_spaces/lr.yaml] [--configs 64] [--jobs 2]
        [--out benchmarks/data/search_quality.parquet] [--overrides KEY=VALUE ...] [--synthetic TRAIN VAL]
    python benchmarks/search_quality.py replay [--table benchmarks/data/search_quality.parquet]
        [--space search_spaces/lr.yaml] [--seeds 20] [--trials 48] [--sampler-variants] [--asha-variants] [--small]
    python benchmarks/search_quality.py replay-mo [--table benchmarks/data/search_quality_pareto.parquet]
        [--space search_spaces/pareto.yaml] [--seeds 20] [--budget EPOCHS] [--trials N] [--small]
    python benchmarks/search_quality.py live [--space search_spaces/lr.yaml] [--trials 6]

**record** trains `--configs` configurations of the space for all their epochs and keeps
every epoch's figures. Config 0 is the baseline (`baseline_params`: the base config's own
values). The others are scrambled Sobol points over all parameters (torch's
`SobolEngine`, `--seed`; Optuna's `QMCSampler` would need scipy, which the project does
not install), or Optuna's `RandomSampler(seed)` with `--sampler random`; either way each
is taken by an Optuna trial through the space's `DefineByRun`, so a conditional parameter
is set only where it is active. A configuration is `trial_config` + `--overrides` (dotted
config keys on top of the space's base config, e.g. `data.image_size=64 train.epochs=2`)
on the space's synthetic dataset (`--synthetic TRAIN VAL` changes its size), trained by
`psdet.engine.train` on the CPU in one of `--jobs` worker processes, one torch thread
each. Each finished configuration is written atomically to `<out>.parts/config_<i>.json`;
a rerun of the same command skips those. At the end the Parquet table is assembled
(atomically; left as it is when nothing changed): one row per (config, epoch) with
`config_id`, one column per searched key (null where inactive), `epoch`, `slot_ap`,
`point_ap`, `loss`, `train_s`, `eval_s` (and the space's metric or objectives, if others;
a multi-objective space also keeps the cost metrics `latency_ms`, `params`, `gflops` that
psdet.cost measures at each evaluation). A configuration whose loss went non-finite ends
with a row of NaN at that epoch (its real trial errors there). The schema metadata holds
the machine, torch version, git commit(s), command line, date, space file and text,
overrides, synthetic data and epochs.

**replay** runs whole sweeps against that table instead of training. One local Ray
(127.0.0.1, 2 CPUs, no dashboard); for each seed and strategy a Tuner from
`orchestrate.tuner.build_tuner`, the very construction orchestrate/tune.py uses (the
Optuna searcher with the baseline as first trial, ASHA on `epoch` or FIFO), over the
recorded space and overrides, varied only by `dataclasses.replace`. The sampler, scheduler
and experiment settings are those of `--space` (default: the recorded space file as it is
now, so a changed ASHA rung is replayed without recording again); its search section, base
config and metric must be the recorded ones:

    random+fifo   sampler random, scheduler none
    random+asha   sampler random, the space's ASHA
    tpe+fifo      the space's TPE sampler, scheduler none
    tpe+asha      the space as the sweep runs it (ours)

each with `experiment.seed` = the seed, `num_samples` = `--trials`, no time budget,
`experiment.max_concurrent` trials at once, an in-memory Optuna study. The trainable
looks up the recorded configuration nearest to the trial's parameters (`NearestConfig`:
the same values of the active choice parameters, then the nearest in the unit cube of
the continuous ones, log-scaled where the parameter is; a recorded config with other
choices only when none has the same, at a large penalty per differing choice) and
reports its curve, one epoch per `EPOCH_S` seconds, until it ends or ASHA stops it.

A Tune callback on the driver counts every result in arrival order (one result = one
epoch spent) and keeps the best metric so far. Per run: the epochs spent when the best
first reaches the **target**, the 95th percentile (5th for mode min) of the recorded
configs' final-epoch metric; and the best at the **budget**, num_samples x max_epochs
of the space (the demo sweep without early stopping: 12 x 8 = 96 epochs), or at the
run's end if it spent fewer. The table shows medians and interquartile ranges per
strategy; runs that never reach the target count as infinitely many epochs.
`--asha-variants` adds random+asha and tpe+asha runs with other ASHA rungs (grace
period, reduction factor: `ASHA_VARIANTS`); `--sampler-variants` adds tpe+asha runs with
other TPE settings (startup trials, multivariate+group, constant liar); same seeds.
`--small`: 2 seeds of 6 trials (CI).

Last line: `search_quality: ratio=X random_fifo_epochs=A tpe_asha_epochs=B target=T
budget_epochs=N tpe_asha_best=... random_fifo_best=... seeds=S`, X = A / B (medians of
epochs to target; `inf` where random+fifo's median run never reached it, `nan` where
neither did, 0 where only tpe+asha's did not).

**replay-mo** compares, on a table of a two-objective space (search_spaces/pareto.yaml:
slot AP against latency), three strategies at an equal budget in epochs (`--budget`,
default the space's num_samples x epochs), each a Tuner from `build_tuner` with the
space's own (multi-objective) sampler: **MO-ASHA** (the space's scheduler, as the sweep
runs it), **FIFO** (no early stopping) and **ASHA(first objective)** (Ray's ASHA, the
sweep's `BaselineASHA`, on the first objective alone with the same rungs; handed to
`build_tuner` as its `scheduler`). Up to `--trials` trials a run (default: the budget over
the grace period, so that even a run that stops every trial at its first rung can spend
the budget), the space's concurrency, no time or spending budget. A `ParetoAccount` on the
driver counts results in arrival order; when the budget's epoch arrives it keeps the
trials completed by then (their last epoch reported) with their final objective values,
and the run's figure is the **hypervolume** of those points (orchestrate.pareto.
hypervolume_2d, exact) from a fixed reference point: per objective the worst value in the
whole table (any config, any epoch), printed. The table shows medians and quartiles per
strategy, and the median as a fraction of the recorded configs' own front (the most any
run can reach: a replayed trial is a recorded config). Last line: `search_quality_mo: hv
MO-ASHA=A FIFO=B ASHA(slot_ap)=C table_front=T budget_epochs=N seeds=S reference=R1,R2`.
`--small`: 2 seeds (CI).

**live** checks the replay against real training: each of the four strategies once, as
a whole sweep of `--trials` trials through `orchestrate/tune.py` (a space file written
from `--space` with only the sampler type, the scheduler type and `num_samples`
changed, as `strategy_spec` does; the space's seed and data). It prints each one's
trials, pruned trials, epochs spent, best final metric and wall time; last line
`search_quality_live: ranking=A>B>C>D trials=N ..._best=...`.

A missing or foreign table, a bad space or override: one line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only

import numpy as np  # noqa: E402

from common import Column, Table, deadline, summary_line  # noqa: E402
from orchestrate.search import strip_baseline  # noqa: E402
from orchestrate.space import DefineByRun, Param, SweepSpec, baseline_params, load_space, trial_config  # noqa: E402
from psdet.config import config_from_dict, parse_override, set_dotted, to_dict  # noqa: E402
from psdet.errors import ConfigError, UserError  # noqa: E402
from psdet.reporting import COST_METRICS, TOTAL_EPOCHS  # noqa: E402

EXIT_USER_ERROR = 2
NUM_CPUS = 2
EPOCH_S = 0.02  # replayed seconds per epoch: concurrent trials interleave their reports as real ones do
EPOCH_COLUMNS = ("slot_ap", "point_ap", "loss", "train_s", "eval_s")
TARGET_PERCENTILE = 95
CHOICE_PENALTY = 1000.0  # per differing choice: above any distance in the unit cube of the continuous ones
STRATEGIES = ("random+fifo", "random+asha", "tpe+fifo", "tpe+asha")
DEFAULT_SPACE = ROOT / "search_spaces" / "lr.yaml"
DEFAULT_TABLE = ROOT / "benchmarks" / "data" / "search_quality.parquet"
DEFAULT_PARETO_TABLE = ROOT / "benchmarks" / "data" / "search_quality_pareto.parquet"
RUN_TIMEOUT_S = 900
# Ray 2.60 gives a new local node 30 s to register its raylet, which a loaded 2-core VM misses
# now and then (the raylet waits on its Python agents): a few more tries, not a longer wait.
RAY_START_ATTEMPTS = 4
LIVE_TIMEOUT_S = 3600  # one live sweep


# ----------------------------------------------------------------------------- the space as recorded


def with_overrides(spec: SweepSpec, overrides: list[str]) -> SweepSpec:
    """`spec` with dotted config overrides applied to its base config (so `max_epochs` and
    every trial see them). ConfigError for a searched key or a value the config rejects."""
    if not overrides:
        return spec
    tree = copy.deepcopy(spec.base_tree)
    searched = {param.key for param in spec.search}
    for text in overrides:
        key, value = parse_override(text)
        if key in searched:
            raise ConfigError(f"--overrides {text}: '{key}' is searched by {spec.path}; override only fixed keys")
        if key == "data.root":
            raise ConfigError(f"--overrides {text}: the dataset is the space's synthetic one (see --synthetic)")
        set_dotted(tree, key, value)
    config_from_dict(tree, source=f"--overrides {' '.join(overrides)}")
    spec = dataclasses.replace(spec, base_tree=tree)
    if spec.scheduler.type == "asha" and spec.scheduler.grace_period > spec.max_epochs:
        raise ConfigError(f"--overrides: {spec.path}'s scheduler.grace_period ({spec.scheduler.grace_period}) "
                          f"is longer than a trial ({spec.max_epochs} epochs)")
    return spec


def with_synthetic(spec: SweepSpec, size: list[int] | None) -> SweepSpec:
    if not size:
        return spec
    train, val = size
    if train < 1 or val < 1:
        raise ConfigError(f"--synthetic {train} {val}: needs at least one training and one validation image")
    synthetic = dataclasses.replace(spec.experiment.synthetic_data, train=train, val=val)
    return dataclasses.replace(spec, experiment=dataclasses.replace(spec.experiment, synthetic_data=synthetic))


def from_unit(param: Param, u: float) -> Any:
    """The value of `param` at `u` in [0, 1): uniform over its choices, its integers (by
    step), its range, or its log range (loguniform, log ints)."""
    if param.type == "choice":
        return param.values[min(int(u * len(param.values)), len(param.values) - 1)]
    if param.type == "int" and not param.log:
        steps = (param.high - param.low) // param.step
        return param.low + min(int(u * (steps + 1)), steps) * param.step
    if param.type == "loguniform" or param.log:
        value = math.exp(math.log(param.low) + u * (math.log(param.high) - math.log(param.low)))
    else:
        value = param.low + u * (param.high - param.low)
    return min(max(round(value), param.low), param.high) if param.type == "int" else value


def draw_configs(spec: SweepSpec, count: int, sampler: str, seed: int) -> list[dict[str, Any]]:
    """`count` configurations (searched key -> value, active keys only); the first is the
    baseline. "sobol": one scrambled Sobol point (torch.quasirandom, `seed`) per config
    over all parameters, mapped by `from_unit`, enqueued into an Optuna study whose trial
    takes its values through the space's `DefineByRun` (so only the parameters active for
    the drawn choices are set); "random": Optuna's RandomSampler(seed) through `DefineByRun`."""
    import optuna
    import torch

    configs = [baseline_params(spec)]
    if count <= 1:
        return configs[:count]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))  # in memory
    space = DefineByRun(spec.search)
    points = []
    if sampler == "sobol":
        engine = torch.quasirandom.SobolEngine(dimension=len(spec.search), scramble=True, seed=seed)
        points = engine.draw(count - 1, dtype=torch.float64).tolist()
    for point in points or [None] * (count - 1):
        if point is not None:
            drawn = {param.key: from_unit(param, u) for param, u in zip(spec.search, point)}
            chosen: dict[str, Any] = {}
            for param in spec.search:
                if param.active(chosen):
                    chosen[param.key] = drawn[param.key]
            study.enqueue_trial(chosen)
        trial = study.ask()
        space(trial)
        configs.append({param.key: trial.params[param.key] for param in spec.search if param.key in trial.params})
        study.tell(trial, 0.0)
    return configs


# ----------------------------------------------------------------------------- record: one worker process


class EpochRecorder:
    """psdet.engine's reporter: keeps each evaluation's figures; always starts fresh."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self.epochs: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint) -> None:
        self.epochs.append({"epoch": int(metrics["epoch"]), **{key: float(metrics[key]) for key in self.columns}})


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def train_recorded(config_id: int, tree: dict, columns: tuple[str, ...], scratch: str) -> dict[str, Any]:
    """Train one configuration (a full config tree) on the CPU; -> its epochs' figures. The
    engine's log goes to a file, not the console; a non-finite loss ends the curve."""
    from psdet.engine import train
    from psdet.errors import NonFiniteLossError

    cfg = config_from_dict(tree, source=f"config {config_id}")
    cfg.train.device = "cpu"
    recorder = EpochRecorder(columns)
    started = time.perf_counter()
    diverged = None
    out_dir = Path(tempfile.mkdtemp(prefix=f"config_{config_id}-", dir=scratch))
    try:
        with open(out_dir / "console.log", "w") as console, contextlib.redirect_stderr(console):
            try:
                train(cfg, out_dir, recorder)
            except NonFiniteLossError as exc:
                diverged = str(exc)
    except Exception as exc:
        tail = (out_dir / "console.log").read_text()[-3000:]
        raise RuntimeError(f"config {config_id} failed: {exc}\n{tail}") from exc
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    epochs = recorder.epochs
    if diverged is not None:
        epochs.append({"epoch": len(epochs) + 1, **{key: math.nan for key in columns}})
    return {"config_id": config_id, "epochs": epochs, "diverged": diverged, "wall_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------- record: the driver


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _columns(spec: SweepSpec) -> tuple[str, ...]:
    """What is kept per epoch: EPOCH_COLUMNS, then each of the space's objectives not among
    them; a multi-objective space also keeps every cost metric (psdet.cost)."""
    wanted = [metric for metric, _ in spec.objectives] + (list(COST_METRICS) if spec.multi_objective else [])
    return (*EPOCH_COLUMNS, *dict.fromkeys(metric for metric in wanted if metric not in EPOCH_COLUMNS))


def record(args: argparse.Namespace) -> int:
    from orchestrate.data import ensure_synthetic

    space_path = Path(args.space)
    if not space_path.is_file():
        raise UserError(f"--space {space_path}: no such file")
    if args.configs < 1 or args.jobs < 1:
        raise UserError("--configs and --jobs must be >= 1")
    spec = with_synthetic(with_overrides(load_space(space_path), args.overrides), args.synthetic)
    out = Path(args.out)
    parts = out.with_name(out.name + ".parts")
    # What the configs and their curves depend on, parsed: edits to the space file's comments,
    # sampler or scheduler sections keep a recording resumable.
    run_key = json.loads(json.dumps({
        "search": [dataclasses.asdict(param) for param in spec.search], "objectives": spec.objectives,
        "base_config": spec.base_tree, "overrides": args.overrides,
        "synthetic": dataclasses.asdict(spec.experiment.synthetic_data), "sampler": args.sampler, "seed": args.seed}))
    parts.mkdir(parents=True, exist_ok=True)
    key_file = parts / "run.json"
    if key_file.is_file() and json.loads(key_file.read_text()) != run_key:
        raise UserError(f"{parts} holds configs of another recording (space, base config, overrides, synthetic "
                        "data or sampler differ); delete it or choose another --out")
    _write_atomically(key_file, json.dumps(run_key, indent=1).encode())

    configs = draw_configs(spec, args.configs, args.sampler, args.seed)
    data_root, made = ensure_synthetic(spec.experiment.synthetic_data)
    trees = [to_dict(trial_config(spec, params, data_root)) for params in configs]  # ConfigError before training
    columns = _columns(spec)
    done: dict[int, dict] = {}
    for config_id, params in enumerate(configs):
        part_file = parts / f"config_{config_id}.json"
        if part_file.is_file():
            part = json.loads(part_file.read_text())
            if part["params"] != params:
                raise UserError(f"{part_file} holds other parameters than config {config_id} of this draw; "
                                f"delete {parts} to start over")
            done[config_id] = part
    todo = [config_id for config_id in range(len(configs)) if config_id not in done]
    print(f"search quality, record: {len(configs)} configs of {space_path} ({spec.max_epochs} epochs"
          + (f", overrides {' '.join(args.overrides)}" if args.overrides else "") + f"), synthetic data "
          f"{spec.experiment.synthetic_data.train} + {spec.experiment.synthetic_data.val} images "
          f"({'made' if made else 'cached'} at {data_root}); {len(done)} already recorded in {parts}, "
          f"{len(todo)} to train, {args.jobs} at a time, 1 torch thread each", flush=True)

    commit, command = _git_commit(), "python " + shlex.join(sys.argv)
    if todo:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before torch starts
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="psdet-search-quality-") as scratch, ProcessPoolExecutor(
                max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker) as pool:
            futures = [pool.submit(train_recorded, config_id, trees[config_id], columns, scratch)
                       for config_id in todo]
            for finished, future in enumerate(as_completed(futures), start=1):
                try:
                    result = future.result()
                except BaseException:  # a failed config or Ctrl-C: train no further configs
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                config_id = result["config_id"]
                part = {"config_id": config_id, "params": configs[config_id], **result, "commit": commit,
                        "command": command, "finished": datetime.datetime.now().isoformat(timespec="seconds")}
                _write_atomically(parts / f"config_{config_id}.json", json.dumps(part).encode())
                done[config_id] = part
                elapsed = time.monotonic() - started
                eta = elapsed / finished * (len(todo) - finished)
                last = result["epochs"][-1] if result["epochs"] else {}
                metric = spec.experiment.metric
                figure = "diverged" if result["diverged"] else f"{metric} {last.get(metric, math.nan):.3f}"
                print(f"config {config_id:>3} ({finished}/{len(todo)}): {figure} after {len(result['epochs'])} "
                      f"epochs, {result['wall_s']:.0f} s; ETA {eta / 60:.1f} min", flush=True)

    parts_in_order = [done[config_id] for config_id in range(len(configs))]
    table = assemble_table(spec.search, configs, [part["epochs"] for part in parts_in_order], columns,
                           recording_metadata(spec, space_path, args, parts_in_order, command))
    out.parent.mkdir(parents=True, exist_ok=True)
    if todo or not out.is_file() or not _read_parquet(out).equals(table):
        _write_parquet(table, out)
    else:
        print(f"{out} is up to date")
    finals = [part["epochs"][-1].get(spec.experiment.metric, math.nan) for part in done.values() if part["epochs"]]
    print(f"wrote {out}: {table.num_rows} rows, {len(configs)} configs; final {spec.experiment.metric}: "
          f"median {np.nanmedian(finals):.3f}, best {np.nanmax(finals):.3f}, baseline "
          f"{done[0]['epochs'][-1][spec.experiment.metric]:.3f}")
    print(summary_line("search_quality_record", configs=len(configs), trained=len(todo), epochs=spec.max_epochs,
                       rows=table.num_rows))
    return 0


def assemble_table(search: tuple[Param, ...], configs: list[dict[str, Any]], curves: list[list[dict[str, float]]],
                   columns: tuple[str, ...], metadata: dict[str, str]):
    """The Parquet table: one row per (config, epoch), `curves[i]` holding config i's
    epochs ({"epoch": 1.., column: value}); `metadata` as the schema's."""
    import pyarrow as pa

    rows = [(config_id, epoch) for config_id, curve in enumerate(curves) for epoch in curve]
    data: dict[str, list] = {"config_id": [config_id for config_id, _ in rows]}
    for param in search:
        data[param.key] = [configs[config_id].get(param.key) for config_id, _ in rows]
    data["epoch"] = [epoch["epoch"] for _, epoch in rows]
    for column in columns:
        data[column] = [epoch[column] for _, epoch in rows]
    return pa.table(data).replace_schema_metadata(metadata)


def recording_metadata(spec: SweepSpec, space_path: Path, args: argparse.Namespace, parts: list[dict],
                       command: str) -> dict[str, str]:
    import torch

    finished = sorted(part["finished"] for part in parts)
    engine_s = sum(epoch["train_s"] + epoch["eval_s"] for part in parts for epoch in part["epochs"]
                   if math.isfinite(epoch["train_s"]))
    return {
        "machine": _machine(), "torch": torch.__version__, "python": platform.python_version(),
        "commit": ",".join(sorted({part["commit"] for part in parts})), "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "trained": f"{finished[0]} .. {finished[-1]}",
        "space_file": str(space_path), "space_text": space_path.read_text(), "overrides": json.dumps(args.overrides),
        "synthetic": json.dumps(dataclasses.asdict(spec.experiment.synthetic_data)), "epochs": str(spec.max_epochs),
        "sampler": f"{args.sampler} seed {args.seed}", "diverged": str(sum(1 for part in parts if part["diverged"])),
        "engine_s": f"{engine_s:.0f}",
    }


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _write_parquet(table, out: Path) -> None:
    import pyarrow.parquet as pq

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- the recorded table


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation; NaN where it is undefined (a constant input, or fewer than two)."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b)[0])


@dataclass(frozen=True)
class Recorded:
    """A recorded table: the space as it was recorded (overrides applied), each config's
    parameters (active keys) and curve (column -> [epochs] array), the metadata."""

    spec: SweepSpec
    configs: list[dict[str, Any]]
    curves: list[dict[str, np.ndarray]]
    metadata: dict[str, str]

    @property
    def columns(self) -> tuple[str, ...]:
        return _columns(self.spec)

    def finals(self) -> np.ndarray:
        """Each config's metric after its last epoch; NaN for one that diverged."""
        metric, epochs = self.spec.experiment.metric, self.spec.max_epochs
        return np.array([curve[metric][-1] if len(curve[metric]) == epochs else math.nan for curve in self.curves])

    def early_ranking(self) -> list[float]:
        """For k = 1 .. epochs-1: the rank correlation (Spearman) of each config's metric
        after epoch k with its final one, over the configs that ran all their epochs: how
        well a rung at epoch k can rank configurations."""
        metric, epochs = self.spec.experiment.metric, self.spec.max_epochs
        full = [curve[metric] for curve in self.curves if len(curve[metric]) == epochs]
        return [spearman([curve[k] for curve in full], [curve[-1] for curve in full]) for k in range(epochs - 1)]

    def target(self) -> float:
        finals = self.finals()
        finals = finals[np.isfinite(finals)]
        if not len(finals):
            raise UserError("no recorded config ran all its epochs: there is no target")
        percentile = TARGET_PERCENTILE if self.spec.experiment.mode == "max" else 100 - TARGET_PERCENTILE
        return float(np.percentile(finals, percentile))

    def budget_epochs(self) -> int:
        """The demo sweep's epochs without early stopping: its trials x their epochs."""
        return self.spec.experiment.num_samples * self.spec.max_epochs


def read_table(path: str | Path) -> Recorded:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--table {path}: no such file (make one with: python benchmarks/search_quality.py record)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's
        raise UserError(f"--table {path}: not a Parquet file ({exc})") from None
    metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    missing = [key for key in ("space_file", "space_text", "overrides") if key not in metadata]
    if missing:
        raise UserError(f"--table {path}: not a search_quality table (no '{missing[0]}' in its metadata)")
    with tempfile.TemporaryDirectory(prefix="psdet-search-quality-space-") as tmp:
        space_file = Path(tmp) / Path(metadata["space_file"]).name
        space_file.write_text(metadata["space_text"])
        spec = with_overrides(load_space(space_file), json.loads(metadata["overrides"]))
    columns = _columns(spec)
    needed = ["config_id", "epoch", *columns, *(param.key for param in spec.search)]
    absent = [column for column in needed if column not in table.column_names]
    if absent:
        raise UserError(f"--table {path}: no column '{absent[0]}'")
    rows = table.to_pydict()
    ids = sorted(set(rows["config_id"]))
    if not ids:
        raise UserError(f"--table {path}: holds no configs")
    if ids != list(range(len(ids))):
        raise UserError(f"--table {path}: config ids are not 0..{len(ids) - 1}")
    order = sorted(range(table.num_rows), key=lambda row: (rows["config_id"][row], rows["epoch"][row]))
    configs: list[dict[str, Any]] = [{} for _ in ids]
    epochs: list[list[int]] = [[] for _ in ids]
    for row in order:
        config_id = rows["config_id"][row]
        configs[config_id] = {param.key: rows[param.key][row] for param in spec.search
                              if rows[param.key][row] is not None}
        epochs[config_id].append(row)
    curves = [{column: np.array([rows[column][row] for row in config_rows], dtype=float)
               for column in ("epoch", *columns)} for config_rows in epochs]
    for config_id, curve in enumerate(curves):
        if list(curve["epoch"]) != list(range(1, len(curve["epoch"]) + 1)):
            raise UserError(f"--table {path}: config {config_id}'s epochs are not 1..{len(curve['epoch'])}")
    return Recorded(spec=spec, configs=configs, curves=curves, metadata=metadata)


class NearestConfig:
    """The recorded configuration nearest to a trial's parameters.

    Nearest means: the same value of every choice parameter (an inactive one counts as the
    value None), and among those the smallest Euclidean distance between the continuous
    parameters scaled to [0, 1] by their bounds (log scale for loguniform and log ints).
    A continuous parameter active in only one of the two adds 1 (the whole range). Where no
    recorded config has the same choices, every differing choice adds CHOICE_PENALTY.
    Ties go to the lowest config id."""

    def __init__(self, search: tuple[Param, ...], configs: list[dict[str, Any]]) -> None:
        self.choices = [param for param in search if param.type == "choice"]
        self.numeric = [param for param in search if param.type != "choice"]
        self.recorded_choices = np.array([self._choice_row(params) for params in configs], dtype=object)
        self.recorded_unit = np.array([self.unit(params) for params in configs], dtype=float)
        self.recorded_choices = self.recorded_choices.reshape(len(configs), len(self.choices))
        self.recorded_unit = self.recorded_unit.reshape(len(configs), len(self.numeric))

    def _choice_row(self, params: dict[str, Any]) -> list[Any]:
        return [params.get(param.key) for param in self.choices]

    def unit(self, params: dict[str, Any]) -> np.ndarray:
        """The continuous parameters in [0, 1]: [len(numeric)], NaN where inactive."""
        values = []
        for param in self.numeric:
            value = params.get(param.key)
            if value is None:
                values.append(math.nan)
            elif param.high == param.low:
                values.append(0.0)
            elif param.type == "loguniform" or param.log:
                values.append((math.log(value) - math.log(param.low)) / (math.log(param.high) - math.log(param.low)))
            else:
                values.append((value - param.low) / (param.high - param.low))
        return np.array(values, dtype=float)

    def distances(self, params: dict[str, Any]) -> np.ndarray:
        """[configs] distances of every recorded config to `params`."""
        query_choices = np.array(self._choice_row(params), dtype=object)
        mismatches = (self.recorded_choices != query_choices).sum(axis=1) if self.choices else 0
        query = self.unit(params)
        recorded_active, query_active = ~np.isnan(self.recorded_unit), ~np.isnan(query)
        both = recorded_active & query_active
        squared = np.where(both, (np.nan_to_num(self.recorded_unit) - np.nan_to_num(query)) ** 2, 0.0)
        squared += recorded_active ^ query_active
        return CHOICE_PENALTY * mismatches + np.sqrt(squared.sum(axis=1))

    def nearest(self, params: dict[str, Any]) -> int:
        return int(np.argmin(self.distances(params)))


# ----------------------------------------------------------------------------- replay: the trial and the count


@dataclass(frozen=True)
class ReplayData:
    """What every replayed trial needs: the lookup and the curves (plain data, pickled once a run)."""

    lookup: NearestConfig
    curves: list[dict[str, np.ndarray]]
    columns: tuple[str, ...]
    epochs: int
    epoch_s: float


def replay_trial(config: dict[str, Any], replay: ReplayData) -> None:
    """A function trainable: the recorded curve of the config nearest to this trial's parameters."""
    from ray import tune

    params, _ = strip_baseline(config)
    config_id = replay.lookup.nearest(params)
    curve = replay.curves[config_id]
    for index in range(len(curve["epoch"])):
        time.sleep(replay.epoch_s)
        tune.report({"epoch": index + 1, **{column: float(curve[column][index]) for column in replay.columns},
                     TOTAL_EPOCHS: replay.epochs, "config_id": config_id})


class EpochAccount:
    """The epochs one run spends, counted on the driver in the order results arrive (each
    result is one epoch of one trial), and the best `metric` so far; `sweep_trials`: also
    the best among the run's first that many trials (by first result), the space's own
    sweep (the demo's 12 trials, ASHA's stops included) rather than an epoch budget, and the
    epochs those trials spent."""

    def __init__(self, metric: str, mode: str, target: float, budget: int, sweep_trials: int | None = None) -> None:
        self.metric, self.mode, self.target, self.budget = metric, mode, target, budget
        self.sweep_trials = sweep_trials
        self.epochs = 0
        self.best: float | None = None
        self.epochs_to_target: int | None = None
        self.best_at_budget: float | None = None
        self.best_in_sweep: float | None = None
        self.sweep_epochs = 0
        self.trials: dict[str, dict[str, Any]] = {}  # in the order of their first result
        self.sweep_ids: set[str] = set()  # the first `sweep_trials` of them

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def _improves(self, value: float | None, best: float | None) -> bool:
        return value is not None and math.isfinite(value) and (best is None or self._better(value, best))

    def add(self, trial_id: str, result: dict[str, Any], params: dict[str, Any] | None = None) -> None:
        self.epochs += 1
        trial = self.trials.setdefault(trial_id, {"config_id": result.get("config_id"), "epochs": 0,
                                                  "params": params})
        trial["epochs"] += 1
        if trial["epochs"] == 1 and (self.sweep_trials is None or len(self.sweep_ids) < self.sweep_trials):
            self.sweep_ids.add(trial_id)
        value = result.get(self.metric)
        if self._improves(value, self.best):
            self.best = float(value)
        if trial_id in self.sweep_ids:
            self.sweep_epochs += 1
            if self._improves(value, self.best_in_sweep):
                self.best_in_sweep = float(value)
        if self.epochs_to_target is None and self.best is not None and not self._better(self.target, self.best):
            self.epochs_to_target = self.epochs
        if self.epochs == self.budget:
            self.best_at_budget = self.best

    def summary(self) -> dict[str, Any]:
        """epochs_to_target (inf: never reached), best_at_budget (the best at the end if the
        run spent fewer epochs), best_in_sweep and sweep_epochs (the first `sweep_trials`
        trials' best and epochs), epochs and trials in all, and each trial's recorded config,
        epochs and parameters."""
        return {"epochs_to_target": self.epochs_to_target if self.epochs_to_target is not None else math.inf,
                "best_at_budget": self.best_at_budget if self.best_at_budget is not None else self.best,
                "best_in_sweep": self.best_in_sweep, "sweep_epochs": self.sweep_epochs,
                "epochs": self.epochs, "trials": len(self.trials), "trial_log": list(self.trials.values())}


def _ledger_callback(account: EpochAccount, path: Path):
    """A tune.Callback feeding `account`, which writes its summary to `path` at the end
    (Tune may hold a copy of the callback: the file is what the driver reads back)."""
    from ray import tune

    class EpochLedger(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            account.add(trial.trial_id, result, strip_baseline(trial.config)[0])

        def on_experiment_end(self, trials, **info) -> None:
            _write_atomically(path, json.dumps(account.summary()).encode())

    return EpochLedger()


# ----------------------------------------------------------------------------- replay: strategies and runs


def strategy_spec(spec: SweepSpec, strategy: str, seed: int, trials: int, sampler=None, scheduler=None) -> SweepSpec:
    """The recorded space as `strategy` ("random|tpe" + "fifo|asha") runs it: only the
    sampler type (random drops the TPE flags), the scheduler type, the seed and the
    number of trials change (and no time budget). `sampler` replaces the space's TPE
    settings, `scheduler` its ASHA settings."""
    search, stopping = strategy.split("+")
    if search == "random":
        chosen = dataclasses.replace(spec.sampler, type="random", multivariate=False, group=False,
                                     constant_liar=False)
    else:
        chosen = sampler or spec.sampler
    return dataclasses.replace(
        spec, sampler=chosen,
        scheduler=dataclasses.replace(scheduler or spec.scheduler, type="asha" if stopping == "asha" else "none"),
        experiment=dataclasses.replace(spec.experiment, seed=seed, num_samples=trials, time_budget_s=None))


def sampler_variants(spec: SweepSpec) -> dict[str, Any]:
    """Label -> TPE settings: the space's, then each with one setting changed."""
    space = spec.sampler
    variants = {_describe(space) + " (the space's)": space}
    for startup in (10, 4, 2):
        if startup != space.n_startup_trials:
            variant = dataclasses.replace(space, n_startup_trials=startup)
            variants[_describe(variant)] = variant
    joint = not space.multivariate
    variant = dataclasses.replace(space, multivariate=joint, group=joint)
    variants[_describe(variant)] = variant
    variant = dataclasses.replace(space, constant_liar=not space.constant_liar)
    variants[_describe(variant)] = variant
    return variants


ASHA_VARIANTS = ((1, 3), (2, 3), (3, 3), (4, 2), (5, 2), (6, 2))  # (grace period, reduction factor)


def scheduler_variants(spec: SweepSpec) -> dict[str, Any]:
    """Label -> ASHA settings: the space's, then ASHA_VARIANTS that fit in a trial."""
    space = spec.scheduler
    variants = {_describe_asha(space) + " (the space's)": space}
    for grace, reduction in ASHA_VARIANTS:
        variant = dataclasses.replace(space, grace_period=grace, reduction_factor=float(reduction))
        if grace <= spec.max_epochs and variant != space:
            variants[_describe_asha(variant)] = variant
    return variants


def _describe_asha(scheduler) -> str:
    return f"grace {scheduler.grace_period}, reduction {scheduler.reduction_factor:g}"


def _describe(sampler) -> str:
    joint = "mv+group" if sampler.multivariate and sampler.group else "mv" if sampler.multivariate else "indep"
    return f"startup {sampler.n_startup_trials}, {joint}, {'liar' if sampler.constant_liar else 'no liar'}"


def replay_run(run_spec: SweepSpec, data: ReplayData, account, storage_root: Path, name: str,
               scheduler=None, timeout_s: int = RUN_TIMEOUT_S) -> dict[str, Any]:
    """One whole sweep of `run_spec` over the replayed trainable, its results counted by
    `account` (an EpochAccount or a ParetoAccount); -> account.summary(). `scheduler`: one
    in place of the space's (build_tuner's `scheduler`)."""
    import optuna
    from ray import tune

    from orchestrate.tuner import build_tuner

    ledger = storage_root / f"{name}.json"
    concurrency = run_spec.experiment.max_concurrent
    trainable = tune.with_resources(tune.with_parameters(replay_trial, replay=data),
                                    {"CPU": min(1.0, NUM_CPUS / concurrency)})
    tuner = build_tuner(run_spec, trainable, name=name, storage_root=str(storage_root),
                        study_storage=optuna.storages.InMemoryStorage(), concurrency=concurrency,
                        callbacks=[_ledger_callback(account, ledger)], scheduler=scheduler)
    with deadline(timeout_s, f"replay run '{name}'"), contextlib.redirect_stdout(sys.stderr):
        results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"replay run '{name}': a trial failed: {results.errors[0]}")
    summary = json.loads(ledger.read_text())
    shutil.rmtree(storage_root / name, ignore_errors=True)
    return summary


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile that stays inf where an infinite value takes part
    (numpy's gives nan for inf - inf and inf * 0)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    fraction = position - low
    if fraction == 0 or ordered[low] == ordered[high]:
        return ordered[low]
    if math.isinf(ordered[high]):
        return math.inf
    return ordered[low] + fraction * (ordered[high] - ordered[low])


def replay_all(recorded: Recorded, seeds: int, trials: int, variants: bool, storage_root: Path,
               epoch_s: float = EPOCH_S, asha_variants: bool = False) -> dict[str, list[dict]]:
    """Runs of every strategy (and sampler or ASHA variant) for seeds 0..seeds-1, the
    strategies' order rotating each seed; -> label -> one summary per seed. Needs a running Ray."""
    spec = recorded.spec
    if spec.sampler.type != "tpe":
        raise ConfigError(f"{recorded.metadata['space_file']}: replay compares random search with the space's "
                          "TPE sampler, but the space's sampler is random")
    target = recorded.target()
    data = ReplayData(lookup=NearestConfig(spec.search, recorded.configs), curves=recorded.curves,
                      columns=recorded.columns, epochs=spec.max_epochs, epoch_s=epoch_s)
    plans: dict[str, tuple[str, Any, Any]] = {strategy: (strategy, None, None) for strategy in STRATEGIES}
    if variants:
        for label, sampler in list(sampler_variants(spec).items())[1:]:  # the space's own is tpe+asha
            plans[f"tpe+asha {label}"] = ("tpe+asha", sampler, None)
    if asha_variants:
        for label, scheduler in list(scheduler_variants(spec).items())[1:]:
            plans[f"tpe+asha {label}"] = ("tpe+asha", None, scheduler)
            plans[f"random+asha {label}"] = ("random+asha", None, scheduler)
    runs: dict[str, list[dict]] = {label: [] for label in plans}
    labels = list(plans)
    for seed in range(seeds):
        shift = seed % len(labels)
        for label in labels[shift:] + labels[:shift]:
            strategy, sampler, scheduler = plans[label]
            started = time.monotonic()
            name = f"{label.replace('+', '_').replace(' ', '_').replace(',', '').replace('.', '_')}-seed{seed}"
            account = EpochAccount(spec.experiment.metric, spec.experiment.mode, target, recorded.budget_epochs(),
                                   sweep_trials=spec.experiment.num_samples)
            summary = replay_run(strategy_spec(spec, strategy, seed, trials, sampler, scheduler), data, account,
                                 storage_root, name)
            runs[label].append({"seed": seed, **summary})
            print(f"seed {seed:>2} {label:<12}: {summary['epochs_to_target']} epochs to target, best at budget "
                  f"{summary['best_at_budget']:.3f}, {summary['trials']} trials / {summary['epochs']} epochs, "
                  f"{time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return runs


def sweep_reaches(value: float | None, goal: float, mode: str) -> bool:
    return value is not None and math.isfinite(value) and (value >= goal if mode == "max" else value <= goal)


def print_table(runs: dict[str, list[dict]], budget: int, sweep_trials: int, sweep_goal: float, mode: str = "max",
                width: int = 12) -> dict[str, dict[str, float]]:
    """One row per strategy; -> label -> {epochs, best, sweep_best, sweep_reached} (medians,
    and the number of runs whose sweep reaches `sweep_goal`; the sweep is a run's first `sweep_trials`
    trials, the space's own sweep, and its epochs are also shown)."""
    table = Table(Column("strategy", f"<{width}"), Column("runs", "4d"), Column("reached", ">7"),
                  Column("epochs to target", "16.1f"), Column("p25", "6.1f"), Column("p75", "6.1f"),
                  Column(f"best at {budget} epochs", "17.3f"), Column("p25", "6.3f"), Column("p75", "6.3f"),
                  Column(f"best of {sweep_trials} trials", "16.3f"), Column("p25", "6.3f"), Column("p75", "6.3f"),
                  Column(f"{'>=' if mode == 'max' else '<='} {sweep_goal:g}", ">7"),
                  Column(f"epochs of {sweep_trials}", "11.1f"), Column("epochs/trial", "12.1f"))
    table.print_header()
    medians = {}
    for label, label_runs in runs.items():
        epochs = [run["epochs_to_target"] for run in label_runs]
        best = [run["best_at_budget"] if run["best_at_budget"] is not None else math.nan for run in label_runs]
        sweep = [run["best_in_sweep"] if run["best_in_sweep"] is not None else math.nan for run in label_runs]
        reached = sum(1 for value in epochs if math.isfinite(value))
        per_trial = sum(run["epochs"] for run in label_runs) / max(1, sum(run["trials"] for run in label_runs))
        goal_runs = sum(1 for run in label_runs if sweep_reaches(run["best_in_sweep"], sweep_goal, mode))
        medians[label] = {"epochs": quantile(epochs, 0.5), "best": quantile(best, 0.5), "sweep_best": quantile(sweep, 0.5),
                          "sweep_reached": goal_runs}
        table.print_row(label, len(label_runs), f"{reached}/{len(label_runs)}", medians[label]["epochs"],
                        quantile(epochs, 0.25), quantile(epochs, 0.75), medians[label]["best"],
                        quantile(best, 0.25), quantile(best, 0.75), medians[label]["sweep_best"],
                        quantile(sweep, 0.25), quantile(sweep, 0.75), f"{goal_runs}/{len(label_runs)}",
                        quantile([run["sweep_epochs"] for run in label_runs], 0.5), per_trial)
    return medians


def epochs_ratio(random_fifo: float, tpe_asha: float) -> float:
    """random+fifo's median epochs to target over tpe+asha's; inf / nan / 0 where one is infinite."""
    if math.isinf(tpe_asha):
        return math.nan if math.isinf(random_fifo) else 0.0
    return random_fifo / tpe_asha


def replayed_space(recorded: Recorded, table: str, space: str | None) -> SweepSpec:
    """The space whose sampler, scheduler and experiment settings the replay runs:
    `--space`, else the recorded space file as it is on disk now (or, where that file is
    gone, the text the table keeps). Its search space, base config, metric and mode must be
    the recorded ones: the curves are theirs."""
    path = Path(space) if space else ROOT / recorded.metadata["space_file"]
    if not path.is_file():
        if space:
            raise UserError(f"--space {space}: no such file")
        return recorded.spec
    spec = with_overrides(load_space(path), json.loads(recorded.metadata["overrides"]))
    then = recorded.spec
    for what, now, was in (("search section", spec.search, then.search), ("base config", spec.base_tree, then.base_tree),
                           ("metric", spec.objectives, then.objectives)):
        if now != was:
            raise UserError(f"{path}: its {what} differs from the one {table} was recorded with; record it again "
                            f"(python benchmarks/search_quality.py record --space {path} --out {table})")
    return spec


def replay(args: argparse.Namespace) -> int:
    recorded = read_table(args.table)
    recorded = dataclasses.replace(recorded, spec=replayed_space(recorded, args.table, args.space))
    seeds = args.seeds if args.seeds is not None else 2 if args.small else 20
    trials = args.trials if args.trials is not None else 6 if args.small else 48
    if seeds < 1 or trials < 1:
        raise UserError("--seeds and --trials must be >= 1")
    spec, meta = recorded.spec, recorded.metadata
    target, budget = recorded.target(), recorded.budget_epochs()
    finals = recorded.finals()
    better = finals >= target if spec.experiment.mode == "max" else finals <= target
    import ray

    print(f"search quality, replay of {args.table}: {len(recorded.configs)} configs of {meta['space_file']} "
          f"({spec.max_epochs} epochs" + (f", overrides {' '.join(json.loads(meta['overrides']))}"
                                           if json.loads(meta["overrides"]) else "")
          + f"), recorded {meta.get('date', '?')} on {meta.get('machine', '?')}, commit {meta.get('commit', '?')}")
    print(f"target: {spec.experiment.metric} {'>=' if spec.experiment.mode == 'max' else '<='} {target:.3f} "
          f"(the {TARGET_PERCENTILE}th percentile of the recorded final-epoch values; {int(better.sum())} of "
          f"{len(finals)} configs reach it; the baseline, config 0: {finals[0]:.3f}); budget: {budget} epochs "
          f"({spec.experiment.num_samples} trials x {spec.max_epochs} epochs, the space's sweep without early "
          "stopping)")
    ranking = recorded.early_ranking()
    print(f"how early epochs rank the configs: rank correlation of {spec.experiment.metric} after epoch k with the "
          f"final, k = 1..{len(ranking)}: " + " ".join(f"{rho:.2f}" for rho in ranking))
    asha = spec.scheduler
    print(f"ours (tpe+asha) as {spec.path} configures it: TPE {_describe(spec.sampler)}; ASHA grace period "
          f"{asha.grace_period}, reduction factor {asha.reduction_factor} (the baseline is never stopped)")
    print(f"each run: {trials} trials, {spec.experiment.max_concurrent} at a time, seeds 0..{seeds - 1}; "
          f"trials replay the nearest recorded config, {EPOCH_S:g} s per epoch; one local Ray ({NUM_CPUS} CPUs, "
          f"Ray {ray.__version__}) for all runs\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="psdet-search-quality-") as tmp, replay_ray():
        started = time.monotonic()
        runs = replay_all(recorded, seeds, trials, args.sampler_variants, Path(tmp),
                          asha_variants=args.asha_variants)
        wall_s = time.monotonic() - started
    if args.runs_json:
        Path(args.runs_json).write_text(json.dumps({"target": target, "budget_epochs": budget, "runs": runs},
                                                   indent=1, default=str))
    main_runs = {label: runs[label] for label in STRATEGIES}
    print(f"epochs spent until the best {spec.experiment.metric} so far reaches the target (a run that never "
          f"does counts as inf; 'reached' says how many did), and the best {spec.experiment.metric} once "
          f"{budget} epochs are spent; medians and quartiles over {seeds} seeds")
    sweep = (spec.experiment.num_samples, args.sweep_goal, spec.experiment.mode)
    print(f"the space's own sweep is each run's first {sweep[0]} trials: their best, how many runs' best is "
          f"{'>=' if sweep[2] == 'max' else '<='} {sweep[1]:g} (--sweep-goal), and the epochs they spent (median)")
    medians = print_table(main_runs, budget, *sweep)
    if args.sampler_variants:
        labels = ["tpe+asha " + label for label in list(sampler_variants(spec))[1:]]
        variant_runs = {"tpe+asha " + list(sampler_variants(spec))[0]: runs["tpe+asha"],
                        **{label: runs[label] for label in labels}}
        print(f"\ntpe+asha with other TPE settings (same seeds; the first row is tpe+asha above)")
        print_table(variant_runs, budget, *sweep, width=max(len(label) for label in variant_runs))
    if args.asha_variants:
        own = list(scheduler_variants(spec))[0]
        variant_runs = {f"{search}+asha {label}": runs[f"{search}+asha"] if label == own else runs[f"{search}+asha {label}"]
                        for label in scheduler_variants(spec) for search in ("random", "tpe")}
        print(f"\nASHA with other rungs, random and TPE (same seeds; the space's rows are the ones above)")
        print_table(variant_runs, budget, *sweep, width=max(len(label) for label in variant_runs))
    ratio = epochs_ratio(medians["random+fifo"]["epochs"], medians["tpe+asha"]["epochs"])
    print(f"\n{len(runs) * seeds} runs in {wall_s:.0f} s")
    infinite = [label for label in ("random+fifo", "tpe+asha") if math.isinf(medians[label]["epochs"])]
    if infinite:
        print(f"note: the median run of {' and '.join(infinite)} never reached the target within {trials} trials, "
              f"so ratio={ratio:.2f} is no ratio of two counts (inf: random+fifo's median is infinite; "
              "nan: both are; 0: only tpe+asha's is)")
    random_fifo, tpe_asha = medians["random+fifo"], medians["tpe+asha"]
    print(summary_line("search_quality", ratio=f"{ratio:.2f}", random_fifo_epochs=f"{random_fifo['epochs']:.1f}",
                       tpe_asha_epochs=f"{tpe_asha['epochs']:.1f}", target=f"{target:.3f}", budget_epochs=budget,
                       tpe_asha_best=f"{tpe_asha['best']:.3f}", random_fifo_best=f"{random_fifo['best']:.3f}",
                       sweep_trials=spec.experiment.num_samples, tpe_asha_sweep_best=f"{tpe_asha['sweep_best']:.3f}",
                       random_fifo_sweep_best=f"{random_fifo['sweep_best']:.3f}", sweep_goal=f"{args.sweep_goal:g}",
                       tpe_asha_sweep_reached=tpe_asha["sweep_reached"],
                       random_fifo_sweep_reached=random_fifo["sweep_reached"], seeds=seeds))
    return 0


# ----------------------------------------------------------------------------- replay-mo: hypervolume at equal budget


def mo_strategies(spec: SweepSpec) -> tuple[str, str, str]:
    """The three multi-objective strategies: the space's MO-ASHA, no early stopping, and
    Ray's ASHA on the first objective alone."""
    return "MO-ASHA", "FIFO", f"ASHA({spec.objectives[0][0]})"


def mo_strategy_spec(spec: SweepSpec, strategy: str, seed: int, trials: int) -> SweepSpec:
    """The recorded multi-objective space as `strategy` runs it: the space's own sampler and
    rungs every time, the scheduler off for FIFO, the seed, `trials` trials, no time or
    spending budget (the replay counts its budget in epochs on the driver)."""
    from orchestrate.space import Budget

    scheduler = dataclasses.replace(spec.scheduler, type="none" if strategy == "FIFO" else "asha")
    return dataclasses.replace(spec, scheduler=scheduler, experiment=dataclasses.replace(
        spec.experiment, seed=seed, num_samples=trials, time_budget_s=None, budget=Budget()))


def mo_scheduler(run_spec: SweepSpec, strategy: str):
    """The scheduler build_tuner is handed for `strategy`: None (the space's own: MO-ASHA,
    or FIFO) or, for ASHA on the first objective, `build_scheduler` of the space reduced to
    that objective (Ray's ASHA with the same rungs, sparing the baseline)."""
    from orchestrate.tuner import build_scheduler

    if strategy != mo_strategies(run_spec)[2]:
        return None
    single = dataclasses.replace(run_spec, experiment=dataclasses.replace(run_spec.experiment, objectives=()))
    return build_scheduler(single)


class ParetoAccount:
    """The epochs one run spends, counted on the driver in the order results arrive (one
    result = one epoch of one trial), and the trials that completed: reported their last
    (`max_epochs`-th) epoch, with finite objectives. `at_budget`: the completed trials'
    objective values once `budget` epochs are spent (the epoch that reaches it included)."""

    def __init__(self, objectives: tuple[tuple[str, str], ...], max_epochs: int, budget: int) -> None:
        self.objectives, self.max_epochs, self.budget = objectives, max_epochs, budget
        self.epochs = 0
        self.completed: list[list[float]] = []
        self.at_budget: list[list[float]] | None = None
        self.trials: dict[str, dict[str, Any]] = {}  # in the order of their first result

    def add(self, trial_id: str, result: dict[str, Any], params: dict[str, Any] | None = None) -> None:
        self.epochs += 1
        trial = self.trials.setdefault(trial_id, {"config_id": result.get("config_id"), "epochs": 0,
                                                  "params": params, "completed_at": None})
        trial["epochs"] += 1
        values = [result.get(metric) for metric, _ in self.objectives]
        if result.get("epoch", 0) >= self.max_epochs and all(
                isinstance(value, (int, float)) and math.isfinite(value) for value in values):
            self.completed.append([float(value) for value in values])
            trial["completed_at"] = self.epochs
        if self.epochs == self.budget:
            self.at_budget = [list(point) for point in self.completed]

    def summary(self) -> dict[str, Any]:
        """points_at_budget (the completed trials' objectives at the budget, or at the end if
        the run spent fewer epochs), epochs and trials in all, completed trials, and each
        trial's recorded config, epochs, parameters and the epoch count at its completion."""
        return {"points_at_budget": self.at_budget if self.at_budget is not None else self.completed,
                "epochs": self.epochs, "trials": len(self.trials), "completed": len(self.completed),
                "trial_log": list(self.trials.values())}


def reference_point(recorded: Recorded) -> list[float]:
    """Per objective, the worst value in the whole table (every config, every epoch): the
    fixed corner the hypervolumes are measured from."""
    reference = []
    for metric, mode in recorded.spec.objectives:
        values = np.concatenate([curve[metric] for curve in recorded.curves])
        values = values[np.isfinite(values)]
        reference.append(float(values.min() if mode == "max" else values.max()))
    return reference


def front_hypervolume(points: list[list[float]], reference: list[float], objectives) -> float:
    """The hypervolume of `points` (objective values) from `reference`, both objectives' modes applied."""
    from orchestrate.pareto import gains, hypervolume_2d

    modes = [mode for _, mode in objectives]
    return hypervolume_2d([gains(point, modes) for point in points], gains(reference, modes))


def replay_mo_all(recorded: Recorded, seeds: int, trials: int, budget: int, storage_root: Path,
                  epoch_s: float = EPOCH_S) -> dict[str, list[dict]]:
    """Runs of the three multi-objective strategies for seeds 0..seeds-1, their order
    rotating each seed; -> label -> one ParetoAccount summary per seed, with `hypervolume`
    of its points at the budget. Needs a running Ray."""
    spec = recorded.spec
    reference = reference_point(recorded)
    data = ReplayData(lookup=NearestConfig(spec.search, recorded.configs), curves=recorded.curves,
                      columns=recorded.columns, epochs=spec.max_epochs, epoch_s=epoch_s)
    labels = list(mo_strategies(spec))
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for seed in range(seeds):
        shift = seed % len(labels)
        for label in labels[shift:] + labels[:shift]:
            started = time.monotonic()
            run_spec = mo_strategy_spec(spec, label, seed, trials)
            name = f"mo_{label.replace('(', '_').replace(')', '').replace('-', '_')}-seed{seed}"
            account = ParetoAccount(spec.objectives, spec.max_epochs, budget)
            summary = replay_run(run_spec, data, account, storage_root, name, scheduler=mo_scheduler(run_spec, label))
            summary["hypervolume"] = front_hypervolume(summary["points_at_budget"], reference, spec.objectives)
            runs[label].append({"seed": seed, **summary})
            print(f"seed {seed:>2} {label:<14}: hypervolume {summary['hypervolume']:.4f} from "
                  f"{len(summary['points_at_budget'])} completed trials at the budget, {summary['trials']} trials / "
                  f"{summary['epochs']} epochs, {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return runs


def check_multi_objective(recorded: Recorded, table: str) -> None:
    spec = recorded.spec
    if len(spec.objectives) != 2:
        raise UserError(f"--table {table}: replay-mo compares two-objective sweeps, but {spec.path} has "
                        f"{len(spec.objectives)} objective(s) (record a space with experiment.objectives)")
    if spec.scheduler.type != "asha":
        raise UserError(f"{spec.path}: replay-mo compares the space's MO-ASHA with FIFO, but its scheduler is "
                        f"{spec.scheduler.type}")


def replay_mo(args: argparse.Namespace) -> int:
    recorded = read_table(args.table)
    recorded = dataclasses.replace(recorded, spec=replayed_space(recorded, args.table, args.space))
    check_multi_objective(recorded, args.table)
    spec, meta = recorded.spec, recorded.metadata
    seeds = args.seeds if args.seeds is not None else 2 if args.small else 20
    budget = args.budget if args.budget is not None else recorded.budget_epochs()
    # enough trials that even a run stopping every trial at the first rung can spend the budget
    trials = args.trials if args.trials is not None else math.ceil(budget / spec.scheduler.grace_period)
    if seeds < 1 or trials < 1 or budget < 1:
        raise UserError("--seeds, --trials and --budget must be >= 1")
    reference = reference_point(recorded)
    finals = [[float(curve[metric][-1]) for metric, _ in spec.objectives] for curve in recorded.curves
              if len(curve["epoch"]) == spec.max_epochs]
    table_hv = front_hypervolume(finals, reference, spec.objectives)
    objectives = ", ".join(f"{mode} {metric}" for metric, mode in spec.objectives)
    labels = mo_strategies(spec)
    import ray

    print(f"search quality, multi-objective replay of {args.table}: {len(recorded.configs)} configs of "
          f"{meta['space_file']} ({spec.max_epochs} epochs" + (f", overrides {' '.join(json.loads(meta['overrides']))}"
                                                               if json.loads(meta["overrides"]) else "")
          + f"), recorded {meta.get('date', '?')} on {meta.get('machine', '?')}, commit {meta.get('commit', '?')}")
    print(f"objectives: {objectives}; hypervolume of the completed trials' final values from the reference point "
          f"{', '.join(f'{metric} {value:.4g}' for (metric, _), value in zip(spec.objectives, reference))} (the "
          f"worst recorded value of each, any epoch); the {len(finals)} recorded configs' own front: {table_hv:.4f}")
    print(f"budget: {budget} epochs per run (counted in arrival order; a trial running when it is spent does not "
          f"count); each run: up to {trials} trials, {spec.experiment.max_concurrent} at a time, the space's "
          f"sampler ({spec.sampler.type}" + (f", {_describe(spec.sampler)}" if spec.sampler.type == "tpe" else "")
          + f"); {labels[0]} and {labels[2]}: rungs from epoch "
          f"{spec.scheduler.grace_period}, reduction {spec.scheduler.reduction_factor:g} (the baseline is never "
          f"stopped); seeds 0..{seeds - 1}; trials replay the nearest recorded config, {EPOCH_S:g} s per epoch; one "
          f"local Ray ({NUM_CPUS} CPUs, Ray {ray.__version__}) for all runs\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="psdet-search-quality-mo-") as tmp, replay_ray():
        started = time.monotonic()
        runs = replay_mo_all(recorded, seeds, trials, budget, Path(tmp))
        wall_s = time.monotonic() - started
    if args.runs_json:
        Path(args.runs_json).write_text(json.dumps({"reference": reference, "table_hypervolume": table_hv,
                                                    "budget_epochs": budget, "runs": runs}, indent=1, default=str))
    print(f"hypervolume at {budget} epochs, medians and quartiles over {seeds} seeds ('of table': the median over "
          "the recorded configs' own front)")
    table = Table(Column("strategy", "<14"), Column("runs", "4d"), Column("hypervolume", "11.4f"),
                  Column("p25", "7.4f"), Column("p75", "7.4f"), Column("of table", "8.2f"),
                  Column("completed at budget", "19.1f"), Column("epochs/trial", "12.1f"))
    table.print_header()
    medians = {}
    for label in labels:
        volumes = [run["hypervolume"] for run in runs[label]]
        medians[label] = quantile(volumes, 0.5)
        completed = quantile([len(run["points_at_budget"]) for run in runs[label]], 0.5)
        per_trial = sum(run["epochs"] for run in runs[label]) / max(1, sum(run["trials"] for run in runs[label]))
        table.print_row(label, len(runs[label]), medians[label], quantile(volumes, 0.25), quantile(volumes, 0.75),
                        medians[label] / table_hv if table_hv > 0 else math.nan, completed, per_trial)
    print(f"\n{len(labels) * seeds} runs in {wall_s:.0f} s")
    print("search_quality_mo: hv " + " ".join(f"{label}={medians[label]:.4f}" for label in labels)
          + f" table_front={table_hv:.4f} budget_epochs={budget} seeds={seeds} reference="
          + ",".join(f"{value:.4g}" for value in reference))
    return 0


def strategy_space(raw: dict, strategy: str, trials: int) -> dict:
    """A space file's YAML as `strategy` runs it live, the same changes `strategy_spec` makes:
    the sampler type (random drops the TPE flags), the scheduler type, `trials` trials."""
    search, scheduler = strategy.split("+")
    raw = copy.deepcopy(raw)
    raw["experiment"] = {**raw["experiment"], "num_samples": trials, "name": f"live-{search}-{scheduler}"}
    raw["experiment"].pop("time_budget_s", None)
    if search == "random":
        raw["sampler"] = {"type": "random"}
    if scheduler == "fifo":
        raw["scheduler"] = {"type": "none"}
    return raw


def live(args: argparse.Namespace) -> int:
    """The four strategies once each, really training, on the space (seed and data its own)."""
    import pyarrow.parquet as pq
    import yaml

    space = Path(args.space)
    if not space.is_file():
        raise UserError(f"--space {space}: no such file")
    if args.trials < 1:
        raise UserError("--trials must be >= 1")
    metric = load_space(space).experiment.metric  # one line and exit 2 on a bad space, before anything trains
    raw = yaml.safe_load(space.read_text())
    print(f"search quality, live: the four strategies on {space}, {args.trials} trials each, seed "
          f"{raw['experiment'].get('seed', 0)}, really training (orchestrate/tune.py, one sweep after another)",
          flush=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="psdet-search-quality-live-") as tmp:
        for strategy in STRATEGIES:
            variant_raw = strategy_space(raw, strategy, args.trials)
            variant = Path(tmp) / f"{strategy.replace('+', '_')}.yaml"
            variant.write_text(yaml.safe_dump(variant_raw, sort_keys=False))
            started = time.monotonic()
            command = [sys.executable, str(ROOT / "orchestrate" / "tune.py"), "--space", str(variant),
                       "--storage", str(Path(tmp) / "runs")]
            done = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, timeout=LIVE_TIMEOUT_S,
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(f"live {strategy}: {' '.join(command)} exited {done.returncode}")
            name = variant_raw["experiment"]["name"]
            trials = pq.read_table(Path(tmp) / "runs" / name / "results.parquet").to_pylist()
            finals = [row[f"final_{metric}"] for row in trials if row["status"] == "completed"]
            rows[strategy] = {"epochs": sum(row["epochs"] for row in trials), "trials": len(trials),
                              "pruned": sum(row["status"] == "pruned" for row in trials),
                              "best": max(finals) if finals else math.nan, "wall_s": time.monotonic() - started}
            print(f"live {strategy}: best {metric} {rows[strategy]['best']:.3f}, {rows[strategy]['epochs']} epochs, "
                  f"{rows[strategy]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    table = Table(Column("strategy", "<12"), Column("trials", "6d"), Column("pruned", "6d"),
                  Column("epochs", "6d"), Column(f"best {metric}", "12.3f"),
                  Column("wall s", "7.0f"))
    table.print_header()
    for strategy, row in rows.items():
        table.print_row(strategy, row["trials"], row["pruned"], row["epochs"], row["best"], row["wall_s"])
    ranking = sorted(rows, key=lambda strategy: -rows[strategy]["best"])
    print(summary_line("search_quality_live", ranking=">".join(ranking), trials=args.trials,
                       **{strategy.replace("+", "_") + "_best": f"{row['best']:.3f}" for strategy, row in rows.items()}))
    return 0


@contextlib.contextmanager
def replay_ray():
    """A fresh local Ray on 127.0.0.1 with NUM_CPUS CPUs and no dashboard; always shut down."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no per-trial result files: nothing reads them
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the searcher's tell() logs every trial otherwise
    # Each run's ResultGrid looks for the per-trial result files the line above turns off.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    python_path = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 1024 * 1024,
                     runtime_env={"env_vars": {"PYTHONPATH": python_path.rstrip(os.pathsep)}})
            break
        except Exception as exc:  # Ray raises a bare Exception when its node misses the start-up deadline
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == RAY_START_ATTEMPTS:
                raise
            print(f"the local Ray did not start in time (attempt {attempt} of {RAY_START_ATTEMPTS}); trying again",
                  file=sys.stderr, flush=True)
    try:
        yield
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="search_quality.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="train configurations of the space and keep every epoch's figures")
    rec.add_argument("--space", default=str(DEFAULT_SPACE.relative_to(ROOT)), help="search-space YAML")
    rec.add_argument("--configs", type=int, default=64, help="configurations, the baseline first (default 64)")
    rec.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    rec.add_argument("--out", default=str(DEFAULT_TABLE.relative_to(ROOT)), help="the Parquet table to write")
    rec.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                     help="dotted config overrides on top of the space's base config")
    rec.add_argument("--synthetic", nargs=2, type=int, metavar=("TRAIN", "VAL"),
                     help="synthetic dataset size (default: the space's)")
    rec.add_argument("--sampler", choices=("sobol", "random"), default="sobol",
                     help="how configs 1.. are drawn (default: scrambled Sobol)")
    rec.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    rep = commands.add_parser("replay", help="run the sweep's strategies over the recorded curves")
    rep.add_argument("--table", default=str(DEFAULT_TABLE.relative_to(ROOT)), help="a table `record` wrote")
    rep.add_argument("--space", help="the space whose sampler and scheduler are replayed (default: the recorded "
                     "space file as it is now); its search section and base config must be the recorded ones")
    rep.add_argument("--seeds", type=int, default=None, help="runs per strategy, seeds 0.. (default 20)")
    rep.add_argument("--trials", type=int, default=None, help="trials per run (default 48)")
    rep.add_argument("--sampler-variants", action="store_true", help="also tpe+asha with other TPE settings")
    rep.add_argument("--asha-variants", action="store_true",
                     help="also random+asha and tpe+asha with other ASHA grace periods and reduction factors")
    rep.add_argument("--small", action="store_true", help="CI: 2 seeds of 6 trials")
    rep.add_argument("--runs-json", metavar="PATH", help="also write every run's figures to PATH")
    rep.add_argument("--sweep-goal", type=float, default=0.5,
                     help="count the runs whose own sweep (the first num_samples trials) reaches this (default 0.5, "
                          "the demo's slot AP goal)")
    rmo = commands.add_parser("replay-mo", help="hypervolume at equal budget: MO-ASHA, FIFO and ASHA on the first "
                              "objective alone, over a multi-objective recording")
    rmo.add_argument("--table", default=str(DEFAULT_PARETO_TABLE.relative_to(ROOT)),
                     help="a table `record --space` of a multi-objective space wrote")
    rmo.add_argument("--space", help="the space whose sampler and scheduler are replayed (default: the recorded "
                     "space file as it is now); its search section and base config must be the recorded ones")
    rmo.add_argument("--seeds", type=int, default=None, help="runs per strategy, seeds 0.. (default 20)")
    rmo.add_argument("--budget", type=int, default=None,
                     help="epochs per run (default: the space's num_samples x epochs)")
    rmo.add_argument("--trials", type=int, default=None,
                     help="trials per run at most (default: budget / grace period, rounded up)")
    rmo.add_argument("--small", action="store_true", help="CI: 2 seeds")
    rmo.add_argument("--runs-json", metavar="PATH", help="also write every run's figures to PATH")
    liv = commands.add_parser("live", help="run the four strategies once each, really training, on the space")
    liv.add_argument("--space", default=str(DEFAULT_SPACE.relative_to(ROOT)), help="search-space YAML")
    liv.add_argument("--trials", type=int, default=6, help="trials per strategy (default 6)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "record":
            return record(args)
        if args.command == "live":
            return live(args)
        if args.command == "replay-mo":
            return replay_mo(args)
        return replay(args)
    except UserError as exc:
        print(f"search_quality.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
