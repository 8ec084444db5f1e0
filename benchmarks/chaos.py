"""Chaos: a small sweep on a local multi-node Ray, a seeded schedule of faults, checked invariants.

    python benchmarks/chaos.py [--small] [--seed N] [--faults worker=10,node=3,driver=3,corrupt=2,outage=1]
                               [--trials N] [--epochs N] [--images N]

A Ray cluster of a head (no CPUs: it schedules nothing) and `WORKER_NODES` worker nodes
(`ray.cluster_utils.Cluster`), S3 storage on moto's server, everything on 127.0.0.1. The
sweep is `orchestrate/tune.py` over a space written here (ps_gat_tiny at 128x128 on
synthetic images, one-worker trials, lr searched, no early stopping so every trial runs all
its epochs, `train.log_interval` 1 so each run's train.log has every step). It runs twice:
- **reference**: fault-free, to the end;
- **chaos**: the same sweep (same space, seeds and data) while this process injects, one at a
  time, a seeded schedule of faults, each at a moment of a running trial read from its
  train.log: mid-step, mid-evaluation, mid-checkpoint-write (its checkpoint written, the
  upload to storage in flight) or between trials (right after one finished). Kinds:
  - worker: SIGKILL of a trial's worker process;
  - node: the node of a trial's worker lost (its raylet and every worker on it SIGKILLed),
    a replacement node added, as an autoscaler would;
  - driver: SIGKILL of tune.py's process tree, then the same command with `--resume`;
  - corrupt: the trial's newest checkpoint in storage truncated, or one bit of it flipped,
    then its worker SIGKILLed, so the retry must notice and fall back;
  - outage: the S3 endpoint stopped for `OUTAGE_S` s, then started again on its port.
Each fault waits for its moment in a live run, so for the trials hit by the one before to run again.

Then it checks, from the storage the sweep left (results.parquet, the Optuna journal, the
trials' checkpoints) and the engine's logs:
- survived, per kind: the sweep finished and every trial the fault hit ended completed (a
  trial a killed driver started after Tune's last save: the new trial that continued it);
- lost: trials the study asked for that did not end completed, pruned or errored with a reason;
- duplicated: parameter sets trained by more than one trial in the results, plus Optuna
  trials without their Tune trial and the reverse;
- exact: completed trials whose final weights `torch.equal` those of the reference trial
  with the same parameters;
- work lost per fault, in steps: the last step each hit run logged minus the step its trial's
  next run resumed from (all of them for a trial that never ran again), against the
  checkpoint interval (a reported checkpoint per epoch: with S3 storage, what a retry reads).
Last line: `chaos: faults=N survived=N lost=0 duplicated=0 exact=K/K ...`.
`--small` (CI): one fault of each kind, the fixed seed 0, 3 trials of 5 epochs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only

import psutil  # noqa: E402
import yaml  # noqa: E402

from cluster_helpers import TUNE, Driver, S3Server, kill_tree, running  # noqa: E402
from common import Column, Table, median, summary_line  # noqa: E402

KINDS = ("worker", "node", "driver", "corrupt", "outage")
FULL = {"worker": 10, "node": 3, "driver": 3, "corrupt": 2, "outage": 1}
SMALL = {kind: 1 for kind in KINDS}
MID_STEP, MID_EVAL, MID_CKPT, BETWEEN = "mid-step", "mid-evaluation", "mid-checkpoint-write", "between trials"
MOMENTS = {"worker": (MID_STEP, MID_EVAL, MID_CKPT), "node": (MID_STEP, MID_EVAL, MID_CKPT, BETWEEN),
           "driver": (MID_CKPT, BETWEEN, MID_STEP), "corrupt": (MID_STEP,), "outage": (MID_STEP,)}
WORKER_NODES = 2
NODE_CPUS = 1
OUTAGE_S = 20
WAIT_S = 300  # for any one thing the injector waits on
IMAGE_SIZE = 128
BATCH_SIZE = 8

STEP = re.compile(r" DEBUG step (\d+) \(epoch (\d+), batch (\d+)/(\d+)\)")
TRAINED = re.compile(r" INFO epoch (\d+)/(\d+): loss ")
EVALUATED = re.compile(r" INFO epoch (\d+)/(\d+): (?!loss )")
RESUMED = re.compile(r"resumed from (\S+): epoch \d+, step (\d+), batch \d+")
PID = re.compile(r"rank 0 of \d+, pid (\d+)")


# ----------------------------------------------------------------------------- the schedule


@dataclass
class Fault:
    kind: str
    moment: str
    variant: str = ""  # corrupt: truncated / bit-flipped
    injected: bool = False
    hit: list[tuple[str, Path]] = field(default_factory=list)  # (trial id, the engine run it killed)
    survived: bool = False
    lost_steps: list[int] = field(default_factory=list)


def schedule(counts: dict[str, int], seed: int) -> list[Fault]:
    """Faults in a seeded order; each kind cycles through its moments, a driver kill starts with
    one mid-upload, corruptions alternate between a truncated and a bit-flipped checkpoint."""
    rng = random.Random(seed)
    faults = []
    for kind in KINDS:
        moments = list(MOMENTS[kind])
        first, rest = moments[:1], moments[1:]
        rng.shuffle(rest)
        moments = first + rest if kind == "driver" else rng.sample(moments, len(moments))
        for index in range(counts.get(kind, 0)):
            variant = ("truncated", "bit-flipped")[index % 2] if kind == "corrupt" else ""
            faults.append(Fault(kind, moments[index % len(moments)], variant))
    rng.shuffle(faults)
    return faults


# ----------------------------------------------------------------------------- what the engine logs


@dataclass(frozen=True)
class EngineRun:
    """One run of a trial (one process), read from its train.log in the node-local scratch dir."""

    trial_id: str
    path: Path
    pid: int | None
    last_step: int  # global steps done that it logged
    phase: str | None  # MID_STEP, MID_EVAL, MID_CKPT or None (not training)
    resumed_step: int | None  # the step it restored, None when it started fresh


def read_run(trial_id: str, path: Path) -> EngineRun:
    try:
        text = (path / "train.log").read_text(errors="replace")
    except OSError:
        text = ""
    pid = PID.search(text)
    resumed = RESUMED.search(text)
    last_step, phase = 0, None
    for line in text.splitlines():
        if match := STEP.search(line):
            last_step = int(match[1])
            phase = MID_STEP if int(match[3]) < int(match[4]) else None  # an epoch's last step: it evaluates next
        elif TRAINED.search(line):
            phase = MID_EVAL
        elif EVALUATED.search(line):
            phase = MID_CKPT  # checkpoint written before evaluation's hooks; the report uploads it now
    return EngineRun(trial_id, path, int(pid[1]) if pid else None, last_step, phase,
                     int(resumed[2]) if resumed else None)


def engine_runs(scratch: Path) -> dict[str, list[EngineRun]]:
    """Every trial's runs, oldest first."""
    runs: dict[str, list[EngineRun]] = {}
    for trial_dir in sorted(scratch.glob("trial_*")):
        trial_id = trial_dir.name.removeprefix("trial_")
        paths = sorted(trial_dir.glob("run-*"), key=lambda p: p.stat().st_ctime_ns)
        runs[trial_id] = [read_run(trial_id, p) for p in paths]
    return runs


def live_runs(scratch: Path) -> list[EngineRun]:
    """The newest run of each trial whose process is alive."""
    return [trial_runs[-1] for trial_runs in engine_runs(scratch).values()
            if trial_runs and trial_runs[-1].pid is not None and running(trial_runs[-1].pid)]


# ----------------------------------------------------------------------------- the injector


class Chaos:
    """Injects the faults into the chaos sweep, one at a time."""

    def __init__(self, cluster, s3: S3Server, driver_args: list[str], env: dict[str, str], scratch: Path,
                 experiment_prefix: str, rng: random.Random) -> None:
        self.cluster, self.s3, self.driver_args, self.env = cluster, s3, driver_args, env
        self.scratch, self.prefix, self.rng = scratch, experiment_prefix, rng
        self.driver = Driver(driver_args, env)
        self.drivers = [self.driver]

    def sweep_over(self) -> bool:
        return self.driver.proc.poll() is not None

    def wait_for_moment(self, moment: str, ready=lambda run: True) -> EngineRun | None:
        """A live run at `moment` for which `ready(run)` holds (for BETWEEN: any live run, right
        after a trial finished); None if the sweep ended first."""
        deadline = time.monotonic() + WAIT_S
        seen = len(self._finished()) if moment == BETWEEN else 0
        while time.monotonic() < deadline and not self.sweep_over():
            if moment == BETWEEN:
                finished = self._finished()
                if len(finished) > seen:  # a trial just ended: hit one that trains on
                    alive = [run for run in live_runs(self.scratch) if run.trial_id not in finished]
                    return alive[0] if alive else EngineRun("", self.scratch, None, 0, None, None)
            else:
                for run in live_runs(self.scratch):
                    if run.phase == moment and (moment != MID_STEP or run.last_step > (run.resumed_step or 0)) \
                            and ready(run):
                        return run
            time.sleep(0.02)
        return None

    def _finished(self) -> set[str]:
        """The trials the driver (this one or an earlier) said ended."""
        for driver in self.drivers:
            driver._drain()
        return {match[1] for driver in self.drivers for line in driver.seen
                if (match := re.match(r"^trial (\S+) (completed|pruned|errored) after", line))}

    def inject(self, fault: Fault) -> None:
        # a corruption needs an older checkpoint to fall back to
        ready = (lambda run: len(self._checkpoints(run.trial_id)) >= 2) if fault.kind == "corrupt" \
            else (lambda run: True)
        victim = self.wait_for_moment(fault.moment, ready)
        if victim is None:
            return
        if fault.kind == "corrupt":
            self._corrupt_newest(victim.trial_id, fault.variant)
        before = {run.trial_id: run for run in live_runs(self.scratch)}
        if fault.kind in ("worker", "corrupt"):
            os.kill(victim.pid, signal.SIGKILL)
            hit = [victim]
        elif fault.kind == "node":
            hit = self._lose_node(victim, before)
        elif fault.kind == "driver":
            hit = list(before.values())
            self.driver.kill()
            # Ray ends the dead driver's trial processes when it notices (slowly on a loaded
            # machine); a resumed trial must not train beside its old self
            deadline = time.monotonic() + WAIT_S
            while any(run.pid and running(run.pid) for run in hit) and time.monotonic() < deadline:
                time.sleep(0.2)
            self.driver = Driver([*self.driver_args, "--resume"], self.env)
            self.drivers.append(self.driver)
        else:
            hit = list(before.values())
            self.s3.server.stop()
            time.sleep(OUTAGE_S)
            self._restart_s3()
        fault.injected = True
        fault.hit = [(run.trial_id, run.path) for run in hit if run.trial_id]
        if fault.kind == "driver":  # the next fault hits the resumed sweep, not its start
            self.driver.wait_for(r"^resuming sweep ", timeout=WAIT_S)
        time.sleep(self.rng.uniform(0.0, 2.0))  # the next fault at a moment of its own

    def _lose_node(self, victim: EngineRun, alive: dict[str, EngineRun]) -> list[EngineRun]:
        """Kill the raylet hosting the victim and every process below it; add a replacement."""
        node = raylet = None
        try:
            parents = {p.pid for p in psutil.Process(victim.pid).parents()} if victim.pid is not None else set()
        except psutil.NoSuchProcess:
            parents = set()
        for worker_node in self.cluster.worker_nodes:
            pid = worker_node.all_processes["raylet"][0].process.pid
            if pid in parents:
                node, raylet = worker_node, pid
        if node is None:  # between trials with nothing running: any worker node
            node = next(iter(self.cluster.worker_nodes))
            raylet = node.all_processes["raylet"][0].process.pid
        below = {p.pid for p in psutil.Process(raylet).children(recursive=True)}
        kill_tree(raylet)
        self.cluster.remove_node(node, allow_graceful=False)
        self.cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=80 * 2**20)
        return [run for run in alive.values() if run.pid in below]

    def _checkpoints(self, trial_id: str) -> list[str]:
        """The state.pt keys of the trial's checkpoints in storage, oldest first."""
        return sorted(key for key in self.s3.keys(f"{self.prefix}/trial_{trial_id}/")
                      if re.search(r"/checkpoint_\d+/state\.pt$", key))

    def _corrupt_newest(self, trial_id: str, variant: str) -> None:
        """Damage the newest checkpoint Tune holds for the trial (its state.pt)."""
        newest = self._checkpoints(trial_id)[-1]
        data = bytearray(self.s3.read(newest))
        if variant == "truncated":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x10
        with self.s3.filesystem().open_output_stream(f"{self.s3.bucket}/{newest}") as stream:
            stream.write(bytes(data))

    def _restart_s3(self) -> None:
        from moto.server import ThreadedMotoServer

        self.s3.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3.port, verbose=False)
        self.s3.server.start()  # moto keeps its buckets in this process: the data is all still there

    def stop(self) -> None:
        for driver in self.drivers:
            driver.kill()


# ----------------------------------------------------------------------------- the checks


def study_trials(journal: bytes, scratch: Path):
    import optuna

    path = scratch / f"journal-{time.monotonic_ns()}"
    path.write_bytes(journal)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).trials


def final_weights(s3: S3Server, prefix: str, trial_id: str):
    """The model state of the trial's newest verified checkpoint in storage."""
    import torch

    from psdet import checkpoint as ckpt

    keys = s3.keys(f"{prefix}/trial_{trial_id}/")
    metas = [key for key in keys if re.search(r"/checkpoint_\d+/meta\.json$", key)]
    by_step = sorted(metas, key=lambda key: json.loads(s3.read(key))["step"], reverse=True)
    with tempfile.TemporaryDirectory(prefix="chaos-ckpt-") as tmp:
        for directory in (key.rsplit("/", 1)[0] for key in by_step):
            local = Path(tmp, directory.rsplit("/", 1)[1])
            local.mkdir()
            for name in (ckpt.META_FILE, ckpt.STATE_FILE):
                (local / name).write_bytes(s3.read(f"{directory}/{name}"))
            try:
                state, _ = ckpt.load_checkpoint(local)
            except Exception:
                continue
            return state["model"]
    raise RuntimeError(f"no valid checkpoint for trial {trial_id} under {prefix}")


def params_of(row: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in row.items() if "." in k and v is not None))


def check(faults: list[Fault], s3: S3Server, name: str, reference: str, num_samples: int, scratch: Path,
          finished: bool, drivers: list[Driver]) -> dict:
    import pyarrow.parquet as pq
    import torch

    prefix = f"sweeps/{name}"
    rows = pq.read_table(io.BytesIO(s3.read(f"{prefix}/results.parquet"))).to_pylist() if finished else []
    ended = [row for row in rows if row["status"] in ("completed", "pruned")
             or (row["status"] == "errored" and row.get("error"))]
    lost = num_samples - len(ended)
    params = [params_of(row) for row in rows]
    duplicated = len(params) - len(set(params))
    tune_ids: set[str] = set()
    if finished:
        study = study_trials(s3.read(f"{prefix}/optuna.journal"), scratch)
        tracked = {t.user_attrs.get("tune_trial_id") for t in study if t.state.name in ("COMPLETE", "PRUNED")}
        tune_ids = {row["trial_id"] for row in rows if row["status"] in ("completed", "pruned")}
        duplicated += len(tracked ^ tune_ids)
    reference_rows = {params_of(row): row for row in
                      pq.read_table(io.BytesIO(s3.read(f"sweeps/{reference}/results.parquet"))).to_pylist()}
    completed = [row for row in rows if row["status"] == "completed"]
    matched = set()  # completed trials whose final weights equal their reference twin's
    for row in completed:
        twin = reference_rows.get(params_of(row))
        if twin is None:
            continue
        ours, theirs = final_weights(s3, prefix, row["trial_id"]), final_weights(s3, f"sweeps/{reference}",
                                                                               twin["trial_id"])
        if ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours):
            matched.add(row["trial_id"])
    exact = len(matched)
    statuses = {row["trial_id"]: row["status"] for row in rows}
    runs = engine_runs(scratch)
    ledger = json.loads(s3.read(f"{prefix}/trials.json")) if finished else {}
    # A trial the killed driver started after Tune's last save is abandoned; a new trial with
    # its parameters continues it from its checkpoint (orchestrate.results.adoptable).
    successor = {tid: record["continued_by"] for tid, record in ledger.items()
                 if record["status"] == "abandoned" and record.get("continued_by")}
    for fault in faults:
        if not fault.injected:
            continue
        fault.survived = finished and all(statuses.get(successor.get(trial_id, trial_id)) == "completed"
                                          for trial_id, _ in fault.hit)
        for trial_id, path in fault.hit:
            trial_runs = runs.get(trial_id, [])
            index = next(i for i, run in enumerate(trial_runs) if run.path == path)
            hit_run = trial_runs[index]
            later = trial_runs[index + 1:] or runs.get(successor.get(trial_id, ""), [])
            if later:
                resumed = later[0].resumed_step or 0
            else:  # never ran again: nothing lost if this run had finished it, else all of it
                resumed = hit_run.last_step if statuses.get(trial_id) == "completed" else 0
            fault.lost_steps.append(max(hit_run.last_step - resumed, 0))
    for trial_id, record in ledger.items():  # what a lost or duplicated trial went through, to find out why
        if record["status"] not in ("completed", "pruned", "errored") or trial_id not in tune_ids:
            print(f"trial {trial_id} in trials.json: status {record['status']}, epochs {record['epochs']}, "
                  f"restarts {record['restarts']}; the drivers said:")
            for number, driver in enumerate(drivers, start=1):
                for line in driver.seen:
                    if (trial_id in line and not re.search(r" epoch \d+/", line)) or "resuming" in line:
                        print(f"  driver {number}: {line[:200]}")
    for row in rows:
        print(f"trial {row['trial_id']}: {row['status']}{' (' + str(row.get('error')) + ')' if row.get('error') else ''}, "
              f"{len(runs.get(row['trial_id'], []))} run(s), restarts {row.get('restarts')}, "
              f"{'bit-exact' if row['trial_id'] in matched else 'NOT bit-exact' if row['status'] == 'completed' else '-'}; "
              f"{dict(params_of(row))}")
    return {"rows": rows, "lost": lost, "duplicated": duplicated, "exact": exact, "completed": len(completed)}


# ----------------------------------------------------------------------------- main


def write_space(path: Path, args, name: str) -> Path:
    space = {
        "experiment": {
            "name": name, "base_config": "ps_gat_tiny",
            "overrides": {"data.image_size": IMAGE_SIZE, "data.batch_size": BATCH_SIZE,
                          "data.val_batch_size": BATCH_SIZE, "train.epochs": args.epochs,
                          "train.log_interval": 1, "train.progress": False},
            "metric": "point_ap", "mode": "max", "num_samples": args.trials, "seed": args.seed,
            "max_concurrent": 2, "synthetic_data": {"train": args.images, "val": 8, "seed": 0},
        },
        "search": {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}},
        "scheduler": {"type": "none"},
        "resources": {"workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},
        # a trial is its worker: each fault that hits it is one failure Tune retries
        "fault_tolerance": {"worker_max_failures": 10, "trial_max_failures": 10, "checkpoints_kept": 3},
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for part in text.split(","):
        kind, _, number = part.partition("=")
        if kind not in KINDS or not number.isdigit():
            raise SystemExit(f"chaos: --faults: '{part}' is not KIND=N with KIND one of {', '.join(KINDS)}")
        counts[kind] = int(number)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CI smoke test: one fault of each kind, 3 trials")
    parser.add_argument("--seed", type=int, default=0, help="the fault schedule's and the sweep's seed")
    parser.add_argument("--faults", default=None, help="KIND=N,... (default: the full schedule, "
                        + ",".join(f"{k}={v}" for k, v in FULL.items()) + ")")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--images", type=int, default=32, help="synthetic training images")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, scratch) to look into")
    args = parser.parse_args()
    counts = parse_counts(args.faults) if args.faults else (SMALL if args.small else FULL)
    args.trials = args.trials or (3 if args.small else 6)
    args.epochs = args.epochs or (5 if args.small else 8)
    sys.exit(run(args, counts))


def run(args, counts: dict[str, int]) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))  # short: Ray's socket paths
    scratch_tmp = workdir / "tmp"
    scratch_tmp.mkdir()
    token = workdir / "auth_token"
    token.write_text(os.urandom(32).hex())
    env_vars = {
        "TMPDIR": str(scratch_tmp), "XDG_CACHE_HOME": str(workdir / "cache"), "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        # a node of a loaded 2-core machine can take longer than the default 30 s to register
        "RAY_raylet_start_wait_time_s": os.environ.get("RAY_raylet_start_wait_time_s", "180"),
    }
    os.environ.update(env_vars)  # the nodes' processes start from this one's environment
    env = {**os.environ}
    faults = schedule(counts, args.seed)
    rng = random.Random(args.seed)
    s3 = S3Server()
    cluster = chaos = None
    try:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False})
        for _ in range(WORKER_NODES):
            cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=80 * 2**20)
        steps_per_epoch = args.images // BATCH_SIZE
        print(f"chaos: Ray cluster of a head and {WORKER_NODES} worker nodes x {NODE_CPUS} CPU on 127.0.0.1, "
              f"S3 on moto (127.0.0.1:{s3.port}), {os.cpu_count()} cores; sweep: {args.trials} one-worker trials "
              f"of ps_gat_tiny {IMAGE_SIZE}x{IMAGE_SIZE}, {args.epochs} epochs x {steps_per_epoch} steps, "
              f"2 at a time, a checkpoint reported per epoch; seed {args.seed}", flush=True)
        print("faults: " + ", ".join(f"{f.kind} ({f.moment}{', ' + f.variant if f.variant else ''})" for f in faults),
              flush=True)
        common = ["--address", cluster.address, "--storage", s3.uri("sweeps")]
        started = time.monotonic()
        reference = Driver([*TUNE, "--space", write_space(workdir / "reference.yaml", args, "reference"), *common],
                           env)
        try:
            if reference.wait(timeout=WAIT_S * 4) != 0:
                raise SystemExit(f"chaos: the reference sweep failed:\n{reference.tail(40)}")
        finally:
            reference.kill()
        reference_s = time.monotonic() - started
        print(f"reference sweep: {reference_s:.0f} s", flush=True)

        scratch = scratch_tmp / "psdet-sweeps" / "chaos"
        space = write_space(workdir / "chaos.yaml", args, "chaos")
        chaos = Chaos(cluster, s3, [*TUNE, "--space", space, *common], env, scratch, "sweeps/chaos", rng)
        started = time.monotonic()
        for index, fault in enumerate(faults, start=1):
            chaos.inject(fault)
            print(f"fault {index}/{len(faults)}: {fault.kind} ({fault.moment}): "
                  + (f"hit {', '.join(t for t, _ in fault.hit) or 'no trial'}" if fault.injected
                     else "not injected (the sweep ended first)"), flush=True)
        code = chaos.driver.wait(timeout=WAIT_S * 4)
        chaos_s = time.monotonic() - started
        finished = code == 0
        print(f"chaos sweep: {chaos_s:.0f} s, {len(chaos.drivers)} driver(s), the last exited {code}", flush=True)
        if not finished:
            print(chaos.driver.tail(40), flush=True)
        for driver in chaos.drivers:
            driver._drain()
        found = check(faults, s3, "chaos", "reference", args.trials, scratch, finished, chaos.drivers)
    finally:
        if chaos is not None:
            chaos.stop()
        if cluster is not None:
            cluster.shutdown()
        s3.stop()
        if args.keep:
            for number, driver in enumerate(chaos.drivers if chaos is not None else [], start=1):
                driver._drain()
                (workdir / f"driver-{number}.log").write_text("\n".join(driver.seen) + "\n")
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report(faults, found, steps_per_epoch)


def report(faults: list[Fault], found: dict, interval: int) -> int:
    print()
    table = Table(Column("fault", "<8"), Column("injected", "8d"), Column("survived", "8d"),
                  Column("moments", "<48"), Column("lost steps median", "17.1f"), Column("max", "3d"))
    table.print_header()
    for kind in KINDS:
        of_kind = [f for f in faults if f.kind == kind]
        if not of_kind:
            continue
        injected = [f for f in of_kind if f.injected]
        lost = [steps for f in injected for steps in f.lost_steps]
        moments = ", ".join(sorted({f.moment for f in injected})) or "-"
        table.print_row(kind, len(injected), sum(f.survived for f in injected), moments,
                        median(lost) if lost else float("nan"), max(lost) if lost else 0)
    injected = [f for f in faults if f.injected]
    lost_steps = [steps for f in injected for steps in f.lost_steps]
    print(f"\ntrials: {len(found['rows'])} in the results, lost {found['lost']}, duplicated {found['duplicated']}; "
          f"bit-exact against the fault-free run: {found['exact']} of {found['completed']} completed")
    print(f"work lost per hit trial: median {median(lost_steps) if lost_steps else 0:.1f} steps, "
          f"max {max(lost_steps, default=0)}, checkpoint interval {interval} steps")
    print(summary_line("chaos", faults=len(injected), survived=sum(f.survived for f in injected),
                       lost=found["lost"], duplicated=found["duplicated"],
                       exact=f"{found['exact']}/{found['completed']}", scheduled=len(faults),
                       lost_steps_median=f"{median(lost_steps) if lost_steps else 0:.1f}",
                       lost_steps_max=max(lost_steps, default=0), ckpt_interval_steps=interval))
    return 0


if __name__ == "__main__":
    main()
