"""The attentional graph neural network slot detector (`model.detector: gat`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from psdet.config import ModelConfig
from psdet.metrics import ImagePrediction
from psdet.models.backbones import build_backbone
from psdet.models.graph import EdgePredictor, GraphEncoder
from psdet.models.heads import conv_head, sample_descriptors
from psdet.models.targets import edge_loss, point_loss, point_targets, real_mark_mask
from psdet.postprocess import decode_point_map, slots_from_edges


class GatDetector(nn.Module):
    """Backbone -> point map (confidence, dx, dy) and descriptor map; descriptors sampled at
    the marking points -> graph encoder -> an edge logit for every ordered pair of points.

    Training runs the graph on the ground-truth marks (zero-padded to P, pads included in
    the attention, as the original); `predict` runs it on the decoded points.
    """

    def __init__(self, cfg: ModelConfig, max_points: int):
        super().__init__()
        self.cfg = cfg
        self.max_points = max_points
        self.backbone = build_backbone(cfg.backbone, cfg.depth_factor)
        self.point_head = conv_head(cfg.depth_factor, 3)
        self.descriptor_head = conv_head(cfg.depth_factor, cfg.descriptor_dim)
        self.graph_encoder = GraphEncoder(cfg.descriptor_dim, cfg.graph) if cfg.use_gnn else None
        edge_input_dim = cfg.graph.proj_dim if cfg.use_gnn else cfg.descriptor_dim
        self.edge_predictor = EdgePredictor(edge_input_dim, cfg.edge_layers, cfg.edge_dropout)

    def forward(self, image: Tensor, marks: Tensor | None = None, num_marks: Tensor | None = None) -> dict[str, Tensor]:
        """image [B, 3, S, S] in [0, 1]; marks [B, P, 4] and num_marks [B] (required in training).

        -> `point_map` [B, 3, S/32, S/32] after sigmoid, `descriptor_map` [B, D, S/32, S/32]
        and, when marks are given, `edge_logits` [B, P, P] over the marks' positions.
        """
        features = self.backbone(image)
        outputs = {
            "point_map": torch.sigmoid(self.point_head(features)),
            "descriptor_map": self.descriptor_head(features),
        }
        if marks is None:
            if self.training:
                raise ValueError("GatDetector needs the ground-truth marks in training mode")
            return outputs
        points_xy = marks[..., :2]
        if num_marks is not None:  # padding rows are zeros, whatever the loader put there
            points_xy = points_xy * real_mark_mask(num_marks, marks.shape[1]).unsqueeze(-1)
        outputs["edge_logits"] = self.edge_logits(outputs["descriptor_map"], points_xy)
        return outputs

    def edge_logits(self, descriptor_map: Tensor, points_xy: Tensor) -> Tensor:
        """descriptor_map [B, D, H, W], points_xy [B, P, 2] in [0, 1] -> logits [B, P, P]."""
        features = sample_descriptors(descriptor_map, points_xy)
        if self.graph_encoder is not None:
            features = self.graph_encoder(points_xy, features)
        return self.edge_predictor(features)

    def loss(self, outputs: dict[str, Tensor], batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """weight_point * masked point MSE + weight_edge * masked edge BCE, both in fp32."""
        point_map = outputs["point_map"]
        targets, mask = point_targets(batch["marks"], batch["num_marks"], *point_map.shape[-2:])
        loss_point = point_loss(point_map, targets, mask)
        loss_edge = edge_loss(outputs["edge_logits"], batch["slot_adjacency"], batch["num_marks"])
        total = self.cfg.weight_point * loss_point + self.cfg.weight_edge * loss_edge
        return total, {"loss_point": loss_point, "loss_edge": loss_edge}

    @torch.no_grad()
    def predict(self, image: Tensor) -> list[ImagePrediction]:
        """image [B, 3, S, S] -> one ImagePrediction per image: decoded points (padded to
        max_points with zeros), the graph on them, slots where sigmoid(edge logit) > edge_thresh,
        scored as `model.slot_score` says. Call in eval mode.

        With `model.nms_keep: all` an image may have more than max_points points: its graph
        then runs on exactly its own points, unpadded, as the original's did; every other
        image's graph still has max_points nodes (pads included in the attention), so no
        image's edges depend on what else is in the batch.
        """
        if self.training:
            raise RuntimeError("call model.eval() before predict: BatchNorm and dropout are in training mode")
        outputs = self(image)
        descriptor_map = outputs["descriptor_map"]
        points = decode_point_map(outputs["point_map"], self.cfg, self.max_points)
        num_points = points.xy.shape[1]
        if num_points == self.max_points:
            edge_scores = torch.sigmoid(self.edge_logits(descriptor_map, points.xy).float())
        else:
            edge_scores = self._edge_scores_by_graph_size(descriptor_map, points)
        return slots_from_edges(edge_scores, points, self.cfg.edge_thresh, self.cfg.slot_score)

    def _edge_scores_by_graph_size(self, descriptor_map: Tensor, points) -> Tensor:
        """Edge probabilities [B, P', P'] when P' > max_points: images with at most max_points
        points share one max_points-node graph; each larger one runs alone on its own points.
        Entries outside an image's graph are 0 (its points there are padding)."""
        batch, num_points = points.valid.shape
        counts = points.valid.sum(dim=1).tolist()
        edge_scores = torch.zeros(batch, num_points, num_points, device=descriptor_map.device)
        small = [b for b, count in enumerate(counts) if count <= self.max_points]
        if small:
            index = torch.tensor(small, device=descriptor_map.device)
            logits = self.edge_logits(descriptor_map[index], points.xy[index, : self.max_points])
            edge_scores[index, : self.max_points, : self.max_points] = torch.sigmoid(logits.float())
        for b, count in enumerate(counts):
            if count > self.max_points:
                logits = self.edge_logits(descriptor_map[b : b + 1], points.xy[b : b + 1, :count])
                edge_scores[b, :count, :count] = torch.sigmoid(logits[0].float())
        return edge_scores
