"""What both engine test modules share: a small synthetic dataset, a quick ps_gat_tiny
config, and the final weights of a run (for the bit-exact comparisons)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from psdet import checkpoint as ckpt
from psdet.config import load_config

REPO = Path(__file__).resolve().parents[1]

# Small and quick: 128x128 input (a 4x4 grid), 8 images per batch.
FAST = [
    "data.image_size=128",
    "data.batch_size=8",
    "data.val_batch_size=8",
    "train.epochs=3",
    "train.progress=false",
    "train.log_interval=2",
]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from psdet.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 48, 8, seed=3, progress=False)
    return root


def _cfg(data: Path, *extra: str):
    return load_config("ps_gat_tiny", [*FAST, f"data.root={data}", *extra])


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    state, _ = ckpt.load_checkpoint(newest)
    return state["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _psdet(*args: str) -> list[str]:
    return [sys.executable, "-m", "psdet", *args]
