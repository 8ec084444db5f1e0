"""Point and slot matching under the ps2.0 protocol; precision, recall and VOC 11-point AP.

Protocol (DMPR-PS `util/precision_recall.py`, gcn-parking-slot `datasets/parking/utils.py`):

- A predicted marking point matches a true one when their squared distance, in
  normalised image coordinates, is below `SQUARED_DISTANCE_THRESH` = 0.000277778
  (10 px of a 600 px image: (10/600)^2 = 0.00027777..., so exactly 10 px still matches).
- A predicted slot matches a true one when both entrance points match *in order*:
  predicted (x1, y1) ~ true (x1, y1) and predicted (x2, y2) ~ true (x2, y2).
- Matching is one-to-one and greedy, per image: predictions are taken by descending
  score (ties: the earlier one first), each takes the nearest still-unmatched truth it
  matches (for slots, nearest = smallest sum of the two squared endpoint distances) and
  is a true positive, or is a false positive when none is left. The originals instead
  let each truth take its best-scoring matching prediction, so one prediction could
  count for two truths; with 10 px matching and NMS over 1/16 of the image the two
  agree on real data.
- The precision-recall curve sweeps a confidence threshold t over every distinct
  prediction score (a prediction counts when score >= t); recall = TP / #truths,
  precision = TP / #predictions kept. AP is the VOC 11-point mean, over r in
  {0, 0.1, ..., 1}, of the highest precision at recall >= r (0 where recall never
  reaches r). Adding curve points at false-positive scores, which the originals skip,
  does not change this AP: each such point has the recall of a better-precision one.

`evaluate(..., protocol="original")` scores exactly as the originals' evaluation does
(DMPR-PS `util/precision_recall.py`, which gcn-parking-slot calls), see
`original_summary`: each truth takes the best-scoring prediction that matches it, so one
prediction can be the true positive of two truths, and an unmatched truth adds a
(recall 1, precision 0) point to the curve. The default, `one_to_one`, is the correct one.

Edge cases (a 0/0 ratio is 1.0 only when there is nothing to find and nothing was
predicted, otherwise 0.0; the originals raise on a set without truths, both protocols
use these rules):
- no truths, no predictions: precision = recall = AP = 1.0;
- no truths, some predictions: precision = recall = AP = 0.0 (all false positives);
- truths, no predictions (at the operating threshold, or at all for AP): 0.0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

SQUARED_DISTANCE_THRESH = 0.000277778  # 10 px of 600, squared, normalised coordinates
RECALL_LEVELS = np.arange(11) / 10.0  # VOC 11-point: 0.0, 0.1, ..., 1.0


def _rows(values, width: int, name: str) -> np.ndarray:
    if type(values) is np.ndarray and values.dtype == np.float64 and values.ndim == 2 and values.shape[1] == width:
        return values  # the common case, kept cheap: one ImagePrediction per image per batch
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, width)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{name} must have shape [N, {width}], got {array.shape}")
    return array


def _vector(values, length: int, name: str) -> np.ndarray:
    if type(values) is np.ndarray and values.dtype == np.float64 and values.shape == (length,):
        return values
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries (one per row), got {array.shape[0]}")
    return array


@dataclass
class ImagePrediction:
    """What the detector found in one image; float64 numpy arrays, coordinates normalised to [0, 1].

    point_xy [K, 2] and point_scores [K] (point confidence); slot_entrances [S, 4] rows
    `x1, y1, x2, y2` (entrance from point 1 to point 2) and slot_scores [S].
    """

    point_xy: np.ndarray
    point_scores: np.ndarray
    slot_entrances: np.ndarray
    slot_scores: np.ndarray

    def __post_init__(self) -> None:
        self.point_xy = _rows(self.point_xy, 2, "point_xy")
        self.point_scores = _vector(self.point_scores, len(self.point_xy), "point_scores")
        self.slot_entrances = _rows(self.slot_entrances, 4, "slot_entrances")
        self.slot_scores = _vector(self.slot_scores, len(self.slot_entrances), "slot_scores")


@dataclass
class ImageTruth:
    """The labelled marking points [G, 2] and slot entrances [H, 4] (`x1, y1, x2, y2`) of one image."""

    point_xy: np.ndarray
    slot_entrances: np.ndarray

    def __post_init__(self) -> None:
        self.point_xy = _rows(self.point_xy, 2, "point_xy")
        self.slot_entrances = _rows(self.slot_entrances, 4, "slot_entrances")


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def truth_from_batch(batch: Mapping) -> list[ImageTruth]:
    """Ground truth of a collated batch (docs/CONTRACTS.md): marks[:num_marks, :2] and the slot_adjacency pairs.

    Slots come out in row-major (i, j) order of `slot_adjacency[b, i, j]`, the entrance
    running from mark i to mark j.
    """
    marks = _numpy(batch["marks"])
    num_marks = _numpy(batch["num_marks"])
    adjacency = _numpy(batch["slot_adjacency"]).astype(bool)
    truths = []
    for image_marks, count, image_adjacency in zip(marks, num_marks, adjacency):
        count = int(count)
        point_xy = image_marks[:count, :2]
        start, end = np.nonzero(image_adjacency[:count, :count])
        truths.append(ImageTruth(point_xy, np.concatenate([point_xy[start], point_xy[end]], axis=1)))
    return truths


def _squared_distances(pred_xy: np.ndarray, true_xy: np.ndarray) -> np.ndarray:
    """[K, 2] x [G, 2] -> [K, G] squared distances."""
    delta = pred_xy[:, None, :] - true_xy[None, :, :]
    return delta[..., 0] ** 2 + delta[..., 1] ** 2


def greedy_match(scores: np.ndarray, matches: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """One-to-one greedy matching: bool [K], True where prediction k is a true positive.

    `matches [K, G]` says which truths each prediction may take, `cost [K, G]` which of
    them it prefers (lowest). Predictions go by descending score, ties in index order.
    """
    is_true_positive = np.zeros(len(scores), dtype=bool)
    if matches.size == 0:
        return is_true_positive
    taken = np.zeros(matches.shape[1], dtype=bool)
    for k in np.argsort(-scores, kind="stable"):
        free = matches[k] & ~taken
        if free.any():
            taken[np.argmin(np.where(free, cost[k], np.inf))] = True
            is_true_positive[k] = True
    return is_true_positive


def match_points(prediction: ImagePrediction, truth: ImageTruth) -> np.ndarray:
    """bool [K]: which predicted points are true positives in this image."""
    distance = _squared_distances(prediction.point_xy, truth.point_xy)
    return greedy_match(prediction.point_scores, distance < SQUARED_DISTANCE_THRESH, distance)


def match_slots(prediction: ImagePrediction, truth: ImageTruth) -> np.ndarray:
    """bool [S]: which predicted slots are true positives (both entrance points match, in order)."""
    start = _squared_distances(prediction.slot_entrances[:, :2], truth.slot_entrances[:, :2])
    end = _squared_distances(prediction.slot_entrances[:, 2:], truth.slot_entrances[:, 2:])
    matches = (start < SQUARED_DISTANCE_THRESH) & (end < SQUARED_DISTANCE_THRESH)
    return greedy_match(prediction.slot_scores, matches, start + end)


def precision_recall_curve(scores: np.ndarray, is_true_positive: np.ndarray, num_truths: int):
    """(thresholds, precision, recall), one entry per distinct score, thresholds descending.

    At threshold t the predictions with score >= t are kept. With no truths recall is 0.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(is_true_positive[order])
    kept = np.arange(1, len(scores) + 1)
    # The last index of each run of equal scores: a threshold keeps the whole run.
    last_of_run = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], len(scores) > 0))
    true_positives, kept = true_positives[last_of_run], kept[last_of_run]
    precision = true_positives / kept
    recall = true_positives / max(num_truths, 1)
    return sorted_scores[last_of_run], precision, recall


def voc_ap_11point(precision: np.ndarray, recall: np.ndarray) -> float:
    """Mean over recall levels 0, 0.1, ..., 1 of the best precision at recall >= level (0 if unreached)."""
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    reached = recall[None, :] >= RECALL_LEVELS[:, None]  # [11, N]
    best = np.where(reached, precision[None, :], 0.0).max(axis=1, initial=0.0)
    return float(best.mean())


def summarise(scores: np.ndarray, is_true_positive: np.ndarray, num_truths: int, score_thresh: float) -> dict[str, float]:
    """precision and recall at `score_thresh` (score >= thresh counts) and 11-point AP over all thresholds."""
    kept = scores >= score_thresh
    num_kept = int(kept.sum())
    true_positives = int((is_true_positive & kept).sum())
    nothing_at_all = num_truths == 0 and num_kept == 0
    precision = true_positives / num_kept if num_kept else float(nothing_at_all)
    recall = true_positives / num_truths if num_truths else float(nothing_at_all)
    if num_truths == 0:
        ap = float(len(scores) == 0)
    else:
        _, curve_precision, curve_recall = precision_recall_curve(scores, is_true_positive, num_truths)
        ap = voc_ap_11point(curve_precision, curve_recall)
    return {"precision": float(precision), "recall": float(recall), "ap": ap}


PROTOCOLS = ("one_to_one", "original")


def match_truths_originally(scores: np.ndarray, matches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The originals' matching in one image: each truth, independently, takes the
    highest-scoring prediction that matches it (ties: the first; a score of 0 never matches).

    scores [K], matches bool [K, G] -> (truth_scores [G]: the score of each truth's
    prediction, 0.0 for an unmatched truth; matched bool [K]: predictions some truth took).
    """
    num_predictions, num_truths = matches.shape
    matched = np.zeros(num_predictions, dtype=bool)
    if num_truths == 0 or num_predictions == 0:
        return np.zeros(num_truths), matched
    candidate = np.where(matches & (scores[:, None] > 0), scores[:, None], -np.inf)  # [K, G]
    best = np.argmax(candidate, axis=0)  # first maximum: the originals' strict `<` update
    found = np.isfinite(candidate[best, np.arange(num_truths)])
    matched[best[found]] = True
    return np.where(found, scores[best], 0.0), matched


def original_summary(truth_scores: np.ndarray, false_positive_scores: np.ndarray, score_thresh: float) -> dict[str, float]:
    """precision, recall at `score_thresh` and AP, counted as DMPR-PS `calc_precision_recall`
    and `calc_average_precision` count them.

    `truth_scores` [G] holds, per truth, the score of the prediction it took (0.0: none);
    `false_positive_scores` the scores of the predictions no truth took. At threshold t:
    TP = truths whose score >= t, FP = unmatched predictions scoring >= t, recall = TP / G,
    precision = TP / (TP + FP). The curve starts at (recall 0, precision 0), has one point
    per distinct truth score > 0, descending, and ends at (1, 0) when some truth is
    unmatched; AP is the mean over r in {0, 0.1, ..., 1} of the best precision from the
    first point with recall >= r on.
    """
    num_truths = len(truth_scores)
    if num_truths == 0:  # the originals raise here; the module's edge-case rules apply
        nothing = float(len(false_positive_scores) == 0)
        return {"precision": nothing, "recall": nothing, "ap": nothing}
    true_positives = int((truth_scores >= score_thresh).sum())
    false_positives = int((false_positive_scores >= score_thresh).sum())
    kept = true_positives + false_positives
    precision = true_positives / kept if kept else 0.0
    recall = true_positives / num_truths

    thresholds = np.unique(truth_scores)[::-1]  # distinct, descending
    curve_recall, curve_precision = [0.0], [0.0]
    for thresh in thresholds:
        if thresh == 0.0:
            curve_recall.append(1.0)
            curve_precision.append(0.0)
            break
        tp = int((truth_scores >= thresh).sum())
        fp = int((false_positive_scores >= thresh).sum())
        curve_recall.append(tp / num_truths)
        curve_precision.append(tp / (tp + fp))
    curve_recall, curve_precision = np.array(curve_recall), np.array(curve_precision)
    total = 0.0
    for level in RECALL_LEVELS:
        first = int(np.argmax(curve_recall >= level))  # the curve always reaches recall 1
        total += float(curve_precision[first:].max())
    return {"precision": float(precision), "recall": float(recall), "ap": total / len(RECALL_LEVELS)}


def _point_matches(prediction: ImagePrediction, truth: ImageTruth) -> np.ndarray:
    return _squared_distances(prediction.point_xy, truth.point_xy) < SQUARED_DISTANCE_THRESH


def _slot_matches(prediction: ImagePrediction, truth: ImageTruth) -> np.ndarray:
    start = _squared_distances(prediction.slot_entrances[:, :2], truth.slot_entrances[:, :2])
    end = _squared_distances(prediction.slot_entrances[:, 2:], truth.slot_entrances[:, 2:])
    return (start < SQUARED_DISTANCE_THRESH) & (end < SQUARED_DISTANCE_THRESH)


def evaluate_original(predictions: Sequence[ImagePrediction], truths: Sequence[ImageTruth],
                      score_thresh: float = 0.5) -> dict[str, float]:
    """`evaluate` under the originals' protocol (`match_truths_originally`, `original_summary`)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images of truth")
    metrics = {}
    for kind, matcher, score_of in (("point", _point_matches, lambda p: p.point_scores),
                                    ("slot", _slot_matches, lambda p: p.slot_scores)):
        truth_scores, false_positives = [np.zeros(0)], [np.zeros(0)]
        for prediction, truth in zip(predictions, truths):
            scores = score_of(prediction)
            per_truth, matched = match_truths_originally(scores, matcher(prediction, truth))
            truth_scores.append(per_truth)
            false_positives.append(scores[~matched])
        summary = original_summary(np.concatenate(truth_scores), np.concatenate(false_positives), score_thresh)
        metrics.update({f"{kind}_{key}": value for key, value in summary.items()})
    return metrics


def evaluate(predictions: Sequence[ImagePrediction], truths: Sequence[ImageTruth], score_thresh: float = 0.5,
             protocol: str = "one_to_one") -> dict[str, float]:
    """Point and slot precision / recall at `score_thresh`, and AP, over a whole set of images.

    `score_thresh` is the operating point for precision and recall: a point or slot counts
    as predicted when its score >= score_thresh (default 0.5; for the GAT detector every
    slot already has edge probability > 0.5, while points are kept down to 0.008). AP does
    not depend on it. Returns point_precision, point_recall, point_ap, slot_precision,
    slot_recall, slot_ap, each in [0, 1]; see the module docstring for the empty cases.
    `protocol`: `one_to_one` (default) or `original` (`evaluate_original`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "original":
        return evaluate_original(predictions, truths, score_thresh)
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images of truth")
    point_tp = [match_points(p, t) for p, t in zip(predictions, truths)]
    slot_tp = [match_slots(p, t) for p, t in zip(predictions, truths)]
    empty = np.zeros(0)
    point = summarise(
        np.concatenate([p.point_scores for p in predictions] + [empty]),
        np.concatenate(point_tp + [empty.astype(bool)]),
        sum(len(t.point_xy) for t in truths),
        score_thresh,
    )
    slot = summarise(
        np.concatenate([p.slot_scores for p in predictions] + [empty]),
        np.concatenate(slot_tp + [empty.astype(bool)]),
        sum(len(t.slot_entrances) for t in truths),
        score_thresh,
    )
    return {f"point_{key}": value for key, value in point.items()} | {f"slot_{key}": value for key, value in slot.items()}
