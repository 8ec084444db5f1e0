"""The switches between the original gcn-parking-slot pipeline and psdet's own choices
(docs/FIDELITY.md): what each shipped config sets, and each switch's behaviour on a
hand-made case."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from psdet.cli import main as psdet_main
from psdet.config import load_config
from psdet.data import build_dataset
from psdet.data.synth import generate
from psdet.metrics import ImagePrediction, ImageTruth, evaluate
from psdet.models import build_model
from psdet.postprocess import DecodedPoints, decode_points, slots_from_edges
from psdet.sampler import ResumableSampler
from psdet.testing import reference_postprocess as ref

# (config, key) -> value. The paper configs carry the original's values; ps_gat_tiny and
# ps_gat_cpu_sweep (the demo's and the recorded sweep's config) keep psdet's.
ORIGINAL = {
    "data.rotate": False,
    "data.drop_last": False,
    "model.max_candidates": 0,
    "model.nms_keep": "all",
    "train.seed": 100,
    "train.ema_decay": 0.0,
}
PSDET = {
    "data.rotate": False,  # short CPU runs learn faster without it (ps_gat_tiny's comment)
    "data.drop_last": True,
    "model.max_candidates": 64,
    "model.nms_keep": "max_points",
    "model.slot_score": "edge_x_min_point",
    "train.seed": 0,
    "train.ema_decay": 0.0,
}
EXPECTED = {
    "ps_gat": {**ORIGINAL, "model.slot_score": "edge", "model.weight_point": 100.0, "data.batch_size": 16,
               "train.epochs": 200, "train.ckpt_interval": 1, "train.keep_checkpoints": 100},
    "ps_dmpr": {**ORIGINAL, "model.weight_point": 1.0, "data.batch_size": 64, "train.epochs": 120,
                "train.ckpt_interval": 1, "train.keep_checkpoints": 20},
    "ps_gat_tiny": {**PSDET, "model.weight_point": 100.0, "data.batch_size": 8, "train.epochs": 8},
    "ps_gat_cpu_sweep": {**PSDET, "model.weight_point": 100.0, "data.batch_size": 8, "train.epochs": 8,
                         "model.backbone": "resnet18", "model.depth_factor": 4, "data.image_size": 256,
                         "optim.optimizer": "adam_onecycle", "optim.lr": 0.003, "train.keep_checkpoints": 3,
                         "train.ema_decay": 0.95},
}


def _value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_configs_set_each_switch(name):
    cfg = load_config(name)
    assert {key: _value(cfg, key) for key in EXPECTED[name]} == EXPECTED[name]


# ----------------------------------------------------------------------------- post-processing


def fourteen_survivors() -> torch.Tensor:
    """An 8x8 map [1, 3, 8, 8]: 14 cells with confidences 0.90, 0.85, ..., 0.25, offsets at
    the cell centre (cells are 1/8 apart, more than the NMS radius 1/16, so all survive)."""
    point_map = torch.zeros(1, 3, 8, 8)
    point_map[:, 1:] = 0.5
    cells = [(row, col) for row in range(1, 8, 2) for col in range(0, 8, 2)][:14]
    for rank, (row, col) in enumerate(cells):
        point_map[0, 0, row, col] = 0.90 - 0.05 * rank
    return point_map


def decode(point_map, *, max_candidates=64, max_points=10, keep_all=False) -> DecodedPoints:
    return decode_points(point_map[:, 0], point_map[:, 1:3], point_thresh=0.008, boundary_thresh=0.05,
                         nms_radius=0.0625, max_candidates=max_candidates, max_points=max_points,
                         keep_all=keep_all)


def test_nms_keep_all_passes_every_survivor_on_as_the_original():
    # The case of docs/FIDELITY.md: 14 survivors, every edge above 0.5. The original keeps
    # all 14 points and emits 14 x 13 = 182 slots (182 + 14 self-pairs, which psdet never
    # emits); psdet's default keeps the 10 most confident and 10 x 9 = 90 slots.
    point_map = fourteen_survivors()
    for keep_all, num_points, num_slots in ((True, 14, 182), (False, 10, 90)):
        points = decode(point_map, max_candidates=0 if keep_all else 64, keep_all=keep_all)
        assert points.xy.shape == (1, num_points, 2) and int(points.valid.sum()) == num_points
        assert points.scores[0].tolist() == pytest.approx([0.90 - 0.05 * r for r in range(num_points)])
        edges = torch.full((1, num_points, num_points), 0.99)
        (prediction,) = slots_from_edges(edges, points, 0.5, "edge")
        assert len(prediction.point_xy) == num_points
        assert len(prediction.slot_entrances) == num_slots


def test_max_candidates_zero_is_no_cap():
    # 14 candidates: a cap of 12 drops the two least confident before NMS, 0 keeps them.
    point_map = fourteen_survivors()
    assert int(decode(point_map, max_candidates=12, keep_all=True).valid.sum()) == 12
    assert int(decode(point_map, max_candidates=0, keep_all=True).valid.sum()) == 14


@pytest.mark.parametrize("seed", [0, 1])
def test_keep_all_equals_the_originals_loop(seed):
    # Untrained-looking maps (every cell a candidate): no cap, every survivor, exactly the
    # original's NMS, sorted by confidence; P is the most survivors in the batch.
    generator = torch.Generator().manual_seed(seed)
    point_map = torch.rand(4, 3, 16, 16, generator=generator)
    point_map[:, 0] = 0.4 + 0.2 * point_map[:, 0]
    fast = decode(point_map, max_candidates=0, keep_all=True)
    slow = [ref.decode_image(image.numpy(), 0.008, 0.05, 0.0625, 10**6, 10**6) for image in point_map]
    assert fast.xy.shape[1] == max(10, max(map(len, slow))) > 10
    for b, points in enumerate(slow):
        n = len(points)
        assert int(fast.valid[b].sum()) == n
        assert np.array_equal(fast.xy[b, :n].numpy(), np.array([p[2][:2] for p in points], dtype=np.float32))
        assert np.array_equal(fast.scores[b, :n].numpy(), np.array([p[0] for p in points], dtype=np.float32))


def test_slot_score_edge_or_edge_times_lower_point_confidence():
    points = DecodedPoints(xy=torch.tensor([[[0.2, 0.2], [0.6, 0.2], [0.2, 0.6]]]),
                           scores=torch.tensor([[0.9, 0.4, 0.8]]), valid=torch.ones(1, 3, dtype=torch.bool),
                           attributes=None)
    edges = torch.zeros(1, 3, 3)
    edges[0, 0, 1] = 0.95  # a confident edge to a doubtful point (0.4)
    edges[0, 0, 2] = 0.70  # a weaker edge between two confident points
    (original,) = slots_from_edges(edges, points, 0.5, "edge")
    (ours,) = slots_from_edges(edges, points, 0.5, "edge_x_min_point")
    np.testing.assert_allclose(original.slot_scores, [0.95, 0.70], rtol=1e-6)
    np.testing.assert_allclose(ours.slot_scores, [0.95 * 0.4, 0.70 * 0.8], rtol=1e-6)
    # the ranking flips: the doubtful pair comes first only under the original's score
    assert original.slot_scores[0] > original.slot_scores[1] and ours.slot_scores[0] < ours.slot_scores[1]
    with pytest.raises(ValueError, match="slot_score"):
        slots_from_edges(edges, points, 0.5, "edge_only")


TINY = ["data.image_size=128", "model.depth_factor=2", "model.descriptor_dim=16",
        "model.graph.point_encoder_layers=[8, 16]", "model.graph.proj_dim=8", "model.edge_layers=[16, 8]"]


@pytest.mark.parametrize("graph", ["gat", "dgcnn"])
def test_graph_on_more_than_max_points_runs_each_large_image_alone(graph):
    # Image 0 has 12 points (> max_points 10): its graph has exactly its 12 nodes. Image 1
    # has 3: its graph has max_points nodes, pads included, as with nms_keep max_points.
    torch.manual_seed(0)
    cfg = load_config("ps_gat_tiny", [*TINY, f"model.graph.type={graph}", "model.nms_keep=all"])
    model = build_model(cfg.model, cfg.data.max_points).eval()
    generator = torch.Generator().manual_seed(3)
    descriptor_map = torch.randn(2, 16, 4, 4, generator=generator)
    xy = torch.zeros(2, 12, 2)
    xy[0] = torch.rand(12, 2, generator=generator)
    xy[1, :3] = torch.rand(3, 2, generator=generator)
    valid = torch.zeros(2, 12, dtype=torch.bool)
    valid[0], valid[1, :3] = True, True
    points = DecodedPoints(xy, torch.where(valid, 0.9, 0.0), valid, None)
    with torch.no_grad():
        scores = model._edge_scores_by_graph_size(descriptor_map, points)
        alone = torch.sigmoid(model.edge_logits(descriptor_map[:1], xy[:1, :12]))[0]
        padded = torch.sigmoid(model.edge_logits(descriptor_map[1:], xy[1:, :10]))[0]
    torch.testing.assert_close(scores[0], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores[1, :10, :10], padded, rtol=0, atol=1e-6)
    assert not scores[1, 10:].any() and not scores[1, :, 10:].any()


def test_gat_predict_keep_all_does_not_depend_on_the_batch():
    # A flat point map (every cell of the 4x4 grid a survivor: 16 > max_points) and edges
    # above 0.5 everywhere: all 16 points, 16 x 15 slots, scored by the edge alone, and an
    # image's result is the same alone or in a batch.
    torch.manual_seed(0)
    cfg = load_config("ps_gat_tiny", [*TINY, "model.nms_keep=all", "model.max_candidates=0", "model.slot_score=edge"])
    model = build_model(cfg.model, cfg.data.max_points).eval()
    torch.nn.init.zeros_(model.point_head[-1].weight)
    torch.nn.init.zeros_(model.edge_predictor.encoder[-1].weight)
    torch.nn.init.constant_(model.edge_predictor.encoder[-1].bias, 5.0)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    together = model.predict(images)
    for b, prediction in enumerate(together):
        (alone,) = model.predict(images[b : b + 1])
        assert len(prediction.point_xy) == 16 and len(prediction.slot_entrances) == 16 * 15
        np.testing.assert_array_equal(prediction.slot_entrances, alone.slot_entrances)
        np.testing.assert_allclose(prediction.slot_scores, alone.slot_scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose(prediction.slot_scores, torch.tensor(5.0).sigmoid().item(), rtol=1e-6)


# ----------------------------------------------------------------------------- training


def test_dmpr_loss_weight():
    # ps_dmpr's loss is the plain masked MSE, as the original; weight_point 100 scales it.
    torch.manual_seed(0)
    batch = {"marks": torch.tensor([[[0.3, 0.4, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]),
             "num_marks": torch.tensor([1]), "slot_adjacency": torch.zeros(1, 2, 2, dtype=torch.bool)}
    totals = {}
    for weight in (1.0, 100.0):
        cfg = load_config("ps_dmpr", ["data.image_size=64", "model.depth_factor=2", f"model.weight_point={weight}"])
        model = build_model(cfg.model, cfg.data.max_points)
        torch.manual_seed(1)
        outputs = {"point_map": torch.rand(1, 6, 2, 2)}
        totals[weight], parts = model.loss(outputs, batch)
    assert load_config("ps_dmpr").model.weight_point == 1.0
    torch.testing.assert_close(totals[1.0], parts["loss_point"])
    torch.testing.assert_close(totals[100.0], 100 * parts["loss_point"])


@pytest.mark.parametrize("drop_last, batches, sizes", [(True, 2, [4, 4]), (False, 3, [4, 4, 2])])
def test_drop_last(drop_last, batches, sizes):
    sampler = ResumableSampler(10, 4, seed=100, drop_last=drop_last)
    sampler.set_epoch(0)
    order = list(sampler)
    assert sampler.batches_per_epoch == batches and len(sampler) == len(order) == sum(sizes)
    loader = torch.utils.data.DataLoader(range(10), batch_size=4, sampler=sampler)
    assert [len(batch) for batch in loader] == sizes
    if not drop_last:  # every image once per epoch, as the original's shuffling DataLoader
        assert sorted(order) == list(range(10))
    sampler.set_epoch(0, skip_batches=2)  # resumed after two batches: only the partial one is left
    assert len(list(sampler)) == len(sampler) == sum(sizes[2:])


@pytest.fixture(scope="module")
def tiny_lots(tmp_path_factory):
    root = tmp_path_factory.mktemp("lots")
    generate(root, 4, 1, seed=2, progress=False)
    return root


@pytest.mark.parametrize("rotate", [False, True])
def test_rotation_switch(tiny_lots, rotate):
    # ps_gat's training samples (no rotation, as the original) have exactly the label's
    # marks; with data.rotate they are rotated (every lot here has marks off-centre).
    cfg = load_config("ps_gat", [f"data.root={tiny_lots}", "data.image_size=128", f"data.rotate={str(rotate).lower()}",
                                 "data.color_jitter=0"])
    train = build_dataset(cfg.data, "training", train=True, seed=cfg.train.seed)
    plain = build_dataset(cfg.data, "training", train=False, seed=cfg.train.seed)
    same = [torch.equal(train[i]["marks"], plain[i]["marks"]) and torch.equal(train[i]["image"], plain[i]["image"])
            for i in range(len(train))]
    assert all(same) if not rotate else not any(same)


# ----------------------------------------------------------------------------- evaluation protocols

PX = 1 / 600  # one pixel of a 600 px image, normalised


def points_image(truth_xy, prediction_xy, scores):
    """One image with point truths and predictions only (no slots)."""
    return (ImagePrediction(np.array(prediction_xy, dtype=float).reshape(-1, 2), np.array(scores, dtype=float),
                            np.zeros((0, 4)), np.zeros(0)),
            ImageTruth(np.array(truth_xy, dtype=float).reshape(-1, 2), np.zeros((0, 4))))


def both(images):
    predictions, truths = zip(*images)
    return (evaluate(list(predictions), list(truths)),
            evaluate(list(predictions), list(truths), protocol="original"))


def test_one_prediction_two_truths():
    # Truths A and B 6 px apart; one prediction P (0.9) 3 px from each. One-to-one: P is
    # one true positive, B is missed: precision 1/1, recall 1/2, AP = 6/11 (precision 1
    # at recall levels 0 .. 0.5, never reaching 0.6). The original: A and B both take P:
    # TP 2 of 2, precision 2/2, recall 1; its curve is (0, 0), (1, 1): AP 1.
    a, b, p = (0.5, 0.5), (0.5 + 6 * PX, 0.5), (0.5 + 3 * PX, 0.5)
    ours, original = both([points_image([a, b], [p], [0.9])])
    assert (ours["point_precision"], ours["point_recall"]) == (1.0, 0.5)
    assert ours["point_ap"] == pytest.approx(6 / 11)
    assert (original["point_precision"], original["point_recall"], original["point_ap"]) == (1.0, 1.0, 1.0)


def test_second_prediction_near_two_truths():
    # Truths A, B 6 px apart; P1 (0.9) and P2 (0.7) each within 10 px of both. One-to-one:
    # P1 takes A, P2 takes B: precision 2/2, recall 2/2, AP 1. The original: both truths
    # take P1 and P2 is a false positive: at 0.5, TP 2, FP 1, precision 2/3, recall 1;
    # its only threshold (0.9) has TP 2, FP 0, so AP is still 1.
    a, b = (0.5, 0.5), (0.5 + 6 * PX, 0.5)
    ours, original = both([points_image([a, b], [(0.5 + 2 * PX, 0.5), (0.5 + 4 * PX, 0.5)], [0.9, 0.7])])
    assert (ours["point_precision"], ours["point_recall"], ours["point_ap"]) == (1.0, 1.0, 1.0)
    assert original["point_precision"] == pytest.approx(2 / 3)
    assert (original["point_recall"], original["point_ap"]) == (1.0, 1.0)


def test_missed_truth_ends_the_original_curve_at_recall_one():
    # Truths A and C (far apart); P1 (0.8) on A, P2 (0.6) nowhere near. Original lists:
    # truth scores [0.8, 0.0], false positives [0.6]. Curve: (0, 0), then t = 0.8: TP 1,
    # FP 0 -> (0.5, 1), then t = 0 -> (1, 0). AP: levels 0 .. 0.5 see precision 1, 0.6 ..
    # 1 see the (1, 0) point: 6/11. At 0.5: TP 1, FP 1: precision 1/2, recall 1/2. The
    # one-to-one protocol agrees here: P1 is a TP, P2 an FP, the same 6/11.
    ours, original = both([points_image([(0.2, 0.2), (0.8, 0.8)], [(0.2, 0.2), (0.5, 0.5)], [0.8, 0.6])])
    for metrics in (ours, original):
        assert (metrics["point_precision"], metrics["point_recall"]) == (0.5, 0.5)
        assert metrics["point_ap"] == pytest.approx(6 / 11)


def test_slots_under_both_protocols():
    # Two true slots whose entrances are 4 px apart at both ends; one predicted slot (0.8)
    # 2 px from each. One-to-one: 1 TP, recall 1/2, AP 6/11; the original: both truths
    # take it, recall 1, AP 1. The points (none predicted) score 0 either way.
    t1 = [0.3, 0.3, 0.3, 0.5]
    t2 = [0.3 + 4 * PX, 0.3, 0.3 + 4 * PX, 0.5]
    predicted = [0.3 + 2 * PX, 0.3, 0.3 + 2 * PX, 0.5]
    prediction = ImagePrediction(np.zeros((0, 2)), np.zeros(0), np.array([predicted]), np.array([0.8]))
    truth = ImageTruth(np.array([t1[:2], t1[2:], t2[:2], t2[2:]]), np.array([t1, t2]))
    ours = evaluate([prediction], [truth])
    original = evaluate([prediction], [truth], protocol="original")
    assert (ours["slot_precision"], ours["slot_recall"], ours["slot_ap"]) == pytest.approx((1.0, 0.5, 6 / 11))
    assert (original["slot_precision"], original["slot_recall"], original["slot_ap"]) == (1.0, 1.0, 1.0)
    assert ours["point_ap"] == original["point_ap"] == 0.0


def original_loop(images, score_thresh):
    """The originals' counting written as plain loops (one truth at a time), for points."""
    truth_scores, false_positives = [], []
    for prediction, truth in images:
        taken = [False] * len(prediction.point_scores)
        for gt in truth.point_xy:
            best, best_score = -1, 0.0
            for k, (xy, score) in enumerate(zip(prediction.point_xy, prediction.point_scores)):
                if ((xy - gt) ** 2).sum() < 0.000277778 and best_score < score:
                    best, best_score = k, score
            truth_scores.append(best_score if best >= 0 else 0.0)
            if best >= 0:
                taken[best] = True
        false_positives += [s for s, t in zip(prediction.point_scores, taken) if not t]
    recalls, precisions = [0.0], [0.0]
    for thresh in sorted(set(truth_scores), reverse=True):
        if thresh == 0.0:
            recalls.append(1.0), precisions.append(0.0)
            break
        tp = sum(s >= thresh for s in truth_scores)
        fp = sum(s >= thresh for s in false_positives)
        recalls.append(tp / len(truth_scores)), precisions.append(tp / (tp + fp))
    ap = sum(max(precisions[next(i for i, r in enumerate(recalls) if r >= level / 10):]) for level in range(11)) / 11
    tp = sum(s >= score_thresh for s in truth_scores)
    fp = sum(s >= score_thresh for s in false_positives)
    return tp / (tp + fp) if tp + fp else 0.0, tp / len(truth_scores), ap


@pytest.mark.parametrize("seed", range(4))
def test_original_protocol_equals_the_loop(seed):
    # Clustered random points (many within 10 px of several others) on 5 images.
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(5):
        centres = rng.uniform(0.2, 0.8, (3, 2))
        truth_xy = (centres[rng.integers(0, 3, 4)] + rng.normal(0, 5 * PX, (4, 2)))
        prediction_xy = (centres[rng.integers(0, 3, 5)] + rng.normal(0, 5 * PX, (5, 2)))
        scores = rng.choice([0.3, 0.6, 0.9, rng.uniform()], 5)
        images.append(points_image(truth_xy, prediction_xy, scores))
    _, original = both(images)
    precision, recall, ap = original_loop(images, 0.5)
    assert (original["point_precision"], original["point_recall"]) == pytest.approx((precision, recall))
    assert original["point_ap"] == pytest.approx(ap)


def test_eval_protocol_flag(tiny_lots, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["-o", "data.image_size=128", "-o", "data.batch_size=4", "-o", "train.epochs=1",
                 "-o", "train.progress=false"]
    assert psdet_main(["train", "-c", "ps_gat_tiny", "--data", str(tiny_lots), "--out", str(run), *overrides]) == 0
    capsys.readouterr()
    results = {}
    for protocol in ("one_to_one", "original"):
        assert psdet_main(["eval", "-c", "ps_gat_tiny", "--data", str(tiny_lots), "--ckpt", str(run), "--json",
                           "--protocol", protocol, *overrides]) == 0
        results[protocol] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert results[protocol]["protocol"] == protocol
    assert {key for key in results["original"] if key.startswith(("point_", "slot_"))} == {
        f"{kind}_{m}" for kind in ("point", "slot") for m in ("precision", "recall", "ap")}
    with pytest.raises(SystemExit):
        psdet_main(["eval", "-c", "ps_gat_tiny", "--ckpt", str(run), "--protocol", "greedy"])
