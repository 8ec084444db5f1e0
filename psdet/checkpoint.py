"""Full training state <-> a checkpoint directory, written atomically, verified on load.

A checkpoint is a directory `ckpt-e{epoch}-s{step}` holding:
- `state.pt`: model, optimizer, AMP scaler, position (epoch, global step, batch within
  the epoch), restart count and every RNG state (python, numpy, torch, CUDA), and with
  `train.ema_decay` the moving average of the weights (`model_ema`: what evaluation
  scored, and what `delivered_weights` hands to evaluation, prediction and
  `train.init_from`); loadable with `torch.load(weights_only=True)`.
- `config.yaml`: the resolved config of the run.
- `meta.json`, written last: position, metrics at save time, and the size and
  SHA-256 of `state.pt`. A directory whose meta is missing or does not match its
  state file is corrupt (a crash mid-write, a truncated copy) and is skipped.

Everything is written into a hidden temporary directory and renamed into place, so a
reader never sees a half-written checkpoint under its final name.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from psdet import userfiles
from psdet.errors import CheckpointError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
EMA_KEY = "model_ema"
_NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)$")

log = logging.getLogger("psdet")


@dataclass(frozen=True)
class Position:
    """Where training stands: `epoch` is the epoch in progress, `batch` batches of it done."""

    epoch: int
    step: int
    batch: int

    @property
    def dirname(self) -> str:
        return f"ckpt-e{self.epoch:04d}-s{self.step:08d}"


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, in weights_only-loadable types."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
         np_state["has_gauss"], np_state["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- write


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path, position: Position, state: dict[str, Any], config_yaml: str, metrics: dict[str, float]
) -> Path:
    """Write a checkpoint under `root` atomically; return its final directory."""
    return write_checkpoint_dir(Path(root) / position.dirname, position, state, config_yaml, metrics)


def write_checkpoint_dir(
    final: Path, position: Position, state: dict[str, Any], config_yaml: str, metrics: dict[str, float]
) -> Path:
    """Write one checkpoint directory `final` atomically (a temporary sibling renamed into
    place, replacing an older `final`); return it."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state_path = tmp / STATE_FILE
    with open(state_path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    (tmp / CONFIG_FILE).write_text(config_yaml)
    meta = {
        "epoch": position.epoch,
        "step": position.step,
        "batch": position.batch,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "state_bytes": state_path.stat().st_size,
        "state_sha256": _sha256(state_path),
    }
    with open(tmp / META_FILE, "w") as handle:
        json.dump(meta, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # the same position written again after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


# ----------------------------------------------------------------------------- read


def read_meta(path: Path) -> dict[str, Any]:
    """The verified meta of a checkpoint directory; CheckpointError if it is incomplete or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a directory")
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint '{path}' is incomplete: no {META_FILE}")
    try:
        meta = userfiles.read_json(meta_path, "checkpoint's meta.json", CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {meta_path} is not a JSON object")
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete: no {STATE_FILE}")
    if state_path.stat().st_size != meta.get("state_bytes"):
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt: {STATE_FILE} has {state_path.stat().st_size} bytes, "
            f"expected {meta.get('state_bytes')} (truncated?)"
        )
    try:
        digest = _sha256(state_path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint '{path}': cannot read {STATE_FILE}: {exc.strerror or exc}") from None
    if digest != meta.get("state_sha256"):
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {STATE_FILE} checksum mismatch")
    return meta


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a verified checkpoint, tensors on CPU, loaded with weights_only=True."""
    meta = read_meta(path)
    try:
        state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc):  # torch refused a global: the pickle would build an object or call code
            raise CheckpointError(f"checkpoint '{path}' cannot be loaded: {STATE_FILE} holds more than tensors and "
                                  "plain data, and is refused unrun (checkpoints load with weights_only=True)") from None
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded: {_first_line(exc)}") from None
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded: {_first_line(exc)}") from None
    return state, meta


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def delivered_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model a checkpoint's `state` delivers: the moving average of the weights when the
    run kept one (train.ema_decay: the model its evaluations scored), else the weights."""
    return state.get(EMA_KEY, state["model"])


def load_model_weights(model: torch.nn.Module, path: Path, what: str) -> Path:
    """Load only the delivered model weights of the checkpoint at `path` (a checkpoint or run
    directory, or its state.pt; weights_only) into `model`; -> the checkpoint directory.
    CheckpointError naming it and `what` (the config) when its tensors do not fit the model."""
    ckpt_dir = resolve_checkpoint(Path(path))
    state, _ = load_checkpoint(ckpt_dir)
    try:
        model.load_state_dict(delivered_weights(state))
    except RuntimeError as exc:  # names the first keys that do not fit, on one line
        details = " ".join(str(exc).split())
        raise CheckpointError(f"checkpoint '{ckpt_dir}' does not fit {what}: {details[:300]}") from None
    return ckpt_dir


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, its `state.pt`, or a run directory (its newest valid checkpoint)."""
    path = Path(path)
    if path.is_file() and path.name == STATE_FILE:
        return path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if (path / META_FILE).exists() or (path / STATE_FILE).exists():
        return path
    for candidate in (path / "checkpoints", path):
        found = latest_valid(candidate)
        if found is not None:
            return found
    raise CheckpointError(f"no valid checkpoint in '{path}'")


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest first (by global step)."""
    if not Path(root).is_dir():
        return []
    found = []
    for child in Path(root).iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(2)), int(match.group(1)), child))
    return [path for _, _, path in sorted(found)]


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint under `root` that verifies; corrupt newer ones are skipped with a warning."""
    found = latest_valid_meta(root)
    return found[0] if found else None


def latest_valid_meta(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """`latest_valid` and that checkpoint's verified meta, read once."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(root)):
        try:
            meta = read_meta(path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        for reason in skipped:
            log.warning("%s; using the previous checkpoint %s", reason, path.name)
        return path, meta
    for reason in skipped:
        log.warning("%s; no earlier checkpoint to fall back to", reason)
    return None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and stale temporaries) under `root`."""
    for path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for stale in Path(root).glob(".tmp-ckpt-*"):
        if stale.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- resume


class ResumeSource(Protocol):
    """Where a run resumes from. The engine asks once, on every rank, after building the run
    and before its first step; every rank must get the same answer."""

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint directory to resume from, or None to start fresh."""


class LocalResume:
    """The newest valid checkpoint under `root` (a run's `checkpoints/`): `psdet train --resume`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def latest_checkpoint(self) -> Path | None:
        return latest_valid(self.root)
