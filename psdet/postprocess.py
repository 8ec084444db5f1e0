"""Predicted point map -> marking points (threshold, border, top-k, NMS) -> parking slots, vectorised.

Follows the inference of gcn-parking-slot (`models/point_detector/post_process.py`,
`directional.py`) and DMPR-PS (`data/process.py`, `inference.py`, `ps_evaluate.py`),
without Python loops over batch, cells, candidates or pairs, on any device. Where this
differs from the originals it says so; `psdet/testing/reference_postprocess.py` holds the
original algorithm as plain loops and the tests check the two agree exactly.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from psdet.config import DmprConfig, ModelConfig
from psdet.metrics import ImagePrediction


class DecodedPoints(NamedTuple):
    """Marking points of a batch, padded to P = max_points and sorted by descending score.

    xy [B, P, 2] normalised to [0, 1] (zeros at pads); scores [B, P] confidences (0 at
    pads); valid bool [B, P] (the valid points come first); attributes [B, P, A] or None,
    the extra map channels sampled at each point (DMPR: shape, cos, sin; zeros at pads).
    """

    xy: Tensor
    scores: Tensor
    valid: Tensor
    attributes: Tensor | None


@functools.lru_cache(maxsize=16)
def _cell_grid(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(col, row) of every cell in row-major order [2, H*W] and the divisor (W, H) [2, 1], float32.

    Dividing by a tensor, not a Python number, keeps CUDA from multiplying by a rounded
    reciprocal instead, so x = (col + dx) / W is the same on every device. Cached: the
    tensors are constants, never written to.
    """
    cols = torch.arange(width, device=device, dtype=torch.float32).expand(height, width)
    rows = torch.arange(height, device=device, dtype=torch.float32).unsqueeze(1).expand(height, width)
    origin = torch.stack([cols, rows]).reshape(2, height * width)
    return origin, torch.tensor([[width], [height]], device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def _rank_constants(num: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """[k, m] bool "m is not ranked before k" (m >= k), and the positions num, num-1, ..., 1."""
    return torch.ones(num, num, dtype=torch.bool, device=device).triu(), torch.arange(num, 0, -1, device=device)


def _suppressed(xy: Tensor, nms_radius: float) -> Tensor:
    """bool [B, K]: candidate k of xy [B, 2, K] (ranked by descending confidence, ties in
    row-major order) lies within nms_radius in both x and y of a candidate ranked before it.

    In that order "m is ranked before k" is exactly the originals' rule for "m suppresses
    k" (higher confidence, or equal confidence and earlier in row-major order), and m
    counts whether or not it was itself suppressed, as there.
    """
    not_before, _ = _rank_constants(xy.shape[2], xy.device)
    box_distance = (xy.unsqueeze(3) - xy.unsqueeze(2)).abs_().amax(dim=1)  # [B, k, m]: max(|dx|, |dy|)
    return box_distance.masked_fill_(not_before, float("inf")).amin(dim=2) < nms_radius


@torch.no_grad()
def decode_points(
    confidence: Tensor,
    offsets: Tensor,
    attributes: Tensor | None = None,
    *,
    point_thresh: float,
    boundary_thresh: float,
    nms_radius: float,
    max_candidates: int,
    max_points: int,
    keep_all: bool = False,
) -> DecodedPoints:
    """Marking points from a predicted map: confidence [B, H, W], offsets [B, 2, H, W] (dx, dy in cells), attributes [B, A, H, W].

    1. A cell is a candidate when confidence >= point_thresh and its point
       x = (col + dx) / W, y = (row + dy) / H lies in [boundary_thresh, 1 - boundary_thresh].
    2. Only the `max_candidates` most confident candidates are kept (ties: row-major
       order); `max_candidates` 0 keeps them all, as the originals did. Without a cap an
       untrained model makes every cell a candidate and the quadratic NMS then
       dominates evaluation.
    3. NMS as the originals: for every pair closer than `nms_radius` in both x and y, the
       less confident one is suppressed (equal confidence: the later one in row-major
       order), whether or not the other one was itself suppressed.
    4. The `max_points` most confident survivors are kept, sorted by descending
       confidence (ties: row-major order), padded with zeros. With `keep_all` (the
       originals) every survivor is kept, still sorted, and P is the larger of
       `max_points` and the most survivors any image of the batch has.

    Computed in float32 (the maps are cast), so x and y equal the originals' numpy float32
    values. On CUDA one host sync decides whether NMS needs its second stage.
    """
    if boundary_thresh > 0.5:
        raise ValueError(f"boundary_thresh must be at most 0.5, got {boundary_thresh}")
    batch, height, width = confidence.shape
    num_cells = height * width
    device = confidence.device
    cell_origin, grid_size = _cell_grid(height, width, device)
    xy = (offsets.float().reshape(batch, 2, num_cells) + cell_origin) / grid_size  # [B, 2, H*W]
    conf = confidence.float().reshape(batch, num_cells)
    inside = xy.clamp(boundary_thresh, 1 - boundary_thresh) == xy  # boundary <= x, y <= 1 - boundary
    is_candidate = (conf >= point_thresh) & inside[:, 0] & inside[:, 1]

    # Candidates first, by descending confidence, ties in row-major (cell index) order;
    # keep max_candidates. fields [B, 3, K]: confidence, x, y.
    num_kept = num_cells if max_candidates == 0 else min(max_candidates, num_cells)
    ranked = torch.sort(torch.where(is_candidate, conf, float("-inf")), dim=1, descending=True, stable=True)
    cells = ranked.indices[:, :num_kept]
    cand_valid = ranked.values[:, :num_kept] > float("-inf")
    fields = torch.cat([conf.unsqueeze(1), xy], dim=1).gather(2, cells.unsqueeze(1).expand(-1, 3, -1))

    # NMS, exactly the originals' rule (see _suppressed). A candidate's fate depends only
    # on those ranked before it, so when every image has max_points survivors among its
    # first 2 * max_points candidates (or no candidates beyond them) the rest cannot
    # change the output: the full K x K comparison runs only when that fails.
    first_stage = num_kept if keep_all else min(num_kept, 2 * max_points)
    survivor = cand_valid[:, :first_stage] & ~_suppressed(fields[:, 1:, :first_stage], nms_radius)
    if first_stage < num_kept and ((survivor.sum(dim=1) < max_points) & cand_valid[:, first_stage]).any():
        survivor = cand_valid & ~_suppressed(fields[:, 1:], nms_radius)

    # The first max_points survivors (keep_all: every survivor), still by descending confidence.
    num_ranked = survivor.shape[1]
    most = max(max_points, int(survivor.sum(dim=1).max())) if keep_all and batch else max_points
    num_out = min(num_ranked, most)
    position_key = torch.where(survivor, _rank_constants(num_ranked, device)[1], 0)
    first = torch.topk(position_key, num_out, dim=1)
    valid = first.values > 0
    picked = fields.gather(2, first.indices.unsqueeze(1).expand(-1, 3, -1)).transpose(1, 2)  # [B, P', 3]
    picked = torch.where(valid.unsqueeze(-1), picked, 0.0)
    point_attributes = None
    if attributes is not None:
        num_attributes = attributes.shape[1]
        picked_cells = cells.gather(1, first.indices)
        point_attributes = attributes.float().reshape(batch, num_attributes, num_cells).gather(
            2, picked_cells.unsqueeze(1).expand(-1, num_attributes, -1)
        ).transpose(1, 2)
        point_attributes = torch.where(valid.unsqueeze(-1), point_attributes, 0.0)

    pad = max(max_points - num_out, 0)
    if pad:  # a grid with fewer cells than max_points
        picked = torch.nn.functional.pad(picked, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
        if point_attributes is not None:
            point_attributes = torch.nn.functional.pad(point_attributes, (0, 0, 0, pad))
    return DecodedPoints(picked[..., 1:], picked[..., 0], valid, point_attributes)


def decode_point_map(point_map: Tensor, model_cfg: ModelConfig, max_points: int) -> DecodedPoints:
    """`decode_points` on a detector's `point_map [B, C, H, W]` (after sigmoid/tanh), with the config's thresholds.

    C = 3: (confidence, dx, dy), no attributes. C = 6 (DMPR): (confidence, shape, dx, dy,
    cos, sin); attributes = (shape, cos, sin).
    """
    channels = point_map.shape[1]
    if channels == 3:
        confidence, offsets, attributes = point_map[:, 0], point_map[:, 1:3], None
    elif channels == 6:
        confidence, offsets, attributes = point_map[:, 0], point_map[:, 2:4], point_map[:, [1, 4, 5]]
    else:
        raise ValueError(f"point_map must have 3 or 6 channels, got {channels}")
    return decode_points(
        confidence,
        offsets,
        attributes,
        point_thresh=model_cfg.point_thresh,
        boundary_thresh=model_cfg.boundary_thresh,
        nms_radius=model_cfg.nms_radius,
        max_candidates=model_cfg.max_candidates,
        max_points=max_points,
        keep_all=model_cfg.nms_keep == "all",
    )


def _image_predictions(points: DecodedPoints, is_slot: np.ndarray, start: np.ndarray, end: np.ndarray, slot_scores: np.ndarray) -> list[ImagePrediction]:
    """One ImagePrediction per image. Pair (i, j) of image b is a slot when is_slot[b, i, j]
    (numpy [B, P, P]); its entrance runs from point start[b, i, j] to point end[b, i, j].

    The inputs are a few hundred values that must end on the host anyway: selecting them
    there with numpy beats a dozen tiny device kernels and boolean indexing.
    """
    xy = points.xy.detach().cpu().numpy().astype(np.float64)
    scores = points.scores.detach().float().cpu().numpy().astype(np.float64)
    valid = points.valid.cpu().numpy()
    point_image, point_index = np.nonzero(valid)  # row-major (b, i)
    slot_image, first, second = np.nonzero(is_slot)  # row-major (b, i, j)
    slot_start, slot_end = start[slot_image, first, second], end[slot_image, first, second]
    point_xy, point_scores = xy[point_image, point_index], scores[point_image, point_index]
    entrances = np.concatenate([xy[slot_image, slot_start], xy[slot_image, slot_end]], axis=1)
    slot_scores = slot_scores[slot_image, first, second].astype(np.float64)
    point_bounds = np.searchsorted(point_image, np.arange(len(valid) + 1)).tolist()
    slot_bounds = np.searchsorted(slot_image, np.arange(len(valid) + 1)).tolist()
    return [
        ImagePrediction(
            point_xy[point_bounds[b] : point_bounds[b + 1]],
            point_scores[point_bounds[b] : point_bounds[b + 1]],
            entrances[slot_bounds[b] : slot_bounds[b + 1]],
            slot_scores[slot_bounds[b] : slot_bounds[b + 1]],
        )
        for b in range(len(valid))
    ]


@torch.no_grad()
def slots_from_edges(edge_scores: Tensor, points: DecodedPoints, edge_thresh: float,
                     slot_score: str = "edge_x_min_point") -> list[ImagePrediction]:
    """GAT slots: i -> j is a slot entrance when both points are valid, i != j and edge_scores[b, i, j] > edge_thresh.

    edge_scores [B, P, P] are probabilities (sigmoid of the edge logits). A slot's score
    (`model.slot_score`) is, with `edge_x_min_point`, its edge probability times the lower
    confidence of its two points; with `edge` (the original) the edge probability alone,
    which ranks a confident edge between two doubtful points, e.g. a stray low-confidence
    candidate, above a real slot. Slots come in row-major (i, j) order. The original also
    accepted i == j; a point paired with itself is no entrance, so it is skipped here.
    """
    if slot_score not in ("edge_x_min_point", "edge"):
        raise ValueError(f"slot_score must be edge_x_min_point or edge, got {slot_score!r}")
    edge_scores = edge_scores.detach().float().cpu().numpy()
    confidence = points.scores.detach().float().cpu().numpy()
    valid = points.valid.cpu().numpy()
    num_points = valid.shape[1]
    is_slot = (edge_scores > edge_thresh) & valid[:, :, None] & valid[:, None, :] & ~np.eye(num_points, dtype=bool)
    start = np.broadcast_to(np.arange(num_points)[:, None], is_slot.shape)
    slot_scores = edge_scores
    if slot_score == "edge_x_min_point":
        slot_scores = edge_scores * np.minimum(confidence[:, :, None], confidence[:, None, :])
    return _image_predictions(points, is_slot, start, start.swapaxes(1, 2), slot_scores)


def _angle_between(direction_a: Tensor, direction_b: Tensor) -> Tensor:
    """Unsigned angle between two directions in radians, in [0, pi] (DMPR-PS `direction_diff`)."""
    diff = (direction_a - direction_b).abs()
    return torch.where(diff < torch.pi, diff, 2 * torch.pi - diff)


def _point_shape(direction: Tensor, is_l_shape: Tensor, to_x: Tensor, to_y: Tensor, dmpr_cfg: DmprConfig) -> Tensor:
    """DMPR-PS point shape seen along the unit vector (to_x, to_y) towards the other point.

    0 none, 1 l_down, 2 t_down, 3 t_middle, 4 t_up, 5 l_up: whether the mark's direction
    is along the entrance (bridge) or along the separator line pointing up or down.
    """
    along = _angle_between(torch.atan2(to_y, to_x), direction) < dmpr_cfg.bridge_angle_diff
    up = _angle_between(torch.atan2(-to_x, to_y), direction) < dmpr_cfg.separator_angle_diff
    down = _angle_between(torch.atan2(to_x, -to_y), direction) < dmpr_cfg.separator_angle_diff
    t_shape = torch.where(along, 3, torch.where(up, 4, torch.where(down, 2, 0)))
    l_shape = torch.where(along, 1, torch.where(up, 5, 0))
    return torch.where(is_l_shape, l_shape, t_shape)


@torch.no_grad()
def pair_directional_points(points: DecodedPoints, dmpr_cfg: DmprConfig) -> list[ImagePrediction]:
    """DMPR-PS slot inference: pair directional marking points by rule, for every image at once.

    `points.attributes` must be (shape, cos, sin): shape >= 0.5 is an L mark, direction =
    atan2(sin, cos). For each pair i < j of valid points (computed in float64):
    1. the squared distance must lie in [vslot_min_dist, vslot_max_dist] or
       [hslot_min_dist, hslot_max_dist] (the originals compare *squared* normalised
       distances with these constants);
    2. no third valid point may lie on the way: for every other point k, the unit
       vectors i -> k and k -> j must have dot product <= slot_suppression_dot_product_thresh;
    3. each end's shape (see `_point_shape`) must pair: not none, not both t_middle,
       not both "up" (> 3), not both "down" (< 3). The entrance runs i -> j when i is up
       (or i is t_middle and j is down), else j -> i.
    Slot score = the lower of its two points' confidences (DMPR-PS `ps_evaluate.py`).
    Slots come in the originals' loop order over (i, j). Every decoded point takes part:
    the `max_points` most confident NMS survivors, or all of them with `model.nms_keep:
    all`, as the originals paired them.
    """
    if points.attributes is None or points.attributes.shape[-1] != 3:
        raise ValueError("pair_directional_points needs attributes (shape, cos, sin) per point")
    xy = points.xy.double()
    valid = points.valid
    num_points = valid.shape[1]
    is_l_shape = points.attributes[..., 0].double() >= 0.5
    direction = torch.atan2(points.attributes[..., 2].double(), points.attributes[..., 1].double())

    to_other = xy[:, None, :, :] - xy[:, :, None, :]  # [B, i, j, 2] = p_j - p_i
    squared_distance = to_other[..., 0] ** 2 + to_other[..., 1] ** 2
    in_band = ((squared_distance >= dmpr_cfg.vslot_min_dist) & (squared_distance <= dmpr_cfg.vslot_max_dist)) | (
        (squared_distance >= dmpr_cfg.hslot_min_dist) & (squared_distance <= dmpr_cfg.hslot_max_dist)
    )
    index = torch.arange(num_points, device=valid.device)
    upper = index[:, None] < index[None, :]
    candidate_pair = upper & valid[:, :, None] & valid[:, None, :] & in_band

    # Third point k between i and j: unit(p_k - p_i) . unit(p_j - p_k) > thresh. A k on
    # top of i or j gives 0/0 = nan, which never passes the test, as in the originals.
    unit = to_other / squared_distance.sqrt().unsqueeze(-1)
    first_leg = unit[:, :, None, :, :]  # [B, i, 1, k, 2]: p_k - p_i
    second_leg = unit.transpose(1, 2)[:, None, :, :, :]  # [B, 1, j, k, 2]: p_j - p_k
    alignment = first_leg[..., 0] * second_leg[..., 0] + first_leg[..., 1] * second_leg[..., 1]  # [B, i, j, k]
    is_third = valid[:, None, None, :] & (index[:, None, None] != index) & (index[None, :, None] != index)
    blocked = ((alignment > dmpr_cfg.slot_suppression_dot_product_thresh) & is_third).any(dim=-1)

    shape_i = _point_shape(direction[:, :, None], is_l_shape[:, :, None], unit[..., 0], unit[..., 1], dmpr_cfg)
    shape_j = _point_shape(direction[:, None, :], is_l_shape[:, None, :], -unit[..., 0], -unit[..., 1], dmpr_cfg)
    pairs = (
        (shape_i != 0) & (shape_j != 0)
        & ~((shape_i == 3) & (shape_j == 3))
        & ~((shape_i > 3) & (shape_j > 3))
        & ~((shape_i < 3) & (shape_j < 3))
    )
    i_to_j = (shape_i > 3) | ((shape_i == 3) & (shape_j < 3))

    is_slot = (candidate_pair & ~blocked & pairs).cpu().numpy()
    i_to_j = i_to_j.cpu().numpy()
    index = np.arange(num_points)
    start = np.where(i_to_j, index[:, None], index[None, :])
    end = np.where(i_to_j, index[None, :], index[:, None])
    slot_scores = points.scores.detach().float().cpu().numpy()
    return _image_predictions(points, is_slot, start, end, np.minimum(slot_scores[:, :, None], slot_scores[:, None, :]))
