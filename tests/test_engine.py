"""The training engine through its public entry points: `psdet train`, `psdet.engine.train`.

Exact resume is checked bit for bit in process here, and across killed and preempted
processes in test_engine_processes.py.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import FAST, REPO, _assert_same_weights, _cfg, _final_weights, _psdet, synth_data  # noqa: F401 (a fixture)
from psdet import checkpoint as ckpt
from psdet import engine
from psdet.config import load_config
from psdet.engine import train
from psdet.errors import ConfigError, NonFiniteLossError
from psdet.hooks import Hook
from psdet.models import build_model
from psdet.optim import build_optimizer
from psdet.reporting import REPORTED

class Recorder(Hook):
    """Every hook call of a run, in order, with what the hook saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def details(self, name: str) -> list:
        return [detail for called, detail in self.calls if called == name]

    def before_train(self, run):
        self.calls.append(("before_train", run.position))

    def on_restore(self, run, checkpoint):
        self.calls.append(("on_restore", (checkpoint, run.position, run.restarts)))

    def before_epoch(self, run, epoch):
        self.calls.append(("before_epoch", epoch))

    def before_step(self, run, step):
        self.calls.append(("before_step", step))

    def after_step(self, run, step):
        self.calls.append(("after_step", step))

    def on_losses(self, run, losses):
        self.calls.append(("on_losses", losses))

    def on_checkpoint(self, run, path, seconds):
        self.calls.append(("on_checkpoint", (path, run.position, seconds)))

    def after_epoch(self, run, metrics):
        self.calls.append(("after_epoch", metrics))

    def on_evaluation(self, run, metrics, checkpoint):
        self.calls.append(("on_evaluation", (metrics, checkpoint)))

    def after_train(self, run):
        self.calls.append(("after_train", None))


def test_resume_from_mid_epoch_checkpoint_in_process(synth_data, tmp_path):
    cfg = _cfg(synth_data, "train.epochs=2", "train.ckpt_every_steps=3", "train.keep_checkpoints=10")
    clean = tmp_path / "clean"
    train(cfg, clean)
    checkpoints = ckpt.list_checkpoints(clean / "checkpoints")
    mid_epoch = [p for p in checkpoints if ckpt.read_meta(p)["batch"] > 0]
    assert mid_epoch, [p.name for p in checkpoints]
    start = mid_epoch[-1]
    assert ckpt.read_meta(start)["epoch"] == 1  # mid-way through the second epoch

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(start, resumed / "checkpoints" / start.name)
    recorder = Recorder()
    metrics = train(cfg, resumed, resume=ckpt.LocalResume(resumed / "checkpoints"), hooks=[recorder])
    assert metrics["restarts"] == 1
    _assert_same_weights(_final_weights(clean), _final_weights(resumed))
    meta = ckpt.read_meta(start)
    assert recorder.details("on_restore") == [
        (resumed / "checkpoints" / start.name, ckpt.Position(meta["epoch"], meta["step"], meta["batch"]), 1)]
    assert recorder.details("before_step")[0] == meta["step"]  # the step after the checkpoint's, not a rerun
    assert recorder.details("before_epoch") == [1]


def test_corrupt_newest_checkpoint_falls_back_with_warning(synth_data, tmp_path, caplog):
    cfg = _cfg(synth_data, "train.epochs=2")
    run = tmp_path / "run"
    train(cfg, run)
    first, newest = ckpt.list_checkpoints(run / "checkpoints")[-2:]
    state_file = newest / ckpt.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:1000])  # truncated copy

    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.read_meta(newest)
    psdet_log = logging.getLogger("psdet")  # psdet's logger does not propagate to the root
    psdet_log.addHandler(caplog.handler)
    try:
        assert ckpt.latest_valid(run / "checkpoints") == first
    finally:
        psdet_log.removeHandler(caplog.handler)
    assert any("corrupt" in r.message and first.name in r.message for r in caplog.records)

    # Resuming continues from the previous checkpoint and finishes the run.
    metrics = train(cfg, run, resume=ckpt.LocalResume(run / "checkpoints"))
    assert metrics["epoch"] == 2 and metrics["restarts"] == 1


def test_checkpoint_holds_full_state_and_loads_weights_only(synth_data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(synth_data, "train.epochs=1"), run)
    (only,) = ckpt.list_checkpoints(run / "checkpoints")
    state = torch.load(only / ckpt.STATE_FILE, weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "batch", "restarts", "rng"} <= state.keys()
    assert {"python", "numpy", "torch"} <= state["rng"].keys()
    assert load_config(only / ckpt.CONFIG_FILE).data.image_size == 128
    assert not list((run / "checkpoints").glob(".tmp-*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and "slot_ap" in rows[-1] and rows[-1]["checkpoint"] == str(only)


def test_keeps_only_newest_checkpoints(synth_data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(synth_data, "train.epochs=4", "train.keep_checkpoints=2"), run)
    assert [p.name[:10] for p in ckpt.list_checkpoints(run / "checkpoints")] == ["ckpt-e0003", "ckpt-e0004"]


def test_non_finite_loss_names_step_and_terms(synth_data, tmp_path):
    result = subprocess.run(
        _psdet("train", "-c", "ps_gat_tiny", "--data", str(synth_data), "--out", str(tmp_path / "nan"),
               *[f"-o={o}" for o in FAST], "-o", "model.weight_point=.nan"),
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss at epoch 1, step 1" in last
    assert "loss_point=" in last and "loss_edge=" in last
    assert "Traceback" not in result.stderr


def test_resuming_a_finished_run_reports_its_final_metrics_again(synth_data, tmp_path):
    cfg = _cfg(synth_data, "train.epochs=1")
    run = tmp_path / "run"
    first = train(cfg, run)
    again = train(cfg, run, resume=ckpt.LocalResume(run / "checkpoints"))
    assert again["restarts"] == 1 and again["epoch"] == 1 and again["total_epochs"] == 1
    assert first["train_s"] > 0 and first["eval_s"] > 0
    assert again["train_s"] == again["eval_s"] == 0  # nothing trained: no engine seconds for a sweep's goodput
    kept = lambda metrics: {k: v for k, v in metrics.items() if k not in ("restarts", "train_s", "eval_s")}  # noqa: E731
    assert kept(again) == kept(first)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and len(ckpt.list_checkpoints(run / "checkpoints")) == 1


def test_hooks_see_every_step_checkpoint_and_evaluation_in_order(synth_data, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(synth_data, "train.epochs=2", "train.ckpt_every_steps=4", "train.keep_checkpoints=10")
    recorder = Recorder()
    metrics = train(cfg, run, hooks=[recorder])

    names = recorder.names()
    assert names[0] == "before_train" and names[-1] == "after_train" and "on_restore" not in names
    assert recorder.details("before_epoch") == [0, 1]
    # 48 images / 8 per batch = 6 steps per epoch; each step's two calls side by side
    assert recorder.details("before_step") == recorder.details("after_step") == list(range(12))
    for index, name in enumerate(names):
        if name == "before_step":
            assert names[index + 1] == "after_step"
    assert [(losses.epoch, losses.batch, losses.step) for losses in recorder.details("on_losses")] == [
        (0, 2, 2), (0, 4, 4), (0, 6, 6), (1, 2, 8), (1, 4, 10), (1, 6, 12)]  # every log_interval = 2 steps
    assert all(set(losses.losses) == {"loss", "loss_point", "loss_edge"} for losses in recorder.details("on_losses"))

    checkpoints = recorder.details("on_checkpoint")  # mid-epoch every 4 steps, and each epoch's end
    assert [position for _, position, _ in checkpoints] == [
        ckpt.Position(0, 4, 4), ckpt.Position(1, 6, 0), ckpt.Position(1, 8, 2), ckpt.Position(2, 12, 0)]
    assert [path for path, _, _ in checkpoints] == ckpt.list_checkpoints(run / "checkpoints")
    assert all(seconds > 0 for _, _, seconds in checkpoints)

    evaluations = recorder.details("on_evaluation")
    assert [report["epoch"] for report, _ in evaluations] == [1, 2]
    assert all(set(REPORTED) <= set(report) for report, _ in evaluations)
    assert [checkpoint for _, checkpoint in evaluations] == [checkpoints[1][0], checkpoints[3][0]]
    assert evaluations[-1][0] == metrics
    epoch_ends = [index for index, name in enumerate(names) if name == "after_epoch"]
    assert [names[index + 1:index + 3] for index in epoch_ends] == [["on_checkpoint", "on_evaluation"]] * 2
    assert recorder.details("after_epoch")[0]["images_per_s"] > 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # the built-in reporter, beside ours


def test_non_finite_loss_stops_the_loader_workers_and_closes_tensorboard(synth_data, tmp_path):
    run = tmp_path / "nan"
    cfg = _cfg(synth_data, "model.weight_point=.nan", "data.num_workers=2")
    threads = set(threading.enumerate())
    recorder = Recorder()
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1") as raised:
        train(cfg, run, hooks=[recorder])
    assert raised.traceback  # the loop's frames are still alive, and with them whatever they held
    assert multiprocessing.active_children() == []  # the DataLoader's two workers have stopped
    deadline = time.monotonic() + 10  # a closed queue's feeder thread ends a moment later
    while set(threading.enumerate()) - threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [thread.name for thread in set(threading.enumerate()) - threads] == []  # TensorBoard's writer's too
    assert recorder.names()[-1] == "after_train"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_a_checkpoint_in_the_stored_layout_resumes(synth_data, tmp_path):
    """state.pt as checkpoints have always held it, written here without the engine: a run
    resumes from it where it says (a change to Run.state_dict must keep reading these)."""
    cfg = _cfg(synth_data, "train.epochs=2")
    torch.manual_seed(5)
    model = build_model(cfg.model, cfg.data.max_points)
    optimizer = build_optimizer(model, cfg.optim)
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(),
        "epoch": 1, "step": 6, "batch": 0, "restarts": 3, "rng": ckpt.capture_rng_state(),
    }
    run = tmp_path / "run"
    saved = ckpt.save_checkpoint(run / "checkpoints", ckpt.Position(1, 6, 0), state, "name: stored\n", {"loss": 1.0})
    recorder = Recorder()
    metrics = train(cfg, run, resume=ckpt.LocalResume(run / "checkpoints"), hooks=[recorder])
    assert recorder.details("on_restore") == [(saved, ckpt.Position(1, 6, 0), 4)]
    assert recorder.details("before_step") == list(range(6, 12))
    assert metrics["epoch"] == 2 and metrics["step"] == 12 and metrics["restarts"] == 4


class BoardOnDisk(Hook):
    """At each evaluation (after the built-in hooks, as the reporter is): the tags in `logdir`'s event files."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.tags: list[set[str]] = []

    def on_evaluation(self, run, metrics, checkpoint) -> None:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        self.tags.append({value.tag for path in self.logdir.glob("events.out.tfevents.*")
                          for event in EventFileLoader(str(path)).Load() for value in event.summary.value})


def test_tensorboard_dir_keeps_one_run_across_a_resume_with_its_hparams(synth_data, tmp_path, monkeypatch):
    """train.tensorboard_dir names the run in TensorBoard; a resumed run writes into the same
    directory and purges what the first run logged past the checkpoint it resumes from. Every
    event file is named as if opened in one second (tensorboardX names a file by its second),
    so their order is the name's suffix (it was not: the resumed run's first file sorted before
    the first run's second, in this process, and TensorBoard read them in that order)."""
    import time

    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboardX import event_file_writer

    class OneSecond:  # the time module, but time() is always in the same second
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def time() -> float:
            return 1764700000.25

    monkeypatch.setattr(event_file_writer, "time", OneSecond())

    boards = tmp_path / "boards"
    cfg = _cfg(synth_data, "train.epochs=2", "train.ckpt_every_steps=3", "train.keep_checkpoints=10",
               f"train.tensorboard_dir={boards / 'lr=0.003,warmup=none'}",
               "train.tensorboard_hparams=[optim.lr, optim.warmup]")
    first = tmp_path / "first"
    on_disk = BoardOnDisk(boards / "lr=0.003,warmup=none")
    train(cfg, first, hooks=[on_disk])  # it runs to the end, as a run that died after its last log line would have
    # What a reporter sees on disk when it gets an evaluation (a trial stopped on it is killed at once).
    assert [{"_hparams_/session_start_info", "val/point_ap"} <= tags for tags in on_disk.tags] == [True, True]
    assert not (first / "tensorboard").exists()
    mid_epoch = [p for p in ckpt.list_checkpoints(first / "checkpoints") if ckpt.read_meta(p)["batch"] > 0][-1]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid_epoch, resumed / "checkpoints" / mid_epoch.name)
    train(cfg, resumed, resume=ckpt.LocalResume(resumed / "checkpoints"))
    # A file per evaluation and run: the first run's two, the resumed one's one (its last epoch's evaluation).
    assert len(list((boards / "lr=0.003,warmup=none").glob("events.out.tfevents.*"))) == 3

    board = EventMultiplexer(tensor_size_guidance={"scalars": 0})  # TensorBoard's own reader of a logdir
    board.AddRunsFromDirectory(str(boards))
    board.Reload()
    assert list(board.Runs()) == ["lr=0.003,warmup=none"]
    run = board.GetAccumulator("lr=0.003,warmup=none")
    # 48 images, 8 per batch: 6 steps per epoch; losses every 2 steps and at the epoch's end.
    # The first run's from step 2 to 12, the resumed one's from its checkpoint's step 9 on: 11, 12 (the epoch's end).
    assert ckpt.read_meta(mid_epoch)["step"] == 9
    assert [e.step for e in run.Tensors("train/loss")] == [2, 4, 6, 8, 11, 12]
    assert [e.step for e in run.Tensors("val/point_ap")] == [6, 12]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        run.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.003)
    assert start.hparams["optim.warmup"].string_value == "none"


def test_tensorboard_hparams_must_name_config_keys(synth_data):
    with pytest.raises(ConfigError, match=r"'train.tensorboard_hparams' names 'optim.lrr', which is no config key"):
        _cfg(synth_data, "train.tensorboard_hparams=[optim.lrr]")


class WeightsAfterEachStep(Hook):
    """The model's weights and BatchNorm statistics after every optimizer step (copies)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def after_step(self, run, step):
        self.states.append({name: value.detach().clone() for name, value in run.raw_model.state_dict().items()})


def test_moving_average_of_the_weights_is_what_is_evaluated_delivered_and_resumed(synth_data, tmp_path):
    from psdet.distributed import DistContext
    from psdet.engine import run_evaluation
    from psdet.data import build_dataset

    decay = 0.8
    cfg = _cfg(synth_data, "train.epochs=2", f"train.ema_decay={decay}", "train.ckpt_every_steps=3",
               "train.keep_checkpoints=10")
    clean = tmp_path / "clean"
    steps = WeightsAfterEachStep()
    metrics = train(cfg, clean, hooks=[steps])

    # the slow reference: the average by hand over every step's weights (the first step's copied in)
    newest = ckpt.list_checkpoints(clean / "checkpoints")[-1]
    state, _ = ckpt.load_checkpoint(newest)
    assert state["ema_updates"] == len(steps.states) == 2 * 6
    for name, value in state[ckpt.EMA_KEY].items():
        if not value.is_floating_point():
            continue
        expected = steps.states[0][name].double()
        for weights in steps.states[1:]:
            expected = decay * expected + (1 - decay) * weights[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6, msg=f"{name}")
    assert any(not torch.equal(value, state["model"][name]) for name, value in state[ckpt.EMA_KEY].items())

    # the checkpoint delivers the average, and evaluation scored it
    model = build_model(cfg.model, cfg.data.max_points)
    assert ckpt.load_model_weights(model, clean, "the test config") == newest
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False, seed=cfg.train.seed)
    one_cpu = DistContext(0, 1, 0, torch.device("cpu"))
    rescored = run_evaluation(model, val_set, cfg, one_cpu)
    assert rescored["point_ap"] == pytest.approx(metrics["point_ap"]) and rescored["slot_ap"] == pytest.approx(metrics["slot_ap"])
    _assert_same_weights(model.state_dict(), state[ckpt.EMA_KEY])

    # a resume mid-epoch ends with the same weights and the same average, bit for bit
    start = [p for p in ckpt.list_checkpoints(clean / "checkpoints") if ckpt.read_meta(p)["batch"] > 0][-1]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(start, resumed / "checkpoints" / start.name)
    train(cfg, resumed, resume=ckpt.LocalResume(resumed / "checkpoints"))
    resumed_state, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(resumed / "checkpoints")[-1])
    _assert_same_weights(state["model"], resumed_state["model"])
    _assert_same_weights(state[ckpt.EMA_KEY], resumed_state[ckpt.EMA_KEY])

    # a checkpoint without an average does not resume a run that keeps one
    plain = tmp_path / "plain"
    train(_cfg(synth_data, "train.epochs=1"), plain)
    with pytest.raises(ckpt.CheckpointError, match="no moving average of the weights, and train.ema_decay is 0.8"):
        train(cfg, plain, resume=ckpt.LocalResume(plain / "checkpoints"))


def test_ema_decay_must_be_below_one(synth_data):
    with pytest.raises(ConfigError, match=r"'train.ema_decay' must be in \[0, 1\) \(0 = off\), got 1.0"):
        _cfg(synth_data, "train.ema_decay=1.0")


def _bf16_cfg(data, *extra: str):
    return _cfg(data, "train.precision=bf16", "train.channels_last=true", *extra)


def test_bf16_on_the_cpu_runs_channels_last_and_resumes_exactly(synth_data, tmp_path, monkeypatch):
    """bf16 autocast in the channels-last layout on a CPU with bf16 in hardware (forced here,
    so any CPU runs it, emulated where it must): the run is in bf16 and channels-last, its
    weights are not the fp32 run's, and a mid-epoch resume is bit-exact."""
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    seen = []

    class Layout(Hook):
        def before_train(self, run):
            kernels = [p for p in run.raw_model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
            seen.append((run.autocast_dtype, run.channels_last,
                         all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)))

    cfg = _bf16_cfg(synth_data, "train.epochs=2", "train.ckpt_every_steps=3", "train.keep_checkpoints=10")
    clean = tmp_path / "clean"
    train(cfg, clean, hooks=[Layout()])
    assert seen == [(torch.bfloat16, True, True)]
    train(_cfg(synth_data, "train.epochs=2"), tmp_path / "fp32")
    assert any(not torch.equal(a, b) for a, b in zip(_final_weights(clean).values(),
                                                      _final_weights(tmp_path / "fp32").values()))

    start = [p for p in ckpt.list_checkpoints(clean / "checkpoints") if ckpt.read_meta(p)["batch"] > 0][-1]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(start, resumed / "checkpoints" / start.name)
    assert train(cfg, resumed, resume=ckpt.LocalResume(resumed / "checkpoints"))["restarts"] == 1
    _assert_same_weights(_final_weights(clean), _final_weights(resumed))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cpu_autocast_it_cannot_run_fast_is_fp32_with_a_warning(synth_data, tmp_path, monkeypatch, capsys,
                                                                precision):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    cpu = torch.device("cpu")
    cfg = _cfg(synth_data, "train.epochs=1", f"train.precision={precision}", "train.channels_last=true")
    assert engine.autocast_dtype(cfg, cpu) is None and not engine.uses_channels_last(cfg, cpu)
    train(cfg, tmp_path / precision)
    assert f"WARNING train.precision {precision} runs in fp32 on this CPU" in capsys.readouterr().err
    train(_cfg(synth_data, "train.epochs=1"), tmp_path / "fp32")
    _assert_same_weights(_final_weights(tmp_path / precision), _final_weights(tmp_path / "fp32"))
    # fp32 never goes channels-last on the CPU (its backward segfaults there in torch 2.13)
    assert not engine.uses_channels_last(_cfg(synth_data, "train.channels_last=true"), cpu)
