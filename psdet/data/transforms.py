"""Image decoding and train-time augmentation: mark-preserving rotation, colour-jitter parameters.

Coordinates are continuous image coordinates normalised to [0, 1]: the image spans
[0, 1] x [0, 1], pixel i covers [i / S, (i + 1) / S], y points down. Angles of rotation
are in degrees, positive = counter-clockwise as seen on screen. Every random choice is
drawn from the `numpy.random.Generator` passed in, never from global state.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

ROTATION_MARGIN = 0.05  # rotated marks must stay this far (normalised) inside the border
ROTATION_TRIES = 10  # angles tried before falling back to no rotation


# ----------------------------------------------------------------------------- decoding


def decode_image(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a JPEG to uint8 [size, size, 3] RGB; also return the file's (width, height).

    Below the file's size, the JPEG decoder is asked for a DCT-downscaled image first
    (`Image.draft`), which is several times faster than decoding at full size.
    """
    with Image.open(path) as image:
        original_size = image.size
        if size < min(original_size):
            image.draft("RGB", (size, size))
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8), original_size


# ----------------------------------------------------------------------------- rotation


def rotation_matrix(angle_deg: float) -> np.ndarray:
    """[2, 2] matrix rotating image-coordinate vectors (y down) counter-clockwise on screen."""
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    return np.array([[cos, sin], [-sin, cos]])


def rotate_marks(marks: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate marks [N, 4] (x, y normalised, direction rad, shape) about the image centre.

    A direction `a` becomes `a - angle` (wrapped to [-pi, pi)): y points down, so a
    counter-clockwise turn on screen lowers atan2(dy, dx).
    """
    rotated = np.array(marks, dtype=np.float64, copy=True)
    rotated[:, :2] = (rotated[:, :2] - 0.5) @ rotation_matrix(angle_deg).T + 0.5
    rotated[:, 2] = (rotated[:, 2] - math.radians(angle_deg) + math.pi) % (2 * math.pi) - math.pi
    return rotated


def rotate_image(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate uint8 [H, W, 3] about its centre, bilinear, corners filled with black."""
    height, width = image.shape[:2]
    # PIL's affine maps each output pixel centre to the input point it samples; that is
    # the inverse rotation about the centre, written in pixels.
    inverse = rotation_matrix(angle_deg).T
    centre = np.array([width / 2.0, height / 2.0])
    offset = centre - inverse @ centre
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    rotated = Image.fromarray(image).transform(
        (width, height), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.asarray(rotated)


def sample_rotation(
    marks_xy: np.ndarray,
    rng: np.random.Generator,
    max_deg: float,
    grid: int,
    margin: float = ROTATION_MARGIN,
    tries: int = ROTATION_TRIES,
) -> float:
    """A random angle in [-max_deg, max_deg] that keeps every mark inside the image.

    marks_xy: [N, 2] normalised. An angle is rejected when a rotated mark comes within
    `margin` of the border, or when it puts two marks into one cell of the `grid` x `grid`
    target map that were in different cells before. After `tries` rejections: 0.
    Always draws exactly `tries` angles, so the generator's state afterwards does not
    depend on the marks.
    """
    angles = rng.uniform(-max_deg, max_deg, size=tries)
    if marks_xy.shape[0] == 0:
        return float(angles[0])
    cells_before = _distinct_cells(marks_xy, grid)
    for angle in angles:
        rotated = (marks_xy - 0.5) @ rotation_matrix(angle).T + 0.5
        inside = np.all((rotated >= margin) & (rotated <= 1.0 - margin))
        if inside and _distinct_cells(rotated, grid) >= cells_before:
            return float(angle)
    return 0.0


def _distinct_cells(marks_xy: np.ndarray, grid: int) -> int:
    cells = np.clip(np.floor(marks_xy * grid), 0, grid - 1).astype(np.int64)
    return len(np.unique(cells[:, 0] * grid + cells[:, 1]))


# ----------------------------------------------------------------------------- colour


def sample_jitter(rng: np.random.Generator, strength: float) -> np.ndarray:
    """One sample's colour-jitter parameters, float32 [8]; `psdet.data.batch.color_jitter` applies them.

    Brightness, contrast and saturation factors are uniform in [1 - strength, 1 + strength],
    the hue shift uniform in [-strength, strength] turns (capped at half a turn), and the
    four steps come in a random order (like torchvision). Always draws the same number of
    values from `rng`.
    """
    brightness, contrast, saturation = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
    hue = rng.uniform(-min(strength, 0.5), min(strength, 0.5))
    order = rng.permutation(4)
    return np.array([brightness, contrast, saturation, hue, *order], dtype=np.float32)
