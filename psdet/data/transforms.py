"""Image decoding and train-time augmentation: colour jitter and mark-preserving rotation.

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
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


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


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, in random order (like torchvision).

    image: float32 [3, H, W] RGB in [0, 1]; returns a new array, clamped to [0, 1] after
    each step. Factors are uniform in [1 - strength, 1 + strength]; the hue shift is
    uniform in [-strength, strength] turns (capped at half a turn), applied as a rotation
    of the YIQ chroma plane. Always draws the same number of values from `rng`.
    """
    brightness, contrast, saturation = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
    hue = rng.uniform(-min(strength, 0.5), min(strength, 0.5))
    order = rng.permutation(4)
    out = image.astype(np.float32, copy=True)
    for step in order:
        if step == 0:
            out *= np.float32(brightness)
        elif step == 1:
            mean = np.float32(_luminance(out).mean())
            out = (out - mean) * np.float32(contrast) + mean
        elif step == 2:
            gray = _luminance(out)[None]
            out = gray + (out - gray) * np.float32(saturation)
        else:
            out = _mix_channels(_hue_matrix(hue), out)
        np.clip(out, 0.0, 1.0, out=out)
    return out


# Channel mixes are written as sums of scaled planes: np.tensordot would go through a
# multi-threaded BLAS call that is many times slower on a busy machine.
def _luminance(image: np.ndarray) -> np.ndarray:
    return _LUMA[0] * image[0] + _LUMA[1] * image[1] + _LUMA[2] * image[2]


def _mix_channels(matrix: np.ndarray, image: np.ndarray) -> np.ndarray:
    """[3, 3] @ [3, H, W] over the channel axis."""
    red, green, blue = image
    return np.stack([matrix[row, 0] * red + matrix[row, 1] * green + matrix[row, 2] * blue for row in range(3)])


def _hue_matrix(turns: float) -> np.ndarray:
    theta = 2.0 * math.pi * turns
    cos, sin = math.cos(theta), math.sin(theta)
    chroma_rotation = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    return (_YIQ_TO_RGB @ chroma_rotation @ _RGB_TO_YIQ).astype(np.float32)
