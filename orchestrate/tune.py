"""Sweep psdet's optimizer, LR schedule and warmup with Ray Tune + Optuna over Ray Train.

    python orchestrate/tune.py --space search_spaces/lr.yaml             # local Ray, synthetic data
    python orchestrate/tune.py --space search_spaces/lr.yaml --dry-run --plot lr.png
    python orchestrate/tune.py --space search_spaces/lr.yaml --resume    # after a crash
    python orchestrate/tune.py --space search_spaces/full.yaml --address HOST:6379 \\
        --storage s3://bucket/sweeps --data /data/ps2.0

Each trial is a Ray Train TorchTrainer running psdet.engine on `resources.workers`
workers; Optuna (TPE, seeded, persistent study) samples the space and ASHA stops poor
trials by epoch. Everything lands in `--storage/--name` (default ./runs/<space name>):
trials.json, results.parquet, best_config.yaml, best_checkpoint.txt, optuna.journal,
one trial_<id>/ directory per trial, and Ray's experiment state for --resume.

A mistake in the space file, the arguments or the data ends in one line and exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not orchestrate/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Any

from orchestrate import storage
from orchestrate.space import SweepSpec, load_space
from psdet.errors import ConfigError, UserError

EXIT_USER_ERROR = 2
SWEEP_FILE = "sweep.json"
JOURNAL = "optuna.journal"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune.py", description=__doc__.splitlines()[0],
        epilog="Search-space files are described in search_spaces/README.md.")
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
    parser.add_argument("--num-samples", type=int, help="override experiment.num_samples")
    parser.add_argument("--max-concurrent", type=int, help="override experiment.max_concurrent")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"tune.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR


def run(args: argparse.Namespace) -> int:
    spec = _with_cli_overrides(load_space(args.space), args)
    name = args.name or spec.name
    storage_root = storage.normalize(args.storage)
    experiment = storage.join(storage_root, name)
    if args.plot and not args.dry_run:
        raise UserError("--plot goes with --dry-run")

    address = args.address or os.environ.get("RAY_ADDRESS")
    _ray_environment(address)
    if args.dry_run:
        return _dry_run(spec, args, address)

    saved = _read_sweep_file(experiment)
    if args.resume:
        if saved is None:
            raise UserError(f"--resume: no sweep to resume at {experiment} (check --storage and --name)")
        if saved["experiment"] != experiment:
            raise UserError(f"--resume: the sweep at {experiment} was started at {saved['experiment']}; its study "
                            "and ledger live there: resume it there (move it back)")
        if saved["space_text"] != Path(args.space).read_text():
            raise ConfigError(f"{args.space}: differs from the space the sweep at {experiment} started with "
                              f"(kept in {storage.join(experiment, SWEEP_FILE)}); resume with that space")
        if args.num_samples is not None or args.max_concurrent is not None or args.optuna_storage:
            raise UserError("--resume continues the sweep as it started: drop --num-samples, --max-concurrent "
                            "and --optuna-storage")
        if args.data:
            data_root, synthetic = _user_data(args.data), None
        else:
            data_root = saved["data_root"]
            synthetic = spec.experiment.synthetic_data if saved["synthetic"] else None
    elif saved is not None:
        raise UserError(f"{experiment} already holds sweep '{name}': add --resume to continue it, "
                        "or pick another --name")
    else:
        data_root, synthetic = _prepare_data(spec, args.data)

    return _sweep(spec, args, name, storage_root, experiment, address, data_root, synthetic, saved)


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


def _ray_environment(address: str | None) -> None:
    """Settings Ray reads when it is imported, so they are made before."""
    if not address or _is_loopback(address):
        # A local Ray binds its node and dashboard to 127.0.0.1 only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        # Ray turns token auth on by itself only for a cluster it finds; joining an explicit
        # address with a token at hand (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]) uses it.
        token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
            os.environ["RAY_AUTH_MODE"] = "token"


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host.startswith("127.") or host == "localhost"


def _user_data(path: str) -> str:
    from orchestrate.data import check_dataset

    return str(check_dataset(path))


def _prepare_data(spec: SweepSpec, data: str | None) -> tuple[str, Any]:
    """(dataset root, the synthetic spec if the root is the synthetic cache)."""
    if data:
        return _user_data(data), None
    from orchestrate.data import ensure_synthetic

    synth = spec.experiment.synthetic_data
    started = time.perf_counter()
    root, made = ensure_synthetic(synth)
    if made:
        print(f"no --data given: synthesized {synth.train} training + {synth.val} validation images "
              f"(seed {synth.seed}) into {root} in {time.perf_counter() - started:.0f} s; cached for later sweeps")
    else:
        print(f"no --data given: using the cached synthetic dataset at {root} "
              f"({synth.train} training + {synth.val} validation images, seed {synth.seed})")
    return str(root), synth


def _read_sweep_file(experiment: str) -> dict | None:
    uri = storage.join(experiment, SWEEP_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def _default_optuna_storage(experiment: str, name: str) -> str:
    """The journal in the experiment directory; with remote storage a local file (a journal
    needs a real file system) that JournalMirror copies to the experiment directory."""
    local = storage.local_path(experiment)
    if local is not None:
        return str(local / JOURNAL)
    digest = hashlib.sha256(experiment.encode()).hexdigest()[:10]
    return str(Path(tempfile.gettempdir(), "psdet-optuna", f"{name}-{digest}.journal"))


def _mirrored_journal(experiment: str, study_url: str) -> tuple[str, str] | None:
    """(local journal, its copy in storage) when a journal file backs a sweep on remote
    storage; a missing local journal (a driver on a new host) is fetched from the copy."""
    if not storage.is_remote(experiment) or "://" in study_url:
        return None
    remote = storage.join(experiment, JOURNAL)
    if not Path(study_url).is_file() and storage.exists(remote):
        Path(study_url).parent.mkdir(parents=True, exist_ok=True)
        Path(study_url).write_bytes(storage.read_bytes(remote))
    return study_url, remote


# ----------------------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _connect(address: str | None) -> str:
    """Join `address` or start a local Ray on loopback; returns a one-line description.

    Worker output stays in the trial directories (train.log) and Ray's session logs:
    the console gets one line per trial event instead of every worker's log. RAY_TRAIN_*
    variables set for this command (e.g. RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) reach
    the trials, whose trainers read them.
    """
    import ray

    env_vars = {key: value for key, value in os.environ.items() if key.startswith("RAY_TRAIN_")}
    if address:
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "://" in address or address == "auto":
            runtime_env = None  # a submitted job (or Ray Client) already has its runtime env
        else:
            # The State API (Train V2 uses it to clean up after a dead controller) must
            # find this cluster even when several Ray instances run on the machine.
            runtime_env = {"env_vars": {**env_vars, "RAY_ADDRESS": address}}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return f"joined the Ray cluster at {address}"
    port = _free_port()
    dashboard = f"http://127.0.0.1:{port}"
    # address="local": always a new instance, never one that `ray start` left on this machine.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {**env_vars, "RAY_API_SERVER_ADDRESS": dashboard}}, log_to_driver=False)
    return f"started a local Ray on 127.0.0.1 (dashboard {dashboard})"


def _nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _use_gpu(spec: SweepSpec, nodes: list[dict[str, float]]) -> bool:
    """`use_gpu: auto` means GPUs when one trial's worth of them fits on the cluster."""
    if spec.resources.use_gpu != "auto":
        return bool(spec.resources.use_gpu)
    from orchestrate.dryrun import trials_that_fit

    if trials_that_fit(spec, True, nodes) > 0:
        return True
    gpus = sum(node.get("GPU", 0) for node in nodes)
    if gpus:
        r = spec.resources
        print(f"use_gpu auto: a trial needs {r.workers * r.gpus_per_worker:g} GPU(s) and the cluster has {gpus:g}; "
              "training on CPU (lower resources.workers to use them)")
    return False


# ----------------------------------------------------------------------------- dry run


def _dry_run(spec: SweepSpec, args: argparse.Namespace, address: str | None) -> int:
    from orchestrate import dryrun
    from orchestrate.data import check_dataset, synthetic_root

    if address:
        import ray

        description = _connect(address)
        try:
            nodes = _nodes()
        finally:
            ray.shutdown()
        cluster = f"cluster at {address}"
    else:
        import torch

        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
        cluster = "this machine (no cluster given; a local Ray would get these)"
        description = None
    use_gpu = _use_gpu(spec, nodes)
    train_split = spec.base_tree["data"]["train_split"]
    if args.data:
        root = check_dataset(args.data)
        num_train = dryrun.count_training_images(root, train_split)
        data_note = f"{root} ({num_train} training images)"
    else:
        synth = spec.experiment.synthetic_data
        num_train = synth.train
        data_note = (f"synthetic, {synth.train} training + {synth.val} validation images, made on the first "
                     f"real run into {synthetic_root(synth)}")
    if description:
        print(description)
    print(dryrun.report(spec, cluster=cluster, nodes=nodes, use_gpu=use_gpu,
                        fit=dryrun.trials_that_fit(spec, use_gpu, nodes), num_train_images=num_train,
                        data_note=data_note, plot=Path(args.plot) if args.plot else None))
    return 0


# ----------------------------------------------------------------------------- the sweep


def _sweep(spec: SweepSpec, args: argparse.Namespace, name: str, storage_root: str, experiment: str,
           address: str | None, data_root: str, synthetic, saved: dict | None) -> int:
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # experiment state at most 5 s old for --resume
    import ray
    from ray import tune

    from orchestrate import trial
    from orchestrate.results import engine_seconds, read_ledger, write_results

    print(_connect(address))
    try:
        nodes = _nodes()
        use_gpu = _use_gpu(spec, nodes)
        concurrency = _concurrency(spec, nodes, use_gpu, joined=bool(address))
        setup = trial.TrialSetup(spec=spec, experiment_uri=experiment, data_root=data_root,
                                 synthetic=synthetic, use_gpu=use_gpu)
        trainable = trial.trainable(setup)
        study_url = saved["optuna_storage"] if args.resume else (
            args.optuna_storage or _default_optuna_storage(experiment, name))
        mirror = _mirrored_journal(experiment, study_url)
        _check_shared(experiment)
        if args.resume:
            if not tune.Tuner.can_restore(experiment):
                raise UserError(f"--resume: {experiment} has no Ray experiment state to restore "
                                "(the first driver died before saving any); start it again under a new --name")
            print(f"resuming sweep '{name}' from {experiment} (study in {study_url})")
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        else:
            storage.write_bytes(storage.join(experiment, SWEEP_FILE), json.dumps({
                "name": name, "experiment": experiment, "space_path": spec.path,
                "space_text": Path(args.space).read_text(),
                "data_root": data_root, "synthetic": synthetic is not None, "optuna_storage": study_url,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }, indent=1).encode())
            print(f"sweep '{name}': {spec.experiment.num_samples} trials, {concurrency} at a time, "
                  f"{'GPU' if use_gpu else 'CPU'}; writing to {experiment}; Optuna study in {study_url}")
            tuner = _new_tuner(spec, trainable, name, storage_root, experiment, concurrency, study_url, mirror)
        engine_before = engine_seconds(read_ledger(experiment))
        fit_started = time.monotonic()
        tuner.fit()
        wall_s = time.monotonic() - fit_started
        records = read_ledger(experiment)
        session = {"wall_s": wall_s, "engine_s": engine_seconds(records) - engine_before, "slots": concurrency}
        summary = write_results(spec, experiment, data_root, records, session)
    finally:
        ray.shutdown()
    unfinished = [row["trial_id"] for row in summary["rows"] if row["status"] in ("running", "pending")]
    if unfinished or len(summary["rows"]) < spec.experiment.num_samples:
        print(f"the sweep stopped early; continue it with: python orchestrate/tune.py --space {args.space} "
              f"--storage {args.storage} --name {name} --resume")
    return 0 if summary["best"] is not None else 1


def _check_shared(experiment: str) -> None:
    """A local --storage path on a cluster of several nodes must be one they all see (NFS):
    each node looks for a marker the driver writes there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if storage.is_remote(experiment) or len(nodes) < 2:
        return

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    marker = Path(experiment, f".shared-check-{os.getpid()}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                  .remote(str(marker)) for node in nodes]
        blind = [node["NodeManagerAddress"] for node, ok in zip(nodes, ray.get(checks, timeout=120)) if not ok]
    finally:
        marker.unlink()
    if blind:
        raise UserError(f"--storage {experiment} is a local path that node(s) {', '.join(blind)} of this "
                        f"{len(nodes)}-node cluster cannot see; use a shared mount or s3://, gs://")


def _concurrency(spec: SweepSpec, nodes: list[dict[str, float]], use_gpu: bool, joined: bool) -> int:
    """Trials at once: max_concurrent, capped to what fits (a waiting trial's workers would
    time out). Not one fitting is an error on a local Ray; a joined cluster may still grow."""
    from orchestrate.dryrun import trials_that_fit

    fit = trials_that_fit(spec, use_gpu, nodes)
    if fit == 0:
        r = spec.resources
        driver = r.driver_cpus if r.workers > 1 else 0
        message = (f"{spec.path}: one trial needs {driver + r.workers * r.cpus_per_worker:g} CPU"
                   + (f" and {r.workers * r.gpus_per_worker:g} GPU" if use_gpu else "")
                   + f" but the cluster's nodes offer {nodes}; lower 'resources.workers' or "
                   "'resources.cpus_per_worker'")
        if not joined:
            raise ConfigError(message)
        print(f"warning: {message} (waiting for the cluster to grow)")
    return min(spec.experiment.max_concurrent, max(fit, 1))


def _new_tuner(spec: SweepSpec, trainable, name: str, storage_root: str, experiment: str, concurrency: int,
               study_url: str, mirror: tuple[str, str] | None):
    from orchestrate import trial
    from orchestrate.results import TrialLedger
    from orchestrate.search import JournalMirror, optuna_storage
    from orchestrate.tuner import build_tuner

    e = spec.experiment
    ledger = TrialLedger(experiment, e.metric, e.mode, in_process=spec.resources.workers == 1)
    callbacks = [ledger, *([JournalMirror(*mirror)] if mirror else [])]
    return build_tuner(spec, trainable, name=name, storage_root=storage_root, study_storage=optuna_storage(study_url),
                       concurrency=concurrency, callbacks=callbacks, trial_dirname=trial.trial_dirname)


if __name__ == "__main__":
    sys.exit(main())
