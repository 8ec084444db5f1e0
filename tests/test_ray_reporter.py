"""Where a restarted Ray Train worker group resumes from: the newer of Ray's registered
checkpoint and the engine's own (orchestrate.ray_reporter.newer_checkpoint).

The end-to-end case (a worker SIGKILLed just after a report Ray had not registered yet)
is what benchmarks/recovery.py measures; its smoke run is in tests/test_benchmarks.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from orchestrate.ray_reporter import newer_checkpoint
from psdet import checkpoint as ckpt


def _save(root: Path, epoch: int, step: int, batch: int = 0) -> Path:
    return ckpt.save_checkpoint(root, ckpt.Position(epoch, step, batch), {"step": torch.tensor(step)}, "name: t\n",
                                {"loss": 1.0 / (step + 1)})


def _corrupt(path: Path) -> None:
    state = path / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:-7])  # truncated, as by a crash mid-copy


def test_nothing_anywhere_starts_fresh(tmp_path):
    assert newer_checkpoint(None, tmp_path / "engine") is None
    assert newer_checkpoint(None, None) is None


def test_only_one_side_has_a_checkpoint(tmp_path):
    from_ray = _save(tmp_path / "ray", 2, 16)
    assert newer_checkpoint(from_ray, tmp_path / "engine") == from_ray
    assert newer_checkpoint(from_ray, None) == from_ray
    engine = _save(tmp_path / "engine", 1, 8)
    assert newer_checkpoint(None, tmp_path / "engine") == engine


def test_the_engines_newer_checkpoint_wins(tmp_path):
    """Ray registered epoch 2's report; the engine has since written epoch 3's (reported
    just before the crash, not yet registered) and a mid-epoch one after it."""
    from_ray = _save(tmp_path / "ray", 2, 16)
    _save(tmp_path / "engine", 3, 24)
    mid_epoch = _save(tmp_path / "engine", 3, 28, batch=4)
    assert newer_checkpoint(from_ray, tmp_path / "engine") == mid_epoch


def test_rays_checkpoint_wins_when_newer_or_equal(tmp_path):
    from_ray = _save(tmp_path / "ray", 2, 16)
    _save(tmp_path / "engine", 1, 8)
    assert newer_checkpoint(from_ray, tmp_path / "engine") == from_ray
    _save(tmp_path / "engine", 2, 16)
    assert newer_checkpoint(from_ray, tmp_path / "engine") == from_ray


def test_corrupt_checkpoints_are_passed_over(tmp_path):
    from_ray = _save(tmp_path / "ray", 2, 16)
    older = _save(tmp_path / "engine", 2, 20, batch=4)
    _corrupt(_save(tmp_path / "engine", 3, 24))
    assert newer_checkpoint(from_ray, tmp_path / "engine") == older  # the newest engine one is truncated
    _corrupt(from_ray)
    assert newer_checkpoint(from_ray, tmp_path / "engine") == older  # and Ray's too


def _tune_checkpoint(trial_dir: Path, index: int, step: int) -> Path:
    """A checkpoint as Tune keeps a reported one: the engine's files in `checkpoint_<index>`."""
    saved = _save(trial_dir / "engine", index, step)
    return Path(shutil.copytree(saved, trial_dir / f"checkpoint_{index:06d}"))


def test_a_corrupt_registered_checkpoint_gives_way_to_the_previous_one(tmp_path):
    """The newest checkpoint Ray (or Tune) registered is damaged in storage: the resume takes
    the newest older one beside it that verifies; none left: start fresh."""
    import ray.train

    from orchestrate.ray_reporter import verified_checkpoint

    first, second, newest = (_tune_checkpoint(tmp_path, index, 8 * index) for index in (1, 2, 3))
    registered = ray.train.Checkpoint(str(newest))
    assert verified_checkpoint(registered, tmp_path) == newest
    _corrupt(newest)  # truncated
    state = second / ckpt.STATE_FILE
    flipped = bytearray(state.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    state.write_bytes(bytes(flipped))  # one bit flipped, the size unchanged
    assert verified_checkpoint(registered, tmp_path) == first
    assert verified_checkpoint(ray.train.Checkpoint(str(second)), tmp_path) == first  # never a newer one
    _corrupt(first)
    assert verified_checkpoint(registered, tmp_path) is None


def test_a_preempted_runs_copy_is_the_newest_one_that_verifies(tmp_path):
    """UploadPreemption copies the checkpoint of a preempted run's last step to the trial's
    storage (a local directory stands in for S3 here) and deletes the older copy there;
    fetch_preempted downloads the newest copy that verifies, passing over one the kill after
    the notice cut short, and finds nothing where nothing was copied."""
    from orchestrate.ray_reporter import UploadPreemption, fetch_preempted

    from psdet.distributed import DistContext

    uri = str(tmp_path / "storage" / "trial_1" / "preempted")
    assert fetch_preempted(uri, tmp_path / "nothing") is None
    upload = UploadPreemption(uri)
    run = SimpleNamespace(ctx=DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    upload.on_preemption(run, None, 5)  # not rank 0: nothing to copy
    assert not Path(uri).exists()
    upload.on_preemption(run, _save(tmp_path / "engine", 0, 5, 5), 5)
    upload.on_preemption(run, _save(tmp_path / "engine", 1, 9, 3), 9)
    assert sorted(p.name for p in Path(uri).iterdir()) == ["ckpt-e0001-s00000009"]  # the older copy deleted
    found, meta = fetch_preempted(uri, tmp_path / "downloads")
    assert meta["step"] == 9 and found.parent == tmp_path / "downloads" and ckpt.read_meta(found) == meta

    shutil.copytree(Path(uri) / "ckpt-e0001-s00000009", Path(uri) / "ckpt-e0002-s00000014")
    _corrupt(Path(uri) / "ckpt-e0002-s00000014")  # a newer copy, torn
    found, meta = fetch_preempted(uri, tmp_path / "again")
    assert meta["step"] == 9


def test_an_abandoned_twins_newest_reported_checkpoint_is_adopted(tmp_path):
    """adopted_checkpoint: the newest `checkpoint_*` under another trial's directory that
    verifies (a corrupt newest gives way to the one before), None where it reported none."""
    from orchestrate.ray_reporter import adopted_checkpoint

    twin = tmp_path / "trial_twin"
    assert adopted_checkpoint(str(twin), tmp_path / "downloads") is None
    older = _tune_checkpoint(twin, 0, 4)
    newer = _tune_checkpoint(twin, 1, 8)
    assert adopted_checkpoint(str(twin), tmp_path / "downloads") == newer
    _corrupt(newer)
    assert adopted_checkpoint(str(twin), tmp_path / "downloads") == older
