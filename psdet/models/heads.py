"""Convolutional heads on the backbone map, and descriptor sampling at points."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from psdet.models.backbones import detector_block


def conv_head(depth_factor: int, out_channels: int) -> nn.Sequential:
    """Two detector blocks at 16 * depth_factor, then a bias-free 1x1 conv -> `out_channels`.

    [B, 32 * depth_factor, H, W] -> [B, out_channels, H, W], raw (no activation).
    """
    layers = detector_block(16 * depth_factor) + detector_block(16 * depth_factor)
    layers.append(nn.Conv2d(32 * depth_factor, out_channels, kernel_size=1, bias=False))
    return nn.Sequential(*layers)


def sample_descriptors(descriptor_map: Tensor, points_xy: Tensor) -> Tensor:
    """Bilinearly sample descriptors at points, L2-normalised over channels.

    descriptor_map: [B, D, H, W]; points_xy: [B, P, 2], x, y normalised to [0, 1] of the
    image (align_corners=True: 0 and 1 are the centres of the border cells). -> [B, D, P].
    """
    batch, channels = descriptor_map.shape[:2]
    # fp32 even under autocast: reduced-precision grid coordinates would move the points
    grid = (points_xy.float() * 2 - 1).view(batch, 1, -1, 2)
    sampled = F.grid_sample(descriptor_map.float(), grid, mode="bilinear", align_corners=True)
    return F.normalize(sampled.reshape(batch, channels, -1), p=2, dim=1)
