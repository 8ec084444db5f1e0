"""psdet.metrics on hand-made cases whose answers are worked out in the comments."""
from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch

from psdet.metrics import (
    ImagePrediction,
    ImageTruth,
    evaluate,
    precision_recall_curve,
    truth_from_batch,
    voc_ap_11point,
)

PX = 1 / 600  # one pixel of the 600x600 ps2.0 image, normalised
A, B, C = [0.2, 0.3], [0.6, 0.3], [0.2, 0.7]


def predict(points=(), point_scores=(), slots=(), slot_scores=()) -> ImagePrediction:
    return ImagePrediction(np.array(points), np.array(point_scores), np.array(slots), np.array(slot_scores))


def truth(points=(), slots=()) -> ImageTruth:
    return ImageTruth(np.array(points), np.array(slots))


def test_perfect_prediction():
    metrics = evaluate([predict([A, B], [0.9, 0.8], [A + B], [0.7])], [truth([A, B], [A + B])])
    assert metrics == {key: 1.0 for key in metrics}
    assert list(metrics) == ["point_precision", "point_recall", "point_ap", "slot_precision", "slot_recall", "slot_ap"]


def test_one_missed_point():
    # 1 of 2 truths found at score 0.9: precision 1/1, recall 1/2. The curve has one point
    # (R 0.5, P 1): levels 0, 0.1, ..., 0.5 get precision 1 and 0.6 ... 1.0 get 0: AP = 6/11.
    metrics = evaluate([predict([A], [0.9])], [truth([A, B])])
    assert metrics["point_precision"] == 1.0
    assert metrics["point_recall"] == 0.5
    assert metrics["point_ap"] == pytest.approx(6 / 11)


def test_one_false_positive():
    # Below the true positive (0.9 TP, 0.8 FP): precision 1/2 at 0.5, recall 1. The curve
    # is (R 1, P 1), (R 1, P 0.5): every level's best precision is 1, AP = 1.
    metrics = evaluate([predict([A, C], [0.9, 0.8])], [truth([A])])
    assert (metrics["point_precision"], metrics["point_recall"], metrics["point_ap"]) == (0.5, 1.0, 1.0)
    # Above it (0.95 FP, 0.9 TP): curve (R 0, P 0), (R 1, P 0.5): every level gets 0.5.
    metrics = evaluate([predict([A, C], [0.9, 0.95])], [truth([A])])
    assert (metrics["point_precision"], metrics["point_recall"], metrics["point_ap"]) == (0.5, 1.0, 0.5)


def test_slot_in_the_wrong_order_does_not_match():
    # Both points match, but B -> A is not the entrance A -> B: the slot is a false
    # positive and the true slot is missed.
    metrics = evaluate([predict([A, B], [0.9, 0.9], [B + A], [0.9])], [truth([A, B], [A + B])])
    assert metrics["point_precision"] == metrics["point_recall"] == 1.0
    assert metrics["slot_precision"] == metrics["slot_recall"] == metrics["slot_ap"] == 0.0


def test_ten_pixel_boundary():
    # Exactly 10 px: squared (1/60)^2 = 0.000277777... < 0.000277778, so it matches;
    # 10.01 px: (10.01/600)^2 = 0.00027833... > 0.000277778, so it does not.
    at_10px = [A[0] + 10 * PX, A[1]]
    beyond = [A[0], A[1] + 10.01 * PX]
    assert evaluate([predict([at_10px], [0.9])], [truth([A])])["point_recall"] == 1.0
    assert evaluate([predict([beyond], [0.9])], [truth([A])])["point_recall"] == 0.0
    # A slot needs both ends within the threshold.
    slot_ok = evaluate([predict(slots=[at_10px + B], slot_scores=[0.9])], [truth(slots=[A + B])])
    slot_off = evaluate([predict(slots=[at_10px + [B[0], B[1] + 10.01 * PX]], slot_scores=[0.9])], [truth(slots=[A + B])])
    assert slot_ok["slot_recall"] == 1.0 and slot_off["slot_recall"] == 0.0


def test_eleven_point_ap_of_a_known_curve():
    # (R, P) = (0.2, 1.0), (0.4, 0.5), (0.8, 0.6). Best precision at recall >= r:
    # r = 0, 0.1, 0.2 -> 1.0 (3 levels); r = 0.3 ... 0.8 -> 0.6 (6 levels); r = 0.9, 1.0 -> 0.
    # AP = (3 * 1.0 + 6 * 0.6) / 11 = 6.6 / 11 = 0.6.
    assert voc_ap_11point([1.0, 0.5, 0.6], [0.2, 0.4, 0.8]) == pytest.approx(0.6)
    assert voc_ap_11point([], []) == 0.0


def test_precision_recall_curve_groups_tied_scores():
    # Scores 0.9 (TP), 0.8 (FP), 0.8 (TP), 0.3 (TP), 4 truths. Thresholds 0.9, 0.8, 0.3 keep
    # 1, 3, 4 predictions with 1, 2, 3 TPs: P = 1, 2/3, 3/4 and R = 1/4, 2/4, 3/4.
    thresholds, precision, recall = precision_recall_curve(
        np.array([0.8, 0.9, 0.3, 0.8]), np.array([False, True, True, True]), num_truths=4
    )
    assert thresholds.tolist() == [0.9, 0.8, 0.3]
    assert precision.tolist() == pytest.approx([1, 2 / 3, 3 / 4])
    assert recall.tolist() == [0.25, 0.5, 0.75]


def test_operating_threshold():
    # A true positive at 0.4 is below score_thresh 0.5: it counts for AP but not for
    # precision / recall at the operating point (score >= thresh counts, so 0.5 would).
    prediction, image_truth = predict([A, B], [0.9, 0.4]), truth([A, B])
    metrics = evaluate([prediction], [image_truth])
    assert (metrics["point_precision"], metrics["point_recall"], metrics["point_ap"]) == (1.0, 0.5, 1.0)
    assert evaluate([prediction], [image_truth], score_thresh=0.4)["point_recall"] == 1.0
    assert evaluate([predict([A], [0.5])], [truth([A])], score_thresh=0.5)["point_recall"] == 1.0


def test_greedy_one_to_one_matching_takes_the_nearest_free_truth():
    # Truths 15 px apart. P1 (0.9) is 8 px from T1 and 7 px from T2: it takes T2, the
    # nearest. P2 (0.8) is 2 px from T1 and 17 px from T2: it takes T1. A third
    # prediction on T1 (0.7) finds T1 taken: false positive. Precision 2/3, recall 1.
    t1, t2 = [0.5, 0.5], [0.5 + 15 * PX, 0.5]
    points = [[0.5 + 8 * PX, 0.5], [0.5 - 2 * PX, 0.5], t1]
    metrics = evaluate([predict(points, [0.9, 0.8, 0.7])], [truth([t1, t2])])
    assert metrics["point_recall"] == 1.0
    assert metrics["point_precision"] == pytest.approx(2 / 3)


def test_empty_images():
    nothing = {key: 1.0 for key in evaluate([predict([A], [0.9])], [truth([A])])}
    # Nothing to find and nothing predicted: perfect, including on no images at all.
    assert evaluate([predict()], [truth()]) == nothing
    assert evaluate([], []) == nothing
    # Nothing to find but something predicted: all false positives.
    spurious = evaluate([predict([A], [0.9], [A + B], [0.9])], [truth()])
    assert set(spurious.values()) == {0.0}
    # Something to find, nothing predicted.
    missed = evaluate([predict()], [truth([A], [A + B])])
    assert set(missed.values()) == {0.0}
    # Something to find, predictions only below the operating point: AP still counts them.
    low = evaluate([predict([A], [0.1])], [truth([A])])
    assert (low["point_precision"], low["point_recall"], low["point_ap"]) == (0.0, 0.0, 1.0)
    # An empty image beside a perfect one changes nothing.
    mixed = evaluate([predict([A], [0.9], [A + B], [0.8]), predict()], [truth([A], [A + B]), truth()])
    assert mixed == nothing


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 images"):
        evaluate([predict(), predict()], [truth()])


def test_truth_from_batch():
    # Image 0: 3 marks, slots 0 -> 2 and 1 -> 0; a stale adjacency bit beyond num_marks
    # is ignored. Image 1: no marks.
    marks = torch.zeros(2, 4, 4)
    marks[0, :3, :2] = torch.tensor([A, B, C])
    adjacency = torch.zeros(2, 4, 4, dtype=torch.bool)
    adjacency[0, 0, 2] = adjacency[0, 1, 0] = adjacency[0, 3, 0] = True
    batch = {"marks": marks, "num_marks": torch.tensor([3, 0]), "slot_adjacency": adjacency}
    first, second = truth_from_batch(batch)
    np.testing.assert_allclose(first.point_xy, [A, B, C], rtol=1e-6)
    np.testing.assert_allclose(first.slot_entrances, [A + C, B + A], rtol=1e-6)
    assert first.point_xy.dtype == np.float64
    assert second.point_xy.shape == (0, 2) and second.slot_entrances.shape == (0, 4)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="point_xy"):
        ImagePrediction(np.zeros((2, 3)), np.zeros(2), np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="slot_scores"):
        ImagePrediction(np.zeros((0, 2)), np.zeros(0), np.zeros((1, 4)), np.zeros(2))


# ----------------------------------------------------------------------------- against DMPR-PS


def dmpr_ps_point_ap(truths_list, predictions_list):
    """DMPR-PS util/precision_recall.py, in loops: per truth the best-scoring matching prediction."""
    true_positive_list, false_positive_list = [], []
    for ground_truths, predictions in zip(truths_list, predictions_list):
        matched = [False] * len(predictions)
        for ground_truth in ground_truths:
            best, index = 0.0, -1
            for i, (score, point) in enumerate(predictions):
                if ((point - ground_truth) ** 2).sum() < 0.000277778 and best < score:
                    best, index = score, i
            if index >= 0:
                matched[index] = True
            true_positive_list.append(predictions[index][0] if index >= 0 else 0.0)
        false_positive_list += [predictions[i][0] for i, m in enumerate(matched) if not m]
    true_positive_list, false_positive_list = sorted(true_positive_list), sorted(false_positive_list)
    recalls, precisions = [0.0], [0.0]
    for thresh in reversed(sorted(set(true_positive_list))):
        if thresh == 0.0:
            recalls.append(1.0)
            precisions.append(0.0)
            break
        false_negatives = bisect.bisect_left(true_positive_list, thresh)
        true_positives = len(true_positive_list) - false_negatives
        false_positives = len(false_positive_list) - bisect.bisect_left(false_positive_list, thresh)
        recalls.append(true_positives / (true_positives + false_negatives))
        precisions.append(true_positives / (true_positives + false_positives))
    total = 0.0
    for i in range(11):
        index = next(k for k, recall in enumerate(recalls) if recall >= i / 10)
        total += max(precisions[index:])
    return total / 11


def test_point_ap_agrees_with_dmpr_ps_when_matches_are_unambiguous():
    # Truths on a 0.1 grid (60 px apart); predictions jittered by up to ~14 px, so some
    # miss, plus spurious points. No prediction can match two truths, where the
    # originals' matching and the greedy one-to-one matching would differ.
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(1, 10) / 10, np.arange(1, 10) / 10), -1).reshape(-1, 2)
    truths, predictions, ours = [], [], []
    for _ in range(30):
        image_truth = grid[rng.random(len(grid)) < 0.1]
        found = image_truth[rng.random(len(image_truth)) < 0.8]
        points = np.concatenate([found + rng.uniform(-10, 10, found.shape) * PX, rng.uniform(0.05, 0.95, (2, 2))])
        scores = rng.random(len(points)).round(2)  # rounded: tied scores too
        truths.append(image_truth)
        predictions.append(list(zip(scores, points)))
        ours.append((predict(points, scores), truth(image_truth)))
    expected = dmpr_ps_point_ap(truths, predictions)
    assert 0.3 < expected < 0.95  # a curve with something to lose at both ends
    assert evaluate(*zip(*ours))["point_ap"] == pytest.approx(expected, abs=1e-12)
