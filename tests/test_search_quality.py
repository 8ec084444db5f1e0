"""benchmarks/search_quality.py: recording curves (resumable), the nearest recorded config,
the epoch accounting, and a replay through the sweep's own Tuner on a hand-made table.

The record test runs the CLI in a subprocess at its smallest size; the replays, which start
a Ray, are in tests/test_search_quality_replay.py. No timing is asserted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import search_quality as sq  # noqa: E402

from orchestrate.space import baseline_params, load_space  # noqa: E402

LR_SPACE = REPO / "search_spaces" / "lr.yaml"
TINY = ["--configs", "3", "--jobs", "1", "--synthetic", "8", "4", "--overrides", "data.image_size=64",
        "train.epochs=5", "data.batch_size=4", "data.val_batch_size=4"]  # 5: lr.yaml's rung is at epoch 5
LAST_LINE = re.compile(r"^search_quality: (?P<pairs>\w+=\S+(?: \w+=\S+)*)$")


def _cli(args: list[str], timeout: float, expect: int = 0) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "benchmarks/search_quality.py", *args], cwd=REPO, capture_output=True,
                               text=True, timeout=timeout,
                               env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == expect, f"exit {completed.returncode}:\n{completed.stdout[-3000:]}\n" \
                                           f"{completed.stderr[-3000:]}"
    return completed


# ----------------------------------------------------------------------------- the nearest recorded config


def _hand_configs() -> list[dict]:
    return [
        {"optim.optimizer": "adam_onecycle", "optim.lr": 3e-3, "optim.weight_decay": 1e-2},
        {"optim.optimizer": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 1e-4, "optim.scheduler": "cosine",
         "optim.warmup": "none"},
        {"optim.optimizer": "adamw", "optim.lr": 1e-2, "optim.weight_decay": 1e-4, "optim.scheduler": "cosine",
         "optim.warmup": "none"},
        {"optim.optimizer": "sgd", "optim.lr": 1e-3, "optim.weight_decay": 1e-3, "optim.momentum": 0.9,
         "optim.scheduler": "constant", "optim.warmup": "linear", "optim.warmup_epochs": 1.0},
    ]


def test_nearest_config_is_nearest_on_a_log_scale_among_the_same_choices():
    lookup = sq.NearestConfig(load_space(LR_SPACE).search, _hand_configs())
    adamw = {"optim.optimizer": "adamw", "optim.weight_decay": 1e-4, "optim.scheduler": "cosine",
             "optim.warmup": "none"}
    # lr 4e-3 is nearer 1e-3 on a linear scale, nearer 1e-2 on lr's log scale [3e-4, 3e-2]:
    # log10(4e-3 / 3e-4) / 2 = 0.5625 against 0.2614 (1e-3) and 0.7614 (1e-2)
    distances = lookup.distances({**adamw, "optim.lr": 4e-3})
    assert distances[1:3] == pytest.approx([0.5625 - 0.2614, 0.7614 - 0.5625], abs=1e-3)
    assert lookup.nearest({**adamw, "optim.lr": 4e-3}) == 2
    assert lookup.nearest({**adamw, "optim.lr": 2e-3}) == 1
    # the baseline's own values: config 0, at distance 0
    assert lookup.nearest(_hand_configs()[0]) == 0
    assert lookup.distances(_hand_configs()[0])[0] == 0


def test_nearest_config_matches_choices_before_distance():
    lookup = sq.NearestConfig(load_space(LR_SPACE).search, _hand_configs())
    # sgd with every continuous value far from config 3's: still config 3, the only sgd + constant + linear
    far_sgd = {"optim.optimizer": "sgd", "optim.lr": 3e-2, "optim.weight_decay": 1e-1, "optim.momentum": 0.8,
               "optim.scheduler": "constant", "optim.warmup": "linear", "optim.warmup_epochs": 2.0}
    assert lookup.nearest(far_sgd) == 3
    # adamw + constant + none has no recorded twin: the fewest differing choices win (config 1: the
    # scheduler; 2 too, but farther in lr), each difference costing CHOICE_PENALTY
    no_twin = {"optim.optimizer": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 1e-4,
               "optim.scheduler": "constant", "optim.warmup": "none"}
    assert lookup.nearest(no_twin) == 1
    assert lookup.distances(no_twin)[1] == pytest.approx(sq.CHOICE_PENALTY)
    # sgd + constant + linear, without warmup_epochs in the lookup of a made-up config: the
    # continuous parameter active on one side only adds the whole range, 1
    one_sided = {key: value for key, value in _hand_configs()[3].items() if key != "optim.warmup_epochs"}
    assert lookup.distances(one_sided)[3] == pytest.approx(1.0)


def test_nearest_config_ties_go_to_the_lowest_id():
    configs = _hand_configs()
    lookup = sq.NearestConfig(load_space(LR_SPACE).search, [configs[1], configs[0], configs[1]])
    assert lookup.nearest(configs[1]) == 0


# ----------------------------------------------------------------------------- the accounting


def test_epoch_account_counts_results_in_arrival_order():
    account = sq.EpochAccount("slot_ap", "max", target=0.5, budget=4)
    for trial, value in [("a", 0.1), ("b", 0.3), ("a", 0.2), ("b", 0.45), ("a", 0.6), ("b", 0.7)]:
        account.add(trial, {"slot_ap": value, "config_id": ord(trial)})
    summary = account.summary()
    assert summary["epochs_to_target"] == 5  # 0.6 is the fifth result
    assert summary["best_at_budget"] == 0.45  # after 4 results
    assert summary["epochs"] == 6 and summary["trials"] == 2
    assert [t["epochs"] for t in summary["trial_log"]] == [3, 3]
    assert summary["best_in_sweep"] == 0.7 and summary["sweep_epochs"] == 6  # no sweep size: every trial counts

    first_one = sq.EpochAccount("slot_ap", "max", target=0.5, budget=4, sweep_trials=1)
    for trial, value in [("a", 0.1), ("b", 0.3), ("a", 0.2), ("b", 0.45), ("a", 0.6), ("b", 0.7)]:
        first_one.add(trial, {"slot_ap": value})
    assert first_one.summary()["best_in_sweep"] == 0.6  # trial a's best: b is the second trial
    assert first_one.summary()["sweep_epochs"] == 3
    assert first_one.summary()["best_at_budget"] == 0.45 and first_one.summary()["epochs"] == 6

    short = sq.EpochAccount("loss", "min", target=0.2, budget=10)
    for value in (0.9, math.nan, 0.3):
        short.add("a", {"loss": value})
    assert short.summary()["epochs_to_target"] == math.inf  # never reached: inf
    assert short.summary()["best_at_budget"] == 0.3  # ended before the budget: its final best


def test_quantile_and_ratio_stay_meaningful_with_runs_that_never_reach_the_target():
    inf = math.inf
    assert sq.quantile([4, 8, 12, 16], 0.5) == 10
    assert sq.quantile([4, 8, inf, inf], 0.5) == inf
    assert sq.quantile([4, 8, 12, inf, inf], 0.5) == 12  # numpy gives nan here
    assert sq.quantile([4, 8, inf], 0.25) == 6
    assert sq.epochs_ratio(48, 12) == 4
    assert sq.epochs_ratio(inf, 12) == inf
    assert math.isnan(sq.epochs_ratio(inf, inf))
    assert sq.epochs_ratio(12, inf) == 0


def test_strategies_vary_only_sampler_scheduler_seed_and_trials():
    spec = load_space(LR_SPACE)
    ours = sq.strategy_spec(spec, "tpe+asha", seed=7, trials=30)
    assert ours.sampler == spec.sampler and ours.scheduler == spec.scheduler
    assert (ours.experiment.seed, ours.experiment.num_samples) == (7, 30)
    assert ours.search == spec.search and ours.base_tree == spec.base_tree
    assert ours.experiment.max_concurrent == spec.experiment.max_concurrent == 2
    assert ours.experiment.baseline
    random_fifo = sq.strategy_spec(spec, "random+fifo", seed=7, trials=30)
    assert random_fifo.sampler.type == "random" and not random_fifo.sampler.multivariate
    assert not random_fifo.sampler.constant_liar and random_fifo.scheduler.type == "none"
    variants = sq.sampler_variants(spec)
    assert list(variants.values())[0] == spec.sampler
    assert {v.n_startup_trials for v in variants.values()} == {10, 4, 2}
    assert any(not v.multivariate for v in variants.values()) and any(not v.constant_liar for v in variants.values())
    rungs = sq.scheduler_variants(spec)
    assert list(rungs.values())[0] == spec.scheduler and len(set(rungs.values())) == len(rungs)
    assert all(v.type == "asha" and v.grace_period <= spec.max_epochs for v in rungs.values())
    wider = sq.strategy_spec(spec, "random+asha", seed=7, trials=30, scheduler=list(rungs.values())[1])
    assert wider.scheduler == list(rungs.values())[1] and wider.sampler.type == "random"
    assert sq.strategy_spec(spec, "tpe+fifo", seed=7, trials=30, scheduler=list(rungs.values())[1]).scheduler.type \
        == "none"


def test_live_strategies_change_only_sampler_scheduler_and_trials():
    import yaml

    raw = yaml.safe_load(LR_SPACE.read_text())
    ours = sq.strategy_space(raw, "tpe+asha", trials=6)
    assert ours["sampler"] == raw["sampler"] and ours["scheduler"] == raw["scheduler"]
    assert ours["search"] == raw["search"] and ours["experiment"]["num_samples"] == 6
    random_fifo = sq.strategy_space(raw, "random+fifo", trials=6)
    assert random_fifo["sampler"] == {"type": "random"} and random_fifo["scheduler"] == {"type": "none"}
    assert {key: value for key, value in random_fifo["experiment"].items() if key not in ("num_samples", "name")} \
        == {key: value for key, value in raw["experiment"].items() if key != "num_samples"}
    assert raw["experiment"]["num_samples"] == 12  # the input is left as it was


def test_replay_runs_the_space_file_as_it_is_now_and_refuses_another_search(tmp_path):
    table = tmp_path / "hand.parquet"
    _hand_table(table)
    recorded = sq.read_table(table)
    text = recorded.metadata["space_text"]
    later = tmp_path / "later.yaml"
    later.write_text(text.replace("grace_period: 1", "grace_period: 2"))
    spec = sq.replayed_space(recorded, str(table), str(later))
    assert spec.scheduler.grace_period == 2 and spec.search == recorded.spec.search
    assert sq.replayed_space(recorded, str(table), None) == recorded.spec  # hand.yaml is not on disk: as recorded
    other = tmp_path / "other.yaml"
    other.write_text(text.replace("high: 3.0e-2", "high: 1.0e-1"))
    refused = _cli(["replay", "--table", str(table), "--space", str(other), "--small"], timeout=60, expect=2)
    assert len(refused.stderr.strip().splitlines()) == 1 and "search section differs" in refused.stderr
    missing = _cli(["live", "--space", str(tmp_path / "none.yaml")], timeout=60, expect=2)
    assert len(missing.stderr.strip().splitlines()) == 1 and "no such file" in missing.stderr


def test_draws_start_with_the_baseline_and_set_only_active_parameters():
    spec = load_space(LR_SPACE)
    configs = sq.draw_configs(spec, 16, "sobol", seed=3)
    assert configs[0] == baseline_params(spec)
    assert configs == sq.draw_configs(spec, 16, "sobol", seed=3)
    assert configs[1:] != sq.draw_configs(spec, 16, "sobol", seed=4)[1:]
    for params in configs:
        chosen = {}
        for param in spec.search:
            if param.active(chosen):
                chosen[param.key] = params[param.key]
        assert params == chosen  # exactly the active keys, each drawn
    assert {params["optim.optimizer"] for params in configs[1:]} == {"adam_onecycle", "adamw", "sgd"}
    assert len(sq.draw_configs(spec, 5, "random", seed=0)) == 5


# ----------------------------------------------------------------------------- the CLI


def test_record_writes_every_epoch_and_resumes(tmp_path):
    out = tmp_path / "curves.parquet"
    first = _cli(["record", *TINY, "--out", str(out)], timeout=300)
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [(row["config_id"], row["epoch"]) for row in rows] == [(c, e) for c in range(3) for e in (1, 2, 3, 4, 5)]
    spec = load_space(LR_SPACE)
    for key, value in baseline_params(spec).items():
        assert rows[0][key] == value
    for key in ("optim.momentum", "optim.scheduler", "optim.warmup", "optim.warmup_epochs"):
        assert rows[0][key] is None  # inactive for adam_onecycle
    assert all(math.isfinite(row["loss"]) and 0 <= row["slot_ap"] <= 1 and row["train_s"] > 0 for row in rows)
    meta = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", meta["commit"]), meta["commit"]
    assert "record --configs 3" in meta["command"] and meta["machine"].endswith("cores")
    assert meta["space_text"] == LR_SPACE.read_text() and meta["epochs"] == "5"
    assert json.loads(meta["overrides"])[1] == "train.epochs=5"
    assert json.loads(meta["synthetic"])["train"] == 8
    assert "config   2 (3/3)" in first.stdout

    before = out.read_bytes()
    again = _cli(["record", *TINY, "--out", str(out)], timeout=120)
    assert "3 already recorded" in again.stdout and "0 to train" in again.stdout
    assert not re.search(r"^config +\d", again.stdout, re.MULTILINE)
    assert out.read_bytes() == before  # nothing trained, nothing rewritten

    other = _cli(["record", *TINY[:-1], "data.val_batch_size=2", "--out", str(out)], timeout=120, expect=2)
    assert "another recording" in other.stderr and len(other.stderr.strip().splitlines()) == 1

    # The key is what the curves depend on, not the file's text: a new comment and rung resume.
    edited = tmp_path / "lr.yaml"
    edited.write_text("# edited\n" + re.sub(r"grace_period: \d+", "grace_period: 2", LR_SPACE.read_text()))
    resumed = _cli(["record", *TINY, "--space", str(edited), "--out", str(out)], timeout=120)
    assert "3 already recorded" in resumed.stdout and "0 to train" in resumed.stdout


def test_user_errors_end_in_one_line_and_exit_2(tmp_path):
    missing = _cli(["replay", "--table", str(tmp_path / "none.parquet")], timeout=60, expect=2)
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()] and "no such file" in missing.stderr
    searched = _cli(["record", "--out", str(tmp_path / "t.parquet"), "--overrides", "optim.lr=0.1"], timeout=60,
                    expect=2)
    assert "'optim.lr' is searched" in searched.stderr and len(searched.stderr.strip().splitlines()) == 1


def _one_at_a_time(source: Path, path: Path, edits: list[tuple[str, str]]):
    """`source` with `edits` (its trial count and concurrency), ASHA at grace 1 and reduction 2,
    written beside `path`, loaded with 3 epochs a trial. -> (the spec, the space's text)."""
    text = source.read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    text, rungs = re.subn(r"grace_period: \d+", "grace_period: 1", text)
    text, reductions = re.subn(r"reduction_factor: \d+", "reduction_factor: 2", text)
    assert rungs == reductions == 1
    space = path.with_suffix(".yaml")
    space.write_text(text)
    return sq.with_overrides(load_space(space), ["train.epochs=3"]), text


def _hand_table(path: Path) -> dict[str, list[float]]:
    """The demo space run one trial at a time, 2 trials in its budget, 3 epochs a trial, ASHA
    grace 1 and reduction 2; four configs of which only config 1 reaches the target, and only
    at its third epoch. -> each config's slot AP curve."""
    spec, text = _one_at_a_time(LR_SPACE, path, [("num_samples: 12", "num_samples: 2"),
                                                 ("max_concurrent: 2 ", "max_concurrent: 1 ")])
    configs = [baseline_params(spec), *_hand_configs()[1:]]
    slot_ap = {0: [0.1, 0.15, 0.2], 1: [0.5, 0.6, 0.9], 2: [0.3, 0.35, 0.4], 3: [0.2, 0.25, 0.3]}
    curves = [[{"epoch": epoch + 1, "slot_ap": value, "point_ap": value, "loss": 1 - value, "train_s": 1.0,
                "eval_s": 0.1} for epoch, value in enumerate(slot_ap[config_id])] for config_id in range(4)]
    metadata = {"space_file": "hand.yaml", "space_text": text, "overrides": json.dumps(["train.epochs=3"])}
    pq.write_table(sq.assemble_table(spec.search, configs, curves, sq.EPOCH_COLUMNS, metadata), path)
    return {config_id: slot_ap[config_id] for config_id in slot_ap}


# ----------------------------------------------------------------------------- replay-mo: hypervolume at equal budget

PARETO_SPACE = REPO / "search_spaces" / "pareto.yaml"
LAST_MO_LINE = re.compile(r"^search_quality_mo: hv (?P<pairs>\S+=\S+(?: \S+=\S+)*)$")


def _brute_force_hypervolume(points, reference) -> float:
    """The dominated area counted cell by cell on the grid of every coordinate (gains, two
    objectives): a cell counts when some point is at or beyond its upper corner in both."""
    xs = sorted({reference[0], *(x for x, _ in points if x > reference[0])})
    ys = sorted({reference[1], *(y for _, y in points if y > reference[1])})
    area = 0.0
    for x_low, x_high in zip(xs, xs[1:]):
        for y_low, y_high in zip(ys, ys[1:]):
            if any(x >= x_high and y >= y_high for x, y in points):
                area += (x_high - x_low) * (y_high - y_low)
    return area


def test_hypervolume_2d_matches_a_brute_force_count():
    from orchestrate.pareto import hypervolume_2d

    # slot AP (max) and -latency ms (min as a gain) from (0, -50): 0.5 x 30 + 0.3 x 10 = 18; the
    # dominated point, the one no faster than the reference and the one with AP 0 add nothing
    points = [(0.5, -20.0), (0.3, -10.0), (0.2, -30.0), (0.9, -50.0), (0.0, -5.0)]
    assert hypervolume_2d(points, (0.0, -50.0)) == pytest.approx(18.0)
    assert _brute_force_hypervolume(points, (0.0, -50.0)) == pytest.approx(18.0)
    assert hypervolume_2d([], (0.0, 0.0)) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(200):
        count = int(rng.integers(1, 12))
        points = [tuple(point) for point in rng.integers(-5, 6, size=(count, 2)).astype(float)]
        reference = tuple(rng.integers(-6, 2, size=2).astype(float))
        assert hypervolume_2d(points, reference) == pytest.approx(_brute_force_hypervolume(points, reference))
    with pytest.raises(ValueError):
        hypervolume_2d([(1.0, 2.0, 3.0)], (0.0, 0.0, 0.0))


def test_pareto_account_keeps_the_completed_trials_at_the_budget():
    account = sq.ParetoAccount((("slot_ap", "max"), ("latency_ms", "min")), max_epochs=2, budget=5)
    results = [("a", 1, 0.1, 30.0), ("b", 1, 0.2, 10.0), ("a", 2, 0.4, 31.0), ("c", 1, 0.0, 5.0),
               ("b", 2, 0.3, 11.0), ("c", 2, 0.5, 6.0)]
    for trial, epoch, slot_ap, latency in results:
        account.add(trial, {"epoch": epoch, "slot_ap": slot_ap, "latency_ms": latency, "config_id": ord(trial)})
    summary = account.summary()
    assert summary["points_at_budget"] == [[0.4, 31.0], [0.3, 11.0]]  # c completes at the sixth epoch
    assert summary["completed"] == 3 and summary["epochs"] == 6 and summary["trials"] == 3
    assert [trial["completed_at"] for trial in summary["trial_log"]] == [3, 5, 6]
    short = sq.ParetoAccount((("slot_ap", "max"), ("latency_ms", "min")), max_epochs=1, budget=10)
    short.add("a", {"epoch": 1, "slot_ap": math.nan, "latency_ms": 3.0})
    short.add("b", {"epoch": 1, "slot_ap": 0.2, "latency_ms": 3.0})
    assert short.summary()["points_at_budget"] == [[0.2, 3.0]]  # ended before the budget; NaN never completes


def test_mo_strategies_differ_only_in_the_scheduler():
    from orchestrate.moasha import MOASHA
    from orchestrate.tuner import BaselineASHA, build_scheduler

    spec = load_space(PARETO_SPACE)
    assert sq.mo_strategies(spec) == ("MO-ASHA", "FIFO", "ASHA(slot_ap)")
    assert sq._columns(spec) == (*sq.EPOCH_COLUMNS, "latency_ms", "params", "gflops")
    assert sq._columns(load_space(LR_SPACE)) == sq.EPOCH_COLUMNS
    runs = {label: sq.mo_strategy_spec(spec, label, seed=3, trials=40) for label in sq.mo_strategies(spec)}
    for run in runs.values():
        assert run.sampler == spec.sampler and run.search == spec.search and run.objectives == spec.objectives
        assert (run.experiment.seed, run.experiment.num_samples) == (3, 40)
        assert not run.experiment.budget.limits() and spec.experiment.budget.limits()  # pareto.yaml has cpu_hours
    moasha = build_scheduler(runs["MO-ASHA"])
    assert isinstance(moasha, MOASHA) and sq.mo_scheduler(runs["MO-ASHA"], "MO-ASHA") is None
    assert runs["FIFO"].scheduler.type == "none" and sq.mo_scheduler(runs["FIFO"], "FIFO") is None
    single = sq.mo_scheduler(runs["ASHA(slot_ap)"], "ASHA(slot_ap)")
    assert isinstance(single, BaselineASHA) and (single._metric, single._mode) == ("slot_ap", "max")
    assert single.budget_milestones == moasha.milestones == [3]  # the same rung, at epoch 3 of 8
    assert single._reduction_factor == moasha.reduction_factor == 3


def _hand_pareto_table(path: Path) -> dict[int, dict[str, list[float]]]:
    """pareto.yaml run one trial at a time, 2 trials in its budget (6 epochs), 3 epochs a
    trial, rungs at epochs 1 and 2 keeping half; four configs of slot AP against latency.
    -> each config's slot AP and latency curves."""
    spec, text = _one_at_a_time(PARETO_SPACE, path, [("num_samples: 16", "num_samples: 2"),
                                                     ("max_concurrent: 2", "max_concurrent: 1")])
    configs = [baseline_params(spec), {"model.depth_factor": 2, "data.image_size": 128, "optim.lr": 1e-3},
               {"model.depth_factor": 8, "data.image_size": 320, "optim.lr": 1e-2},
               {"model.depth_factor": 6, "data.image_size": 192, "optim.lr": 5e-3}]
    curves = {0: {"slot_ap": [0.1, 0.3, 0.5], "latency_ms": [40.0, 42.0, 41.0]},
              1: {"slot_ap": [0.0, 0.1, 0.2], "latency_ms": [9.0, 10.0, 9.5]},
              2: {"slot_ap": [0.2, 0.5, 0.7], "latency_ms": [160.0, 150.0, 155.0]},
              3: {"slot_ap": [0.05, 0.2, 0.3], "latency_ms": [60.0, 70.0, 65.0]}}
    rows = [[{"epoch": epoch + 1, "slot_ap": curve["slot_ap"][epoch], "point_ap": curve["slot_ap"][epoch],
              "loss": 1.0, "train_s": 1.0, "eval_s": 0.1, "latency_ms": curve["latency_ms"][epoch],
              "params": 1e5, "gflops": 0.1} for epoch in range(3)] for curve in curves.values()]
    metadata = {"space_file": "hand_pareto.yaml", "space_text": text, "overrides": json.dumps(["train.epochs=3"])}
    pq.write_table(sq.assemble_table(spec.search, configs, rows, sq._columns(spec), metadata), path)
    return curves


def test_replay_mo_refuses_a_single_objective_table(tmp_path):
    table = tmp_path / "hand.parquet"
    _hand_table(table)
    refused = _cli(["replay-mo", "--table", str(table), "--small"], timeout=60, expect=2)
    assert len(refused.stderr.strip().splitlines()) == 1 and "two-objective" in refused.stderr


def test_ema_ranking_scores_every_average_beside_the_weights_and_resumes(tmp_path):
    out = tmp_path / "ranking.json"
    args = [sys.executable, "benchmarks/ema_ranking.py", "--configs", "3", "--jobs", "1", "--synthetic", "8", "4",
            "--decays", "0.5", "0.9", "--out", str(out), "--overrides", "data.image_size=64", "train.epochs=5",
            "data.batch_size=4", "data.val_batch_size=4"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert sorted(runs) == ["0", "1", "2"]
    for run in runs.values():
        assert [epoch["epoch"] for epoch in run["epochs"]] == [1, 2, 3, 4, 5]
        assert all(set(epoch) == {"epoch", "raw", "ema0.5", "ema0.9"} and 0 <= epoch["ema0.9"] <= 1
                   for epoch in run["epochs"])
    assert re.search(r"^ema_ranking: configs=3 rho_epoch3_raw=\S+ rho_epoch3_ema0.5=\S+$", first.stdout, re.MULTILINE)
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "0 to train" in again.stdout and json.loads(out.read_text()) == runs
    bad = subprocess.run([*args[:2], "--decays", "1.5"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "ema_ranking: --decays [1.5]: each must be in (0, 1)"


def _spearman_by_hand(a, b):
    """Pearson's correlation of the ranks, ties given their mean rank."""
    def ranks(values):
        order = sorted(values)
        return [sum(i + 1 for i, v in enumerate(order) if v == value) / order.count(value) for value in values]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_early_ranking_is_each_epochs_rank_correlation_with_the_final(tmp_path):
    _hand_table(tmp_path / "hand.parquet")
    recorded = sq.read_table(str(tmp_path / "hand.parquet"))
    curves = {0: [0.4, 0.1, 0.2], 1: [0.1, 0.6, 0.9], 2: [0.3, 0.1, 0.4], 3: [0.2, 0.3, 0.3], 4: [0.9, 0.9]}
    recorded = dataclasses.replace(recorded, curves=[{"slot_ap": np.array(curve)} for curve in curves.values()])
    full = [curve for curve in curves.values() if len(curve) == 3]  # config 4 stopped short: left out
    expected = [_spearman_by_hand([c[k] for c in full], [c[-1] for c in full]) for k in range(2)]
    assert recorded.early_ranking() == pytest.approx(expected)
    assert expected[0] == pytest.approx(-0.8) and expected[0] != expected[1]  # the hand curves rank differently
    assert math.isnan(sq.spearman([0.1, 0.1, 0.1], [0.2, 0.3, 0.4])) and math.isnan(sq.spearman([0.1], [0.2]))
