"""The sweep's ledger across a driver restart (orchestrate.results.TrialLedger): a trial the
dead driver started after Tune's last save is abandoned at the resumed driver's first step,
and a new trial with the same parameters continues it (`adoptable`), one successor each."""
from __future__ import annotations

from types import SimpleNamespace

from orchestrate.results import TrialLedger, adoptable
from orchestrate.search import BASELINE
from orchestrate.sweep_file import read_ledger


def _trial(tmp_path, trial_id: str, lr: float, baseline: bool = False) -> SimpleNamespace:
    staging = SimpleNamespace(experiment_driver_staging_path=str(tmp_path / "staging"))
    return SimpleNamespace(trial_id=trial_id, config={"optim.lr": lr, **({BASELINE: True} if baseline else {})},
                           storage=staging, error_file=None)


def test_an_unsaved_trial_is_abandoned_and_continued_by_the_next_with_its_parameters(tmp_path):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    first = TrialLedger(str(experiment), "slot_ap", "max")  # the driver that dies
    first.setup()
    saved, unsaved, fresh = _trial(tmp_path, "saved", 0.01), _trial(tmp_path, "unsaved", 0.003), \
        _trial(tmp_path, "fresh", 0.002)
    first.on_step_begin(0, [])
    for trial in (saved, unsaved, fresh):
        first.on_trial_start(0, [], trial)
    first.on_trial_result(0, [], unsaved, {"epoch": 2, "slot_ap": 0.1, "checkpoint_path": "/x/checkpoint_000001"})
    first.on_trial_result(0, [], saved, {"epoch": 1, "slot_ap": 0.2, "checkpoint_path": "/x/checkpoint_000000"})

    resumed = TrialLedger(str(experiment), "slot_ap", "max")  # Tune restored `saved` alone
    resumed.setup()
    resumed.on_step_begin(0, [saved])
    records = read_ledger(str(experiment))
    assert {tid: r["status"] for tid, r in records.items()} == {
        "saved": "running", "unsaved": "abandoned", "fresh": "abandoned"}
    resumed.on_step_begin(1, [saved])  # once: later steps change nothing
    # `fresh` reported no checkpoint: nothing to continue from; `unsaved` did
    assert adoptable(records, "new", {"optim.lr": 0.002}, False) is None
    assert adoptable(records, "new", {"optim.lr": 0.003}, True) is None  # the baseline flag differs
    assert adoptable(records, "new", {"optim.lr": 0.003}, False) == "unsaved"  # what run_trial looks up

    new, another = _trial(tmp_path, "new", 0.003), _trial(tmp_path, "another", 0.003)
    resumed.on_trial_start(0, [saved, new], new)
    resumed.on_trial_start(0, [saved, new, another], another)
    records = read_ledger(str(experiment))
    assert records["new"]["continues"] == "unsaved" and records["unsaved"]["continued_by"] == "new"
    assert "continues" not in records["another"]  # one successor each
    assert adoptable(records, "new", {"optim.lr": 0.003}, False) == "unsaved"  # a retry of `new` still finds it
    assert adoptable(records, "another", {"optim.lr": 0.003}, False) is None
    resumed.on_trial_start(0, [saved, new], saved)  # a restored trial continues nothing
    assert "continues" not in read_ledger(str(experiment))["saved"]
