"""The per-worker training loop. It knows nothing of Ray: it gets a reporter, a resume
source and hooks.

`train` reads top to bottom: logging, process group (when launched distributed), seeding,
data, the run (model, SyncBN, optimizer, AMP scaler), restore, DDP wrap, then epochs of
`train_step` with evaluation every `eval_interval` epochs and a checkpoint every
`ckpt_interval` epochs (and every `ckpt_every_steps` steps), keeping the newest
`keep_checkpoints`. The learning rate and momentum of each step come from psdet.optim.
A checkpoint is `Run.state_dict()`; a restore is `Run.load_state_dict()` of the same dict.
Everything that watches the loop (log lines, progress, TensorBoard, the reporter, a
benchmark's timer) is a psdet.hooks.Hook.

The only assumption on the outside world: every rank calls `train` with the same config.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from psdet import checkpoint as ckpt
from psdet import distributed
from psdet.config import Config, dump_yaml
from psdet.cost import CostMeter
from psdet.data import build_dataset
from psdet.data.batch import collate_fn, model_input
from psdet.errors import ConfigError, DataError, NonFiniteLossError
from psdet.hooks import Hook, StepLosses, default_hooks
from psdet.metrics import evaluate, truth_from_batch
from psdet.models import build_model
from psdet.optim import apply_schedule, build_optimizer
from psdet.preemption import Preempted, PreemptionNotice
from psdet.reporting import LOSS_TERMS, TOTAL_EPOCHS, LocalReporter, Reporter
from psdet.sampler import ResumableSampler

log = logging.getLogger("psdet")

LossFn = Callable[[dict[str, torch.Tensor], dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def setup_logging(out_dir: Path | None, is_main: bool) -> None:
    """psdet's logger: INFO to stderr on rank 0 (warnings elsewhere), and `OUT/train.log`,
    which also gets the DEBUG lines (the losses of every log interval)."""
    log.setLevel(logging.DEBUG if is_main else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.INFO)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if out_dir is not None and is_main:
        file_handler = logging.FileHandler(out_dir / "train.log")
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """This CPU does bf16 matrix math in hardware (AVX512-BF16 or AMX), where oneDNN's bf16
    convolutions are faster than fp32 ones; elsewhere they are emulated, and slower."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The forward's autocast dtype for `train.precision`; None runs in fp32. On CUDA, bf16 or
    fp16; on the CPU, bf16 where the CPU has it in hardware (`cpu_has_native_bf16`), else fp32,
    and fp16 always fp32 (build_run says so)."""
    if cfg.train.precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.bfloat16 if cfg.train.precision == "bf16" and cpu_has_native_bf16() else None


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """Model and input in channels-last memory format: `train.channels_last`, on CUDA, and on
    the CPU under bf16 autocast only (torch 2.13's fp32 channels-last backward on the CPU
    segfaults in oneDNN; under bf16 it is the fast layout: README, Performance)."""
    return cfg.train.channels_last and (device.type == "cuda" or autocast_dtype(cfg, device) is not None)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One worker's run, built: what `train_step`, a checkpoint and every hook see.

    `raw_model` is the detector itself (its parameters, `loss`, `predict`, the state_dict a
    checkpoint holds); `model` is what the forward runs: `raw_model`, or DDP around it.
    `position` is where training stood at the last checkpoint or epoch end; `restarts`
    how often this run was restored from a checkpoint. `ema` is the moving average of
    `raw_model` when `train.ema_decay` > 0 (updated after every step); `eval_model` is
    what evaluation scores and a checkpoint delivers (psdet.checkpoint.delivered_weights).
    A checkpoint's `state.pt` is `state_dict()`, and `load_state_dict` of that dict puts the
    run back, RNG and moving average included.
    """

    cfg: Config
    ctx: distributed.DistContext
    raw_model: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    channels_last: bool  # input (and model) in channels-last memory format
    autocast_dtype: torch.dtype | None  # the forward runs under autocast to this dtype; None: fp32
    ema: AveragedModel | None = None
    position: ckpt.Position = ckpt.Position(epoch=0, step=0, batch=0)
    restarts: int = 0

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.raw_model if self.ema is None else self.ema.module

    def state_dict(self) -> dict[str, Any]:
        ema = {} if self.ema is None else {ckpt.EMA_KEY: self.ema.module.state_dict(),
                                           "ema_updates": int(self.ema.n_averaged)}
        return {
            "model": self.raw_model.state_dict(),
            **ema,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.position.epoch,
            "step": self.position.step,
            "batch": self.position.batch,
            "restarts": self.restarts,
            "rng": ckpt.capture_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        if self.ema is not None:
            if ckpt.EMA_KEY not in state:
                raise ckpt.CheckpointError("the checkpoint has no moving average of the weights, and "
                                           f"train.ema_decay is {self.cfg.train.ema_decay}: resume it with "
                                           "train.ema_decay=0, or start from its weights (train.init_from)")
            self.ema.module.load_state_dict(state[ckpt.EMA_KEY])
            self.ema.n_averaged.fill_(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = ckpt.Position(state["epoch"], state["step"], state["batch"])
        self.restarts = state["restarts"]
        ckpt.restore_rng_state(state["rng"])


def build_run(cfg: Config, ctx: distributed.DistContext, steps_per_epoch: int,
              raw_model: torch.nn.Module | None = None) -> Run:
    """The model (a fresh `build_model` unless given; SyncBN under DDP on CUDA) on `ctx.device`,
    its optimizer and AMP scaler, at step 0. `model` is `raw_model` until `train` wraps it in DDP."""
    raw_model = build_model(cfg.model, cfg.data.max_points) if raw_model is None else raw_model
    if cfg.train.sync_bn and ctx.distributed:
        if ctx.device.type == "cuda":
            raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        else:
            log.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA; BatchNorm stays per-process on %s",
                        ctx.device)
    if ctx.device.type == "cpu" and cfg.train.precision != "fp32" and autocast_dtype(cfg, ctx.device) is None:
        log.warning("train.precision %s runs in fp32 on this CPU (%s)", cfg.train.precision,
                    "fp16 autocast is for CUDA" if cfg.train.precision == "fp16" else "it has no bf16 in hardware")
    channels_last = uses_channels_last(cfg, ctx.device)
    raw_model.to(ctx.device)
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(raw_model, cfg.optim)
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.device.type == "cuda" and cfg.train.precision == "fp16")
    ema = None
    if cfg.train.ema_decay > 0:  # a copy of the model; the first update copies the weights in
        ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    return Run(cfg, ctx, raw_model, raw_model, optimizer, scaler, steps_per_epoch, channels_last,
               autocast_dtype(cfg, ctx.device), ema)


def restore(run: Run, checkpoint: Path) -> dict[str, float]:
    """Put `run` back to the verified `checkpoint` (one more restart); -> the metrics saved with it."""
    state, meta = ckpt.load_checkpoint(checkpoint)
    run.load_state_dict(state)
    run.restarts += 1
    return meta["metrics"]


# ----------------------------------------------------------------------------- one step


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Every tensor to `device`; `image` becomes the model's float input, colour-jittered when training."""
    moved = {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
             for key, value in batch.items()}
    moved["image"] = model_input(moved["image"], moved.pop("jitter", None), channels_last)
    return moved


def train_step(run: Run, batch: dict[str, Any], step: int,
               loss_fn: LossFn | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Global step `step` (0-based) on one collated batch: set that step's lr and momentum,
    move the batch to the device as model input, forward (under `run.autocast_dtype`), loss
    (`loss_fn(outputs, batch)`, by default the detector's own), backward through the AMP
    scaler, grad-norm clip, optimizer step, then the moving average of the weights (if any).

    -> (the loss terms [3] in psdet.reporting.LOSS_TERMS order, detached, on the device,
    unsynced; {"lr", "momentum"} of the step).
    """
    cfg = run.cfg
    schedule = apply_schedule(run.optimizer, cfg.optim, step, run.steps_per_epoch, cfg.train.epochs)
    batch = _to_device(batch, run.ctx.device, run.channels_last)
    with _autocast(run.ctx.device, run.autocast_dtype):
        outputs = run.model(batch["image"], batch["marks"], batch["num_marks"])
    loss, terms = (loss_fn or run.raw_model.loss)(outputs, batch)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.optim.grad_norm_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.optim.grad_norm_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update_parameters(run.raw_model)
    return torch.stack([loss.detach(), terms["loss_point"].detach(), terms["loss_edge"].detach()]), schedule


# ----------------------------------------------------------------------------- train


def train(cfg: Config, out_dir: Path, reporter: Reporter | None = None, *,
          resume: ckpt.ResumeSource | None = None, hooks: Sequence[Hook] = ()) -> dict[str, float]:
    """Train `cfg` on this worker; returns the last reported metrics.

    Alone it runs on one device; under torchrun (or inside Ray Train, which has already
    made the process group) every rank runs this with the same config and DDP keeps
    them in step. `reporter` receives each evaluation (default: `OUT/metrics.jsonl`);
    `resume` says which checkpoint to continue from (default: none, start fresh);
    `hooks` watch the loop, after the built-in ones (psdet.hooks.default_hooks).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, out_dir, ctx, reporter or LocalReporter(out_dir, is_main=ctx.is_main), resume, hooks)
    finally:
        distributed.teardown(owns_group)


@dataclass(frozen=True)
class _Data:
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    sampler: ResumableSampler
    batch_size: int  # per worker


def _train(cfg: Config, out_dir: Path, ctx: distributed.DistContext, reporter: Reporter,
           resume: ckpt.ResumeSource | None, extra_hooks: Sequence[Hook]) -> dict[str, float]:
    setup_logging(out_dir, ctx.is_main)
    config_yaml = dump_yaml(cfg)
    log.info("config:\n%s", config_yaml)
    log.info("device %s, rank %d of %d, pid %d", ctx.device, ctx.rank, ctx.world_size, os.getpid())
    seed_everything(cfg.train.seed)
    data = _build_data(cfg, ctx)
    run = build_run(cfg, ctx, data.sampler.batches_per_epoch)
    log.info("model: %d parameters", sum(p.numel() for p in run.raw_model.parameters()))
    hooks = [*default_hooks(run, out_dir, reporter), *extra_hooks]
    checkpoints = _Checkpoints(out_dir / "checkpoints", config_yaml, cfg.train.keep_checkpoints)
    try:
        for hook in hooks:
            hook.before_train(run)
        checkpoint = resume.latest_checkpoint() if resume is not None else None
        if checkpoint is None and cfg.train.init_from:
            loaded = ckpt.load_model_weights(run.raw_model, Path(cfg.train.init_from), f"config '{cfg.name}'")
            log.info("model weights from %s (train.init_from)", loaded)
        if checkpoint is not None:
            resumed_metrics = restore(run, checkpoint)
            for hook in hooks:
                hook.on_restore(run, checkpoint)
            if run.position.epoch >= cfg.train.epochs:
                return _report_finished_run(run, resumed_metrics, hooks)
        if ctx.distributed:
            run.model = DistributedDataParallel(
                run.raw_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        with PreemptionNotice() as notice:
            return _train_epochs(run, data, checkpoints, hooks, notice,
                                 cost_meter(run.raw_model, data.val_set, cfg, ctx))
    finally:
        for hook in hooks:
            hook.after_train(run)  # on every exit: a non-finite loss, a stop, a kill by the scheduler


def _train_epochs(run: Run, data: _Data, checkpoints: _Checkpoints, hooks: list[Hook],
                  notice: PreemptionNotice, cost: CostMeter | None = None) -> dict[str, float]:
    """The epoch-and-step loop from `run.position` to the last epoch; -> the last epoch's metrics.
    Each evaluation also reports `cost`'s latency, params and gflops (psdet.cost). On a
    preemption notice: a checkpoint after the step (or the epoch) it came in, then Preempted."""
    cfg, epochs = run.cfg, run.cfg.train.epochs
    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    for epoch in range(run.position.epoch, epochs):
        first_step = step = run.position.step
        skip = run.position.batch  # > 0 only in an epoch resumed mid-way
        data.train_set.set_epoch(epoch)
        data.sampler.set_epoch(epoch, skip_batches=skip)
        run.raw_model.train()
        for hook in hooks:
            hook.before_epoch(run, epoch)
        pending: list[torch.Tensor] = []  # per-step loss terms, checked once per log interval
        epoch_terms, epoch_steps, schedule = torch.zeros(len(LOSS_TERMS), dtype=torch.float64), 0, {}
        started = time.perf_counter()
        with contextlib.closing(_epoch_batches(data, cfg, epoch, run.ctx.device)) as batches:
            for done, batch in enumerate(batches, start=skip + 1):
                for hook in hooks:
                    hook.before_step(run, step)
                losses, schedule = train_step(run, batch, step)
                for hook in hooks:
                    hook.after_step(run, step)
                step += 1
                pending.append(losses)
                if len(pending) >= cfg.train.log_interval or done == run.steps_per_epoch:
                    values = _check_finite(pending, step, epoch)
                    epoch_terms += values.sum(0)
                    epoch_steps += len(pending)
                    pending = []
                    newest = StepLosses(epoch, done, step, dict(zip(LOSS_TERMS, values[-1].tolist())),
                                        schedule["lr"], schedule["momentum"])
                    for hook in hooks:
                        hook.on_losses(run, newest)
                if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0 and done < run.steps_per_epoch:
                    run.position = ckpt.Position(epoch, step, done)
                    checkpoints.save(run, {}, hooks)
                if done < run.steps_per_epoch and notice.requested(run.ctx, step, cfg.train.log_interval):
                    run.position = ckpt.Position(epoch, step, done)
                    raise _preempted(run, checkpoints.save(run, {}, hooks), step, hooks)
        elapsed = time.perf_counter() - started
        metrics = dict(zip(LOSS_TERMS, (epoch_terms / max(epoch_steps, 1)).tolist()))
        metrics.update(epoch=epoch + 1, step=step, lr=schedule.get("lr", float("nan")),
                       images_per_s=(step - first_step) * cfg.data.batch_size / max(elapsed, 1e-9),
                       restarts=run.restarts, train_s=elapsed, eval_s=0.0)
        metrics[TOTAL_EPOCHS] = epochs
        for hook in hooks:
            hook.after_epoch(run, dict(metrics))

        finished = epoch + 1 == epochs
        is_eval = (epoch + 1) % cfg.train.eval_interval == 0 or finished
        if is_eval:
            eval_started = time.perf_counter()
            eval_metrics = run_evaluation(run.eval_model, data.val_set, cfg, run.ctx)
            eval_metrics.update(measure_cost(cost, run.ctx))  # every rank: rank 0 broadcasts
            metrics["eval_s"] = time.perf_counter() - eval_started
        metrics.update(eval_metrics)
        run.position = ckpt.Position(epoch + 1, step, 0)
        is_ckpt = (epoch + 1) % cfg.train.ckpt_interval == 0 or finished
        saved = checkpoints.save(run, metrics, hooks) if is_ckpt else None
        if is_eval:
            for hook in hooks:
                hook.on_evaluation(run, dict(metrics), saved)
        if not finished and notice.requested(run.ctx):
            raise _preempted(run, saved if is_ckpt else checkpoints.save(run, metrics, hooks), step, hooks)
    return metrics


def _preempted(run: Run, checkpoint: Path | None, step: int, hooks: list[Hook]) -> Preempted:
    """The exception that ends a preempted run, said in the run's log too (inside Ray nobody
    else prints it), once the hooks have been told (`on_preemption`)."""
    stop = Preempted(checkpoint, step)
    log.warning("%s", stop)
    for hook in hooks:
        hook.on_preemption(run, checkpoint, step)
    return stop


def _report_finished_run(run: Run, resumed_metrics: dict[str, float], hooks: list[Hook]) -> dict[str, float]:
    """A run restored after its last epoch (e.g. the driver died right after it) trains nothing,
    but its listeners get its final metrics once more, with no engine seconds."""
    log.info("the run had already finished; reporting its final metrics again")
    final = {**resumed_metrics, "restarts": run.restarts, "train_s": 0.0, "eval_s": 0.0}
    for hook in hooks:
        hook.on_evaluation(run, dict(final), None)
    return final


@dataclass(frozen=True)
class _Checkpoints:
    """Where and how this run writes its checkpoints."""

    root: Path
    config_yaml: str
    keep: int

    def save(self, run: Run, metrics: dict[str, float], hooks: list[Hook]) -> Path | None:
        """Rank 0 writes `run.state_dict()` at `run.position` and prunes; every rank waits for it.
        -> the checkpoint directory on rank 0, None elsewhere."""
        path = None
        if run.ctx.is_main:
            state = run.state_dict()
            started = time.perf_counter()
            path = ckpt.save_checkpoint(self.root, run.position, state, self.config_yaml, metrics)
            seconds = time.perf_counter() - started
            for hook in hooks:
                hook.on_checkpoint(run, path, seconds)
            ckpt.prune(self.root, self.keep)
        distributed.barrier(run.ctx)
        return path


# ----------------------------------------------------------------------------- data


def _build_data(cfg: Config, ctx: distributed.DistContext) -> _Data:
    if cfg.data.batch_size % ctx.world_size:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is not divisible by the {ctx.world_size} workers")
    batch_size = cfg.data.batch_size // ctx.world_size
    log.info("batch size %d per worker, %d in total", batch_size, cfg.data.batch_size)
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.train.seed)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False, seed=cfg.train.seed)
    sampler = ResumableSampler(len(train_set), batch_size, seed=cfg.train.seed, rank=ctx.rank,
                               world_size=ctx.world_size, drop_last=cfg.data.drop_last)
    if sampler.batches_per_epoch == 0:
        raise DataError(
            f"{cfg.data.root}: {len(train_set)} training images give no full batch of {batch_size} per worker; "
            "lower data.batch_size or add images"
        )
    log.info("%d training images, %d validation images, %d steps per epoch",
             len(train_set), len(val_set), sampler.batches_per_epoch)
    return _Data(train_set, val_set, sampler, batch_size)


def _epoch_batches(data: _Data, cfg: Config, epoch: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """The batches of `epoch`, from where the sampler was set to start. Closing this generator
    frees the loader's iterator, which stops its worker processes at once, however the
    epoch ended (a non-finite loss, a stop, a kill by the scheduler)."""
    loader = DataLoader(
        data.train_set,
        batch_size=data.batch_size,
        sampler=data.sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn(device),
        drop_last=False,
        # An explicit generator keeps DataLoader seeding off the global torch RNG (exact resume).
        generator=torch.Generator().manual_seed(cfg.train.seed + epoch),
        persistent_workers=False,
    )
    yield from loader


def _check_finite(pending: list[torch.Tensor], step: int, epoch: int) -> torch.Tensor:
    """One host sync per log interval: raise on the first non-finite step, naming its terms."""
    values = torch.stack(pending).double().cpu()
    bad = (~torch.isfinite(values)).any(1).nonzero()
    if len(bad):
        first = int(bad[0])
        at_step = step - len(pending) + first + 1
        terms = ", ".join(f"{name}={value}" for name, value in zip(LOSS_TERMS, values[first].tolist()))
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {at_step}: {terms}")
    return values


# ----------------------------------------------------------------------------- evaluation


def cost_meter(raw_model: torch.nn.Module, dataset, cfg: Config, ctx: distributed.DistContext) -> CostMeter | None:
    """The run's `CostMeter` on rank 0, on the first validation image as the evaluation feeds
    it (device, memory format, autocast); None on other ranks, and with no validation image."""
    if not ctx.is_main or len(dataset) == 0:
        return None
    image = model_input(dataset[0]["image"].unsqueeze(0).to(ctx.device),
                        channels_last=uses_channels_last(cfg, ctx.device))
    dtype = autocast_dtype(cfg, ctx.device)
    return CostMeter(raw_model, image, context=lambda: _autocast(ctx.device, dtype))


def measure_cost(cost: CostMeter | None, ctx: distributed.DistContext) -> dict[str, float]:
    """Rank 0 measures (psdet.cost.COST_METRICS), every rank gets its figures."""
    return distributed.broadcast_from_main(cost.measure() if cost is not None else None, ctx) or {}


def run_evaluation(raw_model: torch.nn.Module, dataset, cfg: Config, ctx: distributed.DistContext,
                   protocol: str = "one_to_one") -> dict[str, float]:
    """Point and slot precision/recall/AP of `raw_model` (the detector, not a DDP wrapper) over
    `dataset`, sharded across ranks, scored on rank 0 under `protocol` (psdet.metrics.evaluate),
    the same on every rank."""
    raw_model.eval()
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
    )
    predictions, truths = [], []
    channels_last = uses_channels_last(cfg, ctx.device)
    with torch.no_grad(), _autocast(ctx.device, autocast_dtype(cfg, ctx.device)):
        for batch in loader:
            predictions += raw_model.predict(model_input(batch["image"].to(ctx.device, non_blocking=True),
                                                         channels_last=channels_last))
            truths += truth_from_batch(batch)
    gathered = distributed.gather_to_main((predictions, truths), ctx)
    metrics = None
    if gathered is not None:
        all_predictions = [p for part, _ in gathered for p in part]
        all_truths = [t for _, part in gathered for t in part]
        metrics = evaluate(all_predictions, all_truths, protocol=protocol)
    return distributed.broadcast_from_main(metrics, ctx)
