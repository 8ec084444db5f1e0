"""The live status block of a running sweep, redrawn in place when stdout is a terminal:

    sweep 'lr' - 2 min 05 s
      trials   2 running, 5 done (3 completed, 2 pruned), 0 errored, 3 to start; 10 planned
      best     point_ap 0.8123 (trial 1a2b3c4d)
      epochs   37 spent of at most 100 (trials x epochs)
      ETA      at most 3 min 10 s (the 55 epochs still possible at 3.4 s of wall per epoch so far)

It reads the sweep's `TrialLedger` (its records are what trials.json holds) and adds no
bookkeeping of its own. The ledger still prints one line per trial event; the block is
erased before each of them (`StatusBlock.erase`, a callback placed before the ledger) and
drawn again below it (`StatusBlock`, placed after). When stdout is not a terminal (a log
file, `ray job submit`) nothing is drawn: the ledger's lines are the whole output.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray import tune

REDRAW_EVERY_S = 1.0  # between events, so the clock and the ETA move


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def render_status(records: dict[str, dict[str, Any]], *, name: str, metric: str, mode: str, num_samples: int,
                  max_epochs: int, elapsed_s: float, epochs_before: int = 0) -> list[str]:
    """The block's lines for the ledger's `records`. `epochs_before`: epochs spent by earlier
    drivers (a resumed sweep), left out of this driver's pace."""
    live = [r for r in records.values() if r["status"] != "abandoned"]
    count = {status: sum(r["status"] == status for r in live) for status in
             ("running", "completed", "pruned", "errored", "pending")}
    to_start = max(num_samples - len(live), 0) + count["pending"]
    done = count["completed"] + count["pruned"]
    lines = [f"sweep '{name}' - {_duration(elapsed_s)}",
             f"  trials   {count['running']} running, {done} done ({count['completed']} completed, "
             f"{count['pruned']} pruned), {count['errored']} errored, {to_start} to start; {num_samples} planned"]
    scored = [r for r in live if isinstance(r["best"].get(metric), (int, float))
              and not math.isnan(r["best"][metric])]
    if scored:
        pick = max if mode == "max" else min
        best = pick(scored, key=lambda r: r["best"][metric])
        lines.append(f"  best     {metric} {best['best'][metric]:.4f} (trial {best['trial_id']}, "
                     f"{best['status']})")
    else:
        lines.append(f"  best     no {metric} reported yet")
    spent = sum(r["epochs"] for r in live)
    budget = num_samples * max_epochs
    lines.append(f"  epochs   {spent} spent of at most {budget} (trials x epochs)")
    # Still possible: what running and unstarted trials may yet run (ASHA may stop them sooner).
    possible = sum((r["total_epochs"] or max_epochs) - r["epochs"] for r in live
                   if r["status"] in ("running", "pending"))
    possible += max(num_samples - len(live), 0) * max_epochs
    paced = spent - epochs_before
    if possible == 0:
        lines.append("  ETA      done")
    elif paced <= 0:
        lines.append(f"  ETA      after the first epoch ({possible} epochs still possible)")
    else:
        per_epoch = elapsed_s / paced
        lines.append(f"  ETA      at most {_duration(possible * per_epoch)} (the {possible} epochs still possible "
                     f"at {per_epoch:.1f} s of wall per epoch so far)")
    return lines


class StatusBlock(tune.Callback):
    """Draws `render_status` of `ledger` below the ledger's event lines, on a terminal only."""

    def __init__(self, ledger, *, name: str, metric: str, mode: str, num_samples: int, max_epochs: int) -> None:
        self.ledger = ledger
        self.settings = {"name": name, "metric": metric, "mode": mode, "num_samples": num_samples,
                         "max_epochs": max_epochs}
        self.erase = _Erase(self)
        self._reset()

    def _reset(self) -> None:
        self._drawn = 0  # lines of the block now on screen
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._epochs_before: int | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the Tuner
        state = self.__dict__.copy()
        state.update(_drawn=0, _epochs_before=None)
        return state

    def setup(self, **info) -> None:
        self._reset()

    @staticmethod
    def live() -> bool:
        return sys.stdout.isatty()

    def clear(self) -> None:
        if self._drawn:
            sys.stdout.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, clear below
            sys.stdout.flush()
            self._drawn = 0

    def draw(self) -> None:
        if not self.live():
            return
        if self._epochs_before is None:
            self._epochs_before = sum(r["epochs"] for r in self.ledger.records.values())
        self.clear()
        lines = render_status(self.ledger.records, elapsed_s=time.monotonic() - self._started,
                              epochs_before=self._epochs_before, **self.settings)
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self._drawn = len(lines)
        self._last_draw = time.monotonic()

    def on_step(self, iteration, trials, **info) -> None:
        if self.live() and time.monotonic() - self._last_draw >= REDRAW_EVERY_S:
            self.draw()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.draw()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.draw()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.draw()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.draw()

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.draw()

    def on_experiment_end(self, trials, **info) -> None:
        self.draw()
        self._drawn = 0  # the last block stays above the leaderboard


class _Erase(tune.Callback):
    """Placed before the ledger: takes the block off the screen so the ledger's line lands
    where the block was; the StatusBlock after the ledger draws it again."""

    def __init__(self, block: StatusBlock) -> None:
        self.block = block

    def _erase(self, *args, **info) -> None:
        if self.block.live():
            self.block.clear()

    on_trial_start = on_trial_result = on_trial_complete = on_trial_error = on_trial_recover = _erase
