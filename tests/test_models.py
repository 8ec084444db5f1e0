"""psdet.models: parameter counts of the original networks, shapes, vectorised targets and
losses against slow reference loops, gradients, and a tiny model that overfits one batch."""
from __future__ import annotations

import pytest
import torch

from psdet.config import load_config
from psdet.models import build_model, count_parameters, describe
from psdet.models.backbones import build_backbone
from psdet.models.graph import DGCNN, MultiHeadAttention, knn_edge_features, pair_features
from psdet.models.heads import sample_descriptors
from psdet.models.targets import edge_loss, point_loss, point_targets
from psdet.testing.reference_loops import (
    edge_loss_loop,
    knn_edge_features_loop,
    multi_head_attention_einsum,
    pair_features_loop,
    point_loss_loop,
    point_targets_loop,
)

TINY = [
    "data.image_size=64",
    "model.depth_factor=2",
    "model.descriptor_dim=16",
    "model.graph.point_encoder_layers=[8, 16]",
    "model.graph.proj_dim=8",
    "model.edge_layers=[16, 8]",
]


def tiny_config(*overrides: str):
    return load_config("ps_gat_tiny", TINY + list(overrides))


def random_batch(batch: int, num_points: int, image_size: int, generator: torch.Generator, num_marks=None) -> dict:
    """A collated batch as psdet.data makes it: zero-padded marks, adjacency among real marks only."""
    if num_marks is None:
        num_marks = torch.randint(0, num_points + 1, (batch,), generator=generator)
    real = torch.arange(num_points) < num_marks.unsqueeze(1)
    marks = torch.cat([
        torch.rand(batch, num_points, 2, generator=generator),
        (torch.rand(batch, num_points, 1, generator=generator) * 2 - 1) * torch.pi,
        torch.randint(0, 2, (batch, num_points, 1), generator=generator).float(),
    ], dim=-1) * real.unsqueeze(-1)
    adjacency = (torch.rand(batch, num_points, num_points, generator=generator) < 0.2)
    adjacency &= real.unsqueeze(2) & real.unsqueeze(1)
    return {
        "image": torch.rand(batch, 3, image_size, image_size, generator=generator),
        "marks": marks,
        "num_marks": num_marks,
        "slot_adjacency": adjacency,
    }


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name, overrides, expected", [
    ("ps_gat", [], 38_773_985),
    ("ps_gat", ["model.backbone=darknet"], 41_508_609),
    ("ps_dmpr", [], 30_307_168),
])
def test_parameter_counts_match_the_original_networks(name, overrides, expected):
    cfg = load_config(name, overrides)
    model = build_model(cfg.model, cfg.data.max_points)
    assert count_parameters(model) == expected
    assert f"{expected:,}" in describe(model)


@pytest.mark.parametrize("backbone", ["vgg16", "darknet", "resnet18", "resnet50"])
def test_every_backbone_gives_a_stride_32_map_of_32_depth_factor_channels(backbone):
    net = build_backbone(backbone, depth_factor=2).eval()
    with torch.no_grad():
        features = net(torch.rand(2, 3, 64, 96))
    assert features.shape == (2, 64, 2, 3)
    assert net.out_channels == 64


@pytest.mark.parametrize("graph", ["gat", "dgcnn"])
@pytest.mark.parametrize("backbone", ["vgg16", "darknet", "resnet18", "resnet50"])
def test_gat_detector_outputs(backbone, graph):
    cfg = tiny_config(f"model.backbone={backbone}", f"model.graph.type={graph}")
    model = build_model(cfg.model, cfg.data.max_points)
    batch = random_batch(2, cfg.data.max_points, 64, torch.Generator().manual_seed(0))
    outputs = model(batch["image"], batch["marks"], batch["num_marks"])
    assert outputs["point_map"].shape == (2, 3, 2, 2)
    assert ((outputs["point_map"] >= 0) & (outputs["point_map"] <= 1)).all()
    assert outputs["descriptor_map"].shape == (2, 16, 2, 2)
    assert outputs["edge_logits"].shape == (2, cfg.data.max_points, cfg.data.max_points)


def test_dmpr_detector_outputs():
    cfg = load_config("ps_dmpr", ["data.image_size=64", "model.depth_factor=2"])
    model = build_model(cfg.model, cfg.data.max_points)
    point_map = model(torch.rand(2, 3, 64, 64))["point_map"]
    assert point_map.shape == (2, 6, 2, 2)
    assert ((point_map[:, :4] >= 0) & (point_map[:, :4] <= 1)).all()
    assert ((point_map[:, 4:] >= -1) & (point_map[:, 4:] <= 1)).all()
    assert (point_map[:, 4:] < 0).any()  # tanh, not sigmoid


def test_gat_detector_needs_marks_in_training():
    cfg = tiny_config()
    model = build_model(cfg.model, cfg.data.max_points)
    with pytest.raises(ValueError, match="marks"):
        model(torch.rand(1, 3, 64, 64))


# ----------------------------------------------------------------------------- graph pieces


def test_pair_features_equal_the_loop():
    features = torch.randn(2, 5, 7)
    pairs = pair_features(features)
    assert pairs.shape == (2, 10, 7, 7)
    torch.testing.assert_close(pairs.flatten(2), pair_features_loop(features), rtol=0, atol=0)


def test_attention_equals_superglue_einsum():
    torch.manual_seed(0)
    attention = MultiHeadAttention(num_heads=4, feature_dim=16)
    for proj in attention.proj:  # break the copy-of-merge init so q, k, v differ
        torch.nn.init.normal_(proj.weight)
    x = torch.randn(3, 16, 6)
    torch.testing.assert_close(attention(x, x, x), multi_head_attention_einsum(attention, x, x, x))


def test_knn_edge_features_equal_the_loop():
    x = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(knn_edge_features(x, 3), knn_edge_features_loop(x, 3))


def test_dgcnn_clamps_k_to_the_number_of_points():
    dgcnn = DGCNN(8, 8, k=10)
    assert dgcnn(torch.randn(2, 8, 3)).shape == (2, 8, 3)


def test_descriptors_at_cell_centres_are_the_normalised_map_values():
    descriptor_map = torch.randn(2, 5, 4, 4)
    rows, cols = torch.tensor([0, 3, 1]), torch.tensor([2, 0, 3])
    points = torch.stack([cols / 3, rows / 3], dim=-1).expand(2, 3, 2)  # align_corners: cell k at k / (W - 1)
    sampled = sample_descriptors(descriptor_map, points)
    expected = torch.nn.functional.normalize(descriptor_map[:, :, rows, cols], dim=1)
    torch.testing.assert_close(sampled, expected)
    torch.testing.assert_close(sampled.norm(dim=1), torch.ones(2, 3))


# ----------------------------------------------------------------------------- targets and losses


def marks_with_collisions(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random marks with every count from 0 to P, a few in a shared cell, one at x = y = 1."""
    batch, num_points = 6, 8
    marks = torch.cat([
        torch.rand(batch, num_points, 2, generator=generator),
        (torch.rand(batch, num_points, 1, generator=generator) * 2 - 1) * torch.pi,
        torch.randint(0, 2, (batch, num_points, 1), generator=generator).float(),
    ], dim=-1)
    marks[1, 3, :2] = marks[1, 1, :2] + 0.01  # same 4x4 cell as mark 1, later: must win
    marks[1, 5, :2] = marks[1, 1, :2] - 0.01
    marks[2, :4, :2] = torch.tensor([0.30, 0.30])
    marks[2, :4, 2:] = torch.tensor([[0.1, 0.0], [0.2, 1.0], [0.3, 0.0], [0.4, 1.0]])
    marks[3, 0, :2] = 1.0  # on the far border: clamped into the last cell
    num_marks = torch.tensor([0, 8, 4, 5, 1, 8])
    return marks, num_marks


@pytest.mark.parametrize("directional", [False, True])
def test_point_targets_equal_the_reference_loop(directional):
    marks, num_marks = marks_with_collisions(torch.Generator().manual_seed(2))
    targets, mask = point_targets(marks, num_marks, 4, 4, directional=directional)
    expected_targets, expected_mask = point_targets_loop(marks, num_marks, 4, 4, directional=directional)
    torch.testing.assert_close(targets, expected_targets)
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=0)
    assert targets[0].abs().sum() == 0 and mask[0, 1:].sum() == 0  # no marks
    if directional:  # four marks in one cell: the last one's shape and direction win
        assert targets[2, 1].sum() == 1.0
        torch.testing.assert_close(targets[2, 4].sum(), torch.tensor(0.4).cos())
    else:
        assert targets[2, 0].sum() == 1.0


def test_point_loss_equals_the_reference():
    marks, num_marks = marks_with_collisions(torch.Generator().manual_seed(3))
    point_map = torch.rand(6, 6, 5, 7)
    targets, mask = point_targets(marks, num_marks, 5, 7, directional=True)
    expected = point_loss_loop(point_map, *point_targets_loop(marks, num_marks, 5, 7, directional=True))
    torch.testing.assert_close(point_loss(point_map, targets, mask), expected)


@pytest.mark.parametrize("num_marks", [[0, 0], [10, 10], [3, 7]])
def test_edge_loss_equals_the_reference(num_marks):
    generator = torch.Generator().manual_seed(4)
    batch = random_batch(2, 10, 32, generator, num_marks=torch.tensor(num_marks))
    logits = torch.randn(2, 10, 10, generator=generator) * 3
    expected = edge_loss_loop(logits, batch["slot_adjacency"], batch["num_marks"])
    torch.testing.assert_close(edge_loss(logits, batch["slot_adjacency"], batch["num_marks"]), expected)


def test_loss_is_weighted_sum_and_backward_gives_finite_grads():
    cfg = tiny_config()
    model = build_model(cfg.model, cfg.data.max_points)
    batch = random_batch(3, cfg.data.max_points, 64, torch.Generator().manual_seed(5))
    total, parts = model.loss(model(batch["image"], batch["marks"], batch["num_marks"]), batch)
    torch.testing.assert_close(total, cfg.model.weight_point * parts["loss_point"]
                               + cfg.model.weight_edge * parts["loss_edge"])
    total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.edge_predictor.encoder[0].weight.grad.abs().sum() > 0
    assert model.graph_encoder.point_encoder[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ps_gat_tiny", "ps_dmpr"])
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    overrides = TINY + ["model.edge_dropout=0"] if name == "ps_gat_tiny" else ["model.depth_factor=2"]
    cfg = load_config(name, overrides)
    model = build_model(cfg.model, cfg.data.max_points)
    batch = random_batch(2, 6, 128, torch.Generator().manual_seed(6), num_marks=torch.tensor([4, 6]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        total, parts = model.loss(model(batch["image"], batch["marks"], batch["num_marks"]), batch)
        total.backward()
        optimizer.step()
        history.append((total.item(), parts["loss_point"].item(), parts["loss_edge"].item()))
    (first_total, first_point, first_edge), (last_total, last_point, last_edge) = history[0], history[-1]
    assert last_total < 0.05 * first_total, history
    assert last_point < 0.05 * first_point, history
    if name == "ps_gat_tiny":
        assert last_edge < 0.7 * first_edge, history


def test_loss_under_bf16_autocast_is_fp32_and_finite():
    cfg = tiny_config()
    model = build_model(cfg.model, cfg.data.max_points)
    batch = random_batch(2, cfg.data.max_points, 64, torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch["image"], batch["marks"], batch["num_marks"])
    assert outputs["edge_logits"].dtype == torch.bfloat16
    total, parts = model.loss(outputs, batch)
    assert total.dtype == parts["loss_edge"].dtype == torch.float32
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- predict


def flat_point_map_model(name: str, *overrides: str):
    """A model whose point map is sigmoid(0) / tanh(0) everywhere: one point per cell centre."""
    cfg = load_config(name, ["data.image_size=128", "model.depth_factor=2", *overrides])
    model = build_model(cfg.model, cfg.data.max_points).eval()
    head = model.point_head if name == "ps_gat_tiny" else model.head
    torch.nn.init.zeros_(head[-1].weight)
    return cfg, model


@pytest.mark.parametrize("edge_bias, slots_per_image", [(5.0, 10 * 9), (-5.0, 0)])
def test_gat_predict_runs_the_graph_on_the_decoded_points(edge_bias, slots_per_image):
    cfg, model = flat_point_map_model("ps_gat_tiny", *TINY[1:])
    torch.nn.init.zeros_(model.edge_predictor.encoder[-1].weight)
    torch.nn.init.constant_(model.edge_predictor.encoder[-1].bias, edge_bias)
    predictions = model.predict(torch.rand(2, 3, 128, 128))
    centres = {(c + 0.5) / 4 for c in range(4)}
    assert len(predictions) == 2
    for prediction in predictions:
        assert prediction.point_xy.shape == (cfg.data.max_points, 2)  # 16 cells, the 10 best kept
        assert set(prediction.point_xy.ravel().round(6)) <= {round(c, 6) for c in centres}
        assert len(prediction.slot_entrances) == slots_per_image
        points = {tuple(p) for p in prediction.point_xy}
        assert all(tuple(s[:2]) in points and tuple(s[2:]) in points for s in prediction.slot_entrances)
        if slots_per_image:  # edge probability times the lower point confidence (sigmoid(0) = 0.5)
            torch.testing.assert_close(torch.from_numpy(prediction.slot_scores),
                                       torch.full((slots_per_image,), 0.5 * torch.tensor(5.0).sigmoid().item(),
                                                  dtype=torch.float64))


@pytest.mark.parametrize("nms_keep, num_points", [("all", 16), ("max_points", 10)])
def test_dmpr_predict_decodes_directional_points(nms_keep, num_points):
    # 16 cells, one point at each centre, 0.25 apart: NMS keeps all 16; ps_dmpr (the
    # original) pairs every survivor, nms_keep max_points only the 10 most confident
    cfg, model = flat_point_map_model("ps_dmpr", f"model.nms_keep={nms_keep}")
    predictions = model.predict(torch.rand(3, 3, 128, 128))
    assert len(predictions) == 3
    for prediction in predictions:
        assert prediction.point_xy.shape == (num_points, 2)
        assert prediction.slot_entrances.shape[1] == 4


def test_predict_refuses_training_mode():
    cfg = tiny_config()
    model = build_model(cfg.model, cfg.data.max_points)
    with pytest.raises(RuntimeError, match="eval"):
        model.predict(torch.rand(1, 3, 64, 64))
