"""A SIGTERM is a preemption notice: a spot instance, a Kubernetes pod being evicted, a
batch scheduler at the end of a job's time all send one some seconds (30 s to 2 min on the
clouds) before the kill.

While `PreemptionNotice` is active, SIGTERM only raises a flag. The engine asks
`notice.requested(ctx, step, every)` after every step; every rank answers the same (the
flag is all-reduced when distributed, every `train.log_interval` steps, so ranks that got
the signal at different steps still stop together), the engine writes a checkpoint at that step and raises `Preempted`, and
`--resume` (or the next attempt of a Ray trial) continues from it with no step lost.

A handler can only be installed from the main thread; elsewhere (a Ray Train or Tune
worker runs the loop in a thread of its own) the notice stays inactive and SIGTERM keeps
its default meaning.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module; torch comes only with a run
    from psdet.distributed import DistContext

log = logging.getLogger("psdet")

EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(Exception):
    """The run stopped on a preemption notice after writing `checkpoint` at global `step`."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        super().__init__(f"preempted (SIGTERM): stopped after step {step} with a checkpoint at {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


class PreemptionNotice:
    """`with PreemptionNotice() as notice:` SIGTERM raises `notice`'s flag instead of ending
    the process; the previous handler is back on exit."""

    def __init__(self) -> None:
        self.received = False
        self.active = False
        self._previous = None

    def __enter__(self) -> "PreemptionNotice":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self.active = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self._previous)
            self.active = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            log.warning("SIGTERM: a preemption notice; stopping after this step with a checkpoint")
        self.received = True

    def requested(self, ctx: "DistContext", step: int = 0, every: int = 1) -> bool:
        """Whether any rank has the notice (all ranks must call this at the same step).
        Distributed, the ranks agree by an all-reduce and a host sync, so only at steps that
        are a multiple of `every` (the loop's log interval, where it syncs anyway); alone,
        the flag is read at every call."""
        if not self.active:  # the same on every rank of a run: all in main threads, or none
            return False
        if not ctx.distributed:
            return self.received
        if step % max(every, 1):
            return False
        import torch

        flag = torch.tensor([1.0 if self.received else 0.0], device=ctx.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
