"""Detectors: `build_model(model_cfg, max_points)` and parameter summaries.

Every detector is an `nn.Module` with `forward(image, marks=None, num_marks=None) -> dict`,
`loss(outputs, batch) -> (total, parts)` and `predict(image) -> list[ImagePrediction]`
(docs/CONTRACTS.md).
"""
from __future__ import annotations

from torch import nn

from psdet.config import ModelConfig
from psdet.models.dmpr_detector import DmprDetector
from psdet.models.gat_detector import GatDetector

__all__ = ["DmprDetector", "GatDetector", "build_model", "count_parameters", "describe"]


def build_model(model_cfg: ModelConfig, max_points: int) -> GatDetector | DmprDetector:
    """`model.detector` gat | dmpr -> the detector; `max_points` pads predicted points (data.max_points)."""
    if model_cfg.detector == "gat":
        return GatDetector(model_cfg, max_points)
    if model_cfg.detector == "dmpr":
        return DmprDetector(model_cfg, max_points)
    raise ValueError(f"unknown detector {model_cfg.detector!r}; choose gat or dmpr")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def describe(model: nn.Module) -> str:
    """Readable summary: each top-level submodule's class and parameter count, then the total."""
    lines = [type(model).__name__]
    for name, child in model.named_children():
        lines.append(f"  {name:<16} {type(child).__name__:<18} {count_parameters(child):>12,}")
    lines.append(f"  {'total':<35} {count_parameters(model):>12,}")
    return "\n".join(lines)
