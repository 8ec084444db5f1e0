"""Sweep psdet's optimizer, LR schedule and warmup with Ray Tune + Optuna over Ray Train.

    python orchestrate/tune.py --space search_spaces/lr.yaml             # local Ray, synthetic data
    python orchestrate/tune.py --space search_spaces/lr.yaml --dry-run --plot lr.png
    python orchestrate/tune.py --space search_spaces/lr.yaml --resume    # after a crash
    python orchestrate/tune.py --space search_spaces/lr.yaml --report    # and write report.html at the end
    python orchestrate/tune.py report --storage runs --name lr           # report.html of any sweep, finished or not
    python orchestrate/tune.py --space search_spaces/full.yaml --address HOST:6379 \\
        --storage s3://bucket/sweeps --data /data/ps2.0

Each trial is a Ray Train TorchTrainer running psdet.engine on `resources.workers`
workers; Optuna (TPE, seeded, persistent study) samples the space and ASHA stops poor
trials by epoch. Everything lands in `--storage/--name` (default ./runs/<space name>):
trials.json, results.parquet, best_config.yaml, best_checkpoint.txt, optuna.journal,
one trial_<id>/ directory per trial, and Ray's experiment state for --resume.

A mistake in the space file, the arguments or the data ends in one line and exit code 2.
This module is the command line: it checks the arguments against the space and, on
--resume, against sweep.json (docs/RESUME.md); orchestrate.sweep runs what it checked.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not orchestrate/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import os
import time

from orchestrate import ray_env, storage, sweep_file
from orchestrate.data import check_dataset, ensure_synthetic
from orchestrate.space import SweepSpec, SyntheticData, check_init_from, load_space
from psdet.errors import ConfigError, UserError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune.py", description=__doc__.splitlines()[0],
        epilog="Search-space files are described in search_spaces/README.md. "
               "`tune.py report --storage S --name N` writes report.html of a sweep.")
    parser.add_argument("--space", required=True, help="search-space YAML (e.g. search_spaces/lr.yaml)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    parser.add_argument("--storage", default="runs",
                        help="local path or pyarrow URI (s3://bucket/path, gs://...) for results and checkpoints "
                             "(default: ./runs)")
    parser.add_argument("--name", help="experiment name (default: the space's name)")
    parser.add_argument("--data", help="dataset root in the ps2.0 layout (default: a small synthetic set, made once)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --storage/--name")
    parser.add_argument("--dry-run", action="store_true", help="validate and preview the sweep; train nothing")
    parser.add_argument("--plot", metavar="PNG", help="with --dry-run: draw the sampled LR curves into PNG")
    parser.add_argument("--optuna-storage", metavar="URL",
                        help="Optuna study storage: a journal file path or an RDB URL "
                             "(default: optuna.journal in the experiment directory)")
    parser.add_argument("--warm-start", metavar="EXPERIMENT",
                        help="seed a new sweep's study with the finished trials of an earlier sweep "
                             "(its directory: a local path or storage URI) that fit this space")
    parser.add_argument("--num-samples", type=int, help="override experiment.num_samples")
    parser.add_argument("--max-concurrent", type=int, help="override experiment.max_concurrent")
    parser.add_argument("--report", action="store_true",
                        help="when the sweep ends, write report.html into the experiment directory")
    return parser


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune.py report", description="write report.html of a sweep (finished or interrupted) into its "
                                           "experiment directory, --storage/--name")
    parser.add_argument("--storage", default="runs", help="the sweep's --storage: local path or pyarrow URI "
                                                          "(default: ./runs)")
    parser.add_argument("--name", required=True, help="the sweep's experiment name")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    is_report = argv[:1] == ["report"]
    args = build_report_parser().parse_args(argv[1:]) if is_report else build_parser().parse_args(argv)
    try:
        return run_report(args) if is_report else run(args)
    except UserError as exc:
        print(f"tune.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR


def run_report(args: argparse.Namespace, session: dict[str, float] | None = None) -> int:
    """`tune.py report` (and `--report` at the end of a sweep): write report.html."""
    experiment = storage.join(storage.normalize(args.storage), args.name)
    ray_env.prepare(None)  # orchestrate.report imports Ray; it starts none
    from orchestrate import report

    print(f"report           {report.write_report(experiment, session)}")
    return 0


def run(args: argparse.Namespace) -> int:
    spec = _with_cli_overrides(load_space(args.space), args)
    name = args.name or spec.name
    storage_root = storage.normalize(args.storage)
    experiment = storage.join(storage_root, name)
    if args.plot and not args.dry_run:
        raise UserError("--plot goes with --dry-run")
    if args.report and args.dry_run:
        raise UserError("--report goes without --dry-run: a dry run leaves nothing to report on")
    if args.warm_start and args.resume:
        raise UserError("--warm-start seeds a new sweep; --resume continues one with the history it has: drop one")
    warm = _warm_start(args.warm_start, spec) if args.warm_start else ()

    check_init_from(spec)  # a pretrained checkpoint that does not fit fails here, before Ray starts
    address = ray_env.address(args.address)
    ray_env.prepare(address)
    # Ray reads its environment when it is imported, so the modules that import it come after prepare().
    from orchestrate import dryrun, sweep

    if args.dry_run:
        return dryrun.run(spec, address, args.data, Path(args.plot) if args.plot else None)

    saved = sweep_file.read(experiment)
    space_text = Path(args.space).read_text()
    if args.resume:
        data_root, synthetic, study_url = _as_started(saved, args, spec, experiment, space_text)
    elif saved is not None:
        raise UserError(f"{experiment} already holds sweep '{name}': add --resume to continue it, "
                        "or pick another --name")
    else:
        data_root, synthetic = _prepare_data(spec, args.data)
        study_url = args.optuna_storage or sweep_file.default_optuna_storage(experiment, name)

    summary = sweep.run(sweep.SweepPlan(
        spec=spec, space_text=space_text, name=name, storage_root=storage_root, experiment=experiment,
        address=address, data_root=data_root, synthetic=synthetic, study_url=study_url, resume=args.resume,
        warm_start=warm))
    unfinished = [row["trial_id"] for row in summary["rows"] if row["status"] in ("running", "pending")]
    if unfinished or (len(summary["rows"]) < spec.experiment.num_samples and not summary.get("budget_stopped")):
        print(f"the sweep stopped early; continue it with: python orchestrate/tune.py --space {args.space} "
              f"--storage {args.storage} --name {name} --resume")
    if args.report:
        run_report(argparse.Namespace(storage=storage_root, name=name), summary["session"])
    return 0 if summary["best"] is not None else 1


def _warm_start(source: str, spec: SweepSpec) -> tuple:
    from orchestrate import warm_start

    trials, line = warm_start.load(source, spec)
    print(line)
    return tuple(trials)


def _with_cli_overrides(spec: SweepSpec, args: argparse.Namespace) -> SweepSpec:
    changes = {}
    for key in ("num_samples", "max_concurrent"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            changes[key] = value
    if not changes:
        return spec
    return dataclasses.replace(spec, experiment=dataclasses.replace(spec.experiment, **changes))


def _as_started(saved: dict | None, args: argparse.Namespace, spec: SweepSpec, experiment: str,
                space_text: str) -> tuple[str, SyntheticData | None, str]:
    """--resume: the sweep's dataset (root, synthetic spec) and study URL from its sweep.json,
    once the command is the one it started with."""
    if saved is None:
        raise UserError(f"--resume: no sweep to resume at {experiment} (check --storage and --name)")
    if saved["experiment"] != experiment:
        raise UserError(f"--resume: the sweep at {experiment} was started at {saved['experiment']}; its study "
                        "and ledger live there: resume it there (move it back)")
    if saved["space_text"] != space_text:
        raise ConfigError(f"{args.space}: differs from the space the sweep at {experiment} started with "
                          f"(kept in {storage.join(experiment, sweep_file.SWEEP_FILE)}); resume with that space")
    sweep_file.check_journal(saved["optuna_storage"], spec.name, len(sweep_file.read_ledger(experiment)))
    if args.num_samples is not None or args.max_concurrent is not None or args.optuna_storage:
        raise UserError("--resume continues the sweep as it started: drop --num-samples, --max-concurrent "
                        "and --optuna-storage")
    if args.data:
        return str(check_dataset(args.data)), None, saved["optuna_storage"]
    synthetic = spec.experiment.synthetic_data if saved["synthetic"] else None
    return saved["data_root"], synthetic, saved["optuna_storage"]


def _prepare_data(spec: SweepSpec, data: str | None) -> tuple[str, SyntheticData | None]:
    """(dataset root, the synthetic spec if the root is the synthetic cache)."""
    if data:
        return str(check_dataset(data)), None
    synth = spec.experiment.synthetic_data
    started = time.perf_counter()
    root, made = ensure_synthetic(synth, workers=os.cpu_count() or 1)  # before Ray connects: forking is safe
    if made:
        print(f"no --data given: synthesized {synth.train} training + {synth.val} validation images "
              f"(seed {synth.seed}) into {root} in {time.perf_counter() - started:.0f} s; cached for later sweeps")
    else:
        print(f"no --data given: using the cached synthetic dataset at {root} "
              f"({synth.train} training + {synth.val} validation images, seed {synth.seed})")
    return str(root), synth


if __name__ == "__main__":
    sys.exit(main())
