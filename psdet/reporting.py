"""How the engine hands out metrics and checkpoints, without knowing who listens.

The engine calls `report` on every rank once per evaluation; rank 0 passes the
checkpoint directory it just wrote (or None), other ranks pass None. Where to resume
from is the reporter's business too: a local run looks in its own checkpoint folder, a
Ray Train worker asks Ray (see orchestrate/ray_reporter.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

from psdet import checkpoint as ckpt

# The names of what the engine reports once per evaluation (docs/CONTRACTS.md): the one
# list the engine, the search-space validator and the sweep's results all use.
LOSS_TERMS = ("loss", "loss_point", "loss_edge")  # means over the epoch's steps
EVAL_METRICS = ("point_precision", "point_recall", "point_ap", "slot_precision", "slot_recall", "slot_ap")
TOTAL_EPOCHS = "total_epochs"  # the run's planned epochs: a report with epoch < total_epochs is not the last
ENGINE_SECONDS = ("train_s", "eval_s")  # this epoch's seconds in the step loop and in evaluation
REPORTED = ("epoch", "step", *LOSS_TERMS, "lr", *EVAL_METRICS, "restarts", "images_per_s", TOTAL_EPOCHS,
            *ENGINE_SECONDS)


class Reporter(Protocol):
    def latest_checkpoint(self) -> Path | None:
        """The checkpoint directory to resume from, or None to start fresh."""

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Take one evaluation's metrics, with the checkpoint written at that point."""


class LocalReporter:
    """Appends metrics to `OUT/metrics.jsonl`; resumes from the newest valid checkpoint
    under `OUT/checkpoints` when `resume` is set."""

    def __init__(self, out_dir: Path, resume: bool = False, is_main: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.is_main = is_main
        self.history: list[dict[str, float]] = []

    def latest_checkpoint(self) -> Path | None:
        if not self.resume:
            return None
        return ckpt.latest_valid(self.out_dir / "checkpoints")

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.history.append(dict(metrics))
        if not self.is_main:
            return
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        if checkpoint is not None:
            row["checkpoint"] = str(checkpoint)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
