"""From collated samples to the model's input: float32 in [0, 1], colour-jittered for training.

A sample holds its image as uint8 and, for training, its colour-jitter parameters
(`transforms.sample_jitter`). `model_input` turns a batch of them into the model's input
and jitters the whole batch at once. Where that runs depends on the device
(`collate_fn`):
- CUDA: on the GPU, after the copy. The workers ship uint8, a quarter of float32's bytes
  through shared memory, pinned memory and the host-to-device copy, and the slowest
  augmentation step leaves the CPU workers.
- CPU: in the DataLoader workers, in the collate function, so the jitter runs in
  parallel with the training step as before instead of inside it.
The same code does it either way; `model_input` passes a batch the workers already made
float32 through unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import default_collate

# ITU-R 601 luma, and RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
# The inverse is taken once, here on the CPU: torch.linalg.inv on a GPU waits for the
# device (it checks for singular input), and this runs in every training step.
LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_TO_RGB = torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)).tolist()
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # the steps, as `params[:, 4:]` orders them


def collate_fn(device: torch.device) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The DataLoader's collate for training on `device`: plain stacking for CUDA (the GPU
    makes the model input), stacking then `model_input` in the workers for the CPU."""
    return default_collate if device.type == "cuda" else collate_model_input


def collate_model_input(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Make each sample's model input (float32, jittered) where the collate runs, then stack.

    One image at a time: on a CPU, jittering a whole batch in one go is slower (each
    step's output is a fresh batch-sized buffer, far larger than the caches), and this
    way each worker handles its own batch while the others handle theirs.
    """
    made = []
    for sample in samples:
        sample = dict(sample)
        jitter = sample.pop("jitter", None)
        sample["image"] = model_input(sample["image"][None], None if jitter is None else jitter[None])[0]
        made.append(sample)
    return default_collate(made)


def model_input(image: torch.Tensor, jitter: torch.Tensor | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 3, S, S] on its device -> float32 in [0, 1], jittered when `jitter` is given.

    A float32 `image` is a batch `collate_model_input` already made; it passes through
    (only the memory format changes).
    """
    if image.dtype == torch.uint8:
        pixels = image.float().div_(255.0)
    elif jitter is None:
        pixels = image
    else:
        raise ValueError("jitter parameters given with a float image that was already made model input")
    if jitter is not None:
        pixels = color_jitter(pixels, jitter.to(pixels.device))
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return pixels


def color_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue of each image, in each image's own order.

    images: float32 [B, 3, H, W] in [0, 1]; params: [B, 8] from `transforms.sample_jitter`
    (three factors, the hue shift in turns, the order of the four steps). Each step is an
    affine map of the three channels, `M @ rgb + c`, clamped to [0, 1] after it, as
    torchvision does: brightness `b I`; contrast `k I` plus `(1 - k)` times the image's mean
    luma; saturation `s I + (1 - s)` times the luma row; hue a rotation in YIQ. Every image
    takes one step per round, so four batched matrix products do the whole batch.
    """
    with torch.autocast(images.device.type, enabled=False):  # float32 whatever the caller's autocast
        return _color_jitter(images.float(), params)


def _color_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    batch = images.shape[0]
    device, dtype = images.device, images.dtype
    brightness, contrast, saturation, hue = params[:, :4].to(dtype).unbind(1)
    order = params[:, 4:].to(torch.int64)
    luma = torch.tensor(LUMA, device=device, dtype=dtype)
    eye = torch.eye(3, device=device, dtype=dtype).expand(batch, 3, 3)
    gray_rows = luma.expand(3, 3)  # gray = gray_rows @ rgb, the luma in all three channels
    matrices = torch.stack([
        brightness[:, None, None] * eye,
        contrast[:, None, None] * eye,
        saturation[:, None, None] * eye + (1.0 - saturation)[:, None, None] * gray_rows,
        _hue_matrices(hue),
    ], dim=1)  # [B, step, 3, 3]
    rows = torch.arange(batch, device=device)
    out = images
    for round_ in range(4):
        step = order[:, round_]
        mean_luma = torch.einsum("c,bchw->b", luma, out) / (out.shape[2] * out.shape[3])
        offset = torch.where(step == CONTRAST, (1.0 - contrast) * mean_luma, torch.zeros_like(mean_luma))
        mixed = torch.bmm(matrices[rows, step], out.flatten(2)).view_as(out)
        out = mixed.add_(offset[:, None, None, None]).clamp_(0.0, 1.0)
    return out


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """[B] hue shifts in turns -> [B, 3, 3] RGB matrices: to YIQ, rotate (I, Q), back to RGB."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=turns.dtype, device=turns.device)
    to_rgb = torch.tensor(_YIQ_TO_RGB, dtype=turns.dtype, device=turns.device)
    theta = 2.0 * math.pi * turns
    rotation = torch.zeros(turns.shape[0], 3, 3, dtype=turns.dtype, device=turns.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = theta.cos(), -theta.sin()
    rotation[:, 2, 1], rotation[:, 2, 2] = theta.sin(), theta.cos()
    return to_rgb @ rotation @ to_yiq
