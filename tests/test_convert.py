"""`psdet convert`: original gcn-parking-slot checkpoints -> psdet checkpoints.

The original-layout state dicts here come from skeleton modules written after the
original's module tree (PointDetectorBase > PointDetector > YetAnotherDarknet / VGG /
ResNet, point_predictor, descriptor_map, GCNEncoder, EdgePredictor; DirectionalPointDetector
for DMPR): its names and shapes, independent of psdet's mapping table. The converted
model's outputs must equal those of the same tensors copied into psdet in order.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from psdet import convert
from psdet.cli import main
from psdet.config import load_config
from psdet.data.synth import generate
from psdet.errors import CheckpointError
from psdet.models import build_model

# ----------------------------------------------------------------------------- the original's module tree


def squeeze_expand(c: int) -> list[nn.Module]:  # its define_detector_block
    return [nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.1),
            nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.1)]


def halve(c: int) -> list[nn.Module]:  # its define_halve_unit
    return [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.1)]


class YetAnotherDarknet(nn.Module):
    def __init__(self, df: int):
        super().__init__()
        layers = [nn.Conv2d(3, df, 3, padding=1, bias=False), nn.BatchNorm2d(df), nn.LeakyReLU(0.1)]
        for blocks in (1, 1, 2, 2, 1):
            layers += halve(df)
            for _ in range(blocks):
                layers += squeeze_expand(df)
            df *= 2
        self.model = nn.Sequential(*layers)


class OriginalVGG(nn.Module):
    """torchvision-style VGG16 'D' with 1024 last conv, and the classifier it never runs
    (on the meta device: its 120M parameters are never allocated). The original's widths
    are fixed (df 32); a smaller df scales them as psdet does, to keep tests light."""

    def __init__(self, df: int = 32):
        super().__init__()
        layers, cin = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 1024, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v * df // 32, 3, padding=1), nn.ReLU(True)]
                cin = v * df // 32
        self.features = nn.Sequential(*layers)
        with torch.device("meta"):
            self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))


class BasicBlock(nn.Module):
    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(True)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = downsample


class OriginalResNet18(nn.Module):
    """Its ResNet18: layer4 widened to 1024 planes; widths scaled by df / 32 as OriginalVGG."""

    def __init__(self, df: int = 32):
        super().__init__()
        self.inplanes = 64 * df // 32
        self.conv1, self.bn1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False), nn.BatchNorm2d(self.inplanes)
        self.relu, self.maxpool = nn.ReLU(True), nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64 * df // 32, 1)
        self.layer2 = self._make_layer(128 * df // 32, 2)
        self.layer3 = self._make_layer(256 * df // 32, 2)
        self.layer4 = self._make_layer(1024 * df // 32, 2)

    def _make_layer(self, planes, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*blocks)


def mlp(channels, dropout=False):  # its gcn.MLP
    layers = []
    for i in range(1, len(channels)):
        layers.append(nn.Conv1d(channels[i - 1], channels[i], 1, bias=True))
        if i < len(channels) - 1:
            layers += [nn.BatchNorm1d(channels[i]), nn.ReLU()] + ([nn.Dropout(0.5)] if dropout else [])
    return nn.Sequential(*layers)


class PointEncoder(nn.Module):
    def __init__(self, dim, layers):
        super().__init__()
        self.encoder = mlp([2, *layers, dim])


class MultiHeadedAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.merge = nn.Conv1d(dim, dim, 1)
        self.proj = nn.ModuleList([nn.Conv1d(dim, dim, 1) for _ in range(3)])


class AttentionalPropagation(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = MultiHeadedAttention(dim)
        self.mlp = mlp([2 * dim, 2 * dim, dim])


class AttentionalGNN(nn.Module):
    def __init__(self, dim, num_layers):
        super().__init__()
        self.layers = nn.ModuleList([AttentionalPropagation(dim) for _ in range(num_layers)])


class OriginalDGCNN(nn.Module):
    """Each BatchNorm registered twice, as bnN and inside convN, as the original does."""

    def __init__(self, dim):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(dim), nn.BatchNorm2d(dim), nn.BatchNorm2d(dim)
        self.bn4 = nn.BatchNorm1d(dim)
        self.conv1 = nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), self.bn1, nn.LeakyReLU(0.2))
        self.conv2 = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), self.bn2, nn.LeakyReLU(0.2))
        self.conv3 = nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), self.bn3, nn.LeakyReLU(0.2))
        self.conv4 = nn.Sequential(nn.Conv1d(3 * dim, dim, 1, bias=False), self.bn4, nn.LeakyReLU(0.2))


class GCNEncoder(nn.Module):
    def __init__(self, graph, dim, layers, proj_dim):
        super().__init__()
        self.point_encoder = PointEncoder(dim, layers)
        self.gnn = AttentionalGNN(dim, 3) if graph == "gat" else OriginalDGCNN(dim)
        self.proj = nn.Conv1d(dim, proj_dim, 1, bias=True)


class EdgePredictor(nn.Module):
    def __init__(self, input_dim, layers):
        super().__init__()
        self.encoder = mlp([input_dim, *layers, 1], dropout=True)


class PointDetector(nn.Module):
    def __init__(self, backbone, df, graph, descriptor_dim, point_layers, proj_dim, edge_layers):
        super().__init__()
        self.feature_extractor = {"darknet": YetAnotherDarknet, "vgg16": OriginalVGG,
                                  "resnet18": OriginalResNet18}[backbone](df)
        self.point_predictor = nn.Sequential(*squeeze_expand(16 * df), *squeeze_expand(16 * df),
                                             nn.Conv2d(32 * df, 3, 1, bias=False))
        self.descriptor_map = nn.Sequential(*squeeze_expand(16 * df), *squeeze_expand(16 * df),
                                            nn.Conv2d(32 * df, descriptor_dim, 1, bias=False))
        self.graph_encoder = GCNEncoder(graph, descriptor_dim, point_layers, proj_dim)
        self.edge_predictor = EdgePredictor(2 * proj_dim, edge_layers)


class DirectionalPointDetector(nn.Module):
    def __init__(self, df):
        super().__init__()
        self.feature_extractor = YetAnotherDarknet(df)
        self.predict = nn.Sequential(*squeeze_expand(16 * df), *squeeze_expand(16 * df),
                                     nn.Conv2d(32 * df, 6, 1, bias=False))


class PointDetectorBase(nn.Module):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.register_buffer("global_step", torch.LongTensor(1).zero_())
        self.model = network


def random_state(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state dict with random values (positive running variances); meta
    tensors (the VGG classifier) become uninitialised tensors of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if value.is_meta:
            state[key] = torch.empty(value.shape)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        else:
            state[key] = torch.full_like(value, 7)
    for index in range(1, 5):  # the DGCNN aliases are the same tensors as their twins
        for key in list(state):
            twin = f"model.graph_encoder.gnn.conv{index}.1."
            if key.startswith(twin):
                alias = f"model.graph_encoder.gnn.bn{index}." + key[len(twin):]
                if alias in state:
                    state[alias] = state[key]
    return state


# (name, psdet config overrides, original network)
SMALL_GAT = dict(descriptor_dim=16, point_layers=[8, 12], proj_dim=8, edge_layers=[16, 8])
CASES = {
    "darknet_gat": (["model.backbone=darknet", "model.depth_factor=2"], "darknet", 2, "gat"),
    "darknet_dgcnn": (["model.backbone=darknet", "model.depth_factor=2", "model.graph.type=dgcnn"], "darknet", 2, "dgcnn"),
    "vgg16_gat": (["model.backbone=vgg16", "model.depth_factor=4"], "vgg16", 4, "gat"),
    "resnet18_dgcnn": (["model.backbone=resnet18", "model.depth_factor=4", "model.graph.type=dgcnn"], "resnet18", 4, "dgcnn"),
}
SMALL = ["model.descriptor_dim=16", "model.graph.point_encoder_layers=[8, 12]", "model.graph.proj_dim=8",
         "model.edge_layers=[16, 8]", "data.image_size=64"]


def original_gat(backbone, df, graph) -> PointDetectorBase:
    return PointDetectorBase(PointDetector(backbone, df, graph, **SMALL_GAT))


def positional_copy(model: nn.Module, original_state: dict[str, torch.Tensor]) -> None:
    """The same tensors copied into psdet in registration order, skipping what psdet lacks."""
    skipped = ("global_step", ".classifier.", "gnn.bn1.", "gnn.bn2.", "gnn.bn3.", "gnn.bn4.")
    tensors = [v for k, v in original_state.items() if not any(s in k for s in skipped)]
    target = model.state_dict()
    assert len(tensors) == len(target)
    model.load_state_dict(dict(zip(target, tensors)))


def outputs_of(model: nn.Module, images: torch.Tensor, marks: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(images, marks)


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_gat_equals_a_positional_copy(case):
    overrides, backbone, df, graph = CASES[case]
    original_state = random_state(original_gat(backbone, df, graph), seed=len(case))
    architecture = convert.detect_architecture(original_state, case)
    assert architecture["model.backbone"] == backbone and architecture["model.depth_factor"] == df
    assert architecture["model.graph.type"] == graph and architecture["model.descriptor_dim"] == 16
    assert architecture["model.edge_layers"] == [16, 8] and architecture["model.graph.point_encoder_layers"] == [8, 12]
    cfg = load_config("ps_gat", [*SMALL, *overrides])
    converted, copied = (build_model(cfg.model, cfg.data.max_points) for _ in range(2))
    converted.load_state_dict(convert.convert_model_state(original_state, converted, backbone=backbone,
                                                          detector="gat", source=case))
    positional_copy(copied, original_state)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    marks = torch.rand(2, 10, 4, generator=torch.Generator().manual_seed(2))
    ours, reference = outputs_of(converted, images, marks), outputs_of(copied, images, marks)
    for key in ("point_map", "descriptor_map", "edge_logits"):
        assert torch.equal(ours[key], reference[key]), key
    for key, value in converted.state_dict().items():  # every tensor came across, bit for bit
        assert torch.equal(value, copied.state_dict()[key]), key


def test_converted_dmpr_equals_a_positional_copy():
    original_state = random_state(PointDetectorBase(DirectionalPointDetector(2)), seed=3)
    assert convert.detect_architecture(original_state, "dmpr") == {
        "model.detector": "dmpr", "model.depth_factor": 2, "model.backbone": "darknet"}
    cfg = load_config("ps_dmpr", ["data.image_size=64", "model.depth_factor=2"])
    converted, copied = (build_model(cfg.model, cfg.data.max_points) for _ in range(2))
    converted.load_state_dict(convert.convert_model_state(original_state, converted, backbone="darknet",
                                                          detector="dmpr", source="dmpr"))
    positional_copy(copied, original_state)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(outputs_of(converted, images, None)["point_map"], outputs_of(copied, images, None)["point_map"])


def test_every_original_key_is_accounted_for():
    # ps_gat's full-size VGG16 + GAT (built on the meta device: names and shapes only):
    # 161 tensors reach psdet, each from its own original key, with the original's shape;
    # global_step and the six classifier tensors are the only original keys left behind.
    with torch.device("meta"):
        original_state = PointDetectorBase(PointDetector("vgg16", 32, "gat", 128, [32, 64], 64, [256, 128])).state_dict()
        target = build_model(load_config("ps_gat").model, 10).state_dict()
    mapping = convert.original_key_map(list(target), "vgg16", "gat")
    assert len(mapping) == len(set(mapping.values())) == len(target) == 161
    assert set(original_state) - set(mapping.values()) == {"global_step", *convert.VGG_CLASSIFIER}
    assert all(original_state[original].shape == target[key].shape for key, original in mapping.items())


def test_missing_unknown_and_misshapen_keys_are_named():
    original_state = random_state(original_gat("darknet", 2, "gat"), seed=0)
    cfg = load_config("ps_gat", [*SMALL, *CASES["darknet_gat"][0]])
    model = build_model(cfg.model, cfg.data.max_points)
    broken = dict(original_state)
    del broken["model.edge_predictor.encoder.0.weight"]
    broken["model.slant_predictor.encoder.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        convert.convert_model_state(broken, model, backbone="darknet", detector="gat", source="ckpt.pth")
    message = str(error.value)
    assert "1 missing key(s): model.edge_predictor.encoder.0.weight" in message
    assert "1 unknown key(s): model.slant_predictor.encoder.0.weight" in message and "\n" not in message
    wrong = dict(original_state, **{"model.graph_encoder.proj.bias": torch.zeros(9)})
    with pytest.raises(CheckpointError, match=r"model.graph_encoder.proj.bias \(9,\)"):
        convert.convert_model_state(wrong, model, backbone="darknet", detector="gat", source="ckpt.pth")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def lots(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lots")
    generate(root, 4, 2, seed=4, progress=False)
    return root


def save_original(path: Path, state: dict) -> Path:
    torch.save({"epoch": 6, "it": 60, "model_state": state, "optimizer_state": None, "version": "none"}, path)
    return path


def test_convert_then_eval_predict_and_train_init(lots, tmp_path, capsys):
    original = save_original(tmp_path / "checkpoint_epoch_6.pth",
                             random_state(original_gat("darknet", 2, "dgcnn"), seed=5))
    out = tmp_path / "converted"
    assert main(["convert", str(original), str(out), "-o", "data.image_size=64", "-o", "data.num_workers=0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"]["model.graph.type"] == "dgcnn" and summary["epoch"] == 6
    config = str(out / "config.yaml")
    assert main(["eval", "-c", config, "--data", str(lots), "--ckpt", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    image = sorted((lots / "testing" / "all").glob("*.jpg"))[0]
    assert main(["predict", "--ckpt", str(out), str(image), "--min-score", "0"]) == 0
    assert "slots" in json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    assert main(["train", "-c", config, "--data", str(lots), "--out", str(run), "--init", str(out),
                 "-o", "data.batch_size=2", "-o", "train.epochs=1", "-o", "train.progress=false",
                 "-o", "data.num_workers=0"]) == 0
    assert "train.init_from" in (run / "train.log").read_text()
    capsys.readouterr()
    # an existing OUT is refused, and --init with a checkpoint of another architecture too
    assert main(["convert", str(original), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", "-c", "ps_gat_tiny", "--data", str(lots), "--out", str(tmp_path / "x"),
                 "--init", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit config 'ps_gat_tiny'" in err


@pytest.mark.parametrize("payload, needle", [
    ("not a checkpoint", "cannot load"),
    ({"model": {}}, "no 'model_state'"),
    ({"model_state": {"model.encoder.weight": torch.zeros(1)}}, "neither model.point_predictor"),
])
def test_convert_rejects_what_is_not_an_original_checkpoint(tmp_path, capsys, payload, needle):
    path = tmp_path / "bad.pth"
    if isinstance(payload, str):
        path.write_text(payload)
    else:
        torch.save(payload, path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_convert_names_unknown_keys_and_exits_2(tmp_path, capsys):
    state = random_state(original_gat("darknet", 2, "gat"), seed=6)
    state["model.vacant_predictor.encoder.0.weight"] = torch.zeros(3)
    original = save_original(tmp_path / "extra.pth", state)
    assert main(["convert", str(original), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key(s): model.vacant_predictor.encoder.0.weight" in err
    assert not (tmp_path / "out").exists()
