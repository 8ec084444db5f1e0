"""Multi-objective sweeps, warm starts and budgets, without a Ray cluster: the searcher's
multi-objective study, the Pareto ranks and front files of the results, `--warm-start`
(what it takes, what it refuses, and that TPE starts where the earlier study was good), and
the budget's arithmetic and refusal."""
from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO
from orchestrate import budget, sweep_file, warm_start
from orchestrate.results import rows, write_results
from orchestrate.search import build_searcher, optuna_storage
from orchestrate.space import load_space
from orchestrate.tune import main
from psdet.config import load_config
from psdet.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)
PARETO = REPO / "search_spaces" / "pareto.yaml"


def _space(tmp_path: Path, name: str = "mo", **experiment) -> Path:
    """A small multi-objective space over the learning rate (ps_gat_tiny, 3 epochs)."""
    tree = {
        "experiment": {"name": name, "base_config": "ps_gat_tiny", "objectives": {"slot_ap": "max", "latency_ms": "min"},
                       "overrides": {"train.epochs": 3}, "baseline": False, "seed": 0, **experiment},
        "search": {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-1}},
        "sampler": {"type": "tpe", "n_startup_trials": 5},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _result(epoch: int, ap: float | None, latency: float | None, total: int = 3) -> dict:
    out = {"epoch": epoch, "total_epochs": total}
    out.update({"slot_ap": ap} if ap is not None else {})
    out.update({"latency_ms": latency} if latency is not None else {})
    return out


def test_a_multi_objective_study_is_told_every_objective(tmp_path):
    spec = load_space(_space(tmp_path))
    assert spec.multi_objective and spec.objectives == (("slot_ap", "max"), ("latency_ms", "min"))
    assert (spec.experiment.metric, spec.experiment.mode) == ("slot_ap", "max")  # the first one
    searcher = build_searcher(spec, optuna_storage(str(tmp_path / "optuna.journal")))
    for trial_id in ("full", "stopped", "broken", "no_latency"):
        assert "optim.lr" in searcher.suggest(trial_id)
    searcher.on_trial_result("full", _result(1, 0.1, 9.0))
    searcher.on_trial_complete("full", _result(3, 0.4, 8.0))
    searcher.on_trial_complete("stopped", _result(1, 0.05, 7.0))
    searcher.on_trial_complete("broken", error=True)
    searcher.on_trial_complete("no_latency", _result(3, 0.3, None))
    study = searcher.study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert trials["full"].state.name == "COMPLETE" and trials["full"].values == [0.4, 8.0]
    assert trials["stopped"].state.name == "PRUNED" and trials["stopped"].values is None
    assert trials["broken"].state.name == trials["no_latency"].state.name == "FAIL"


def test_nsga2_is_a_sampler_choice(tmp_path):
    path = _space(tmp_path)
    tree = yaml.safe_load(path.read_text())
    tree["sampler"] = {"type": "nsga2", "population_size": 4}
    path.write_text(yaml.safe_dump(tree))
    spec = load_space(path)
    searcher = build_searcher(spec, optuna_storage(str(tmp_path / "optuna.journal")))
    assert isinstance(searcher.sampler, optuna.samplers.NSGAIISampler)
    assert 1e-4 <= searcher.suggest("a")["optim.lr"] <= 1e-1


def _record(trial_id, status, ap, latency, lr, baseline=False, epochs=3, wall=60.0):
    final = {"epoch": epochs, "slot_ap": ap, "latency_ms": latency}
    return {"trial_id": trial_id, "params": {"optim.lr": lr}, "baseline": baseline, "status": status,
            "epochs": epochs, "total_epochs": 3, "final": final, "best": final,
            "checkpoint": f"trial_{trial_id}/checkpoint_000002", "restarts": 0, "worker_restarts": 0,
            "wall_time_s": wall, "engine_s": wall, "error": None}


def _records():
    # (slot_ap, latency_ms): a (0.6, 20) and b (0.4, 10) trade off: the front. c (0.5, 25) is
    # dominated by a only: front 1. The baseline (0.3, 30) is dominated by a, b and c: front 2.
    # d was stopped early: no Pareto rank, however good its last values.
    return {r["trial_id"]: r for r in (
        _record("base", "completed", 0.3, 30.0, 3e-3, baseline=True), _record("a", "completed", 0.6, 20.0, 1e-3),
        _record("b", "completed", 0.4, 10.0, 2e-2), _record("c", "completed", 0.5, 25.0, 5e-4),
        _record("d", "pruned", 0.9, 1.0, 5e-2, epochs=1))}


def test_results_rank_by_pareto_front_and_write_one_config_per_front_member(tmp_path, capsys):
    spec = load_space(_space(tmp_path))
    table = rows(_records(), "slot_ap", "max", spec.objectives)
    assert [(r["trial_id"], r["pareto_rank"]) for r in table] == [("a", 0), ("b", 0), ("c", 1), ("base", 2),
                                                                  ("d", None)]
    experiment = tmp_path / "runs" / "mo"
    summary = write_results(spec, str(experiment), "/data/ps2.0", _records())
    out = capsys.readouterr().out
    assert "Pareto front (2 of 5 trials; max slot_ap, min latency_ms):" in out
    assert "front against baseline: 2 of the 2 front trials dominate the baseline base (a, b)" in out
    assert sorted(p.name for p in (experiment / "pareto").iterdir()) == ["a.yaml", "b.yaml", "checkpoints.txt"]
    assert not (experiment / "best_config.yaml").exists()
    cfg = load_config(str(experiment / "pareto" / "b.yaml"))  # what `psdet train -c` reads
    assert cfg.optim.lr == 2e-2 and cfg.data.root == "/data/ps2.0"
    assert (experiment / "pareto" / "checkpoints.txt").read_text().splitlines()[0] == "a trial_a/checkpoint_000002"
    parquet = pq.read_table(experiment / "results.parquet").to_pylist()
    assert {r["trial_id"]: r["pareto_rank"] for r in parquet} == {"a": 0, "b": 0, "c": 1, "base": 2, "d": None}
    assert summary["best"]["trial_id"] == "a"


# ----------------------------------------------------------------------------- warm starts


def _good(lr: float) -> float:
    """The earlier study's slot AP: best at lr 1e-3, falling off by a third per decade."""
    return 1.0 - abs(math.log10(lr) + 3.0) / 3.0


def _earlier_sweep(tmp_path: Path, space: Path, extra_trials: bool = True) -> Path:
    """An earlier single-objective sweep's directory: sweep.json and a journal of 24
    COMPLETE trials (lr drawn at random, scored by `_good`) plus two that do not fit the space."""
    experiment = tmp_path / "runs" / "earlier"
    journal = experiment / sweep_file.JOURNAL
    sweep_file.write(str(experiment), name="earlier", space_path=str(space), space_text=space.read_text(),
                     data_root="/data", synthetic=False, optuna_storage=str(journal))
    study = optuna.create_study(study_name="earlier", storage=optuna_storage(str(journal)), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(24):
        trial = study.ask()
        study.tell(trial, _good(trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)))
    if extra_trials:
        study.enqueue_trial({"optim.lr": 0.5})  # outside the new range
        trial = study.ask()
        study.tell(trial, _good(trial.suggest_float("optim.lr", 1e-4, 1.0, log=True)))
        trial = study.ask()
        trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
        trial.suggest_float("optim.momentum", 0.8, 0.99)  # a key the new space does not search
        study.tell(trial, 0.1)
    return experiment


def _single_objective_space(tmp_path: Path, name: str, metric: str = "slot_ap") -> Path:
    path = _space(tmp_path, name=name)
    tree = yaml.safe_load(path.read_text())
    del tree["experiment"]["objectives"]
    tree["experiment"].update(metric=metric, mode="max")
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_warm_start_takes_fitting_trials_and_tpe_starts_in_the_good_region(tmp_path):
    space = _single_objective_space(tmp_path, "lr_only")
    earlier = _earlier_sweep(tmp_path, space)
    spec = load_space(space)
    trials, line = warm_start.load(str(earlier), spec)
    assert len(trials) == 24 and line.startswith("warm start: 24 of 26 finished trials of sweep 'earlier'")
    assert "2 left out" in line
    assert all(t.user_attrs[warm_start.WARM_START].startswith("earlier#") for t in trials)

    cold = build_searcher(spec, optuna_storage(str(tmp_path / "cold.journal")))
    warm = build_searcher(spec, optuna_storage(str(tmp_path / "warm.journal")), warm_start=trials)
    assert warm.warm_started == 24 and len(warm.study.trials) == 24
    cold_lr, warm_lr = cold.suggest("first")["optim.lr"], warm.suggest("first")["optim.lr"]
    # The region the earlier study found good: where its score is at least that of its best
    # quarter's worst trial (TPE's own "good" split is smaller still: gamma ~ 10%).
    quarter = sorted((t.value for t in trials), reverse=True)[len(trials) // 4 - 1]
    assert _good(warm_lr) >= quarter > _good(cold_lr), (warm_lr, cold_lr, quarter)
    assert warm_lr != cold_lr


def test_warm_start_refuses_another_metric_a_missing_sweep_and_a_space_nothing_fits(tmp_path, capsys):
    earlier = _earlier_sweep(tmp_path, _single_objective_space(tmp_path, "lr_only"), extra_trials=False)
    with pytest.raises(UserError, match="optimised max slot_ap, this space optimises max slot_ap, min latency_ms"):
        warm_start.load(str(earlier), load_space(_space(tmp_path)))
    other_metric = _single_objective_space(tmp_path, "points", metric="point_ap")
    assert main(["--space", str(other_metric), "--warm-start", str(earlier), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--warm-start" in err[0] and "optimised max slot_ap" in err[0]
    assert main(["--space", str(other_metric), "--warm-start", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "no sweep there" in capsys.readouterr().err
    narrow = yaml.safe_load(_single_objective_space(tmp_path, "narrow").read_text())
    narrow["search"]["optim.lr"] = {"type": "loguniform", "low": 0.2, "high": 0.3}  # no earlier trial there
    (tmp_path / "narrow.yaml").write_text(yaml.safe_dump(narrow))
    with pytest.raises(UserError, match="none of the 24 finished trials .* fits this space"):
        warm_start.load(str(earlier), load_space(tmp_path / "narrow.yaml"))
    assert main(["--space", str(tmp_path / "narrow.yaml"), "--warm-start", str(earlier), "--resume"]) == 2
    assert "--warm-start seeds a new sweep" in capsys.readouterr().err


# ----------------------------------------------------------------------------- budgets


def test_budget_counts_resource_hours_epochs_and_projects_the_next_trial(tmp_path):
    spec = load_space(_space(tmp_path, budget={"cpu_hours": 0.1, "epochs": 20}))
    # One-worker trials on ps_gat_tiny's resources default (2 workers x 1 CPU + 0.1 driver).
    assert budget.trial_resources(spec, use_gpu=False) == {"cpu": 2.1, "gpu": 0.0}
    records = {"a": _record("a", "completed", 0.5, 10.0, 1e-3, wall=60.0),
               "b": {**_record("b", "running", 0.5, 10.0, 1e-3, epochs=1, wall=20.0)}}
    now = budget.spent(records, spec, use_gpu=False, wall_s=90.0)
    # 80 s of trials x 2.1 CPUs = 168 CPU-s; 4 epochs; 90 s of driver.
    assert now == pytest.approx({"gpu_hours": 0.0, "cpu_hours": 168 / 3600, "epochs": 4.0, "wall_hours": 90 / 3600})
    ahead = budget.projected(records, spec, use_gpu=False, wall_s=90.0)
    # 20 s an epoch; b has 2 epochs left, the next trial 3: 5 more epochs = 100 s x 2.1 CPUs.
    assert ahead == pytest.approx({"gpu_hours": 0.0, "cpu_hours": (168 + 210) / 3600, "epochs": 9.0,
                                   "wall_hours": (90 + 60) / 3600})
    assert budget.projected({}, spec, use_gpu=False, wall_s=0.0) is None  # nothing measured yet


def test_searcher_starts_no_trial_that_would_cross_the_budget(tmp_path, capsys):
    spec = load_space(_space(tmp_path, budget={"epochs": 8}))
    experiment = tmp_path / "runs" / "mo"
    guard = budget.BudgetGuard(spec, str(experiment), use_gpu=False)
    searcher = build_searcher(spec, optuna_storage(str(tmp_path / "optuna.journal")), budget=guard)
    assert searcher.suggest("a") is not None  # nothing spent, nothing measured
    experiment.mkdir(parents=True, exist_ok=True)
    ledger = {"a": _record("a", "completed", 0.5, 10.0, 1e-3)}  # 3 epochs spent
    (experiment / "trials.json").write_text(json.dumps(ledger))
    assert searcher.suggest("b") is not None  # 3 + 3 = 6 <= 8
    ledger["b"] = _record("b", "running", 0.5, 10.0, 1e-3, epochs=1)
    (experiment / "trials.json").write_text(json.dumps(ledger))
    assert searcher.suggest("c") == "FINISHED"  # 4 spent + 2 left for b + 3 for c = 9 > 8
    state = budget.read_budget_file(str(experiment))
    assert "one more trial would bring the spending to 9 epochs, over 8 epochs" in state["stopped"]
    assert list(state["sessions"]) == [guard.session] and list((experiment / "budget").iterdir())
    assert budget.summary_line(spec, str(experiment), ledger, use_gpu=False).startswith(
        "budget: spent 4 epochs of 8 epochs; no new trial after that: one more trial")
    ledger["b"]["epochs"] = 5
    (experiment / "trials.json").write_text(json.dumps(ledger))
    assert guard.exhausted()  # 8 of 8: with stop_running, running trials stop at their next rung


def test_a_driver_writes_its_wall_time_at_most_once_a_second(tmp_path, monkeypatch):
    """The searcher hears every result twice (the limiter's event and StudySync's): the second
    tick within a second writes nothing; one after it writes the new wall time."""
    spec = load_space(_space(tmp_path, budget={"epochs": 8}))
    guard = budget.BudgetGuard(spec, str(tmp_path / "runs" / "mo"), use_gpu=False)
    clock = iter([100.0, 100.4, 101.5])
    monkeypatch.setattr(budget.time, "monotonic", lambda: next(clock))
    guard.session_started = 90.0
    written = []
    monkeypatch.setattr(guard, "_write", lambda **fields: written.append(fields))
    guard.tick(), guard.tick(), guard.tick()
    assert written == [{"wall_s": 10.0}, {"wall_s": 11.5}]


def test_architecture_keys_are_searched_like_any_other(tmp_path):
    from orchestrate.dryrun import sample_params
    from orchestrate.space import trial_config

    path = _space(tmp_path, name="arch")
    tree = yaml.safe_load(path.read_text())
    tree["search"] = {
        "model.backbone": {"type": "choice", "values": ["darknet", "resnet18"]},
        "model.depth_factor": {"type": "int", "low": 2, "high": 8, "step": 2},
        "data.image_size": {"type": "int", "low": 128, "high": 256, "step": 64},
        "model.graph.proj_dim": {"type": "int", "low": 8, "high": 32, "step": 8},
        "model.graph.num_heads": {"type": "choice", "values": [2, 4]},
    }
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    spec = load_space(path)
    seen = set()
    for params in sample_params(spec, 12):
        cfg = trial_config(spec, params)
        assert (cfg.model.backbone, cfg.model.depth_factor, cfg.data.image_size, cfg.model.graph.proj_dim,
                cfg.model.graph.num_heads) == tuple(params[p.key] for p in spec.search)
        assert cfg.data.image_size in (128, 192, 256) and cfg.model.depth_factor in (2, 4, 6, 8)
        seen.add(cfg.model.backbone)
    assert seen == {"darknet", "resnet18"}
