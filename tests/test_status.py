"""The live status block (orchestrate/status.py): what it says about a sweep's ledger, and
that it is redrawn in place on a terminal and absent otherwise."""
from __future__ import annotations

import io
import sys
from types import SimpleNamespace

from orchestrate.status import StatusBlock, render_status


def rec(tid: str, status: str, epochs: int, best: float | None = None) -> dict:
    return {"trial_id": tid, "status": status, "epochs": epochs, "total_epochs": 4,
            "best": {} if best is None else {"slot_ap": best}}


SETTINGS = {"name": "lr", "metric": "slot_ap", "mode": "max", "num_samples": 6, "max_epochs": 4}


def test_status_counts_trials_best_epochs_and_eta():
    records = {r["trial_id"]: r for r in [
        rec("a", "completed", 4, 0.5), rec("b", "pruned", 1, 0.7), rec("c", "running", 2, 0.6),
        rec("d", "errored", 1), rec("e", "abandoned", 3, 0.99)]}
    lines = render_status(records, elapsed_s=125, **SETTINGS)
    assert lines == [
        "sweep 'lr' - 2 min 05 s",
        "  trials   1 running, 2 done (1 completed, 1 pruned), 1 errored, 2 to start; 6 planned",
        "  best     slot_ap 0.7000 (trial b, pruned)",  # the abandoned trial's 0.99 is not in the results
        "  epochs   8 spent of at most 24 (trials x epochs)",
        # still possible: c's 2 more epochs + 2 unstarted x 4 = 10, at 125 s / 8 epochs
        "  ETA      at most 2 min 36 s (the 10 epochs still possible at 15.6 s of wall per epoch so far)",
    ]


def test_status_of_a_minimising_sweep_and_before_any_epoch():
    lines = render_status({"a": rec("a", "running", 0)}, elapsed_s=3, **{**SETTINGS, "mode": "min"})
    assert lines[2] == "  best     no slot_ap reported yet"
    assert lines[4] == "  ETA      after the first epoch (24 epochs still possible)"
    records = {"a": rec("a", "completed", 4, 0.2), "b": rec("b", "completed", 4, 0.1)}
    lines = render_status(records, elapsed_s=3, **{**SETTINGS, "mode": "min", "num_samples": 2})
    assert lines[2] == "  best     slot_ap 0.1000 (trial b, completed)" and lines[4] == "  ETA      done"


def test_a_resumed_sweep_paces_the_eta_on_this_drivers_epochs_only():
    records = {"a": rec("a", "completed", 4, 0.5), "b": rec("b", "running", 2, 0.4)}
    lines = render_status(records, elapsed_s=20, epochs_before=4, **{**SETTINGS, "num_samples": 2})
    assert lines[4] == "  ETA      at most 20 s (the 2 epochs still possible at 10.0 s of wall per epoch so far)"


class Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def drive(monkeypatch, tty: bool) -> str:
    """Two trial events as Tune delivers them: erase, the ledger's line, draw."""
    out = Terminal(tty)
    monkeypatch.setattr(sys, "stdout", out)
    ledger = SimpleNamespace(records={"a": rec("a", "running", 0)})
    block = StatusBlock(ledger, **SETTINGS)
    block.setup()
    for epoch in (1, 2):
        block.erase.on_trial_result(0, [], None, {})
        print(f"trial a epoch {epoch}/4")
        ledger.records["a"].update(epochs=epoch, best={"slot_ap": 0.1 * epoch})
        block.on_trial_result(0, [], None, {})
    return out.getvalue()


def test_on_a_terminal_the_block_is_redrawn_in_place_below_the_event_lines(monkeypatch):
    text = drive(monkeypatch, tty=True)
    first, second = text.split("\x1b[5F\x1b[J")  # the 5-line block erased once, before the second event
    assert first.startswith("trial a epoch 1/4\nsweep 'lr' - ")
    assert second.startswith("trial a epoch 2/4\nsweep 'lr' - ")
    assert "  best     slot_ap 0.1000" in first and "  best     slot_ap 0.2000" in second
    assert len(second.strip().splitlines()) == 6


def test_without_a_terminal_only_the_event_lines_are_printed(monkeypatch):
    assert drive(monkeypatch, tty=False) == "trial a epoch 1/4\ntrial a epoch 2/4\n"
