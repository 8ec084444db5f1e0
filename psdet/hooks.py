"""Hooks: the one way to watch or time the training loop from outside it.

The engine (psdet/engine.py) takes a list of `Hook`s and calls each of them, in list
order, at fixed points of the loop. Its own console output, its TensorBoard scalars and
its reports are hooks too (`default_hooks`); a benchmark or a caller adds more. The model
is detectron2's `HookBase`.

Every method is called on every rank, except `on_checkpoint` (rank 0, which writes the
checkpoint). A hook that should act once checks `run.ctx.is_main`. `run` is the
engine's `Run`: config, device context, raw model, optimizer, position.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from psdet.config import config_value
from psdet.reporting import COST_METRICS, EVAL_METRICS, Reporter

if TYPE_CHECKING:
    from psdet.engine import Run

log = logging.getLogger("psdet")


@dataclass(frozen=True)
class StepLosses:
    """The loss terms of the newest step, read on the host once per `train.log_interval` steps
    (and at the end of each epoch): one device sync per interval, not per step."""

    epoch: int  # 0-based
    batch: int  # batches of this epoch done
    step: int  # global steps done
    losses: dict[str, float]  # psdet.reporting.LOSS_TERMS of the newest step
    lr: float
    momentum: float  # SGD momentum or Adam beta1 in effect


class Hook:
    """Watches the loop; every method does nothing here. The order of calls in one run:

    before_train
    on_restore                  once, if the run was restored from a checkpoint
    per epoch:
        before_epoch
        per step:               before_step, after_step; then on_losses every
                                train.log_interval steps, on_checkpoint after a
                                mid-epoch checkpoint (train.ckpt_every_steps)
        after_epoch             the epoch's training figures, before evaluation
        on_checkpoint           the epoch's checkpoint, every train.ckpt_interval epochs (rank 0)
        on_evaluation           every train.eval_interval epochs, after that checkpoint
    on_preemption               a preemption notice stopped the run, after its checkpoint
    after_train                 on every exit, an error included: close what before_train
                                opened (it may have raised before reaching this hook)

    A run restored after its last epoch calls on_evaluation once, with the final metrics it
    had saved and no checkpoint, and trains nothing.
    """

    def before_train(self, run: Run) -> None:
        pass

    def on_restore(self, run: Run, checkpoint: Path) -> None:
        """`run` now holds the state of `checkpoint` (`run.position`, `run.restarts` included)."""

    def before_epoch(self, run: Run, epoch: int) -> None:
        """`epoch` is 0-based; `run.position.batch` batches of it are already done (a mid-epoch resume)."""

    def before_step(self, run: Run, step: int) -> None:
        """`step`: the 0-based global index of the step about to run."""

    def after_step(self, run: Run, step: int) -> None:
        """`step`: the index of the step just done (the optimizer has stepped); no host sync here."""

    def on_losses(self, run: Run, losses: StepLosses) -> None:
        pass

    def on_checkpoint(self, run: Run, path: Path, seconds: float) -> None:
        """Rank 0 wrote `path` (at `run.position`) in `seconds`, before pruning older ones."""

    def after_epoch(self, run: Run, metrics: dict[str, float]) -> None:
        """`metrics`: the epoch's loss means, lr, images/s and train seconds (no evaluation yet)."""

    def on_evaluation(self, run: Run, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """`metrics` holds every name in psdet.reporting.REPORTED; `checkpoint` is the one written
        at this point, on rank 0 (None elsewhere, or when this epoch wrote none)."""

    def on_preemption(self, run: Run, checkpoint: Path | None, step: int) -> None:
        """The run stops on a preemption notice (psdet.preemption) after global `step`, with
        `checkpoint` written at exactly that step (on rank 0; None elsewhere); every rank is
        told, at the same step."""

    def after_train(self, run: Run) -> None:
        pass


class ReportHook(Hook):
    """Hands each evaluation and its checkpoint to a `Reporter`, on every rank."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def on_evaluation(self, run: Run, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.reporter.report(dict(metrics), checkpoint)


class LoggingHook(Hook):
    """psdet's log lines about the loop: the restore, each log interval's losses (DEBUG: train.log
    only), each epoch's losses and each evaluation."""

    def on_restore(self, run: Run, checkpoint: Path) -> None:
        position = run.position
        log.info("resumed from %s: epoch %d, step %d, batch %d (restart %d)",
                 checkpoint, position.epoch + 1, position.step, position.batch, run.restarts)

    def on_losses(self, run: Run, losses: StepLosses) -> None:
        log.debug("step %d (epoch %d, batch %d/%d): loss %.4f", losses.step, losses.epoch + 1, losses.batch,
                  run.steps_per_epoch, losses.losses["loss"])

    def after_epoch(self, run: Run, metrics: dict[str, float]) -> None:
        log.info("epoch %d/%d: loss %.4f (point %.5f, edge %.4f), %.1f images/s", metrics["epoch"],
                 run.cfg.train.epochs, metrics["loss"], metrics["loss_point"], metrics["loss_edge"],
                 metrics["images_per_s"])

    def on_evaluation(self, run: Run, metrics: dict[str, float], checkpoint: Path | None) -> None:
        log.info("epoch %d/%d: %s", metrics["epoch"], run.cfg.train.epochs,
                 ", ".join(f"{name} {metrics[name]:.4g}" if name in COST_METRICS else f"{name} {metrics[name]:.4f}"
                           for name in (*EVAL_METRICS, *COST_METRICS) if name in metrics))


class ProgressHook(Hook):
    """A terminal progress line on rank 0: redrawn in place on a TTY, every 10% otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.prefix = ""
        self.last_decile = -1
        self.start = 0.0

    def before_epoch(self, run: Run, epoch: int) -> None:
        self.prefix = f"epoch {epoch + 1}/{run.cfg.train.epochs}"
        self.last_decile = -1
        self.start = time.perf_counter()

    def on_losses(self, run: Run, losses: StepLosses) -> None:
        total = max(run.steps_per_epoch, 1)
        decile = 10 * losses.batch // total
        if not self.tty and decile == self.last_decile:
            return
        self.last_decile = decile
        rate = losses.batch / max(time.perf_counter() - self.start, 1e-9)
        line = f"{self.prefix} [{losses.batch}/{total}] {rate:.2f} it/s loss {losses.losses['loss']:.4f}"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def after_epoch(self, run: Run, metrics: dict[str, float]) -> None:
        if self.tty:
            sys.stderr.write("\n")


class TensorBoardHook(Hook):
    """Rank 0's TensorBoard scalars under `logdir`: train/* every log interval,
    train/images_per_s every epoch, val/* every evaluation; `hparams` (name -> number, string
    or bool) as the run's HParams, with the val/* scalars as their metrics.

    Every run of the same directory writes a new event file that starts with a restart
    marker at the first step it logs (0, or the restored checkpoint's step + 1): TensorBoard
    drops the earlier files' events from that step on (a dead run may have logged past its
    checkpoint), so a restored run and the one before it show as one unbroken run. The
    writer opens at the first epoch (or the first event) and closes at every evaluation,
    so that the events are on disk before the reporter hands the evaluation on (a trial the
    scheduler stops on that report is killed; tensorboardX's `flush` leaves queued events to
    its thread), opening again on a new file for the next; and in `after_train`, however
    the run ends."""

    def __init__(self, logdir: Path, hparams: dict[str, float | str | bool] | None = None) -> None:
        self.logdir = logdir
        self.hparams = dict(hparams or {})
        self.purge_from = 0  # the first step this run logs
        self._writer = None
        self._opened = False  # whether this run has opened an event file yet

    def _open(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter
            from tensorboardX.summary import hparams

            first, self._opened = not self._opened, True
            # tensorboardX names a file by the second it opened it. TensorBoard reads a directory's
            # files in name order, so two opened within one second, by one run or by a run and the
            # one resumed from it (another hook, maybe the same process), sort by the nanosecond.
            self._writer = SummaryWriter(logdir=str(self.logdir), purge_step=self.purge_from if first else None,
                                         filename_suffix=f".{time.time_ns():020d}.{os.getpid()}")
            if first and self.hparams:
                metrics = {f"val/{name}": 0.0 for name in EVAL_METRICS}  # names only: the scalars hold the values
                experiment, session_start, _ = hparams(self.hparams, metrics)
                for summary in (experiment, session_start):
                    self._writer.file_writer.add_summary(summary)
        return self._writer

    def on_restore(self, run: Run, checkpoint: Path) -> None:
        self.purge_from = run.position.step + 1

    def before_epoch(self, run: Run, epoch: int) -> None:
        self._open()  # after any restore: the new event file purges from there

    def on_losses(self, run: Run, losses: StepLosses) -> None:
        writer = self._open()
        for name, value in losses.losses.items():
            writer.add_scalar(f"train/{name}", value, losses.step)
        writer.add_scalar("train/lr", losses.lr, losses.step)
        writer.add_scalar("train/momentum", losses.momentum, losses.step)

    def after_epoch(self, run: Run, metrics: dict[str, float]) -> None:
        self._open().add_scalar("train/images_per_s", metrics["images_per_s"], metrics["step"])

    def on_evaluation(self, run: Run, metrics: dict[str, float], checkpoint: Path | None) -> None:
        writer = self._open()  # a run restored after its last epoch opens it here
        for name in EVAL_METRICS:
            if name in metrics:
                writer.add_scalar(f"val/{name}", metrics[name], metrics["step"])
        self._close()  # on disk before the reporter, a later hook, gets the evaluation

    def after_train(self, run: Run) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def default_hooks(run: Run, out_dir: Path, reporter: Reporter) -> list[Hook]:
    """What every run gets: log lines, the progress line and TensorBoard on rank 0 (in
    `train.tensorboard_dir`, default OUT/tensorboard), then the reporter."""
    hooks: list[Hook] = [LoggingHook()]
    if run.ctx.is_main:
        if run.cfg.train.progress:
            hooks.append(ProgressHook())
        train = run.cfg.train
        hooks.append(TensorBoardHook(Path(train.tensorboard_dir) if train.tensorboard_dir else out_dir / "tensorboard",
                                     {key: config_value(run.cfg, key) for key in train.tensorboard_hparams}))
    hooks.append(ReportHook(reporter))
    return hooks
