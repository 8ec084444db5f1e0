"""Where the engine's evaluations go, without the engine knowing who listens; and the names
of what it reports.

A `Reporter` gets `report(metrics, checkpoint)` on every rank once per evaluation (through
psdet.hooks.ReportHook); rank 0 passes the checkpoint directory it just wrote (or None),
other ranks pass None. A local run appends to `OUT/metrics.jsonl` (`LocalReporter`); a
sweep's trial reports to Ray (orchestrate/trial.py, orchestrate/ray_reporter.py). Where a
run resumes from is not the reporter's business: see psdet.checkpoint.ResumeSource.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

# The names of what the engine reports once per evaluation (docs/CONTRACTS.md): the one
# list the engine, the search-space validator and the sweep's results all use.
LOSS_TERMS = ("loss", "loss_point", "loss_edge")  # means over the epoch's steps
EVAL_METRICS = ("point_precision", "point_recall", "point_ap", "slot_precision", "slot_recall", "slot_ap")
TOTAL_EPOCHS = "total_epochs"  # the run's planned epochs: a report with epoch < total_epochs is not the last
ENGINE_SECONDS = ("train_s", "eval_s")  # this epoch's seconds in the step loop and in evaluation
# What running the model costs (psdet.cost): batch-1 inference ms, parameter count, forward GFLOPs.
COST_METRICS = ("latency_ms", "params", "gflops")
REPORTED = ("epoch", "step", *LOSS_TERMS, "lr", *EVAL_METRICS, *COST_METRICS, "restarts", "images_per_s",
            TOTAL_EPOCHS, *ENGINE_SECONDS)


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Take one evaluation's metrics, with the checkpoint written at that point."""


class LocalReporter:
    """Appends each evaluation's metrics (and its checkpoint's path) to `OUT/metrics.jsonl` on rank 0."""

    def __init__(self, out_dir: Path, is_main: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.is_main = is_main

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if not self.is_main:
            return
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        if checkpoint is not None:
            row["checkpoint"] = str(checkpoint)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
