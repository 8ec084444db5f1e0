"""The per-worker training loop. It knows nothing of Ray: it gets a `Reporter`.

The loop follows the seed script step by step: config and logger, process group (when
launched distributed), seeding, TensorBoard, data, model, SyncBN, optimizer, restore,
DDP wrap, schedules with warmup, then epochs with evaluation every `eval_interval`
epochs and a checkpoint every `ckpt_interval` epochs (and every `ckpt_every_steps`
steps), keeping the newest `keep_checkpoints`.

The only assumption on the outside world: every rank calls `train` with the same config.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from psdet import checkpoint as ckpt
from psdet import distributed
from psdet.config import Config, dump_yaml
from psdet.data import build_dataset
from psdet.data.batch import collate_fn, model_input
from psdet.errors import ConfigError, DataError, NonFiniteLossError
from psdet.metrics import evaluate, truth_from_batch
from psdet.models import build_model
from psdet.optim import apply_schedule, build_optimizer
from psdet.reporting import LOSS_TERMS, TOTAL_EPOCHS, LocalReporter, Reporter
from psdet.sampler import ResumableSampler

log = logging.getLogger("psdet")


def setup_logging(out_dir: Path | None, is_main: bool) -> None:
    """psdet's logger: INFO to stderr on rank 0 (warnings elsewhere), and `OUT/train.log`."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
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


def _autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Every tensor to `device`; `image` becomes the model's float input, colour-jittered when training."""
    moved = {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
             for key, value in batch.items()}
    moved["image"] = model_input(moved["image"], moved.pop("jitter", None), channels_last)
    return moved


def _loader(dataset, sampler, batch_size: int, num_workers: int, seed: int, device: torch.device) -> DataLoader:
    # An explicit generator keeps DataLoader seeding off the global torch RNG (exact resume).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn(device),
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


class _Progress:
    """A terminal progress line on rank 0: redrawn in place on a TTY, every 10% otherwise."""

    def __init__(self, enabled: bool, total: int, epoch: int, epochs: int) -> None:
        self.enabled = enabled
        self.total = max(total, 1)
        self.prefix = f"epoch {epoch + 1}/{epochs}"
        self.tty = sys.stderr.isatty()
        self.last_decile = -1
        self.start = time.perf_counter()

    def update(self, done: int, loss: float | None) -> None:
        if not self.enabled:
            return
        decile = 10 * done // self.total
        if not self.tty and decile == self.last_decile:
            return
        self.last_decile = decile
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        loss_text = f" loss {loss:.4f}" if loss is not None else ""
        line = f"{self.prefix} [{done}/{self.total}] {rate:.2f} it/s{loss_text}"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _state(module: torch.nn.Module, optimizer, scaler, position: ckpt.Position, restarts: int) -> dict:
    return {
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": position.epoch,
        "step": position.step,
        "batch": position.batch,
        "restarts": restarts,
        "rng": ckpt.capture_rng_state(),
    }


def run_evaluation(module: torch.nn.Module, dataset, cfg: Config, ctx: distributed.DistContext) -> dict[str, float]:
    """Point and slot precision/recall/AP over `dataset`, sharded across ranks, scored on rank 0."""
    module.eval()
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
    )
    predictions, truths = [], []
    channels_last = cfg.train.channels_last and ctx.device.type == "cuda"
    with torch.no_grad(), _autocast(cfg, ctx.device):
        for batch in loader:
            predictions += module.predict(model_input(batch["image"].to(ctx.device, non_blocking=True),
                                                      channels_last=channels_last))
            truths += truth_from_batch(batch)
    gathered = distributed.gather_to_main((predictions, truths), ctx)
    metrics = None
    if gathered is not None:
        all_predictions = [p for part, _ in gathered for p in part]
        all_truths = [t for _, part in gathered for t in part]
        metrics = evaluate(all_predictions, all_truths)
    return distributed.broadcast_from_main(metrics, ctx)


def train(cfg: Config, out_dir: Path, reporter: Reporter | None = None) -> dict[str, float]:
    """Train `cfg` on this worker; returns the last reported metrics.

    Alone it runs on one device; under torchrun (or inside Ray Train, which has already
    made the process group) every rank runs this with the same config and DDP keeps
    them in step. `reporter` decides where to resume from and receives each evaluation.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, out_dir, reporter or LocalReporter(out_dir, is_main=ctx.is_main), ctx)
    finally:
        distributed.teardown(owns_group)


def _train(cfg: Config, out_dir: Path, reporter: Reporter, ctx: distributed.DistContext) -> dict[str, float]:
    setup_logging(out_dir, ctx.is_main)
    config_yaml = dump_yaml(cfg)
    log.info("config:\n%s", config_yaml)
    log.info("device %s, rank %d of %d, pid %d", ctx.device, ctx.rank, ctx.world_size, os.getpid())
    seed_everything(cfg.train.seed)

    if cfg.data.batch_size % ctx.world_size:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is not divisible by the {ctx.world_size} workers")
    batch_size = cfg.data.batch_size // ctx.world_size
    log.info("batch size %d per worker, %d in total", batch_size, cfg.data.batch_size)

    writer = None
    if ctx.is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(logdir=str(out_dir / "tensorboard"))

    try:
        train_set = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.train.seed)
        val_set = build_dataset(cfg.data, cfg.data.val_split, train=False, seed=cfg.train.seed)
        sampler = ResumableSampler(len(train_set), batch_size, seed=cfg.train.seed, rank=ctx.rank,
                                   world_size=ctx.world_size)
        steps_per_epoch = sampler.batches_per_epoch
        if steps_per_epoch == 0:
            raise DataError(
                f"{cfg.data.root}: {len(train_set)} training images give no full batch of {batch_size} per worker; "
                "lower data.batch_size or add images"
            )
        log.info("%d training images, %d validation images, %d steps per epoch",
                 len(train_set), len(val_set), steps_per_epoch)

        module = build_model(cfg.model, cfg.data.max_points)
        if cfg.train.sync_bn and ctx.distributed:
            if ctx.device.type == "cuda":
                module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            else:
                log.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA; BatchNorm stays per-process on %s",
                            ctx.device)
        module.to(ctx.device)
        if cfg.train.channels_last and ctx.device.type == "cuda":
            module.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(module, cfg.optim)
        scaler = torch.amp.GradScaler("cuda", enabled=ctx.device.type == "cuda" and cfg.train.precision == "fp16")

        position = ckpt.Position(epoch=0, step=0, batch=0)
        restarts = 0
        resume_from = reporter.latest_checkpoint()
        finished_metrics: dict[str, float] | None = None
        if resume_from is not None:
            state, meta = ckpt.load_checkpoint(resume_from)
            finished_metrics = meta["metrics"]
            module.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            position = ckpt.Position(state["epoch"], state["step"], state["batch"])
            restarts = state["restarts"] + 1
            ckpt.restore_rng_state(state["rng"])
            log.info("resumed from %s: epoch %d, step %d, batch %d (restart %d)",
                     resume_from, position.epoch + 1, position.step, position.batch, restarts)

        if finished_metrics is not None and position.epoch >= cfg.train.epochs:
            # Restored after its last epoch (e.g. the driver died right after it): nothing to
            # train, but the listener still gets the run's final metrics once more.
            log.info("the run had already finished; reporting its final metrics again")
            final = {**finished_metrics, "restarts": restarts, "train_s": 0.0, "eval_s": 0.0}
            reporter.report(final, None)
            return final

        model = module
        if ctx.distributed:
            model = DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        log.info("model: %d parameters", sum(p.numel() for p in module.parameters()))

        ckpt_root = out_dir / "checkpoints"
        total_epochs = cfg.train.epochs
        last_metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}

        def save(at: ckpt.Position, metrics: dict[str, float]) -> Path | None:
            path = None
            if ctx.is_main:
                path = ckpt.save_checkpoint(ckpt_root, at, _state(module, optimizer, scaler, at, restarts),
                                            config_yaml, metrics)
                ckpt.prune(ckpt_root, cfg.train.keep_checkpoints)
            distributed.barrier(ctx)
            return path

        for epoch in range(position.epoch, total_epochs):
            skip = position.batch if epoch == position.epoch else 0
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch, skip_batches=skip)
            loader = _loader(train_set, sampler, batch_size, cfg.data.num_workers, cfg.train.seed + epoch, ctx.device)
            module.train()
            progress = _Progress(ctx.is_main and cfg.train.progress, steps_per_epoch, epoch, total_epochs)
            pending: list[torch.Tensor] = []  # per-step loss terms, checked once per log interval
            epoch_terms = torch.zeros(len(LOSS_TERMS), dtype=torch.float64)
            epoch_steps = 0
            step = position.step if epoch == position.epoch else epoch * steps_per_epoch
            epoch_start_step = step
            started = time.perf_counter()
            schedule = {}
            for batch_index, batch in enumerate(loader, start=skip):
                schedule = apply_schedule(optimizer, cfg.optim, step, steps_per_epoch, total_epochs)
                batch = _to_device(batch, ctx.device, cfg.train.channels_last and ctx.device.type == "cuda")
                with _autocast(cfg, ctx.device):
                    outputs = model(batch["image"], batch["marks"], batch["num_marks"])
                loss, terms = module.loss(outputs, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_norm_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_norm_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                pending.append(torch.stack([loss.detach(), terms["loss_point"].detach(), terms["loss_edge"].detach()]))
                done = batch_index + 1
                if len(pending) >= cfg.train.log_interval or done == steps_per_epoch:
                    values = _check_finite(pending, step, epoch)
                    epoch_terms += values.sum(0)
                    epoch_steps += len(pending)
                    pending = []
                    if writer is not None:
                        for name, value in zip(LOSS_TERMS, values[-1].tolist()):
                            writer.add_scalar(f"train/{name}", value, step)
                        writer.add_scalar("train/lr", schedule["lr"], step)
                        if schedule.get("momentum") is not None:
                            writer.add_scalar("train/momentum", schedule["momentum"], step)
                    progress.update(done, float(values[-1, 0]))
                if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0 and done < steps_per_epoch:
                    save(ckpt.Position(epoch, step, done), {})
            progress.close()
            elapsed = time.perf_counter() - started
            images_per_s = (step - epoch_start_step) * cfg.data.batch_size / max(elapsed, 1e-9)
            means = (epoch_terms / max(epoch_steps, 1)).tolist()
            last_metrics = {name: value for name, value in zip(LOSS_TERMS, means)}
            last_metrics.update(epoch=epoch + 1, step=step, lr=schedule.get("lr", float("nan")),
                                images_per_s=images_per_s, restarts=restarts, train_s=elapsed, eval_s=0.0)
            last_metrics[TOTAL_EPOCHS] = total_epochs
            log.info("epoch %d/%d: loss %.4f (point %.5f, edge %.4f), %.1f images/s",
                     epoch + 1, total_epochs, means[0], means[1], means[2], images_per_s)
            if writer is not None:
                writer.add_scalar("train/images_per_s", images_per_s, step)

            finished = epoch + 1 == total_epochs
            is_eval = (epoch + 1) % cfg.train.eval_interval == 0 or finished
            is_ckpt = (epoch + 1) % cfg.train.ckpt_interval == 0 or finished
            if is_eval:
                eval_started = time.perf_counter()
                eval_metrics = run_evaluation(module, val_set, cfg, ctx)
                last_metrics["eval_s"] = time.perf_counter() - eval_started
                log.info("epoch %d/%d: %s", epoch + 1, total_epochs,
                         ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                if writer is not None:
                    for name, value in eval_metrics.items():
                        writer.add_scalar(f"val/{name}", value, step)
            last_metrics.update(eval_metrics)
            saved = save(ckpt.Position(epoch + 1, step, 0), last_metrics) if is_ckpt else None
            if is_eval:
                reporter.report(dict(last_metrics), saved)
            position = ckpt.Position(epoch + 1, step, 0)

        return last_metrics
    finally:
        if writer is not None:
            writer.close()  # on every exit: a non-finite loss, a stop, a kill by the scheduler


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
