"""What the Ray dashboard's Train page says of a multi-worker trial that ran all its epochs,
under Ray's ASHA and under the sweep's.

    python benchmarks/train_run_state.py [--small]

One local Ray (loopback only, 2 CPUs, Train state tracking on, as orchestrate/tune.py starts
one). Per scheduler, a one-trial `Tuner` over a function trainable that builds a 2-worker
`TorchTrainer` (0.25 CPU per worker) whose loop reports epochs 1 to 3 (`total_epochs` 3)
and calls `fit()`, as orchestrate/trial.py does:
- ray_asha: Ray's `ASHAScheduler` (max_t 3, grace 1), which stops a trial on its report at
  max_t;
- ours: the sweep's `orchestrate.tuner.BaselineASHA` on the same settings, which lets a
  trial's last report end it by itself (`orchestrate.moasha.is_last_report`);
- fifo: no early stopping, `FIFOScheduler`.
Then the Train runs as the dashboard's HTTP API lists them (`/api/train/v2/runs/v1`, what its
Train page shows), read once no run is RUNNING any more (at most 60 s after the last fit).

A run whose trial was killed before `fit()` returned stays RUNNING in Train's state actor;
the dashboard calls it ABORTED once its controller actor is dead. Last line:
`train_run_state: ray_asha_finished=0|1 ours_finished=0|1 fifo_finished=0|1`. `--small`
runs ray_asha and ours only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, deadline, local_ray, summary_line  # noqa: E402

EPOCHS = 3


def loop(config: dict) -> None:
    import ray.train

    for epoch in range(1, EPOCHS + 1):
        ray.train.report({"epoch": epoch, "score": float(epoch), "total_epochs": EPOCHS})


def trial(config: dict, storage: str) -> None:
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
                 run_config=ray.train.RunConfig(name="train", storage_path=f"{storage}/trial_{trial_id}",
                                                callbacks=[TuneReportCallback()])).fit()


def schedulers(small: bool) -> dict:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrate.tuner import BaselineASHA

    asha = {"time_attr": "epoch", "metric": "score", "mode": "max", "max_t": EPOCHS, "grace_period": 1}
    chosen = {"ray_asha": ASHAScheduler(**asha), "ours": BaselineASHA(**asha)}
    if not small:
        chosen["fifo"] = FIFOScheduler()
    return chosen


def auth_token() -> str | None:
    """The token a local Ray uses when token auth is on (as orchestrate.ray_env finds it)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.is_file() else None)


def train_runs(dashboard: str) -> list[dict]:
    token = auth_token()
    request = urllib.request.Request(f"{dashboard}/api/train/v2/runs/v1",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["train_runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="ray_asha and ours only")
    args = parser.parse_args()
    os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"
    storage = Path(tempfile.mkdtemp(prefix="psdet-train-run-state-"))
    statuses: dict[str, str] = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, storage, ignore_errors=True)
        dashboard = cleanup.enter_context(local_ray(num_cpus=2))
        from ray import tune

        for name, scheduler in schedulers(args.small).items():
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(trial, storage=str(storage / name)), {"CPU": 0.25}),
                tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1),
                run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
            started = time.monotonic()
            with deadline(300, f"the {name} trial"):
                (result,) = tuner.fit()
            assert result.error is None and result.metrics["epoch"] == EPOCHS, (name, result.error, result.metrics)
            print(f"{name:9s} trial of {EPOCHS} epochs done in {time.monotonic() - started:.1f} s", flush=True)
        settle_by = time.monotonic() + 60
        while True:
            runs = train_runs(dashboard)
            if all(run["status"] != "RUNNING" for run in runs) or time.monotonic() > settle_by:
                break
            time.sleep(2)
    for run in runs:
        name = Path(run["run_settings"]["run_config"]["storage_path"]).parent.name
        statuses[name] = run["status"]
        print(f"{name:9s} Train run {run['status']:9s} {run.get('status_detail') or ''}")
    print(summary_line("train_run_state", **{f"{name}_finished": int(status == "FINISHED")
                                             for name, status in sorted(statuses.items())}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
