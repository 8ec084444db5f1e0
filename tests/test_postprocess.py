"""psdet.postprocess against the originals' loops (psdet/testing/reference_postprocess.py), exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psdet.config import DmprConfig, ModelConfig
from psdet.postprocess import DecodedPoints, decode_point_map, decode_points, pair_directional_points, slots_from_edges
from psdet.testing import reference_postprocess as ref

GAT = dict(point_thresh=0.008, boundary_thresh=0.05, nms_radius=0.0625, max_candidates=64, max_points=10)


def decode_both(point_map: torch.Tensor, **params):
    """Fast and reference decoding of a [B, C, H, W] map (confidence, dx, dy, *attributes)."""
    attributes = point_map[:, 3:] if point_map.shape[1] > 3 else None
    fast = decode_points(point_map[:, 0], point_map[:, 1:3], attributes, **params)
    slow = [ref.decode_image(image.numpy(), **params) for image in point_map]
    return fast, slow


def assert_same_points(fast: DecodedPoints, slow) -> None:
    """Valid points come first, in the same order, with bit-identical values; pads are zero."""
    for b, points in enumerate(slow):
        n = len(points)
        assert fast.valid[b].tolist() == [True] * n + [False] * (fast.valid.shape[1] - n)
        expected = np.array([p[2] for p in points], dtype=np.float32).reshape(n, -1)
        assert np.array_equal(fast.xy[b, :n].numpy(), expected[:, :2])
        assert np.array_equal(fast.scores[b, :n].numpy(), np.array([p[0] for p in points], dtype=np.float32))
        if fast.attributes is not None:
            assert np.array_equal(fast.attributes[b, :n].numpy(), expected[:, 2:])
            assert not fast.attributes[b, n:].any()
        assert not fast.xy[b, n:].any() and not fast.scores[b, n:].any()


def random_map(generator, batch, size, channels=3, low=0.0, high=1.0):
    point_map = torch.rand(batch, channels, size, size, generator=generator)
    point_map[:, 0] = low + (high - low) * point_map[:, 0]
    return point_map


@pytest.mark.parametrize("size", [8, 16])
def test_decode_random_maps(size):
    generator = torch.Generator().manual_seed(size)
    point_map = random_map(generator, 6, size, channels=6)
    fast, slow = decode_both(point_map, **{**GAT, "point_thresh": 0.7})
    assert_same_points(fast, slow)
    assert sum(map(len, slow)) >= 6  # the test exercises real points


def test_decode_untrained_map_every_cell_a_candidate():
    # Confidence ~U(0.4, 0.6) >= 0.008 in every cell: ~200 of the 256 points lie inside the
    # border, and the 64 most confident go to NMS.
    generator = torch.Generator().manual_seed(1)
    point_map = random_map(generator, 8, 16, low=0.4, high=0.6)
    fast, slow = decode_both(point_map, **GAT)
    assert_same_points(fast, slow)
    assert fast.valid.all()  # plenty of survivors: every image fills max_points


def test_decode_clustered_points_exercise_nms():
    # Offsets push points towards cell corners, so neighbours fall inside a wide NMS box
    # and suppression chains (suppressed points suppressing others) are common.
    generator = torch.Generator().manual_seed(2)
    point_map = random_map(generator, 8, 16)
    point_map[:, 1:3] = (point_map[:, 1:3] > 0.5).float() * 0.98 + 0.01
    for radius in (0.0625, 0.15):
        fast, slow = decode_both(point_map, **{**GAT, "nms_radius": radius, "max_candidates": 256, "max_points": 64})
        assert_same_points(fast, slow)


def test_decode_ties_follow_row_major_order():
    # Three confidence levels only: ties in the top-k cap, in NMS and in the output order.
    generator = torch.Generator().manual_seed(3)
    point_map = random_map(generator, 8, 8, channels=4)
    point_map[:, 0] = torch.randint(1, 4, (8, 8, 8), generator=generator).float() / 4
    point_map[:, 1:3] = torch.randint(0, 3, (8, 2, 8, 8), generator=generator).float() / 2
    for max_candidates in (5, 20, 64):
        fast, slow = decode_both(point_map, **{**GAT, "nms_radius": 0.2, "max_candidates": max_candidates, "max_points": 8})
        assert_same_points(fast, slow)


def test_suppressed_point_still_suppresses():
    # A (0.9) - B (0.8) - C (0.7) in a row, 0.1 apart, radius 0.15: A suppresses B, and B,
    # though suppressed, still suppresses C (the originals' rule). Greedy NMS would keep C.
    point_map = torch.zeros(1, 3, 10, 10)
    point_map[0, 0, 5, 3:6] = torch.tensor([0.9, 0.8, 0.7])  # x = (col + 0) / 10 = 0.3, 0.4, 0.5
    fast = decode_points(point_map[:, 0], point_map[:, 1:3], **{**GAT, "nms_radius": 0.15})
    assert fast.valid[0].tolist() == [True] + [False] * 9
    assert fast.scores[0, 0].item() == pytest.approx(0.9)


def test_decode_survivors_ranked_beyond_the_first_stage():
    # max_points 3: NMS first looks at the 6 most confident candidates. Here those are a
    # 3x3 cluster (all within 0.2 of each other: only the best survives), so the other
    # survivors, isolated weaker points, rank beyond them and the full comparison must run.
    point_map = torch.zeros(1, 3, 16, 16)
    point_map[0, 1:] = 0.5
    point_map[0, 0, 6:9, 6:9] = torch.linspace(0.99, 0.91, 9).reshape(3, 3)
    for k, (row, col) in enumerate([(2, 2), (2, 13), (13, 2), (13, 13)]):
        point_map[0, 0, row, col] = 0.5 - 0.1 * k
    params = {**GAT, "nms_radius": 0.2, "max_points": 3}
    fast, slow = decode_both(point_map, **params)
    assert_same_points(fast, slow)
    # (6.5, 6.5) / 16 from the cluster, then the isolated points at 0.5 and 0.4.
    np.testing.assert_allclose(fast.xy[0].numpy(), [[6.5 / 16, 6.5 / 16], [2.5 / 16, 2.5 / 16], [13.5 / 16, 2.5 / 16]])


def test_decode_border_and_small_grid_padding():
    # A 2x2 grid has fewer cells than max_points: the output is still padded to 10, the
    # attribute channel too.
    point_map = torch.tensor(
        [[[[0.9, 0.5], [0.02, 0.001]], [[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.05]], [[0.1, 0.2], [0.3, 0.4]]]]
    )
    fast, slow = decode_both(point_map, **{**GAT, "nms_radius": 0.1})
    # Cell (0,0): (0.25, 0.25) 0.9. Cell (0,1): (0.75, 0.25) 0.5. Cell (1,0): (0.25, 0.75) 0.02.
    # Cell (1,1): below point_thresh.
    assert fast.xy.shape == (1, 10, 2) and fast.attributes.shape == (1, 10, 1) and fast.valid[0].sum() == 3
    assert fast.xy[0, :3].tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75]]
    assert fast.attributes[0, :3, 0].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert_same_points(fast, slow)
    # On a 1x1 grid x = dx: x = 0.05 is on the border and kept (inclusive); 0.04 is outside.
    border = torch.tensor([[[[0.9]], [[0.05]], [[0.5]]]])
    kept = decode_points(border[:, 0], border[:, 1:3], **{**GAT, "boundary_thresh": 0.05})
    border[0, 1] = 0.04
    dropped = decode_points(border[:, 0], border[:, 1:3], **{**GAT, "boundary_thresh": 0.05})
    assert kept.valid[0, 0] and not dropped.valid.any()
    with pytest.raises(ValueError, match="boundary_thresh"):
        decode_points(border[:, 0], border[:, 1:3], **{**GAT, "boundary_thresh": 0.6})


def to_ref_points(points: DecodedPoints, b: int):
    n = int(points.valid[b].sum())
    attributes = points.attributes[b, :n].numpy() if points.attributes is not None else np.zeros((n, 0), np.float32)
    values = np.concatenate([points.xy[b, :n].numpy(), attributes], axis=1)
    return [(points.scores[b, i].item(), i, values[i]) for i in range(n)]


def assert_same_slots(prediction, slots) -> None:
    expected_rows = np.array([s[1] for s in slots], dtype=np.float64).reshape(-1, 4)
    assert np.array_equal(prediction.slot_entrances, expected_rows)
    assert np.array_equal(prediction.slot_scores, np.array([float(s[0]) for s in slots]))


@pytest.mark.parametrize("edge_thresh", [0.5, 0.9])
def test_slots_from_random_edges(edge_thresh):
    generator = torch.Generator().manual_seed(4)
    point_map = random_map(generator, 8, 16, low=0.0, high=0.3)  # some images with few points
    points = decode_points(point_map[:, 0], point_map[:, 1:3], **GAT)
    edges = torch.rand(8, 10, 10, generator=generator)
    predictions = slots_from_edges(edges, points, edge_thresh)
    assert len(predictions) == 8
    total = 0
    for b, prediction in enumerate(predictions):
        ref_points = to_ref_points(points, b)
        slots = ref.slots_from_edges_image(ref_points, edges[b].numpy(), edge_thresh)
        assert_same_slots(prediction, slots)
        assert np.array_equal(prediction.point_xy, points.xy[b, : len(ref_points)].numpy())
        assert np.array_equal(prediction.point_scores, points.scores[b, : len(ref_points)].numpy())
        total += len(slots)
    assert total > 0


def test_slots_skip_self_pairs_and_pads():
    points = DecodedPoints(
        xy=torch.tensor([[[0.2, 0.2], [0.6, 0.2], [0.0, 0.0]]]),
        scores=torch.tensor([[0.9, 0.8, 0.0]]),
        valid=torch.tensor([[True, True, False]]),
        attributes=None,
    )
    edges = torch.full((1, 3, 3), 0.99)  # every pair, self-pairs and pads included, looks like a slot
    (prediction,) = slots_from_edges(edges, points, 0.5)
    np.testing.assert_allclose(prediction.slot_entrances, [[0.2, 0.2, 0.6, 0.2], [0.6, 0.2, 0.2, 0.2]], atol=1e-6)
    assert len(prediction.point_xy) == 2
    # Edge scores straight from an autocast model: bf16, still attached to the graph.
    (low_precision,) = slots_from_edges(edges.bfloat16().requires_grad_(), points, 0.5)
    assert len(low_precision.slot_scores) == 2


# ----------------------------------------------------------------------------- DMPR-PS


def directional(xy, scores, shape, direction, max_points=10) -> DecodedPoints:
    """DecodedPoints from lists of one image's points: shape 0 = T, 1 = L, direction in radians."""
    n = len(xy)
    pad = max_points - n
    attributes = torch.tensor([[s, math.cos(d), math.sin(d)] for s, d in zip(shape, direction)]).reshape(n, 3)
    return DecodedPoints(
        xy=torch.cat([torch.tensor(xy, dtype=torch.float32).reshape(n, 2), torch.zeros(pad, 2)])[None],
        scores=torch.cat([torch.tensor(scores, dtype=torch.float32), torch.zeros(pad)])[None],
        valid=torch.tensor([True] * n + [False] * pad)[None],
        attributes=torch.cat([attributes, torch.zeros(pad, 3)])[None],
    )


def test_dmpr_hand_made_vertical_slot():
    # Two T marks 0.25 apart (squared 0.0625, inside the vertical-slot band), both
    # pointing down (+y, pi/2). Seen from A along A->B = (1, 0): "down" is atan2(1, 0) =
    # pi/2, so A is t_down (2); seen from B along (-1, 0): "up" is atan2(1, 0) = pi/2, so B
    # is t_up (4). A is down (< 3), so the entrance runs B -> A; score min(0.9, 0.7).
    cfg = DmprConfig()
    points = directional([[0.3, 0.5], [0.55, 0.5]], [0.9, 0.7], [0, 0], [math.pi / 2] * 2)
    (prediction,) = pair_directional_points(points, cfg)
    np.testing.assert_allclose(prediction.slot_entrances, [[0.55, 0.5, 0.3, 0.5]], atol=1e-6)
    assert prediction.slot_scores.tolist() == pytest.approx([0.7])
    # A third mark halfway between them blocks the pair; it is itself too close to pair.
    blocked = directional([[0.3, 0.5], [0.55, 0.5], [0.425, 0.5]], [0.9, 0.7, 0.8], [0, 0, 0], [math.pi / 2] * 3)
    assert len(pair_directional_points(blocked, cfg)[0].slot_scores) == 0
    # Pointing up (-pi/2) flips both shapes and so the entrance: A -> B.
    flipped = directional([[0.3, 0.5], [0.55, 0.5]], [0.9, 0.7], [0, 0], [-math.pi / 2] * 2)
    np.testing.assert_allclose(pair_directional_points(flipped, cfg)[0].slot_entrances, [[0.3, 0.5, 0.55, 0.5]], atol=1e-6)
    # Too far apart for either band (squared 0.5): no slot.
    far = directional([[0.1, 0.5], [0.8, 0.5]], [0.9, 0.7], [0, 0], [math.pi / 2] * 2)
    assert len(pair_directional_points(far, cfg)[0].slot_scores) == 0


def random_directional_points(generator, batch, max_points=10) -> DecodedPoints:
    counts = torch.randint(0, max_points + 1, (batch,), generator=generator)
    valid = torch.arange(max_points)[None] < counts[:, None]
    xy = 0.1 + 0.8 * torch.rand(batch, max_points, 2, generator=generator)
    # Directions near the axes so that many pairs get a non-"none" shape.
    quarter = torch.randint(0, 4, (batch, max_points), generator=generator).float() * (math.pi / 2)
    direction = quarter + 0.3 * (torch.rand(batch, max_points, generator=generator) - 0.5)
    shape = torch.rand(batch, max_points, generator=generator)
    attributes = torch.stack([shape, direction.cos(), direction.sin()], dim=-1)
    scores = torch.rand(batch, max_points, generator=generator)
    zero = valid.unsqueeze(-1)
    return DecodedPoints(xy * zero, scores * valid, valid, attributes * zero)


def test_dmpr_pairing_matches_reference_on_random_points():
    generator = torch.Generator().manual_seed(5)
    cfg = DmprConfig()
    points = random_directional_points(generator, 64)
    predictions = pair_directional_points(points, cfg)
    total = 0
    for b, prediction in enumerate(predictions):
        marking_points = ref.directional_points(to_ref_points(points, b))
        slots = ref.inference_slots(marking_points, cfg)
        assert_same_slots(prediction, slots)
        total += len(slots)
    assert total >= 20


def test_dmpr_end_to_end_from_a_six_channel_map():
    generator = torch.Generator().manual_seed(6)
    point_map = torch.rand(4, 6, 16, 16, generator=generator)
    point_map[:, 4:] = point_map[:, 4:] * 2 - 1  # cos, sin after tanh
    model_cfg = ModelConfig(detector="dmpr", point_thresh=0.9)
    points = decode_point_map(point_map, model_cfg, max_points=10)
    reordered = point_map[:, [0, 2, 3, 1, 4, 5]]  # (confidence, dx, dy, shape, cos, sin)
    slow = [ref.decode_image(image.numpy(), 0.9, 0.05, 0.0625, 64, 10) for image in reordered]
    assert_same_points(points, slow)
    for prediction, image_points in zip(pair_directional_points(points, model_cfg.dmpr), slow):
        assert_same_slots(prediction, ref.inference_slots(ref.directional_points(image_points), model_cfg.dmpr))
