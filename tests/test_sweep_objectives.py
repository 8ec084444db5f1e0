"""Multi-objective sweeps and budgets end to end, through `python orchestrate/tune.py` joined
to one local Ray for the module (one-worker trials on search_spaces/smoke.yaml's tiny setup).

- a multi-objective sweep (point AP against latency) under MO-ASHA ends with a Pareto
  front: `pareto_rank` in results.parquet, pareto/<trial>.yaml per front member, a
  two-direction Optuna study told both values;
- a sweep with an epoch budget, its driver SIGKILLed after the first trial and resumed,
  spends no more than the budget: the resumed driver counts the first driver's spending
  from the sweep's record instead of starting from zero.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster_helpers import TUNE, Driver
from conftest import REPO

SMOKE = REPO / "search_spaces" / "smoke.yaml"
FINISHED = re.compile(r"^trial (\S+) (completed|pruned) after")
ONE_WORKER = {"workers": 1, "use_gpu": False, "cpus_per_worker": 0.5}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"}


def run_tune(args: list, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNE, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tail(result: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def space_file(path: Path, name: str, experiment: dict, drop: tuple[str, ...] = (), **sections) -> Path:
    """smoke.yaml with one-worker trials, `experiment` keys set (`drop` ones removed) and whole sections replaced."""
    space = yaml.safe_load(SMOKE.read_text())
    space["experiment"].update(name=name, **experiment)
    for key in drop:
        del space["experiment"][key]
    space["resources"] = ONE_WORKER
    space.update(sections)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.mark.timeout(300)
def test_multi_objective_sweep_ends_with_a_pareto_front(ray_cluster, env, tmp_path):
    path = space_file(tmp_path / "mo.yaml", "mo", {"objectives": {"point_ap": "max", "latency_ms": "min"}},
                      drop=("metric", "mode"))
    storage = tmp_path / "runs"
    result = run_tune(["--space", path, "--address", ray_cluster.address, "--storage", storage], env, timeout=280)
    assert result.returncode == 0, tail(result)
    out = result.stdout

    experiment = storage / "mo"
    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert len(rows) == 3 and {row["status"] for row in rows} <= {"completed", "pruned"}
    for row in rows:
        assert row["final_latency_ms"] > 0 and row["final_params"] > 0 and row["final_gflops"] > 0
        assert (row["pareto_rank"] is None) == (row["status"] != "completed")
    front = sorted(row["trial_id"] for row in rows if row["pareto_rank"] == 0)
    assert front, rows
    assert sorted(p.stem for p in (experiment / "pareto").glob("*.yaml")) == front
    assert not (experiment / "best_config.yaml").exists()
    assert f"Pareto front ({len(front)} of 3 trials; max point_ap, min latency_ms):" in out

    import optuna

    backend = optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))
    study = optuna.load_study(study_name="mo", storage=optuna.storages.JournalStorage(backend))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    by_trial = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    for row in rows:
        trial = by_trial[row["trial_id"]]
        if row["status"] == "completed":
            assert trial.state.name == "COMPLETE"
            assert trial.values == pytest.approx([row["final_point_ap"], row["final_latency_ms"]])
        else:
            assert trial.state.name == "PRUNED"


@pytest.mark.timeout(420)
def test_budget_survives_a_driver_kill_and_resume(ray_cluster, env, tmp_path):
    # 3-epoch trials, one at a time, no early stopping, 7 epochs of budget: two trials fit
    # (3 + 3), a third would bring it to 9. A resumed driver that forgot the first trial's
    # epochs would start a third.
    space = space_file(tmp_path / "budget.yaml", "budget",
                       {"num_samples": 6, "max_concurrent": 1, "budget": {"epochs": 7}}, scheduler={"type": "none"})
    storage = tmp_path / "runs"
    experiment = storage / "budget"
    args = ["--space", space, "--address", ray_cluster.address, "--storage", storage]
    driver = Driver([*TUNE, *map(str, args)], env)
    try:
        driver.wait_for(FINISHED, timeout=240)
    finally:
        driver.kill()
    before = json.loads((experiment / "trials.json").read_text())
    assert sum(r["status"] == "completed" for r in before.values()) >= 1

    resumed = run_tune([*args, "--resume"], env, timeout=300)
    assert resumed.returncode == 0, tail(resumed)
    assert "the sweep stopped early" not in resumed.stdout, tail(resumed)  # the budget ended it, not a crash
    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert len(rows) == 2 and {row["status"] for row in rows} == {"completed"}, rows
    assert sum(row["epochs"] for row in rows) == 6
    line = next(line for line in resumed.stdout.splitlines() if line.startswith("budget: spent"))
    assert line.startswith("budget: spent 6 epochs of 7 epochs; no new trial after that: one more trial would "
                           "bring the spending to 9 epochs, over 7 epochs"), line
    sessions = {p.stem: json.loads(p.read_text())["wall_s"] for p in (experiment / "budget").glob("*.json")}
    assert len(sessions) == 2 and all(seconds > 0 for seconds in sessions.values())  # both drivers counted
