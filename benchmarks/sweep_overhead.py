"""Sweep overhead: what one trial costs beyond training, ours against a bare Ray Train V2 trainer.

    python benchmarks/sweep_overhead.py [--small]

One local Ray (loopback only, 2 CPUs, started as orchestrate/tune.py starts one). Every
trial has 2 Train workers of 0.5 CPU each (search_spaces/optimizer.yaml's resources).

1. Fixed cost per trial, with a no-op training loop (get the checkpoint to resume from,
   then one report: the place where the first step would run), interleaved rounds:
   - bare: `TorchTrainer(loop).fit()` from the driver, the loop calling
     `ray.train.get_checkpoint()` and `ray.train.report()`;
   - bare in Tune: the same bare trainer inside a one-trial `Tuner` (Tune's own share);
   - ours: a one-trial `Tuner` over a function trainable that builds the trial's trainer
     with `orchestrate.trial.build_trainer` (TuneReport callback, storage layout,
     failure and checkpoint config), the loop going through psdet.engine's reporter
     (`orchestrate.ray_reporter.RayReporter`);
   - ours, 1 worker: the path of one-worker trials (search_spaces/lr.yaml): no trainer,
     the loop runs in the Tune trial's own process (1 CPU) and reports through
     `orchestrate.trial.TuneReporter`.
   Columns: fit() (Tuner.fit() for the Tune variants) to the first step (the last rank's),
   of which inside the training loop (its imports, getting the checkpoint), the last
   rank's report to fit() returning (teardown), and fit() in all. Stamps are wall-clock
   times the workers write.
2. One report with a checkpoint: a real trial, psdet.engine on ps_gat_tiny at its
   defaults (256x256, batch 16, eval and checkpoint every epoch) on 200 + 50 synthetic
   images (`psdet synth`'s defaults), through ours. Rank 0 times every
   `RayReporter.report` and, through an engine hook (`on_checkpoint`), the engine's own
   checkpoint write; the epoch time is the interval between reports (steps + evaluation
   + checkpoint + report). Beside it, Ray's floor: a bare trainer reporting that
   checkpoint, and reporting none, 2.5 s apart.
3. Driver memory: one `Tuner` running back-to-back no-op trials of ours (as a sweep
   does); the driver's RSS after each trial, growth from trial 2 to the last; and the
   seconds per trial in such a sweep (Tune's experiment setup paid once).
4. (full size only) Seconds per trial in sweeps of 3 with Tune's `reuse_actors` off (as
   orchestrate/tune.py runs today) and on, alternating.

Last line: `sweep_overhead: ratio=... floor_ratio=... ours_vs_floor=... report_ckpt_s=...
report_pct_of_epoch=... rss_growth_pct=... sweep_trial_s=...` with ratio = ours / bare, fit()
to teardown end, medians; floor_ratio = bare in Tune / bare (Ray's own floor for a trial of
a sweep), ours_vs_floor = ours / bare in Tune (what our wrapper adds beyond it). `--small`: one round without
"bare in Tune" and without the warm-up trial (so the first, cold trial is in it: its
ratio is no figure), a smaller real trial (128x128, 32 + 8 images), 3 back-to-back one-worker trials in part 3
(a TorchTrainer trial costs about 35 s of process starts on 2 cores; the smoke test checks
the code, not the figure).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only

from ray import tune  # noqa: E402

from common import (  # noqa: E402
    Column, Table, deadline, interleaved, local_ray, median, ours_trial, read_stamp, rss_mib, run_tuner, summary_line,
    trial_setup, write_stamp,
)

NUM_CPUS = 2
TRIAL_TIMEOUT_S = 600
SPACE = ROOT / "search_spaces" / "optimizer.yaml"  # its resources: 2 workers x 0.5 CPU, driver 0.1 CPU
IN_PROCESS = "ours, 1 worker"


# ----------------------------------------------------------------------------- worker loops (run in Ray workers)


def _rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def bare_noop_loop(loop_config: dict) -> None:
    start = time.time()
    import ray.train

    ray.train.get_checkpoint()
    first_step = time.time()
    ray.train.report({"epoch": 1, "step": 1, "loss": 0.0})
    write_stamp(loop_config["stamp_dir"], f"{loop_config['label']}.rank{_rank()}",
                start=start, first_step=first_step, end=time.time())


def ours_noop_loop(loop_config: dict) -> None:
    start = time.time()
    from orchestrate.ray_reporter import TOTAL_EPOCHS, RayReporter, RayResume

    RayResume().latest_checkpoint()
    first_step = time.time()
    RayReporter(extra_metrics={TOTAL_EPOCHS: 1}).report({"epoch": 1, "step": 1, "loss": 0.0}, None)
    write_stamp(loop_config["stamp_dir"], f"{loop_config['label']}.rank{_rank()}",
                start=start, first_step=first_step, end=time.time())


def ours_in_process_noop(params: dict, loop_config: dict) -> None:
    """A one-worker trial's no-op: in the Tune trial process, as orchestrate.trial.train_in_process."""
    start = time.time()
    from orchestrate.trial import TuneReporter, TuneResume

    TuneResume(trial_dir=None).latest_checkpoint()
    first_step = time.time()
    TuneReporter().report({"epoch": 1, "step": 1, "loss": 0.0, "total_epochs": 1}, None)
    write_stamp(loop_config["stamp_dir"], f"{loop_config['label']}.rank0",
                start=start, first_step=first_step, end=time.time())


def bare_report_loop(loop_config: dict) -> None:
    """Ray's floor for a report: `reports` calls of `ray.train.report` with an engine
    checkpoint on rank 0 (as RayReporter passes it), then as many without; rank 0 times each.
    `gap_s` apart: Train V2 takes a report off a worker when it polls it (every 2 s), and a
    report made before the last one was taken waits for that poll."""
    import ray.train

    timings: dict[str, list[float]] = {"with checkpoint": [], "without": []}
    for kind in timings:
        for index in range(loop_config["reports"]):
            time.sleep(loop_config["gap_s"])  # the epoch's work
            checkpoint = None
            if kind == "with checkpoint" and _rank() == 0:
                checkpoint = ray.train.Checkpoint.from_directory(loop_config["checkpoint"])
            start = time.time()
            ray.train.report({"epoch": index + 1}, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)
            timings[kind].append(time.time() - start)
    if _rank() == 0:
        write_stamp(loop_config["stamp_dir"], f"{loop_config['label']}.rank0", **timings)


def timed_engine_loop(loop_config: dict) -> None:
    """orchestrate.trial.train_loop_per_worker, with rank 0 timing each report (a reporter
    that times the trial's own) and each checkpoint write (an engine hook)."""
    from orchestrate.ray_reporter import RayReporter, RayResume
    from psdet.config import config_from_dict
    from psdet.engine import train
    from psdet.hooks import Hook

    cfg = config_from_dict(loop_config["config"], source="benchmark config")
    reports: list[dict] = []
    saves: list[dict] = []

    class TimedReporter(RayReporter):
        def report(self, metrics, checkpoint):
            start = time.time()
            super().report(metrics, checkpoint)
            reports.append({"start": start, "end": time.time(), "checkpoint": checkpoint is not None,
                            "epoch": metrics["epoch"], "images_per_s": metrics["images_per_s"]})

    class CheckpointTimes(Hook):
        def on_checkpoint(self, run, path, seconds):
            size = sum(f.stat().st_size for f in Path(path).iterdir())
            end = time.time()
            saves.append({"start": end - seconds, "end": end, "bytes": size, "path": str(path)})

    start = time.time()
    out_dir = Path(loop_config["out_dir"])
    train(cfg, out_dir, TimedReporter(), resume=RayResume(), hooks=[CheckpointTimes()])
    if _rank() == 0:
        write_stamp(loop_config["stamp_dir"], f"{loop_config['label']}.rank0", start=start, reports=reports, saves=saves)


# ----------------------------------------------------------------------------- trainables (run in Tune trial actors)


def bare_trainer(loop, loop_config: dict, storage_path: str, name: str):
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrate.space import load_space

    resources = load_space(SPACE).resources
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=resources.workers,
                                               resources_per_worker={"CPU": resources.cpus_per_worker}),
        run_config=ray.train.RunConfig(storage_path=storage_path, name=name),
    )


def bare_in_tune_trial(params: dict, loop_config: dict) -> None:
    from orchestrate.trial import TRAIN_RUN_NAME

    bare_trainer(bare_noop_loop, loop_config, tune.get_context().get_trial_dir(), TRAIN_RUN_NAME).fit()


# ----------------------------------------------------------------------------- driver


def tuner(function, work: "Workdir", name: str, num_samples: int = 1, callbacks=None, reuse_actors=False,
          trial_cpus: float | None = None) -> None:
    from orchestrate.space import load_space

    run_tuner(function, work.storage, name, trial_cpus or load_space(SPACE).resources.driver_cpus,
              TRIAL_TIMEOUT_S * num_samples, num_samples, callbacks, reuse_actors)


class Workdir:
    """Storage and stamps of one benchmark run; each trial gets a fresh label."""

    def __init__(self, root: Path) -> None:
        self.storage = str(root / "storage")
        self.stamps = root / "stamps"
        self.stamps.mkdir(parents=True)
        self.count = 0

    def label(self, variant: str) -> str:
        self.count += 1
        return f"{variant.replace(' ', '_')}-{self.count}"

    def worker_stamps(self, label: str) -> list[dict]:
        return [read_stamp(self.stamps, path.stem) for path in sorted(self.stamps.glob(f"{label}.rank*.json"))]


def fixed_cost(work: Workdir, variant: str, costs: dict[str, list[dict]]) -> None:
    """Run one no-op trial of `variant`, append {to_first_step, teardown, total} to costs[variant]."""
    label = work.label(variant)
    loop_config = {"stamp_dir": str(work.stamps), "label": label}
    start = time.time()
    if variant == "bare":
        with deadline(TRIAL_TIMEOUT_S, "bare TorchTrainer.fit()"):
            bare_trainer(bare_noop_loop, loop_config, work.storage, label).fit()
    elif variant == "bare in Tune":
        tuner(tune.with_parameters(bare_in_tune_trial, loop_config=loop_config), work, label)
    elif variant == IN_PROCESS:
        tuner(tune.with_parameters(ours_in_process_noop, loop_config=loop_config), work, label, trial_cpus=1.0)
    else:
        setup = trial_setup(SPACE, str(Path(work.storage, label)))
        tuner(tune.with_parameters(ours_trial, setup=setup, loop=ours_noop_loop, loop_config=loop_config), work, label)
    end = time.time()
    stamps = work.worker_stamps(label)
    first_step = max(s["first_step"] for s in stamps)
    last_report = max(s["end"] for s in stamps)
    in_loop = max(s["first_step"] - s["start"] for s in stamps)
    costs[variant].append({"to_first_step": first_step - start, "in_loop": in_loop, "teardown": end - last_report,
                           "total": end - start})


def bench_fixed_cost(work: Workdir, variants: list[str], rounds: int) -> dict[str, float]:
    """Part 1; -> median total seconds by variant."""
    costs: dict[str, list[dict]] = {variant: [] for variant in variants}
    if rounds > 1:  # one untimed trial first: Ray starts its first worker processes cold
        fixed_cost(work, "bare", {"bare": []})
    interleaved({variant: (lambda variant=variant: fixed_cost(work, variant, costs)) for variant in variants},
                repeats=rounds, warmup=0)
    print(f"1. fixed cost of one no-op trial, seconds, median of {rounds}: 2 workers x 0.5 CPU "
          f"(a TorchTrainer), or '{IN_PROCESS}' in the trial's process")
    table = Table(Column("variant", "<15"), Column("fit to first step", "17.1f"), Column("of it in loop", "13.2f"),
                  Column("teardown", "9.1f"), Column("total", "7.1f"), Column("/ bare", "7.2f"))
    table.print_header()
    totals = {variant: median([c["total"] for c in costs[variant]]) for variant in variants}
    for variant in variants:
        table.print_row(variant, median([c["to_first_step"] for c in costs[variant]]),
                        median([c["in_loop"] for c in costs[variant]]),
                        median([c["teardown"] for c in costs[variant]]), totals[variant],
                        totals[variant] / totals["bare"])
    print()
    return totals


def bench_report(work: Workdir, small: bool) -> tuple[float, float]:
    """Part 2; -> (seconds of one report with a checkpoint, its share of the epoch in %)."""
    from orchestrate.data import ensure_synthetic
    from orchestrate.space import SyntheticData
    from psdet.config import load_config, to_dict

    synthetic = SyntheticData(train=32, val=8, seed=0) if small else SyntheticData(train=200, val=50, seed=0)
    data_root, _ = ensure_synthetic(synthetic)
    overrides = [f"data.root={data_root}", "train.epochs=3", "train.progress=false"]
    if small:
        overrides += ["data.image_size=128", "train.epochs=2"]
    cfg = load_config("ps_gat_tiny", overrides)
    label = work.label("engine")
    setup = trial_setup(SPACE, str(Path(work.storage, label)), str(data_root))
    loop_config = {"stamp_dir": str(work.stamps), "label": label, "config": to_dict(cfg)}
    tuner(tune.with_parameters(ours_trial, setup=setup, loop=timed_engine_loop, loop_config=loop_config), work, label)
    stamps = read_stamp(work.stamps, f"{label}.rank0")
    reports, saves = stamps["reports"], stamps["saves"]
    report_s = [r["end"] - r["start"] for r in reports if r["checkpoint"]]
    save_s = [s["end"] - s["start"] for s in saves]
    # epoch k (k >= 2): from the end of report k-1 to the end of report k; the first epoch also holds the setup
    epoch_s = [later["end"] - earlier["end"] for earlier, later in zip(reports, reports[1:])]
    report, save, epoch = median(report_s), median(save_s), median(epoch_s)
    floor = None
    if not small:  # Ray's own cost of the same report, from a bare trainer
        engine_checkpoint = saves[-1]["path"]  # the engine keeps its newest checkpoints
        if not Path(engine_checkpoint).is_dir():
            raise RuntimeError(f"the engine's last checkpoint {engine_checkpoint} is gone")
        floor_label = work.label("bare reports")
        floor_config = {"stamp_dir": str(work.stamps), "label": floor_label, "reports": 4, "gap_s": 2.5,
                        "checkpoint": str(engine_checkpoint)}
        with deadline(TRIAL_TIMEOUT_S, "bare TorchTrainer.fit()"):
            bare_trainer(bare_report_loop, floor_config, work.storage, floor_label).fit()
        floor = read_stamp(work.stamps, f"{floor_label}.rank0")
    steps = len(range(0, synthetic.train - cfg.data.batch_size + 1, cfg.data.batch_size))
    print(f"2. one report with a checkpoint: psdet.engine on ps_gat_tiny, {cfg.data.image_size}x{cfg.data.image_size}, "
          f"batch {cfg.data.batch_size}, {synthetic.train} + {synthetic.val} synthetic images ({steps} steps/epoch), "
          f"report + checkpoint every epoch, {cfg.train.epochs} epochs; rank 0, median over epochs, seconds")
    table = Table(Column("what", "<46"), Column("seconds", "8.2f"), Column("% of epoch", "10.1f"))
    table.print_header()
    table.print_row("epoch (steps, eval, checkpoint, report)", epoch, 100.0)
    table.print_row(f"engine checkpoint write ({saves[0]['bytes'] / 2**20:.1f} MiB)", save, 100 * save / epoch)
    table.print_row("ours: RayReporter.report with the checkpoint", report, 100 * report / epoch)
    if floor is not None:
        for kind, values in floor.items():
            table.print_row(f"bare: ray.train.report {kind}", median(values), 100 * median(values) / epoch)
    print(f"training throughput {median([r['images_per_s'] for r in reports]):.1f} images/s\n")
    return report, 100 * report / epoch


class TrialEnds(tune.Callback):
    """On the driver: when each trial ended, and the driver's RSS then."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ends.append((time.time(), rss_mib()))


def sweep(work: Workdir, num_trials: int, reuse_actors: bool, one_worker: bool = False) -> list[tuple[float, float]]:
    """`num_trials` back-to-back no-op trials of ours in one Tuner (TorchTrainer trials, or
    `one_worker` trials in their own process); -> (seconds, driver RSS MiB) per trial."""
    label = work.label("sweep")
    loop_config = {"stamp_dir": str(work.stamps), "label": label + "-{trial_id}"}
    if one_worker:
        trainable, trial_cpus = tune.with_parameters(ours_in_process_noop, loop_config=loop_config), 1.0
    else:
        setup = trial_setup(SPACE, str(Path(work.storage, label)))
        trainable = tune.with_parameters(ours_trial, setup=setup, loop=ours_noop_loop, loop_config=loop_config)
        trial_cpus = None
    ends = TrialEnds()
    start = time.time()
    tuner(trainable, work, label, num_samples=num_trials, callbacks=[ends], reuse_actors=reuse_actors,
          trial_cpus=trial_cpus)
    times = [finished for finished, _ in ends.ends]
    return [(finished - previous, rss) for (finished, rss), previous in zip(ends.ends, [start] + times[:-1])]


def bench_driver_rss(work: Workdir, num_trials: int, one_worker: bool) -> tuple[float, float]:
    """Part 3; -> (RSS growth from trial 2 to the last in %, median seconds per trial after the first)."""
    trials = sweep(work, num_trials, reuse_actors=False, one_worker=one_worker)
    kind = "one-worker trials in their own process" if one_worker else "TorchTrainer trials"
    print(f"3. driver RSS over {num_trials} back-to-back no-op trials of ours in one Tuner ({kind}, as tune.py runs them)")
    table = Table(Column("trial", "5d"), Column("trial s", "8.1f"), Column("driver RSS MiB", "14.1f"),
                  Column("vs trial 2", "10"))
    table.print_header()
    for index, (seconds, rss) in enumerate(trials, start=1):
        growth = "" if index < 2 else f"{100 * (rss / trials[1][1] - 1):+.1f}%"
        table.print_row(index, seconds, rss, growth)
    print()
    return 100 * (trials[-1][1] / trials[1][1] - 1), median([seconds for seconds, _ in trials[1:]])


def bench_reuse_actors(work: Workdir, rounds: int, trials_per_sweep: int) -> None:
    """Part 4: seconds per trial in a sweep with Tune's reuse_actors off (tune.py today) and on."""
    per_trial: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for reuse in (False, True):
            per_trial[reuse] += [seconds for seconds, _ in sweep(work, trials_per_sweep, reuse)[1:]]
    print(f"4. seconds per no-op trial of ours in a sweep of {trials_per_sweep} (the first of each left out), "
          f"Tune's reuse_actors off and on, alternating; median of {len(per_trial[False])}")
    table = Table(Column("reuse_actors", "<12"), Column("trial s", "8.1f"), Column("/ off", "6.2f"))
    table.print_header()
    for reuse in (False, True):
        table.print_row(str(reuse), median(per_trial[reuse]), median(per_trial[reuse]) / median(per_trial[False]))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CI smoke test: fewest trials")
    args = parser.parse_args()
    variants = ["bare", "ours", IN_PROCESS] if args.small else ["bare", "bare in Tune", "ours", IN_PROCESS]
    rounds, sweep_trials = (1, 3) if args.small else (3, 10)

    import ray

    with tempfile.TemporaryDirectory(prefix="psdet-sweep-overhead-") as tmp, local_ray(NUM_CPUS) as dashboard:
        print(f"sweep overhead, Ray {ray.__version__} (Train V2), local Ray with {NUM_CPUS} CPUs on 127.0.0.1 "
              f"(dashboard {dashboard}), {os.cpu_count()} cores\n", flush=True)
        work = Workdir(Path(tmp))
        totals = bench_fixed_cost(work, variants, rounds)
        report_s, report_pct = bench_report(work, args.small)
        growth, sweep_trial_s = bench_driver_rss(work, sweep_trials, one_worker=args.small)
        if not args.small:
            bench_reuse_actors(work, rounds=2, trials_per_sweep=3)
    # Ray's floor: a bare trainer in a one-trial Tuner; ours against it is what our wrapper adds
    floor = {"floor_ratio": totals["bare in Tune"] / totals["bare"],
             "ours_vs_floor": totals["ours"] / totals["bare in Tune"]} if "bare in Tune" in totals else {}
    print(summary_line("sweep_overhead", ratio=totals["ours"] / totals["bare"], **floor,
                       trainer_trial_s=f"{totals['ours']:.1f}", in_process_trial_s=f"{totals[IN_PROCESS]:.1f}",
                       report_ckpt_s=report_s,
                       report_pct_of_epoch=f"{report_pct:.1f}", rss_growth_pct=f"{growth:.1f}",
                       sweep_trial_s=f"{sweep_trial_s:.1f}"))


if __name__ == "__main__":
    main()
