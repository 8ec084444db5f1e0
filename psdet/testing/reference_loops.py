"""Slow, obvious reference implementations, written like the original psdet (loops over batch,
marks and pairs). Tests check the vectorised code in psdet against these."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def point_targets_loop(marks, num_marks, height, width, directional=False):
    """The original get_targets_points / DirectionalPointDetector.get_targets, cell clamped to the grid.

    marks [B, P, 4] = (x, y, direction, shape) -> (targets, mask) [B, C, H, W], C = 6 or 3.
    """
    channels = 6 if directional else 3
    batch = marks.shape[0]
    targets = torch.zeros(batch, channels, height, width)
    mask = torch.zeros_like(targets)
    mask[:, 0].fill_(1.0)
    for b in range(batch):
        for mark in marks[b, : int(num_marks[b])]:
            x, y, direction, shape = (float(v) for v in mark)
            col = min(max(math.floor(x * width), 0), width - 1)
            row = min(max(math.floor(y * height), 0), height - 1)
            targets[b, 0, row, col] = 1.0
            if directional:
                targets[b, 1, row, col] = shape
                targets[b, 2, row, col] = x * width - col
                targets[b, 3, row, col] = y * height - row
                targets[b, 4, row, col] = math.cos(direction)
                targets[b, 5, row, col] = math.sin(direction)
            else:
                targets[b, 1, row, col] = x * width - col
                targets[b, 2, row, col] = y * height - row
            mask[b, 1:, row, col] = 1.0
    return targets, mask


def point_loss_loop(point_map, targets, mask):
    return torch.nn.MSELoss()(point_map * mask, targets * mask)


def edge_loss_loop(edge_logits, slot_adjacency, num_marks):
    """The original: F.binary_cross_entropy on probabilities, weight = mask of real pairs."""
    edges_pred = torch.sigmoid(edge_logits)
    edges_target = torch.zeros_like(edges_pred)
    edges_mask = torch.zeros_like(edges_pred)
    for b in range(edge_logits.shape[0]):
        n = int(num_marks[b])
        for i in range(n):
            for j in range(n):
                edges_mask[b, i, j] = 1.0
                if slot_adjacency[b, i, j]:
                    edges_target[b, i, j] = 1.0
    return F.binary_cross_entropy(edges_pred, edges_target, edges_mask)


def pair_features_loop(features):
    """The original EdgePredictor input: [B, C, N] -> [B, 2C, N*N], column i*N+j = [f_i, f_j]."""
    b, c, n = features.shape
    inputs = torch.zeros(b, 2 * c, n * n)
    for i in range(n):
        for j in range(n):
            inputs[:, :, i * n + j] = torch.cat([features[:, :, i], features[:, :, j]], dim=1)
    return inputs


def multi_head_attention_einsum(attention, query, key, value):
    """SuperGlue's MultiHeadedAttention.forward, einsum form, with `attention`'s weights."""
    batch = query.shape[0]
    dim, heads = attention.head_dim, attention.num_heads
    q, k, v = (proj(x).view(batch, dim, heads, -1) for proj, x in zip(attention.proj, (query, key, value)))
    scores = torch.einsum("bdhn,bdhm->bhnm", q, k) / dim**0.5
    prob = torch.softmax(scores, dim=-1)
    x = torch.einsum("bhnm,bdhm->bdhn", prob, v)
    return attention.merge(x.contiguous().view(batch, dim * heads, -1))


def knn_edge_features_loop(x, k):
    """DGCNN get_graph_feature: [B, C, N] -> [B, 2C, N, k], neighbours by distance, self included."""
    batch, channels, n = x.shape
    out = torch.zeros(batch, 2 * channels, n, k)
    for b in range(batch):
        points = x[b].t()
        for i in range(n):
            distances = ((points - points[i]) ** 2).sum(dim=1)
            order = torch.argsort(distances, stable=True)[:k]
            for slot, j in enumerate(order):
                out[b, :channels, i, slot] = points[j] - points[i]
                out[b, channels:, i, slot] = points[i]
    return out
