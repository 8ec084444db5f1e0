"""Recovery: SIGKILL one Ray Train worker mid-epoch; how long until training resumes, what is lost.

    python benchmarks/recovery.py [--small] [--ckpt-every-steps N] [--ray-only] [--bare-step-s S]

Ours: one Tune trial built as the sweep builds it (orchestrate.trial.build_trainer: its
failure and checkpoint config) runs psdet.engine on ps_gat_tiny at 128x128 on synthetic
images, 2 workers x 0.5 CPU, on a local Ray (loopback only, 2 CPUs). The workers run
orchestrate.trial.train_loop_per_worker, watched through engine hooks (psdet.hooks):
- `after_step` appends (time, global steps done) to a per-process file after every step
  (a restore brings the global step back);
- `on_restore` stamps when a restore loaded and which step it restored; `on_evaluation`,
  after the reporter's, when each report returned;
- each worker process stamps its start (pid, rank) when the training loop is entered,
  and whether Ray had registered a checkpoint to offer it.
Bare (first, full size only): a bare `TorchTrainer` with the same workers and failure
config whose loop holds no psdet (a sleep and an all_reduce per step, a one-file
checkpoint per epoch): Ray's own floor, measured in the same run.
The driver watches the stamp files and, three quarters into epochs 2, 4, ..., sends
SIGKILL to one worker (rank 1, then rank 0). Ray Train restarts the worker group
(`FailureConfig(max_failures)` of search_spaces/optimizer.yaml) and the loop resumes from the
newer of the checkpoint Ray registered last and the engine's own newest one
(`RayResume`, orchestrate/ray_reporter.py). Per kill:
- recovery: the kill to the first step a restarted worker completes, split into the kill
  to the new workers entering the loop (Ray), to the checkpoint loaded, to the step;
- lost: steps completed before the kill minus the restored checkpoint's step; beside it,
  how long before the kill the last report returned and whether Ray had registered any
  checkpoint (Train V2 registers a report when its controller next polls the workers,
  every 2 s: a report made just before a crash can be lost).
The checkpoint interval is the engine's: every epoch (ps_gat_tiny's `ckpt_interval` 1),
or `--ckpt-every-steps N` for the engine's mid-epoch checkpoints too. `--ray-only`
resumes from Ray's registered checkpoint alone (`RayResume` without the engine's
checkpoint folder): the comparison that shows what the engine's own checkpoints save.
Last line: `recovery: recovery_s=... lost_steps=... ckpt_interval_steps=...` for ours
(median recovery, most steps lost over the kills). `--small`: one kill of ours, fewer images.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only

from common import (  # noqa: E402
    Column, Table, deadline, local_ray, median, ours_trial, run_tuner, summary_line, trial_setup, write_stamp,
)

NUM_CPUS = 2
SPACE = ROOT / "search_spaces" / "optimizer.yaml"  # 2 workers x 0.5 CPU, worker_max_failures 2
IMAGE_SIZE = 128
BATCH_SIZE = 8  # global: 4 per worker
WAIT_S = 300  # for any one event the driver waits on
BARE_STEP_S = 0.2  # the bare loop's step, about ours at this size


# ----------------------------------------------------------------------------- the worker loop (runs in Ray workers)


def instrumented_engine_loop(loop_config: dict) -> None:
    """orchestrate.trial.train_loop_per_worker, with step, restore, report and start stamps
    written by engine hooks."""
    entered = time.time()  # before the imports: they are part of the loop's restart cost
    import ray.train

    from orchestrate import trial
    from psdet.hooks import Hook

    stamps = Path(loop_config["stamp_dir"])
    rank, pid = ray.train.get_context().get_world_rank(), os.getpid()
    write_stamp(stamps, f"start-{pid}", pid=pid, rank=rank, time=entered)

    class Stamps(Hook):
        """(time, global steps done) after every step and every report, one line each, and the restore."""

        def __init__(self) -> None:
            self.steps_file = open(stamps / f"steps-{pid}-rank{rank}.txt", "a", buffering=1)  # at the OS at once
            self.reports_file = open(stamps / f"reports-{pid}.txt", "a", buffering=1)

        def after_step(self, run, step) -> None:
            self.steps_file.write(f"{time.time():.6f} {step + 1}\n")

        def on_restore(self, run, checkpoint) -> None:
            write_stamp(stamps, f"restore-{pid}", pid=pid, rank=rank, time=time.time(), step=run.position.step,
                        path=str(checkpoint))

        def on_evaluation(self, run, metrics, checkpoint) -> None:  # after the reporter's, which runs first
            self.reports_file.write(f"{time.time():.6f} {int(metrics['step'])}\n")

        def after_train(self, run) -> None:
            self.steps_file.close()
            self.reports_file.close()

    registered = ray.train.get_checkpoint()  # whether Ray has a checkpoint to offer this worker group
    write_stamp(stamps, f"resume-{pid}", pid=pid, rank=rank, time=time.time(),
                path=registered.path if registered else None)
    if loop_config["ray_only"]:
        loop_config = dict(loop_config, resume_from_engine=False)
    trial.train_loop_per_worker(loop_config, hooks=[Stamps()])


def bare_loop(loop_config: dict) -> None:
    """Ray's floor: a loop with no psdet in it. Each step sleeps `step_s` and all-reduces one
    number (so a survivor blocks as under DDP); every `steps_per_epoch` steps rank 0
    reports a one-file checkpoint holding the step. The same stamps as the engine loop."""
    entered = time.time()
    import tempfile

    import ray.train
    import torch
    import torch.distributed as dist

    stamps = Path(loop_config["stamp_dir"])
    rank, pid = ray.train.get_context().get_world_rank(), os.getpid()
    write_stamp(stamps, f"start-{pid}", pid=pid, rank=rank, time=entered)
    steps_file = open(stamps / f"steps-{pid}-rank{rank}.txt", "a", buffering=1)
    reports_file = open(stamps / f"reports-{pid}.txt", "a", buffering=1)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    write_stamp(stamps, f"resume-{pid}", pid=pid, rank=rank, time=time.time(),
                path=checkpoint.path if checkpoint is not None else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = int(Path(directory, "step.txt").read_text())
        write_stamp(stamps, f"restore-{pid}", pid=pid, rank=rank, time=time.time(), step=step, path=checkpoint.path)
    while step < loop_config["total_steps"]:
        time.sleep(loop_config["step_s"])
        dist.all_reduce(torch.ones(1))
        step += 1
        steps_file.write(f"{time.time():.6f} {step}\n")
        if step % loop_config["steps_per_epoch"] == 0:
            with tempfile.TemporaryDirectory() as directory:
                saved = None
                if rank == 0:
                    Path(directory, "step.txt").write_text(str(step))
                    saved = ray.train.Checkpoint.from_directory(directory)
                ray.train.report({"step": step}, checkpoint=saved)
            reports_file.write(f"{time.time():.6f} {step}\n")


# ----------------------------------------------------------------------------- the driver's view of the stamps


class Stamps:
    """Reads what the workers wrote: per process its rank, steps, reports, resume and restore."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def processes(self) -> dict[int, dict]:
        found = {}
        for path in self.directory.glob("start-*.json"):
            record = json.loads(path.read_text())
            found[record["pid"]] = record
        return found

    def steps(self, pid: int) -> list[tuple[float, int]]:
        """(time, global step) of each step process `pid` completed."""
        paths = list(self.directory.glob(f"steps-{pid}-rank*.txt"))
        if not paths:
            return []
        rows = []
        for line in paths[0].read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:  # a line cut by the kill is skipped
                rows.append((float(parts[0]), int(parts[1])))
        return rows

    def last_report_before(self, moment: float) -> float | None:
        """When the last `report` any worker returned from before `moment` did so."""
        ends = []
        for path in self.directory.glob("reports-*.txt"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and float(parts[0]) < moment:
                    ends.append(float(parts[0]))
        return max(ends, default=None)

    def stamp(self, kind: str, pid: int) -> dict | None:
        """The `restore` or `resume` stamp of process `pid`, if it wrote one."""
        path = self.directory / f"{kind}-{pid}.json"
        return json.loads(path.read_text()) if path.exists() else None


def wait_for(condition, what: str, failed: threading.Event):
    """Poll `condition()` until it returns something truthy; None if the trial ended first."""
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if failed.is_set():
            return None
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"recovery: waited {WAIT_S} s for {what}")


def kill_and_measure(stamps: Stamps, kills: int, steps_per_epoch: int, results: list[dict],
                     errors: list[BaseException], trial_over: threading.Event) -> None:
    """The driver's killer thread: `kills` times, SIGKILL one worker 3/4 into an even epoch, then
    measure the restart."""
    try:
        for index in range(kills):
            victim_rank = 1 if index % 2 == 0 else 0
            kill_at = steps_per_epoch * (2 * index + 1) + math.ceil(0.75 * steps_per_epoch)  # epoch 2, 4, ...
            generation = stamps.processes()

            def victim_ready():
                for pid, record in stamps.processes().items():
                    steps = stamps.steps(pid)
                    if record["rank"] == victim_rank and steps and steps[-1][1] >= kill_at:
                        return pid
                return None

            victim = wait_for(victim_ready, f"rank {victim_rank} to reach step {kill_at}", trial_over)
            if victim is None:
                return
            generation = stamps.processes()
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            time.sleep(1.0)  # a step the survivor was finishing still counts as done
            done_before = max((s[-1][1] for s in map(stamps.steps, generation) if s), default=0)

            def first_new_step():
                new = [pid for pid in stamps.processes() if pid not in generation]
                steps = [stamps.steps(pid) for pid in new]
                firsts = [s[0] for s in steps if s]
                return (new, min(firsts)) if firsts else None

            found = wait_for(first_new_step, "a restarted worker's first step", trial_over)
            if found is None:
                raise RuntimeError("the trial ended before a restarted worker made a step")
            new_pids, (first_step_time, first_step) = found
            starts = [stamps.processes()[pid]["time"] for pid in new_pids]
            restores = [r for pid in new_pids if (r := stamps.stamp("restore", pid)) is not None]
            restored_step = restores[0]["step"] if restores else 0  # none: started over from step 0
            offered = [r["path"] for pid in new_pids if (r := stamps.stamp("resume", pid)) is not None]
            results.append({
                "kill": index + 1, "victim_rank": victim_rank, "kill_at": kill_at, "done_before": done_before,
                "offered": "yes" if offered and offered[0] else "none",
                "since_report": killed_at - (stamps.last_report_before(killed_at) or float("nan")),
                "restored_step": restored_step, "first_step": first_step,
                "to_start": min(starts) - killed_at,
                "to_restored": min(r["time"] for r in restores) - killed_at if restores else float("nan"),
                "recovery": first_step_time - killed_at,
            })
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def measure(variant: str, run, stamp_dir: Path, kills: int, steps_per_epoch: int, timeout_s: int) -> list[dict]:
    """Run one trial (`run()`, blocking) while the killer thread kills and measures; -> per-kill rows."""
    stamp_dir.mkdir()
    results: list[dict] = []
    errors: list[BaseException] = []
    trial_over = threading.Event()
    killer = threading.Thread(target=kill_and_measure, daemon=True,
                              args=(Stamps(stamp_dir), kills, steps_per_epoch, results, errors, trial_over))
    killer.start()
    try:  # Ray's messages about the killed worker go to stderr with Tune's, the table stays on stdout
        with deadline(timeout_s, f"the {variant} trial"), contextlib.redirect_stdout(sys.stderr):
            run()
    finally:
        trial_over.set()
        killer.join(timeout=30)
    if errors:
        raise errors[0]
    if len(results) < kills:
        raise SystemExit(f"recovery: only {len(results)} of {kills} kills of the {variant} trial were measured")
    return [dict(row, variant=variant) for row in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CI smoke test: one kill of ours only, fewer images")
    parser.add_argument("--ckpt-every-steps", type=int, default=0,
                        help="engine mid-epoch checkpoints every N steps (default 0: every epoch only)")
    parser.add_argument("--bare-step-s", type=float, default=BARE_STEP_S,
                        help=f"the bare loop's step, seconds (default {BARE_STEP_S})")
    parser.add_argument("--ray-only", action="store_true",
                        help="resume from Ray's registered checkpoint alone, not the engine's newer one")
    args = parser.parse_args()

    import ray
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer

    from orchestrate.data import ensure_synthetic
    from orchestrate.space import SyntheticData, load_space
    from psdet.config import load_config, to_dict

    spec = load_space(SPACE)
    kills = 1 if args.small else min(2, spec.fault_tolerance.worker_max_failures)
    synthetic = SyntheticData(train=32 if args.small else 64, val=8, seed=0)
    steps_per_epoch = synthetic.train // BATCH_SIZE
    epochs = 2 * kills + 1
    data_root, _ = ensure_synthetic(synthetic)
    cfg = load_config("ps_gat_tiny", [
        f"data.root={data_root}", f"data.image_size={IMAGE_SIZE}", f"data.batch_size={BATCH_SIZE}",
        f"data.val_batch_size={BATCH_SIZE}", f"train.epochs={epochs}", "train.progress=false",
        f"train.ckpt_every_steps={args.ckpt_every_steps}", "train.log_interval=2",
    ])
    interval = args.ckpt_every_steps or steps_per_epoch * cfg.train.ckpt_interval
    timeout_s = WAIT_S * (kills + 2)
    resources = spec.resources

    with tempfile.TemporaryDirectory(prefix="psdet-recovery-") as tmp, local_ray(NUM_CPUS) as dashboard:
        print(f"recovery, Ray {ray.__version__} (Train V2), local Ray with {NUM_CPUS} CPUs on 127.0.0.1 "
              f"(dashboard {dashboard}), {os.cpu_count()} cores")
        print(f"ours: ps_gat_tiny {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH_SIZE} over {resources.workers} workers x "
              f"{resources.cpus_per_worker} CPU, {synthetic.train} images = {steps_per_epoch} steps/epoch, "
              f"checkpoint every {interval} steps, {epochs} epochs; {kills} kill(s) per trial, "
              f"FailureConfig(max_failures={spec.fault_tolerance.worker_max_failures}), resuming from "
              + ("Ray's latest checkpoint alone (--ray-only)" if args.ray_only
                 else "the newer of Ray's and the engine's newest checkpoint (orchestrate/ray_reporter.py)"),
              flush=True)
        storage = str(Path(tmp, "storage"))
        rows = []
        if not args.small:
            print(f"bare: the same workers, {args.bare_step_s} s sleep + all_reduce per step, a checkpoint per "
                  f"{steps_per_epoch} steps", flush=True)
            bare_config = {"stamp_dir": str(Path(tmp, "bare")), "total_steps": steps_per_epoch * epochs,
                           "steps_per_epoch": steps_per_epoch, "step_s": args.bare_step_s}
            trainer = TorchTrainer(
                bare_loop, train_loop_config=bare_config,
                scaling_config=ray.train.ScalingConfig(num_workers=resources.workers,
                                                       resources_per_worker={"CPU": resources.cpus_per_worker}),
                run_config=ray.train.RunConfig(
                    storage_path=storage, name="bare",
                    failure_config=ray.train.FailureConfig(max_failures=spec.fault_tolerance.worker_max_failures)),
            )
            rows += measure("bare", trainer.fit, Path(bare_config["stamp_dir"]), kills, steps_per_epoch, timeout_s)
        setup = trial_setup(SPACE, str(Path(storage, "ours")), str(data_root))
        loop_config = {"config": to_dict(cfg), "synthetic": None, "stamp_dir": str(Path(tmp, "ours")), "label": "ours",
                       "ray_only": args.ray_only}
        function = tune.with_parameters(ours_trial, setup=setup, loop=instrumented_engine_loop, loop_config=loop_config)
        rows += measure("ours", lambda: run_tuner(function, storage, "ours", resources.driver_cpus, timeout_s),
                        Path(loop_config["stamp_dir"]), kills, steps_per_epoch, timeout_s)
    print()

    table = Table(Column("variant", "<7"), Column("kill", "4d"), Column("rank", "4d"), Column("at step", "7d"),
                  Column("steps done", "10d"), Column("s after report", "14.1f"), Column("Ray had one", "<10"),
                  Column("restored step", "13d"),
                  Column("lost", "4d"),
                  Column("to new workers s", "16.1f"), Column("to restored s", "13.1f"),
                  Column("to first step s", "16.1f"))
    table.print_header()
    for row in rows:
        table.print_row(row["variant"], row["kill"], row["victim_rank"], row["kill_at"], row["done_before"],
                        row["since_report"], row["offered"], row["restored_step"], row["done_before"] - row["restored_step"], row["to_start"],
                        row["to_restored"], row["recovery"])
    ours = [row for row in rows if row["variant"] == "ours"]
    recovery_s = median([row["recovery"] for row in ours])
    lost = max(row["done_before"] - row["restored_step"] for row in ours)
    line = f"\nours: recovery (median) {recovery_s:.1f} s; most steps lost {lost}, checkpoint interval {interval} steps"
    bare_rows = [row for row in rows if row["variant"] == "bare"]
    if bare_rows:
        line += f"; bare: {median([row['recovery'] for row in bare_rows]):.1f} s"
    print(line)
    print(summary_line("recovery", recovery_s=f"{recovery_s:.1f}", lost_steps=lost, ckpt_interval_steps=interval))


if __name__ == "__main__":
    main()
