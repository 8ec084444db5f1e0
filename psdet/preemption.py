"""A SIGTERM is a preemption notice: a spot instance, a Kubernetes pod being evicted, a
batch scheduler at the end of a job's time all send one some seconds (30 s to 2 min on the
clouds) before the kill.

While `PreemptionNotice` is active, the notice only raises a flag. The engine asks
`notice.requested(ctx, step, every)` after every step; every rank answers the same (the
flag is all-reduced when distributed, every `train.log_interval` steps, so ranks that got
the notice at different steps still stop together), the engine writes a checkpoint at that
step and raises `Preempted`, and `--resume` (or the next attempt of a Ray trial) continues
from it with no step lost.

How the notice arrives depends on the thread the loop runs in:
- **the main thread** (`psdet train`, torchrun): the notice installs its own SIGTERM handler.
- **any other thread** (a Ray Train worker and a one-worker Tune trial run the loop in a
  thread of their own; Python lets only the main thread install a signal handler): either
  the host hands the notice over itself, with a SIGTERM handler of its own in the main
  thread that calls `deliver_notice()` (orchestrate does so in Ray Train workers), or the
  process keeps its host's handler. Ray's, in every worker process, raises SystemExit in
  the main thread ("The process receives a SIGTERM"); the interpreter then runs its atexit
  callbacks while the loop's thread still runs, if the main thread was running a task
  (a one-worker Tune trial's is, waiting for the loop's next report). The notice
  registers one for as long as the loop runs: it raises the flag and holds the exit until
  the loop has left the notice (its checkpoint written), at most `exit_grace_s`. Any
  orderly exit of the process in the middle of training takes this path, which only ever
  costs one checkpoint.
"""
from __future__ import annotations

import atexit
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
# How long an exiting process waits for the loop's checkpoint: within Kubernetes' default
# terminationGracePeriodSeconds (30 s), the shortest notice of the hosts in cluster/README.md.
EXIT_GRACE_S = 25.0


class Preempted(Exception):
    """The run stopped on a preemption notice after writing `checkpoint` at global `step`."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        super().__init__(f"preempted (SIGTERM): stopped after step {step} with a checkpoint at {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


_ACTIVE: list["PreemptionNotice"] = []  # the notices of the loops running in this process


def deliver_notice() -> bool:
    """Raise the flag of every active notice in this process (from any thread: a host's own
    SIGTERM handler); -> whether a running loop took it. When none did, the host should
    treat the SIGTERM as it otherwise would (end the process)."""
    for notice in list(_ACTIVE):
        notice._on_sigterm(signal.SIGTERM, None)
    return bool(_ACTIVE)


class PreemptionNotice:
    """`with PreemptionNotice() as notice:` a SIGTERM raises `notice`'s flag instead of ending
    the process at once (see the module docstring for the thread the loop runs in); the
    previous SIGTERM handler, or the exit hook, is gone again on leaving the block."""

    def __init__(self, exit_grace_s: float = EXIT_GRACE_S) -> None:
        self.received = False
        self.active = False
        self.exit_grace_s = exit_grace_s
        self._previous = None
        self._left = threading.Event()  # the loop has left the block: an exit need not wait
        self._exiting = False  # the exit hook is running: the interpreter is calling its atexit list

    def __enter__(self) -> "PreemptionNotice":
        self._left.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        else:
            atexit.register(self._on_exit)
        self.active = True
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        self._left.set()
        if not self.active:
            return
        _ACTIVE.remove(self)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        elif not self._exiting:
            atexit.unregister(self._on_exit)
        self.active = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            log.warning("SIGTERM: a preemption notice; stopping after this step with a checkpoint")
        self.received = True

    def _on_exit(self) -> None:
        """The process is exiting (Ray's SIGTERM handler, in the main thread) while the loop
        trains in another thread: let it reach its checkpoint first."""
        if self._left.is_set():
            return
        self._exiting = True
        log.warning("the process is exiting (SIGTERM?) while training: a preemption notice; "
                    "waiting up to %.0f s for the checkpoint after this step", self.exit_grace_s)
        self.received = True
        if not self._left.wait(self.exit_grace_s):
            log.warning("no checkpoint within %.0f s; exiting without one", self.exit_grace_s)

    def requested(self, ctx: "DistContext", step: int = 0, every: int = 1) -> bool:
        """Whether any rank has the notice (all ranks must call this at the same step).
        Distributed, the ranks agree by an all-reduce and a host sync, so only at steps that
        are a multiple of `every` (the loop's log interval, where it syncs anyway); alone,
        the flag is read at every call."""
        if not self.active:
            return False
        if not ctx.distributed:
            return self.received
        if step % max(every, 1):
            return False
        import torch

        flag = torch.tensor([1.0 if self.received else 0.0], device=ctx.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
