"""Slow reference for the batched colour jitter: one image at a time, one numpy step at a time.

It is the per-sample jitter that `psdet.data.transforms` ran in the DataLoader workers
before the jitter moved to the device: brightness `x * b`; contrast `(x - m) * k + m`
with m the image's mean luma; saturation `gray + (x - gray) * s`; hue a rotation of the
YIQ chroma plane; each clamped to [0, 1], in the order `params[4:]` gives.
"""
from __future__ import annotations

import math

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def color_jitter(image: np.ndarray, params: np.ndarray) -> np.ndarray:
    """image float32 [3, H, W] in [0, 1]; params [8] from `transforms.sample_jitter`."""
    brightness, contrast, saturation, hue = (np.float32(v) for v in params[:4])
    out = image.astype(np.float32, copy=True)
    for step in params[4:].astype(int):
        if step == 0:
            out = out * brightness
        elif step == 1:
            mean = np.float32(luminance(out).mean())
            out = (out - mean) * contrast + mean
        elif step == 2:
            gray = luminance(out)[None]
            out = gray + (out - gray) * saturation
        else:
            out = mix_channels(hue_matrix(float(hue)), out)
        out = np.clip(out, 0.0, 1.0)
    return out


def luminance(image: np.ndarray) -> np.ndarray:
    return LUMA[0] * image[0] + LUMA[1] * image[1] + LUMA[2] * image[2]


def mix_channels(matrix: np.ndarray, image: np.ndarray) -> np.ndarray:
    """[3, 3] @ [3, H, W] over the channel axis, one output channel at a time."""
    red, green, blue = image
    return np.stack([matrix[row, 0] * red + matrix[row, 1] * green + matrix[row, 2] * blue for row in range(3)])


def hue_matrix(turns: float) -> np.ndarray:
    theta = 2.0 * math.pi * turns
    cos, sin = math.cos(theta), math.sin(theta)
    chroma_rotation = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    return (np.linalg.inv(RGB_TO_YIQ) @ chroma_rotation @ RGB_TO_YIQ).astype(np.float32)
