"""Training targets and losses, vectorised over batch, marks and cells.

Marks follow docs/CONTRACTS.md: `marks [B, P, 4]` = (x, y, direction, shape), x and y
normalised to [0, 1], the first `num_marks[b]` rows real, the rest padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def real_mark_mask(num_marks: Tensor, num_points: int) -> Tensor:
    """[B] counts -> bool [B, P], True for the real (non-padding) marks."""
    return torch.arange(num_points, device=num_marks.device) < num_marks.unsqueeze(1)


def point_targets(marks: Tensor, num_marks: Tensor, height: int, width: int,
                  directional: bool = False) -> tuple[Tensor, Tensor]:
    """Cell targets for the point map, and which of them are supervised.

    Each real mark falls in cell (floor(x * W), floor(y * H)), clamped to the grid; that cell
    gets confidence 1 and the sub-cell offsets (x * W - col, y * H - row). With
    `directional` (DMPR) the channels are (confidence, shape, dx, dy, cos, sin), else
    (confidence, dx, dy). When marks share a cell the later one wins, as a loop over marks
    would do; the winner is chosen by index, so the result is the same on every device.

    -> (targets [B, C, H, W], mask [B, C, H, W]): confidence supervised everywhere, the
    other channels only at cells holding a mark.
    """
    batch, num_points = marks.shape[:2]
    device = marks.device
    marks = marks.float()
    x, y = marks[..., 0], marks[..., 1]
    col = (x * width).floor().clamp(0, width - 1)
    row = (y * height).floor().clamp(0, height - 1)
    cell = row.long() * width + col.long()  # [B, P]

    real = real_mark_mask(num_marks, num_points)
    mark_index = torch.arange(num_points, device=device).expand(batch, num_points)
    batch_index = torch.arange(batch, device=device).unsqueeze(1).expand(batch, num_points)
    flat_cell = batch_index * (height * width) + cell
    last_in_cell = torch.full((batch * height * width,), -1, dtype=torch.long, device=device)
    last_in_cell = last_in_cell.scatter_reduce(0, flat_cell[real], mark_index[real], reduce="amax")
    winner = real & (last_in_cell[flat_cell] == mark_index)  # at most one mark per cell

    offset_x, offset_y = x * width - col, y * height - row
    confidence = torch.ones_like(x)
    if directional:
        direction, shape = marks[..., 2], marks[..., 3]
        values = [confidence, shape, offset_x, offset_y, direction.cos(), direction.sin()]
    else:
        values = [confidence, offset_x, offset_y]
    values = torch.stack(values, dim=-1)  # [B, P, C]
    channels = values.shape[-1]

    targets = torch.zeros(batch, height * width, channels, device=device)
    mask = torch.zeros_like(targets)
    mask[..., 0] = 1.0
    rows, cells = batch_index[winner], cell[winner]
    targets[rows, cells] = values[winner]
    mask[rows, cells] = 1.0
    return (targets.transpose(1, 2).reshape(batch, channels, height, width),
            mask.transpose(1, 2).reshape(batch, channels, height, width))


def point_loss(point_map: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Masked MSE, mean over every element (the original's nn.MSELoss on pred*mask, target*mask)."""
    return F.mse_loss(point_map.float() * mask, targets * mask)


def edge_mask(num_marks: Tensor, num_points: int) -> Tensor:
    """bool [B, P, P]: pairs (i, j) of real marks, i == j included (as the original)."""
    real = real_mark_mask(num_marks, num_points)
    return real.unsqueeze(2) & real.unsqueeze(1)


def edge_loss(edge_logits: Tensor, slot_adjacency: Tensor, num_marks: Tensor) -> Tensor:
    """Binary cross-entropy of sigmoid(logits) against `slot_adjacency` [B, P, P], weighted by
    the real-pair mask, mean over all B * P * P elements (the original's F.binary_cross_entropy
    with weight=mask). From logits in fp32, so it is stable and autocast-safe."""
    weight = edge_mask(num_marks, edge_logits.shape[-1]).float()
    return F.binary_cross_entropy_with_logits(edge_logits.float(), slot_adjacency.float(), weight=weight)
