"""The original gcn-parking-slot checkpoints -> psdet checkpoints (`psdet convert`).

An original checkpoint is `{'epoch', 'it', 'model_state', 'optimizer_state', 'version'}`
(its `tools/train_utils/train_utils.py`); `model_state` is the state dict of its
`PointDetectorBase`, whose network sits under `model.`. The module names differ from
psdet's, the tensors inside each module do not: every rename is a prefix, listed here
per part of the network, and the inner names (VGG `features` indices, Darknet layer
indices, ResNet `layerN.M.convK`, GAT `layers.L.attn.proj.I` / `.merge` / `.mlp.N`,
DGCNN `convN.M`, MLP indices) are the same on both sides.

The mapping is complete in both directions: every psdet tensor comes from exactly one
original key, and every original key is either mapped or one of the few the original
carries without a psdet counterpart (`DROPPED`). Anything else, missing or unknown, is a
`CheckpointError` that names the keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from psdet.errors import CheckpointError

# (original prefix, psdet prefix) for every part of each network. The backbone's rule
# depends on the backbone; the rest on the detector and graph type.
BACKBONE_PREFIXES = {
    "vgg16": ("model.feature_extractor.features.", "backbone.features."),
    "darknet": ("model.feature_extractor.model.", "backbone.layers."),
    "resnet18": ("model.feature_extractor.", "backbone."),
    "resnet50": ("model.feature_extractor.", "backbone."),
}
GAT_DETECTOR_PREFIXES = (
    ("model.point_predictor.", "point_head."),
    ("model.descriptor_map.", "descriptor_head."),
    ("model.graph_encoder.point_encoder.encoder.", "graph_encoder.point_encoder."),
    ("model.graph_encoder.gnn.", "graph_encoder.gnn."),  # GAT `layers.*` or DGCNN `conv*`
    ("model.graph_encoder.proj.", "graph_encoder.proj."),
    ("model.edge_predictor.encoder.", "edge_predictor.encoder."),
)
DMPR_DETECTOR_PREFIXES = (("model.predict.", "head."),)

# Original keys with no psdet tensor. `global_step` is a counter buffer of its
# PointDetectorBase; VGG16 keeps torchvision's ImageNet classifier, which its forward
# never runs; its DGCNN registers each BatchNorm twice (as `bnN` and inside `convN`), so
# `bnN.*` repeats `convN.1.*` (checked equal, then dropped).
GLOBAL_STEP = "global_step"
VGG_CLASSIFIER = tuple(f"model.feature_extractor.classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))
DGCNN_BN_ALIAS = re.compile(r"^model\.graph_encoder\.gnn\.bn(\d)\.(.+)$")
_SHOWN = 6  # keys named in one error line


def _short_list(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def read_original(path: Path) -> dict[str, Any]:
    """The original checkpoint at `path`, loaded on the CPU with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: original checkpoint does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot load as a torch checkpoint (weights_only): {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state"), dict):
        got = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: not a gcn-parking-slot checkpoint: no 'model_state' dict (got {got})")
    return checkpoint


def detect_architecture(model_state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Config overrides (dotted keys) describing the network an original `model_state` holds:
    detector, backbone, width, graph type and the layer sizes readable from its shapes."""
    keys = set(model_state)

    def shape(key: str) -> torch.Size:
        if key not in model_state:
            raise CheckpointError(f"{source}: missing key {key} (needed to tell the architecture)")
        return model_state[key].shape

    def mlp_widths(prefix: str) -> list[int]:
        """Output widths of an original MLP's Conv1d layers, in order."""
        convs = sorted((int(m.group(1)), key) for key in keys
                       if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", key)) and model_state[key].dim() == 3)
        return [model_state[key].shape[0] for _, key in convs]

    overrides: dict[str, Any] = {}
    if "model.predict.0.weight" in keys:
        overrides["model.detector"] = "dmpr"
        head = "model.predict."
    elif "model.point_predictor.0.weight" in keys:
        overrides["model.detector"] = "gat"
        head = "model.point_predictor."
    else:
        raise CheckpointError(f"{source}: neither model.point_predictor.* (GAT) nor model.predict.* (DMPR) keys; "
                              "not a gcn-parking-slot model_state")
    overrides["model.depth_factor"] = shape(head + "0.weight")[1] // 32
    if any(k.startswith("model.feature_extractor.features.") for k in keys):
        backbone = "vgg16"
    elif any(k.startswith("model.feature_extractor.model.") for k in keys):
        backbone = "darknet"
    elif "model.feature_extractor.layer1.0.conv3.weight" in keys:
        backbone = "resnet50"
    elif "model.feature_extractor.layer1.0.conv1.weight" in keys:
        backbone = "resnet18"
    else:
        raise CheckpointError(f"{source}: no backbone keys under model.feature_extractor "
                              "(VGG16 features.*, Darknet model.*, ResNet layer1.*)")
    overrides["model.backbone"] = backbone
    if overrides["model.detector"] == "dmpr":
        return overrides

    overrides["model.descriptor_dim"] = shape("model.descriptor_map.12.weight")[0]
    overrides["model.edge_layers"] = mlp_widths("model.edge_predictor.encoder.")[:-1]
    has_graph = any(k.startswith("model.graph_encoder.") for k in keys)
    overrides["model.use_gnn"] = has_graph
    if has_graph:
        if any(k.startswith("model.graph_encoder.gnn.layers.") for k in keys):
            overrides["model.graph.type"] = "gat"
            overrides["model.graph.gat_layers"] = len({k.split(".")[4] for k in keys
                                                       if k.startswith("model.graph_encoder.gnn.layers.")})
        elif "model.graph_encoder.gnn.conv1.0.weight" in keys:
            overrides["model.graph.type"] = "dgcnn"
        else:
            raise CheckpointError(f"{source}: model.graph_encoder has neither GAT (gnn.layers.*) nor DGCNN "
                                  "(gnn.conv1.*) keys")
        overrides["model.graph.point_encoder_layers"] = mlp_widths("model.graph_encoder.point_encoder.encoder.")[:-1]
        overrides["model.graph.proj_dim"] = shape("model.graph_encoder.proj.weight")[0]
    return overrides


def original_key_map(psdet_keys: list[str], backbone: str, detector: str) -> dict[str, str]:
    """psdet key -> the original key it is read from, for a psdet model's state-dict keys."""
    prefixes = (BACKBONE_PREFIXES[backbone],) + (GAT_DETECTOR_PREFIXES if detector == "gat" else DMPR_DETECTOR_PREFIXES)
    mapping = {}
    for key in psdet_keys:
        for original_prefix, psdet_prefix in prefixes:
            if key.startswith(psdet_prefix):
                mapping[key] = original_prefix + key[len(psdet_prefix):]
                break
        else:  # a psdet module without an original counterpart: a bug in this table
            raise AssertionError(f"psdet key {key} has no original counterpart in psdet.convert")
    return mapping


def convert_model_state(model_state: dict[str, torch.Tensor], model: torch.nn.Module, *, backbone: str,
                        detector: str, source: str) -> dict[str, torch.Tensor]:
    """The psdet state dict of `model` (built for the detected architecture) read from an
    original `model_state`; CheckpointError naming every missing, unknown or misshapen key."""
    target = model.state_dict()
    mapping = original_key_map(list(target), backbone, detector)
    expected = set(mapping.values()) | {GLOBAL_STEP}
    if backbone == "vgg16" and detector == "gat":
        expected |= set(VGG_CLASSIFIER)
    aliases = {}
    for key in model_state:
        match = DGCNN_BN_ALIAS.match(key)
        if match:
            aliases[key] = f"model.graph_encoder.gnn.conv{match.group(1)}.1.{match.group(2)}"
    expected |= {alias for alias, twin in aliases.items() if twin in expected}
    missing = sorted(expected - set(model_state) - {GLOBAL_STEP})
    unknown = sorted(set(model_state) - expected)
    if missing or unknown:
        parts = ([f"{len(missing)} missing key(s): {_short_list(missing)}"] if missing else []) + (
            [f"{len(unknown)} unknown key(s): {_short_list(unknown)}"] if unknown else [])
        raise CheckpointError(f"{source}: does not match the original {detector}/{backbone} layout: {'; '.join(parts)}")
    misshapen = [f"{original} {tuple(model_state[original].shape)} (psdet {key} wants {tuple(target[key].shape)})"
                 for key, original in mapping.items() if model_state[original].shape != target[key].shape]
    if misshapen:
        raise CheckpointError(f"{source}: {len(misshapen)} tensor(s) of the wrong shape: {_short_list(misshapen)}")
    differing = [alias for alias, twin in aliases.items() if not torch.equal(model_state[alias], model_state[twin])]
    if differing:
        raise CheckpointError(f"{source}: DGCNN BatchNorm aliases differ from their twins: {_short_list(differing)}")
    return {key: model_state[original].clone().to(target[key].dtype) for key, original in mapping.items()}
