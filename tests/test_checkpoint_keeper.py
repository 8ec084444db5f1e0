"""CheckpointKeeper: a one-worker trial's Tune checkpoints are deleted only once no recently
saved experiment state names them (so a killed driver resumes every trial from a checkpoint
that exists), and the keeper's record survives a driver restart."""
from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

from orchestrate.checkpoint_keeper import CheckpointKeeper


def report(keeper: CheckpointKeeper, root: Path, trial_id: str, index: int) -> Path:
    path = root / f"trial_{trial_id}" / f"checkpoint_{index:06d}"
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"weights")
    keeper.on_checkpoint(0, [], SimpleNamespace(trial_id=trial_id), SimpleNamespace(path=str(path)))
    return path


def left(root: Path, trial_id: str) -> list[str]:
    return sorted(p.name for p in (root / f"trial_{trial_id}").glob("checkpoint_*"))


def test_a_checkpoint_the_saved_state_names_is_kept_until_two_newer_saves(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path), keep=2)
    report(keeper, tmp_path, "a", 0)
    keeper.get_state()  # the experiment state now names checkpoint 0
    report(keeper, tmp_path, "a", 1)
    report(keeper, tmp_path, "a", 2)  # Tune's num_to_keep=2 would delete checkpoint 0 here
    assert left(tmp_path, "a") == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    keeper.get_state()  # names checkpoint 2; the one before (maybe all remote storage has) names 0
    assert left(tmp_path, "a") == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    keeper.get_state()  # both recent states name checkpoint 2: 0 is no longer needed
    assert left(tmp_path, "a") == ["checkpoint_000001", "checkpoint_000002"]
    report(keeper, tmp_path, "a", 3)  # the newest `keep`, and every one from 2 on
    assert left(tmp_path, "a") == ["checkpoint_000002", "checkpoint_000003"]


def test_trials_are_kept_apart_and_the_end_of_the_sweep_keeps_the_newest(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path), keep=1)
    for index in range(3):
        report(keeper, tmp_path, "a", index)
    keeper.get_state()
    report(keeper, tmp_path, "b", 0)
    report(keeper, tmp_path, "b", 1)  # no state names b's checkpoints yet: only the newest stays
    assert left(tmp_path, "b") == ["checkpoint_000001"]
    assert left(tmp_path, "a") == ["checkpoint_000002"]
    report(keeper, tmp_path, "a", 3)
    assert left(tmp_path, "a") == ["checkpoint_000002", "checkpoint_000003"]  # 2 is named by the last save
    keeper.on_experiment_end([])
    assert left(tmp_path, "a") == ["checkpoint_000003"] and left(tmp_path, "b") == ["checkpoint_000001"]


def test_a_resumed_driver_goes_on_from_the_saved_record(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path), keep=1)
    report(keeper, tmp_path, "a", 0)
    report(keeper, tmp_path, "a", 1)
    state = pickle.loads(pickle.dumps(keeper.get_state()))  # Tune pickles it beside the experiment state

    resumed = pickle.loads(pickle.dumps(CheckpointKeeper(str(tmp_path), keep=1)))  # as Tuner.restore builds it
    resumed.set_state(state)
    report(resumed, tmp_path, "a", 2)
    assert left(tmp_path, "a") == ["checkpoint_000001", "checkpoint_000002"]  # 1: named by the saved state
    resumed.get_state()
    resumed.get_state()
    assert left(tmp_path, "a") == ["checkpoint_000002"]


def test_a_checkpoint_already_gone_is_forgotten(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path), keep=1)
    first = report(keeper, tmp_path, "a", 0)
    for file in first.iterdir():
        file.unlink()
    first.rmdir()
    report(keeper, tmp_path, "a", 1)
    assert keeper.paths["a"] == [str(tmp_path / "trial_a" / "checkpoint_000001")]
