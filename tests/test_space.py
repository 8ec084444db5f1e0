"""Search spaces, the searcher and the sweep's CLI up to the point where Ray would start.

Everything here runs without a Ray cluster: the shipped space files, the conditional
define-by-run space, one-line errors for bad space files, `--dry-run`, and the
searcher's bookkeeping with Optuna (PRUNED, intermediate values, restore).
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import REPO
from orchestrate import storage, sweep_file
from orchestrate.dryrun import sample_params
from orchestrate.placement import trials_that_fit
from orchestrate.results import rows, to_table
from orchestrate.space import DefineByRun, load_space, trial_config
from orchestrate.tune import main
from psdet.errors import ConfigError

SPACES = REPO / "search_spaces"
BAD = Path(__file__).parent / "bad_spaces"

# Each bad file -> the key its one-line error must name.
BAD_SPACES = {
    "unknown_section.yaml": "schedular",
    "unknown_experiment_key.yaml": "experiment.num_sample",
    "bad_type.yaml": "experiment.num_samples",
    "bad_metric.yaml": "experiment.metric",
    "unknown_config_key.yaml": "search.optim.lrr",
    "bad_param_type.yaml": "search.optim.lr.type",
    "loguniform_nonpositive.yaml": "search.optim.lr.low",
    "low_above_high.yaml": "search.optim.lr.low",
    "when_missing_param.yaml": "search.optim.momentum.when",
    "when_impossible_value.yaml": "search.optim.momentum.when",
    "choice_rejected_by_config.yaml": "search.optim.scheduler",
    "bad_override.yaml": "experiment.overrides",
    "bad_resources.yaml": "resources.workers",
    "grace_too_long.yaml": "scheduler.grace_period",
    "missing_search.yaml": "search",
    "uniform_on_int_key.yaml": "search.train.epochs",
    "bad_fault_tolerance.yaml": "fault_tolerance.checkpoints_kept",
    "warmup_longer_than_run.yaml": "search.optim.warmup_epochs",
    "shared_gpu.yaml": "resources.gpus_per_worker",
    "baseline_outside_range.yaml": "search.optim.lr",
    "group_without_multivariate.yaml": "sampler.group",
    "objectives_bad_mode.yaml": "experiment.objectives.latency_ms",
    "objectives_unknown_metric.yaml": "experiment.objectives.latency",
    "objectives_with_metric.yaml": "experiment.metric",
    "objectives_only_one.yaml": "experiment.objectives",
    "budget_not_positive.yaml": "experiment.budget.gpu_hours",
    "budget_unknown_unit.yaml": "experiment.budget.gpu_hour",
    "image_size_step.yaml": "search.data.image_size",
    "nsga2_with_tpe_settings.yaml": "sampler.type",
}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_every_bad_space_file_is_listed():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(BAD_SPACES)


@pytest.mark.parametrize("name", sorted(BAD_SPACES))
def test_bad_space_exits_2_with_one_line_naming_file_and_key(name, capsys):
    assert main(["--space", str(BAD / name)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert str(BAD / name) in lines[0] and BAD_SPACES[name] in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("content, message", [
    ("experiment: {name: x\n", "invalid YAML"),  # unclosed mapping
    (None, "cannot read search space"),  # no such file
    ("- a\n- b\n", "must be a mapping of sections"),
])
def test_unreadable_space_file_exits_2_with_one_line_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "space.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["--space", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], lines


@pytest.mark.parametrize("command", [[sys.executable, "orchestrate/tune.py"],
                                     [str(Path(sys.executable).parent / "psdet-sweep")]])
def test_bad_space_as_a_script_exits_2(command):
    result = subprocess.run([*command, "--space", "tests/bad_spaces/bad_metric.yaml"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("tune.py: error: tests/bad_spaces/bad_metric.yaml: 'experiment.metric' "
                                     "'slot_apx' is not a reported metric (did you mean 'slot_ap'?)")


@pytest.mark.parametrize("name", ["lr", "optimizer", "scheduler", "warmup", "full", "smoke", "pareto"])
def test_shipped_spaces_load_and_every_sampled_config_is_valid(name):
    spec = load_space(SPACES / f"{name}.yaml")
    assert spec.name == name
    for params in sample_params(spec, 12):
        cfg = trial_config(spec, params, data_root="/data/ps2.0")
        assert cfg.data.root == "/data/ps2.0"
        for key, value in params.items():
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == value


def test_conditional_parameters_appear_exactly_when_their_condition_holds():
    spec = load_space(SPACES / "full.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    space = DefineByRun(spec.search)
    seen = set()
    for _ in range(300):
        trial = study.ask()
        space(trial)
        params = trial.params
        assert ("optim.momentum" in params) == (params["optim.optimizer"] == "sgd")
        assert ("optim.nesterov" in params) == (params["optim.optimizer"] == "sgd")
        assert ("optim.pct_start" in params) == (params["optim.scheduler"] == "onecycle")
        assert ("optim.lr_decay" in params) == (params["optim.scheduler"] == "step")
        assert ("optim.warmup_epochs" in params) == (params["optim.warmup"] != "none")
        assert ("optim.warmup_start_factor" in params) == (params["optim.warmup"] != "none")
        seen.update(params)
    assert seen == {p.key for p in spec.search}  # every parameter is reachable


def test_dry_run_prints_budget_resources_and_lr_preview(capsys, tmp_path):
    from PIL import Image

    plot = tmp_path / "lr.png"
    assert main(["--space", str(SPACES / "warmup.yaml"), "--dry-run", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "sweep 'warmup'" in out and "optim.warmup_epochs" in out and "when optim.warmup in" in out
    assert "12 trials x up to 8 epochs = at most 96 trial-epochs" in out
    assert "ASHA may stop a trial after epoch 2, 4" in out
    assert "one trial: 1.1 CPU (0.1 driver + 2 workers x 0.5)" in out
    assert "trial(s) fit at once" in out
    assert out.count("     lr ") == 3  # three sampled LR curves as text
    assert not (tmp_path / "runs").exists()
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] == 900


def test_dry_run_previews_the_configs_the_sweep_samples_first():
    from orchestrate.search import BASELINE, build_searcher, strip_baseline
    from orchestrate.space import baseline_params

    spec = load_space(SPACES / "full.yaml")
    searcher = build_searcher(spec, optuna.storages.InMemoryStorage())
    suggested = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [strip_baseline(config)[0] for config in suggested] == sample_params(spec, 4)
    # The first is the baseline: ps_gat's own optimizer settings, flagged; the rest are sampled.
    assert suggested[0] == {**baseline_params(spec), BASELINE: True}
    assert suggested[0]["optim.lr"] == 0.003 and suggested[0]["optim.optimizer"] == "adam_onecycle"
    assert "optim.momentum" not in suggested[0]  # only for sgd
    assert not any(BASELINE in config for config in suggested[1:])


def test_trials_that_fit_packs_drivers_and_workers():
    spec = load_space(SPACES / "optimizer.yaml")  # a trial: 0.1 CPU driver + 2 workers x 0.5 CPU (+ 1 GPU)
    assert trials_that_fit(spec, False, [{"CPU": 2}]) == 1
    assert trials_that_fit(spec, False, [{"CPU": 8}]) == 7
    assert trials_that_fit(spec, False, [{"CPU": 1.0}]) == 0
    assert trials_that_fit(spec, True, [{"CPU": 8, "GPU": 1}]) == 0
    assert trials_that_fit(spec, True, [{"CPU": 8, "GPU": 4}]) == 2
    assert trials_that_fit(spec, False, [{"CPU": 0.6}, {"CPU": 0.5}]) == 1  # workers spread over nodes


def test_cli_argument_mistakes_exit_2(capsys, tmp_path):
    smoke = str(SPACES / "smoke.yaml")
    assert main(["--space", smoke, "--plot", "x.png"]) == 2
    assert main(["--space", smoke, "--resume", "--storage", str(tmp_path)]) == 2
    assert main(["--space", smoke, "--num-samples", "0"]) == 2
    assert main(["--space", smoke, "--data", str(tmp_path), "--storage", str(tmp_path / "runs")]) == 2  # not ps2.0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("tune.py: error: ") for line in errors)
    assert "no sweep to resume" in errors[1] and "ps_json_label" in errors[3]


# ----------------------------------------------------------------------------- the searcher


def _searcher(tmp_path: Path):
    from orchestrate.search import build_searcher, optuna_storage

    spec = load_space(SPACES / "smoke.yaml")
    journal = str(tmp_path / "optuna.journal")
    return build_searcher(spec, optuna_storage(journal)), journal


def _result(epoch: int, value: float, total: int = 3) -> dict:
    return {"epoch": epoch, "point_ap": value, "total_epochs": total, "training_iteration": epoch}


def _study(journal: str):
    backend = optuna.storages.journal.JournalFileBackend(journal)
    return optuna.load_study(study_name="smoke", storage=optuna.storages.JournalStorage(backend))


def test_resume_holds_the_sweep_to_how_it_started(tmp_path, capsys):
    """sweep.json, before Ray starts: never a second sweep over a started one, and --resume
    only with the space, the place and the settings the sweep started with."""
    smoke = SPACES / "smoke.yaml"
    runs = tmp_path / "runs"
    sweep_file.write(str(runs / "smoke"), name="smoke", space_path=str(smoke), space_text=smoke.read_text(),
                     data_root=str(tmp_path / "data"), synthetic=True, optuna_storage=str(runs / "smoke" / "j"))
    changed = tmp_path / "smoke.yaml"
    changed.write_text(smoke.read_text().replace("num_samples: 3", "num_samples: 4"))
    moved = tmp_path / "moved"
    shutil.copytree(runs, moved)
    assert main(["--space", str(smoke), "--storage", str(runs)]) == 2
    assert main(["--space", str(changed), "--storage", str(runs), "--resume"]) == 2
    assert main(["--space", str(smoke), "--storage", str(runs), "--resume", "--num-samples", "5"]) == 2
    assert main(["--space", str(smoke), "--storage", str(moved), "--resume"]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("tune.py: error: ") for line in errors), errors
    assert "already holds sweep 'smoke': add --resume" in errors[0]
    assert f"{changed}: differs from the space the sweep at {runs / 'smoke'} started with" in errors[1]
    assert "drop --num-samples" in errors[2]
    assert f"was started at {runs / 'smoke'}" in errors[3]
    assert captured.out == ""  # refused before any data was made or Ray was started


def test_searcher_records_stopped_trials_as_pruned_with_their_curve(tmp_path):
    searcher, journal = _searcher(tmp_path)
    for trial_id in ("full", "stopped", "broken"):
        assert searcher.suggest(trial_id)
    for epoch, value in ((1, 0.1), (2, 0.2), (3, 0.3)):
        searcher.on_trial_result("full", _result(epoch, value))
    searcher.on_trial_complete("full", _result(3, 0.3))
    searcher.on_trial_result("stopped", _result(1, 0.05))
    searcher.on_trial_complete("stopped", _result(2, 0.07))  # ASHA's stop: its last result is not re-sent
    searcher.on_trial_complete("broken", error=True)

    trials = {t.user_attrs["tune_trial_id"]: t for t in _study(journal).trials}
    assert trials["full"].state.name == "COMPLETE" and trials["full"].value == 0.3
    assert trials["full"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}
    assert trials["stopped"].state.name == "PRUNED"
    assert trials["stopped"].intermediate_values == {1: 0.05, 2: 0.07}
    assert trials["broken"].state.name == "FAIL"


def test_searcher_restore_settles_the_study_against_the_trials_tune_restored(tmp_path):
    searcher, journal = _searcher(tmp_path)
    searcher.suggest("done")
    searcher.on_trial_complete("done", _result(3, 0.4))
    searcher.suggest("midflight")
    searcher.on_trial_result("midflight", _result(1, 0.1))
    broken_params = searcher.suggest("broken")
    searcher.on_trial_complete("broken", error=True)  # Tune resumes errored trials (resume_errored=True)
    searcher.suggest("ghost")  # the searcher's saved state has it, Tune's saved trials do not
    state = str(tmp_path / "searcher.pkl")
    searcher.save(state)
    searcher.suggest("orphan")  # asked for after the last save, then the driver died
    searcher.suggest("late")  # asked for after the searcher's save, but Tune's state has it
    searcher.on_trial_result("late", _result(1, 0.15))

    restored, _ = _searcher(tmp_path)
    restored.restore(state)
    assert restored.unsettled
    restored.settle({"done": ("TERMINATED", _result(3, 0.4)), "midflight": ("PENDING", _result(1, 0.1)),
                     "broken": ("PENDING", {}), "late": ("PENDING", _result(1, 0.15))})
    assert not restored.unsettled
    restored.on_trial_result("midflight", _result(1, 0.1))  # the same epoch again after the restart
    restored.on_trial_result("midflight", _result(2, 0.2))
    restored.on_trial_complete("midflight", _result(3, 0.3))
    restored.on_trial_complete("midflight", _result(3, 0.3))  # heard twice (limiter and StudySync): told once
    restored.on_trial_complete("done", _result(3, 0.9))  # finished before: Optuna's record stands
    restored.on_trial_complete("broken", _result(3, 0.2))
    restored.on_trial_complete("late", _result(3, 0.5))

    study = _study(journal).trials
    broken = [t for t in study if t.user_attrs["tune_trial_id"] == "broken"]
    assert [t.state.name for t in broken] == ["FAIL", "COMPLETE"]  # the retry is a new Optuna trial
    assert broken[1].params == broken[0].params == broken_params
    assert broken[1].user_attrs["retry_of"] == broken[0].number
    latest = {t.user_attrs["tune_trial_id"]: t for t in study}  # each Tune trial's newest Optuna trial
    assert latest["done"].value == 0.4
    assert latest["midflight"].state.name == "COMPLETE" and latest["midflight"].value == 0.3
    assert latest["midflight"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}
    assert latest["late"].state.name == "COMPLETE" and latest["late"].intermediate_values == {1: 0.15, 3: 0.5}
    assert "continues" in latest["late"].user_attrs
    assert latest["orphan"].state.name == latest["ghost"].state.name == "FAIL"
    assert not [t for t in study if t.state.name == "RUNNING"]
    assert len([t for t in study if t.state.name == "COMPLETE"]) == 4


# ----------------------------------------------------------------------------- results and storage


def test_results_rank_completed_first_and_keep_mixed_choices():
    def record(trial_id, status, final, best, choice):
        return {"trial_id": trial_id, "params": {"optim.lr": 0.01, "x.choice": choice}, "status": status,
                "epochs": 3 if status == "completed" else 1, "total_epochs": 3, "final": {"slot_ap": final},
                "best": {"slot_ap": best}, "checkpoint": None, "restarts": 0, "worker_restarts": 0,
                "wall_time_s": 1.0, "error": None}

    records = {r["trial_id"]: r for r in (
        record("a", "pruned", 0.9, 0.9, 1), record("b", "completed", 0.2, 0.5, "two"),
        record("c", "completed", 0.4, 0.4, 3.5), record("d", "errored", None, None, 1),
        record("e", "abandoned", 0.99, 0.99, 1))}
    table_rows = rows(records, "slot_ap", "max")
    assert [row["trial_id"] for row in table_rows] == ["c", "b", "a", "d"]
    table = to_table(table_rows)
    assert table.column("x.choice").to_pylist() == ["3.5", "two", "1", "1"]


def test_storage_join_keeps_uri_queries():
    uri = "s3://bucket/sweeps?endpoint_override=http://127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "lr", "trials.json") == (
        "s3://bucket/sweeps/lr/trials.json?endpoint_override=http://127.0.0.1:9000&scheme=http")
    assert storage.is_remote(uri) and not storage.is_remote("runs") and not storage.is_remote("/tmp/x")
    assert storage.join("/tmp/runs", "lr") == "/tmp/runs/lr"
    assert storage.display(uri, "bucket/sweeps/lr/trial_1/train/checkpoint_0") == \
        "s3://bucket/sweeps/lr/trial_1/train/checkpoint_0"


def test_storage_reads_and_writes_file_uris_as_local_paths(tmp_path):
    target = tmp_path / "sweep" / "sweep.json"
    storage.write_bytes(f"file://{target}", b"{}")
    assert target.read_bytes() == b"{}" and storage.exists(str(target))
    assert storage.read_bytes(f"file://{target}") == b"{}"
    assert storage.local_path(f"file://{tmp_path}") == tmp_path


def test_baseline_is_the_first_trial_flagged_in_tune_and_optuna(tmp_path):
    from orchestrate.search import BASELINE, strip_baseline

    searcher, journal = _searcher(tmp_path)
    first, second = searcher.suggest("base"), searcher.suggest("other")
    assert first == {"optim.lr": 0.003, "optim.warmup": "none", BASELINE: True}  # ps_gat_tiny's own values
    assert strip_baseline(first) == ({"optim.lr": 0.003, "optim.warmup": "none"}, True)
    assert BASELINE not in second and strip_baseline(second)[1] is False
    trials = {t.user_attrs["tune_trial_id"]: t for t in _study(journal).trials}
    assert trials["base"].user_attrs[BASELINE] is True and BASELINE not in trials["other"].user_attrs

    # A resumed driver reopens the study: the baseline is not asked for a second time, and
    # the sampler goes on from where it was (a fresh one would draw `second` again).
    state = str(tmp_path / "searcher.pkl")
    searcher.save(state)
    restored, _ = _searcher(tmp_path)
    restored.restore(state)
    third = restored.suggest("third")
    assert BASELINE not in third and third != second
    fresh, _ = _searcher(tmp_path / "fresh")
    fresh.suggest("base")
    assert fresh.suggest("other") == second  # the same seed draws the same


def test_baseline_can_be_switched_off_and_random_sampling_chosen(tmp_path):
    from orchestrate.search import BASELINE, build_sampler, build_searcher
    from orchestrate.space import Sampler

    spec = load_space(SPACES / "smoke.yaml")
    spec = dataclasses.replace(spec, experiment=dataclasses.replace(spec.experiment, baseline=False),
                               sampler=Sampler(type="random"))
    assert isinstance(build_sampler(spec), optuna.samplers.RandomSampler)
    searcher = build_searcher(spec, optuna.storages.InMemoryStorage())
    assert all(BASELINE not in searcher.suggest(f"t{i}") for i in range(3))
    tpe = build_sampler(load_space(SPACES / "lr.yaml"))
    assert isinstance(tpe, optuna.samplers.TPESampler)


def test_one_worker_trials_are_retried_for_worker_and_trial_failures():
    from orchestrate.space import FaultTolerance, Resources
    from orchestrate.tuner import trial_retries

    spec = load_space(SPACES / "smoke.yaml")  # 2 workers: Ray Train restarts workers, Tune retries trials
    assert trial_retries(spec) == spec.fault_tolerance.trial_max_failures == 0
    one = dataclasses.replace(spec, resources=Resources(workers=1),
                              fault_tolerance=FaultTolerance(worker_max_failures=2, trial_max_failures=1))
    assert trial_retries(one) == 3
    unlimited = dataclasses.replace(one, fault_tolerance=FaultTolerance(worker_max_failures=-1))
    assert trial_retries(unlimited) == -1
    assert trials_that_fit(one, False, [{"CPU": 2}]) == 2  # no separate driver for a one-worker trial


def test_summary_compares_best_with_baseline_and_counts_epochs_and_goodput():
    from orchestrate.results import goodput, sweep_summary

    spec = load_space(SPACES / "lr.yaml")  # 8 epochs a trial
    table = [
        {"trial_id": "b", "status": "completed", "baseline": False, "epochs": 8, "total_epochs": 8,
         "final_slot_ap": 0.61},
        {"trial_id": "a", "status": "completed", "baseline": True, "epochs": 8, "total_epochs": 8,
         "final_slot_ap": 0.44},
        {"trial_id": "c", "status": "pruned", "baseline": False, "epochs": 2, "total_epochs": 8,
         "best_slot_ap": 0.01},
    ]
    lines = sweep_summary(table, spec, {"wall_s": 100.0, "engine_s": 160.0, "slots": 2})
    assert lines[0] == ("best against baseline: trial b slot_ap 0.6100, baseline a 0.4400 (delta +0.1700)")
    assert lines[1] == "epochs: 18 spent, against 24 without early stopping (6 saved, 25%); 1 of 3 trials stopped early"
    assert lines[2].startswith("goodput: 80% (160 s of engine training + evaluation over 100 s wall x 2 trial slots)")
    assert goodput(160.0, 100.0, 2) == pytest.approx(0.8)


def test_placement_caps_concurrency_to_what_fits_and_refuses_a_local_ray_that_fits_none(capsys):
    from orchestrate.placement import concurrency, use_gpu

    spec = load_space(SPACES / "smoke.yaml")  # a trial: driver + 2 workers, max_concurrent 2
    one_trial = spec.resources.driver_cpus + 2 * spec.resources.cpus_per_worker
    assert concurrency(spec, [{"CPU": 8.0}], False, joined=False) == spec.experiment.max_concurrent
    assert concurrency(spec, [{"CPU": one_trial}], False, joined=False) == 1
    with pytest.raises(ConfigError, match="one trial needs .* CPU but the cluster's nodes offer"):
        concurrency(spec, [{"CPU": one_trial / 2}], False, joined=False)
    assert capsys.readouterr().out == ""
    assert concurrency(spec, [{"CPU": one_trial / 2}], False, joined=True) == 1  # a joined cluster may grow
    assert capsys.readouterr().out.startswith("warning: ")

    auto = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, use_gpu="auto", gpus_per_worker=1))
    assert use_gpu(auto, [{"CPU": 8.0, "GPU": 2.0}]) is True
    assert use_gpu(auto, [{"CPU": 8.0}]) is False and capsys.readouterr().out == ""
    assert use_gpu(auto, [{"CPU": 8.0, "GPU": 1.0}]) is False  # two workers, one GPU: on CPU, and said so
    assert "use_gpu auto: a trial needs 2 GPU(s) and the cluster has 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fine-tuning sweeps


def _pretrained(root: Path, *overrides: str) -> Path:
    """A psdet checkpoint of an untrained ps_gat_tiny (with `overrides`), as `psdet train` writes one."""
    from psdet import checkpoint as ckpt
    from psdet.config import dump_yaml, load_config
    from psdet.models import build_model

    cfg = load_config("ps_gat_tiny", list(overrides))
    model = build_model(cfg.model, cfg.data.max_points)
    return ckpt.save_checkpoint(root, ckpt.Position(1, 10, 0), {"model": model.state_dict()}, dump_yaml(cfg), {})


def _smoke_with(path: Path, **experiment) -> Path:
    import yaml

    space = yaml.safe_load(SMOKE_SPACE.read_text())
    space["experiment"].update(experiment)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


SMOKE_SPACE = REPO / "search_spaces" / "smoke.yaml"


def test_init_from_starts_every_trial_from_the_pretrained_weights(tmp_path):
    from orchestrate.space import check_init_from

    pretrained = _pretrained(tmp_path / "pre")
    spec = load_space(_smoke_with(tmp_path / "space.yaml", init_from=str(pretrained.relative_to(tmp_path))))
    assert spec.base_tree["train"]["init_from"] == str(pretrained.resolve())  # beside the space file
    check_init_from(spec)  # fits the base config's model
    assert trial_config(spec, {"optim.lr": 0.001, "optim.warmup": "none"}).train.init_from == str(pretrained.resolve())


def test_init_from_that_does_not_fit_is_refused_before_ray_starts(tmp_path, capsys):
    wider = _pretrained(tmp_path / "pre", "model.depth_factor=8")
    space = _smoke_with(tmp_path / "space.yaml", init_from=str(wider))
    assert main(["--space", str(space), "--dry-run", "--address", "127.0.0.1:1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(wider) in line and "does not fit the base config of" in line and "size mismatch" in line, line


@pytest.mark.parametrize("experiment, message", [
    ({"init_from": "no/such/ckpt"}, "'experiment.init_from': no checkpoint at no/such/ckpt"),
    ({"init_from": "PRE", "overrides": {"train.init_from": "x", "train.epochs": 3}}, "not both"),
])
def test_init_from_mistakes_name_the_key(tmp_path, experiment, message):
    pretrained = _pretrained(tmp_path / "pre")
    experiment = {key: (str(pretrained) if value == "PRE" else value) for key, value in experiment.items()}
    with pytest.raises(ConfigError, match=message):
        load_space(_smoke_with(tmp_path / "space.yaml", **experiment))


def test_init_from_refuses_a_searched_architecture_key(tmp_path):
    import yaml

    pretrained = _pretrained(tmp_path / "pre")
    space = yaml.safe_load(SMOKE_SPACE.read_text())
    space["experiment"]["init_from"] = str(pretrained)
    space["search"]["model.depth_factor"] = {"type": "choice", "values": [2, 4]}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    with pytest.raises(ConfigError, match="fits one architecture, but 'model.depth_factor' is searched"):
        load_space(path)
