"""Graph over marking points: position encoder, GAT or DGCNN message passing, edge predictor.

Features are channel-first, [B, C, P] (Conv1d layout), P points per image (padded).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psdet.config import GraphConfig


def mlp(channels: list[int], dropout: float | None = None) -> nn.Sequential:
    """1x1 Conv1d layers (with bias) through `channels`; BN, ReLU (and dropout) between them.

    With `dropout` given (even 0) every hidden layer gets a Dropout module, so the layer
    indices, hence checkpoint keys, do not depend on the dropout rate.
    The last layer's bias starts at 0, as in every MLP of the original.
    """
    layers: list[nn.Module] = []
    for index in range(1, len(channels)):
        layers.append(nn.Conv1d(channels[index - 1], channels[index], kernel_size=1, bias=True))
        if index < len(channels) - 1:
            layers += [nn.BatchNorm1d(channels[index]), nn.ReLU()]
            if dropout is not None:
                layers.append(nn.Dropout(dropout))
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- GAT


class MultiHeadAttention(nn.Module):
    """SuperGlue multi-head attention: q/k/v 1x1 projections, scaled dot product, 1x1 merge.

    Channel c of a projection belongs to head c % num_heads (SuperGlue's view(B, dim, heads, N)).
    """

    def __init__(self, num_heads: int, feature_dim: int):
        super().__init__()
        if feature_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide feature_dim {feature_dim}")
        self.num_heads = num_heads
        self.head_dim = feature_dim // num_heads
        self.merge = nn.Conv1d(feature_dim, feature_dim, kernel_size=1)
        # as SuperGlue: the q, k, v projections start as copies of the merge layer
        self.proj = nn.ModuleList([copy.deepcopy(self.merge) for _ in range(3)])

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        batch = query.shape[0]
        # [B, D, N] -> [B, heads, N, head_dim]
        q, k, v = (
            proj(x).view(batch, self.head_dim, self.num_heads, -1).permute(0, 2, 3, 1)
            for proj, x in zip(self.proj, (query, key, value))
        )
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        merged = attended.permute(0, 3, 1, 2).reshape(batch, self.head_dim * self.num_heads, -1)
        return self.merge(merged)


class AttentionalPropagation(nn.Module):
    """One message-passing layer: attention message, then MLP [2d, 2d, d] on [x, message]."""

    def __init__(self, feature_dim: int, num_heads: int):
        super().__init__()
        self.attn = MultiHeadAttention(num_heads, feature_dim)
        self.mlp = mlp([2 * feature_dim, 2 * feature_dim, feature_dim])

    def forward(self, x: Tensor) -> Tensor:
        message = self.attn(x, x, x)
        return self.mlp(torch.cat([x, message], dim=1))


class AttentionalGNN(nn.Module):
    """`num_layers` self-attention propagation layers with residuals: [B, D, P] -> [B, D, P]."""

    def __init__(self, feature_dim: int, num_layers: int, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList([AttentionalPropagation(feature_dim, num_heads) for _ in range(num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


# ----------------------------------------------------------------------------- DGCNN


def knn_edge_features(x: Tensor, k: int) -> Tensor:
    """EdgeConv input: for each point and each of its k nearest (itself included) neighbours,
    [neighbour - point, point]. x: [B, C, N] -> [B, 2C, N, k]."""
    points = x.transpose(1, 2)  # [B, N, C]
    squared_norm = points.square().sum(-1)
    squared_distance = squared_norm.unsqueeze(2) - 2 * points @ points.transpose(1, 2) + squared_norm.unsqueeze(1)
    neighbour_index = (-squared_distance).topk(k, dim=-1).indices  # [B, N, k]
    batch_index = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
    neighbours = points[batch_index, neighbour_index]  # [B, N, k, C]
    centres = points.unsqueeze(2).expand_as(neighbours)
    return torch.cat([neighbours - centres, centres], dim=3).permute(0, 3, 1, 2)


def conv_bn_leaky2d(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.LeakyReLU(0.2))


class DGCNN(nn.Module):
    """Two EdgeConv stages over k-nearest-neighbour graphs in feature space, then a 1x1 fusion
    of the input and both stages: [B, C_in, N] -> [B, C_out, N]. k is clamped to N."""

    def __init__(self, input_dim: int, output_dim: int, k: int):
        super().__init__()
        self.k = k
        self.conv1 = conv_bn_leaky2d(2 * input_dim, input_dim)
        self.conv2 = conv_bn_leaky2d(input_dim, input_dim)
        self.conv3 = conv_bn_leaky2d(2 * input_dim, input_dim)
        self.conv4 = nn.Sequential(nn.Conv1d(3 * input_dim, output_dim, 1, bias=False), nn.BatchNorm1d(output_dim),
                                   nn.LeakyReLU(0.2))

    def forward(self, x: Tensor) -> Tensor:
        k = min(self.k, x.shape[2])
        stage1 = self.conv2(self.conv1(knn_edge_features(x, k))).amax(dim=-1)
        stage2 = self.conv3(knn_edge_features(stage1, k)).amax(dim=-1)
        return self.conv4(torch.cat([x, stage1, stage2], dim=1))


# ----------------------------------------------------------------------------- encoder and edges


class GraphEncoder(nn.Module):
    """Point positions + sampled descriptors -> per-point features for the edge predictor.

    forward(points_xy [B, P, 2] in [0, 1], descriptors [B, D, P]) -> [B, proj_dim, P].
    """

    def __init__(self, descriptor_dim: int, cfg: GraphConfig):
        super().__init__()
        self.point_encoder = mlp([2, *cfg.point_encoder_layers, descriptor_dim])
        if cfg.type == "gat":
            self.gnn = AttentionalGNN(descriptor_dim, cfg.gat_layers, cfg.num_heads)
        elif cfg.type == "dgcnn":
            self.gnn = DGCNN(descriptor_dim, descriptor_dim, cfg.k)
        else:
            raise ValueError(f"unknown graph type {cfg.type!r}; choose gat or dgcnn")
        self.proj = nn.Conv1d(descriptor_dim, cfg.proj_dim, kernel_size=1, bias=True)

    def forward(self, points_xy: Tensor, descriptors: Tensor) -> Tensor:
        x = self.point_encoder(points_xy.transpose(1, 2).to(descriptors.dtype)) + descriptors
        return self.proj(self.gnn(x))


def pair_features(features: Tensor) -> Tensor:
    """Every ordered pair (i, j): [B, C, P] -> [B, 2C, P, P] with [:, :, i, j] = [f_i, f_j]."""
    batch, channels, num_points = features.shape
    first = features.unsqueeze(3).expand(batch, channels, num_points, num_points)
    second = features.unsqueeze(2).expand(batch, channels, num_points, num_points)
    return torch.cat([first, second], dim=1)


class EdgePredictor(nn.Module):
    """MLP on every ordered pair of point features: [B, C, P] -> edge logits [B, P, P].

    logits[b, i, j] > 0 means "i -> j is a slot entrance". Layers [2C, *hidden, 1] with BN,
    ReLU and dropout between them.
    """

    def __init__(self, feature_dim: int, hidden: list[int], dropout: float):
        super().__init__()
        self.encoder = mlp([2 * feature_dim, *hidden, 1], dropout=dropout)

    def forward(self, features: Tensor) -> Tensor:
        batch, _, num_points = features.shape
        pairs = pair_features(features).flatten(2)  # [B, 2C, P*P], pair index i * P + j
        return self.encoder(pairs).view(batch, num_points, num_points)
