"""What a detector costs to run: inference latency, parameter count and forward FLOPs.

Measured, not estimated, on the device the model sits on:

- `latency_ms`: the median wall time of `model.predict` on one image (batch 1), the network
  and the post-processing (point decoding, NMS, the graph on the decoded points, the edge
  scores, slot pairing), after `WARMUP_RUNS` untimed calls, over `TIMED_RUNS` timed ones.
  On CUDA each call is bracketed by a synchronize, so the time is the kernels', not their launch.
  On CPU it is timed on one intra-op thread (`CPU_THREADS`): a batch-1 forward of these sizes
  gains little from more, and threads that wait on each other on a shared machine make the
  figure meaningless (ps_gat_tiny at 128x128 on a loaded 2-core VM: 18 ms on one thread,
  about 1000 ms on two) and the measurement slower than an epoch.
- `params`: every scalar parameter, shared tensors once (psdet.models.count_parameters).
- `gflops`: the floating-point operations of one `predict` at batch 1 and the run's input
  size, counted by `torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs),
  in units of 1e9. It counts the matrix products and convolutions, which is where the work
  is; elementwise operations are not counted. The first count in a process imports part of
  torch that FlopCounterMode dispatches through (about 14 s on a loaded 2-core VM, once).

The engine measures these at every evaluation (`CostMeter`): params and gflops once per
run (they depend only on the architecture and the input size), latency each time, on rank
0, then shared with the other ranks. It runs on one validation image, so that the
post-processing sees the candidates a real input gives.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from psdet.models import count_parameters
from psdet.reporting import COST_METRICS

__all__ = ["COST_METRICS", "CostMeter", "forward_gflops", "inference_latency_ms"]
WARMUP_RUNS = 5
TIMED_RUNS = 20
CPU_THREADS = 1


def forward_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    """FLOPs (1e9) of `model.predict(image)`; `image` [1, 3, S, S] float in [0, 1] on the model's device."""
    with _cpu_threads(image.device), FlopCounterMode(display=False) as counter:
        model.predict(image)
    return counter.get_total_flops() / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _cpu_threads(device: torch.device):
    """On CPU: torch's intra-op threads set to CPU_THREADS for the block, then put back."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inference_latency_ms(model: torch.nn.Module, image: torch.Tensor, *, warmup: int = WARMUP_RUNS,
                         runs: int = TIMED_RUNS, context: Callable[[], contextlib.AbstractContextManager] | None = None,
                         clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of `model.predict(image)` over `runs` timed calls after `warmup`
    untimed ones (on CPU with CPU_THREADS threads); `context()` wraps each call (the
    evaluation's autocast)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    device = image.device
    context = context or contextlib.nullcontext
    with torch.no_grad(), _cpu_threads(device):
        for _ in range(warmup):
            with context():
                model.predict(image)
        _synchronize(device)
        durations = []
        for _ in range(runs):
            started = clock()
            with context():
                model.predict(image)
            _synchronize(device)
            durations.append(clock() - started)
    return 1000.0 * statistics.median(durations)


class CostMeter:
    """The cost metrics of one run's model (`COST_METRICS`), measured on `image`.

    `measure()` times the latency afresh each call; params and gflops are measured on
    the first call and kept (they depend only on the architecture and the input size)."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        self.model = model
        self.image = image
        self.context = context
        self._static: dict[str, float] | None = None

    def measure(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            if self._static is None:
                with torch.no_grad(), (self.context or contextlib.nullcontext)():
                    gflops = forward_gflops(self.model, self.image)
                self._static = {"params": count_parameters(self.model), "gflops": gflops}
            latency = inference_latency_ms(self.model, self.image, context=self.context)
        finally:
            self.model.train(was_training)
        return {"latency_ms": latency, **self._static}
