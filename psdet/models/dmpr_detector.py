"""The DMPR-PS directional marking-point detector (`model.detector: dmpr`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from psdet.config import ModelConfig
from psdet.metrics import ImagePrediction
from psdet.models.backbones import build_backbone
from psdet.models.heads import conv_head
from psdet.models.targets import point_loss, point_targets
from psdet.postprocess import decode_point_map, pair_directional_points

# point-map channels: confidence, shape, dx, dy (sigmoid); cos, sin of the direction (tanh)
NUM_CHANNELS = 6


class DmprDetector(nn.Module):
    """Darknet -> one head -> [B, 6, S/32, S/32] directional point map; slots come from
    rule-based pairing of the decoded points (psdet.postprocess.pair_directional_points).
    """

    def __init__(self, cfg: ModelConfig, max_points: int):
        super().__init__()
        self.cfg = cfg
        self.max_points = max_points
        self.backbone = build_backbone(cfg.backbone, cfg.depth_factor)
        self.head = conv_head(cfg.depth_factor, NUM_CHANNELS)

    def forward(self, image: Tensor, marks: Tensor | None = None, num_marks: Tensor | None = None) -> dict[str, Tensor]:
        """image [B, 3, S, S] -> `point_map` [B, 6, S/32, S/32]; marks are not used."""
        raw = self.head(self.backbone(image))
        point_map = torch.cat([torch.sigmoid(raw[:, :4]), torch.tanh(raw[:, 4:])], dim=1)
        return {"point_map": point_map}

    def loss(self, outputs: dict[str, Tensor], batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """weight_point * masked MSE; `loss_edge` is a zero so every detector reports the same keys."""
        point_map = outputs["point_map"]
        targets, mask = point_targets(batch["marks"], batch["num_marks"], *point_map.shape[-2:], directional=True)
        loss_point = point_loss(point_map, targets, mask)
        loss_edge = torch.zeros((), device=point_map.device)
        return self.cfg.weight_point * loss_point, {"loss_point": loss_point, "loss_edge": loss_edge}

    @torch.no_grad()
    def predict(self, image: Tensor) -> list[ImagePrediction]:
        """image [B, 3, S, S] -> one ImagePrediction per image: decoded points with (shape, cos,
        sin) attributes, paired into slots by the DMPR-PS rules. Call in eval mode."""
        if self.training:
            raise RuntimeError("call model.eval() before predict: BatchNorm is in training mode")
        points = decode_point_map(self(image)["point_map"], self.cfg, self.max_points)
        return pair_directional_points(points, self.cfg.dmpr)
