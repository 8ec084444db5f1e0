"""Slow reference post-processing: the originals' algorithm, step by step, as plain loops.

Written after gcn-parking-slot `models/point_detector/post_process.py` and
`directional.py` (`post_processing`, `inference_slots`) and DMPR-PS `data/process.py` /
`ps_evaluate.py`, one image at a time. Two steps the originals lacked are added so the
results can be compared with psdet.postprocess: the top-k cap on candidates before NMS
and the cap of max_points on NMS survivors. Here a point is `(score, cell, values)`,
values = np.array([x, y, *attributes]) in float32 as the originals' numpy maps gave.
"""
from __future__ import annotations

import math

import numpy as np


def decode_image(prediction: np.ndarray, point_thresh, boundary_thresh, nms_radius, max_candidates, max_points):
    """prediction [C, H, W] = (confidence, dx, dy, *attributes) float32 -> list of (score, cell, values)."""
    predicted_points = []
    height, width = prediction.shape[1], prediction.shape[2]
    for i in range(height):
        for j in range(width):
            if prediction[0, i, j] >= point_thresh:
                xval = (np.float32(j) + prediction[1, i, j]) / np.float32(width)
                yval = (np.float32(i) + prediction[2, i, j]) / np.float32(height)
                if not (boundary_thresh <= xval <= 1 - boundary_thresh and boundary_thresh <= yval <= 1 - boundary_thresh):
                    continue
                values = np.array([xval, yval, *prediction[3:, i, j]], dtype=np.float32)
                predicted_points.append((prediction[0, i, j], i * width + j, values))
    # Added: keep the max_candidates most confident (sorted() is stable: ties stay in
    # row-major order), then restore row-major order for the original NMS loop.
    capped = sorted(predicted_points, key=lambda point: -point[0])[:max_candidates]
    capped = sorted(capped, key=lambda point: point[1])
    survivors = non_maximum_suppression(capped, nms_radius)
    # Added: the max_points most confident survivors, ties in row-major order.
    return sorted(survivors, key=lambda point: -point[0])[:max_points]


def non_maximum_suppression(pred_points, nms_radius):
    """The original NMS: a suppressed point still suppresses others."""
    suppressed = [False] * len(pred_points)
    for i in range(len(pred_points) - 1):
        for j in range(i + 1, len(pred_points)):
            i_x = pred_points[i][2][0]
            i_y = pred_points[i][2][1]
            j_x = pred_points[j][2][0]
            j_y = pred_points[j][2][1]
            if abs(j_x - i_x) < nms_radius and abs(j_y - i_y) < nms_radius:
                idx = i if pred_points[i][0] < pred_points[j][0] else j
                suppressed[idx] = True
    if any(suppressed):
        return [point for point, supres in zip(pred_points, suppressed) if not supres]
    return pred_points


def slots_from_edges_image(points, edges, edge_thresh):
    """Original GAT pairing: every ordered pair of the n points, score > thresh; self-pairs skipped and
    the slot scored edge * min(point confidences) (see psdet.postprocess.slots_from_edges).

    edges [P, P]: a numpy array, or the edge predictor's tensor as the original read it.
    """
    slots = []
    n = len(points)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            score = edges[i, j]
            if score > edge_thresh:
                x1, y1 = points[i][2][:2]
                x2, y2 = points[j][2][:2]
                slots.append((score * min(points[i][0], points[j][0]), np.array([x1, y1, x2, y2])))
    return slots


# ----------------------------------------------------------------------------- DMPR-PS


def directional_points(points):
    """(score, cell, [x, y, shape, cos, sin]) -> (score, np.array([x, y, direction, shape])) in float64."""
    result = []
    for score, _, values in points:
        x, y, shape, cos_value, sin_value = (float(v) for v in values)
        result.append((float(score), np.array([x, y, math.atan2(sin_value, cos_value), shape])))
    return result


def direction_diff(direction_a, direction_b):
    diff = abs(direction_a - direction_b)
    return diff if diff < math.pi else 2 * math.pi - diff


def determine_point_shape(point, vector, cfg):
    """0 none, 1 l_down, 2 t_down, 3 t_middle, 4 t_up, 5 l_up."""
    vec_direct = math.atan2(vector[1], vector[0])
    vec_direct_up = math.atan2(-vector[0], vector[1])
    vec_direct_down = math.atan2(vector[0], -vector[1])
    if point[1][3] < 0.5:
        if direction_diff(vec_direct, point[1][2]) < cfg.bridge_angle_diff:
            return 3
        if direction_diff(vec_direct_up, point[1][2]) < cfg.separator_angle_diff:
            return 4
        if direction_diff(vec_direct_down, point[1][2]) < cfg.separator_angle_diff:
            return 2
    else:
        if direction_diff(vec_direct, point[1][2]) < cfg.bridge_angle_diff:
            return 1
        if direction_diff(vec_direct_up, point[1][2]) < cfg.separator_angle_diff:
            return 5
    return 0


def pass_through_third_point(marking_points, i, j, thresh):
    x_1, y_1 = marking_points[i][1][0], marking_points[i][1][1]
    x_2, y_2 = marking_points[j][1][0], marking_points[j][1][1]
    for point_idx, point in enumerate(marking_points):
        if point_idx == i or point_idx == j:
            continue
        x_0, y_0 = point[1][0], point[1][1]
        vec1 = np.array([x_0 - x_1, y_0 - y_1])
        vec2 = np.array([x_2 - x_0, y_2 - y_0])
        with np.errstate(invalid="ignore"):  # a point on top of i or j: 0/0, never "between"
            vec1 = vec1 / np.linalg.norm(vec1)
            vec2 = vec2 / np.linalg.norm(vec2)
        if np.dot(vec1, vec2) > thresh:
            return True
    return False


def pair_marking_points(point_a, point_b, cfg):
    vector_ab = np.array([point_b[1][0] - point_a[1][0], point_b[1][1] - point_a[1][1]])
    vector_ab = vector_ab / np.linalg.norm(vector_ab)
    shape_a = determine_point_shape(point_a, vector_ab, cfg)
    shape_b = determine_point_shape(point_b, -vector_ab, cfg)
    if shape_a == 0 or shape_b == 0:
        return 0
    if shape_a == 3 and shape_b == 3:
        return 0
    if shape_a > 3 and shape_b > 3:
        return 0
    if shape_a < 3 and shape_b < 3:
        return 0
    if shape_a != 3:
        return 1 if shape_a > 3 else -1
    return 1 if shape_b < 3 else -1


def inference_slots(marking_points, cfg):
    """DMPR-PS slots as (score, [x1, y1, x2, y2]), score = min of the two point confidences."""
    slots = []
    for i in range(len(marking_points) - 1):
        for j in range(i + 1, len(marking_points)):
            point_i, point_j = marking_points[i], marking_points[j]
            distance = (point_i[1][0] - point_j[1][0]) ** 2 + (point_i[1][1] - point_j[1][1]) ** 2
            if not (cfg.vslot_min_dist <= distance <= cfg.vslot_max_dist or cfg.hslot_min_dist <= distance <= cfg.hslot_max_dist):
                continue
            if pass_through_third_point(marking_points, i, j, cfg.slot_suppression_dot_product_thresh):
                continue
            result = pair_marking_points(point_i, point_j, cfg)
            if result == 0:
                continue
            a, b = (i, j) if result == 1 else (j, i)
            score = min(marking_points[a][0], marking_points[b][0])
            x1, y1 = marking_points[a][1][:2]
            x2, y2 = marking_points[b][1][:2]
            slots.append((score, np.array([x1, y1, x2, y2])))
    return slots
