"""psdet.data: ps2.0 labels and layout, the dataset's samples and augmentation, the synthetic generator."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from psdet.config import DataConfig
from psdet.data import synth
from psdet.data.dataset import ParkingSlotDataset, build_dataset, load_image, normalised_marks
from psdet.data.labels import list_samples, read_label
from psdet.data.batch import collate_fn, color_jitter, model_input
from psdet.data.transforms import rotate_marks, sample_jitter
from psdet.errors import DataError
from psdet.testing.reference_augment import color_jitter as reference_color_jitter

SIZE = 256  # network input in these tests: the tiny config's 8x8 grid


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, 24, 4, seed=11, progress=False)
    return root


def _dataset(root: Path, split: str = "training", **overrides) -> ParkingSlotDataset:
    options = dict(image_size=SIZE, max_points=10, train=True, color_jitter=0.0, rotate=False, seed=0)
    options.update(overrides)
    return ParkingSlotDataset(root, split, **options)


def _write_sample(root: Path, name: str, label, image: np.ndarray | None = None, split: str = "training") -> Path:
    """A label (mapping or raw text) and, unless `image` is False, a 600x600 JPEG beside it."""
    label_dir, image_dir = root / "ps_json_label" / split, root / split
    label_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    label_path = label_dir / f"{name}.json"
    label_path.write_text(label if isinstance(label, str) else json.dumps(label))
    if image is not False:
        pixels = np.full((600, 600, 3), 90, np.uint8) if image is None else image
        Image.fromarray(pixels).save(image_dir / f"{name}.jpg", quality=95, subsampling=0)
    return label_path


# ----------------------------------------------------------------------------- labels


def test_labels_accept_lists_a_flat_single_mark_empty_and_flat_slots(tmp_path):
    two_marks = [[100.5, 200.5, 100.5, 250.5, 0], [260.5, 200.5, 210.5, 200.5, 1]]
    lists = read_label(_write_sample(tmp_path, "lists", {"marks": two_marks, "slots": [[2, 1, 1, 90]]}))
    assert lists.marks.shape == (2, 5) and lists.slots.shape == (1, 4)
    assert lists.entrance_pairs.tolist() == [[1, 0]] and lists.name == "lists"

    flat_mark = read_label(_write_sample(tmp_path, "flat", {"marks": two_marks[0], "slots": []}))
    assert flat_mark.marks.tolist() == [two_marks[0]] and flat_mark.slots.shape == (0, 4)

    flat_slot = read_label(_write_sample(tmp_path, "flatslot", {"marks": two_marks, "slots": [1, 2, 3, 120.0]}))
    assert flat_slot.slots.tolist() == [[1, 2, 3, 120.0]]

    empty = read_label(_write_sample(tmp_path, "empty", {"marks": [], "slots": []}))
    assert empty.num_marks == 0 and empty.entrance_pairs.shape == (0, 2)


MARK = [100.5, 200.5, 100.5, 250.5, 0]


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"marks": [[1, 2, 3, 4, 0]], "slots": [', "unreadable JSON"),
        (json.dumps([MARK]), "mapping"),
        (json.dumps({"marks": [MARK]}), "missing key(s) 'slots'"),
        (json.dumps({"marks": [MARK], "slots": [], "extra": 1}), "unknown key(s) 'extra'"),
        (json.dumps({"marks": [[1, 2, 3, 4]], "slots": []}), "'marks'[0] must be [x1, y1, x2, y2, shape]"),
        (json.dumps({"marks": [MARK[:3]], "slots": []}), "'marks'[0] must be"),
        (json.dumps({"marks": [[1, 2, "a", 4, 0]], "slots": []}), "'marks'[0] must be"),
        (json.dumps({"marks": {"a": 1}, "slots": []}), "'marks' must be a list"),
        (json.dumps({"marks": [[1, 2, 3, 4, 2]], "slots": []}), "expected 0 (T) or 1 (L)"),
        (json.dumps({"marks": [MARK, MARK], "slots": [[1, 3, 1, 90]]}), "outside 1..2"),
        (json.dumps({"marks": [MARK, MARK], "slots": [[0, 1, 1, 90]]}), "outside 1..2"),
        (json.dumps({"marks": [MARK, MARK], "slots": [1, 2, 1]}), "'slots' must be [p1, p2, type, angle]"),
        (json.dumps({"marks": [MARK, MARK], "slots": [[1, 1, 1, 90]]}), "to itself"),
        (json.dumps({"marks": [MARK] * 4, "slots": []}), "more than data.max_points = 3"),
    ],
)
def test_each_label_problem_is_a_one_line_data_error_naming_the_file(tmp_path, text, why):
    path = _write_sample(tmp_path, "broken", text)
    with pytest.raises(DataError) as info:
        read_label(path, max_points=3)
    message = str(info.value)
    assert str(path) in message and why in message and "\n" not in message


def test_layout_errors_name_the_path_and_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: dataset root does not exist; expected the ps2.0 layout"):
        list_samples(tmp_path / "nowhere", "training")
    _write_sample(tmp_path, "a", {"marks": [], "slots": []})
    with pytest.raises(DataError, match=r"ps_json_label/testing/all: split directory .* ROOT/ps_json_label/SPLIT"):
        list_samples(tmp_path, "testing/all")
    orphan = _write_sample(tmp_path, "orphan", {"marks": [], "slots": []}, image=False)
    expected = rf"{re.escape(str(orphan))}: no image for this label \(expected .*training/orphan.jpg\)"
    with pytest.raises(DataError, match=expected):
        build_dataset(DataConfig(root=str(tmp_path)), "training", train=False, seed=0)


def test_a_broken_label_fails_when_the_dataset_is_built(tmp_path):
    path = _write_sample(tmp_path, "many", {"marks": [MARK] * 11, "slots": []})
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: 11 marks, more than data.max_points = 10"):
        _dataset(tmp_path)


# ----------------------------------------------------------------------------- generator


def test_synth_writes_the_ps20_layout_deterministically(tmp_path):
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    summary = synth.generate(first, 4, 2, seed=5, progress=False)
    parallel = synth.generate(again, 4, 2, seed=5, progress=False, workers=2)  # same files from 2 processes
    synth.generate(other, 4, 2, seed=6, progress=False)
    assert (summary["train"], summary["val"]) == (4, 2)
    assert (parallel["marks"], parallel["slots"]) == (summary["marks"], summary["slots"])

    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    expected = [Path("ps_json_label/testing/all") / f"test_{i:06d}.json" for i in range(2)]
    expected += [Path("ps_json_label/training") / f"train_{i:06d}.json" for i in range(4)]
    expected += [Path("testing/all") / f"test_{i:06d}.jpg" for i in range(2)]
    expected += [Path("training") / f"train_{i:06d}.jpg" for i in range(4)]
    assert files == sorted(expected)
    for relative in files:
        assert (first / relative).read_bytes() == (again / relative).read_bytes(), relative
    labels = [p for p in files if p.suffix == ".json"]
    assert any((first / p).read_bytes() != (other / p).read_bytes() for p in labels)
    for relative in files:
        if relative.suffix == ".jpg":
            with Image.open(first / relative) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (600, 600))


def test_synth_refuses_to_mix_with_another_dataset(tmp_path):
    _write_sample(tmp_path, "someone_elses", {"marks": [], "slots": []})
    with pytest.raises(DataError, match=r"ps_json_label/training: already holds 1 label"):
        synth.generate(tmp_path, 2, 1, seed=0, progress=False)


def test_synth_labels_follow_the_ps20_conventions(synth_root):
    """Marks well inside and apart; slot p1 -> p2 has the slot on its left (on screen);
    p1's direction is the separator at the slot's angle; an L at p2 points back to p1."""
    counts = []
    for sample in list_samples(synth_root, "training") + list_samples(synth_root, "testing/all"):
        label = read_label(sample.label_path, max_points=10)
        xy = label.marks[:, :2] - 0.5
        direction = label.marks[:, 2:4] - label.marks[:, :2]
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        assert np.all((xy >= 30) & (xy <= 570))
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
        assert gaps.min(initial=1e9) >= 50
        for grid in (8, 16):  # one mark per target cell at the tiny (256 px) and full (512 px) inputs
            cells = {(int(x * grid / 600), int(y * grid / 600)) for x, y in xy}
            assert len(cells) == len(xy)
        for p1, p2, slot_type, angle in label.slots:
            i, j = int(p1) - 1, int(p2) - 1
            entrance = (xy[j] - xy[i]) / np.linalg.norm(xy[j] - xy[i])
            left_on_screen = np.array([entrance[1], -entrance[0]])
            assert direction[i] @ left_on_screen > 0.7
            separator_angle = math.degrees(math.acos(np.clip(direction[i] @ entrance, -1, 1)))
            assert separator_angle == pytest.approx(angle, abs=0.5)
            assert slot_type == (1 if angle == 90 else 2 if angle < 90 else 3)
            if label.marks[j, 4] == 1:
                assert direction[j] @ -entrance > 0.99
        counts.append((label.num_marks, len(label.slots)))
    assert min(c[0] for c in counts) == 0 and max(c[0] for c in counts) >= 4
    assert max(c[1] for c in counts) >= 3


def test_synth_import_does_no_torch_work():
    code = "import sys, psdet.data.synth, psdet.data.labels; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- dataset


def test_samples_follow_the_batch_contract(synth_root):
    dataset = build_dataset(DataConfig(root=str(synth_root), image_size=SIZE), "training", train=True, seed=0)
    assert len(dataset) == 24
    for index in range(len(dataset)):
        sample, label = dataset[index], dataset.labels[index]
        assert set(sample) == {"image", "jitter", "marks", "num_marks", "slot_adjacency", "name"}
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, SIZE, SIZE)
        assert sample["jitter"].dtype == torch.float32 and sample["jitter"].shape == (8,)
        assert sorted(sample["jitter"][4:].tolist()) == [0, 1, 2, 3]
        assert sample["marks"].dtype == torch.float32 and sample["marks"].shape == (10, 4)
        assert sample["num_marks"].dtype == torch.int64 and int(sample["num_marks"]) == label.num_marks
        n = label.num_marks
        assert torch.all(sample["marks"][n:] == 0)
        assert torch.all((sample["marks"][:n, :2] > 0) & (sample["marks"][:n, :2] < 1))
        assert torch.equal(sample["marks"][:n, 3], torch.tensor(label.marks[:, 4], dtype=torch.float32))
        expected = torch.zeros(10, 10, dtype=torch.bool)
        for p1, p2, _, _ in label.slots:
            expected[int(p1) - 1, int(p2) - 1] = True
        assert sample["slot_adjacency"].dtype == torch.bool and torch.equal(sample["slot_adjacency"], expected)
        assert sample["name"] == label.name == f"train_{index:06d}"
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["marks"].shape == (4, 10, 4)
    pixels = model_input(batch["image"], batch["jitter"])
    assert pixels.dtype == torch.float32 and pixels.shape == (4, 3, SIZE, SIZE)
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert set(_dataset(synth_root, "testing/all", train=False, color_jitter=0.5)[0]) == {
        "image", "marks", "num_marks", "slot_adjacency", "name"}  # no jitter out of training
    assert batch["num_marks"].shape == (4,) and batch["slot_adjacency"].shape == (4, 10, 10)
    assert batch["name"] == [f"train_{i:06d}" for i in range(4)]


def test_marks_are_normalised_with_the_ps20_pixel_convention(tmp_path):
    label = {"marks": [[300.5, 150.5, 300.5, 100.5, 1], [0.5, 600.5, 10.5, 610.5, 0]], "slots": [[1, 2, 1, 90]]}
    _write_sample(tmp_path, "one", label)
    marks = _dataset(tmp_path, train=False)[0]["marks"]
    expected = [[0.5, 0.25, -math.pi / 2, 1], [0.0, 1.0, math.pi / 4, 0]]
    assert torch.allclose(marks[:2], torch.tensor(expected), atol=1e-6)


def test_validation_samples_are_never_augmented(synth_root):
    dataset = _dataset(synth_root, "testing/all", train=False, color_jitter=0.5, rotate=True)
    first = [dataset[i] for i in range(len(dataset))]
    dataset.set_epoch(3)
    for index, sample in enumerate(first):
        again = dataset[index]
        image, size = load_image(dataset.files[index].image_path, SIZE)
        assert torch.equal(model_input(sample["image"]), image) and torch.equal(again["image"], sample["image"])
        marks = torch.tensor(normalised_marks(dataset.labels[index], *size), dtype=torch.float32)
        assert torch.equal(sample["marks"][: len(marks)], marks) and torch.equal(again["marks"], sample["marks"])


def test_rotation_moves_image_and_marks_together(tmp_path):
    """A red disc on the mark and a green one on its direction point: after rotation the
    red centroid is at the rotated mark and red -> green points along its direction."""
    image = np.zeros((600, 600, 3), np.uint8)
    rows, cols = np.mgrid[0:600, 0:600] + 0.5
    point, tip = np.array([150.0, 120.0]), np.array([150.0 + 48, 120.0 + 36])
    image[(cols - point[0]) ** 2 + (rows - point[1]) ** 2 < 12**2] = (255, 0, 0)
    image[(cols - tip[0]) ** 2 + (rows - tip[1]) ** 2 < 12**2] = (0, 255, 0)
    far = [520.5, 530.5, 520.5, 580.5, 1]  # a second mark near the opposite corner limits the angles
    _write_sample(tmp_path, "discs", {"marks": [[*(point + 0.5), *(tip + 0.5), 0], far], "slots": []}, image)
    dataset = _dataset(tmp_path, rotate=True)
    centres = np.arange(SIZE) + 0.5
    angles = []
    for epoch in range(12):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        pixels, marks = model_input(sample["image"]).numpy(), sample["marks"].numpy()
        assert np.all((marks[:2, :2] >= 0.05) & (marks[:2, :2] <= 0.95))
        red = np.clip(pixels[0] - pixels[1], 0, None)
        green = np.clip(pixels[1] - pixels[0], 0, None)
        red_xy = np.array([(red * centres[None]).sum(), (red * centres[:, None]).sum()]) / red.sum()
        green_xy = np.array([(green * centres[None]).sum(), (green * centres[:, None]).sum()]) / green.sum()
        assert red_xy == pytest.approx(marks[0, :2] * SIZE, abs=1.0)
        seen = math.atan2(green_xy[1] - red_xy[1], green_xy[0] - red_xy[0])
        assert abs(math.remainder(seen - marks[0, 2], 2 * math.pi)) < math.radians(3)
        angles.append(math.degrees(math.atan2(36, 48)) - math.degrees(marks[0, 2]))
    assert len({round(a) for a in angles}) >= 6  # really rotated, by different angles


def test_rotation_keeps_synthetic_marks_on_paint(synth_root):
    dataset = _dataset(synth_root, rotate=True)
    rotated = 0
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            n = int(sample["num_marks"])
            marks = sample["marks"][:n].numpy()
            original = normalised_marks(dataset.labels[index], 600, 600)
            rotated += int(n > 0 and not np.allclose(marks[:, :2], original[:, :2], atol=1e-4))
            assert np.all((marks[:, :2] >= 0.05) & (marks[:, :2] <= 0.95))
            luminance = model_input(sample["image"]).numpy().mean(0)
            for x, y in marks[:, :2] * SIZE:
                col, row = int(x), int(y)
                window = luminance[max(0, row - 10) : row + 11, max(0, col - 10) : col + 11]
                assert luminance[row, col] - np.median(window) > 0.06, (sample["name"], epoch)
    assert rotated >= len(dataset)  # most samples were actually rotated


def test_rotate_marks_matches_a_per_mark_reference():
    rng = np.random.default_rng(0)
    marks = np.column_stack([rng.uniform(0.1, 0.9, (7, 2)), rng.uniform(-math.pi, math.pi, 7), rng.integers(0, 2, 7)])
    for angle in (0.0, 17.0, -95.0, 180.0):
        theta = math.radians(angle)
        expected = []
        for x, y, direction, shape in marks:  # the original ps2.0 rotate_vector, one mark at a time
            dx, dy = x - 0.5, y - 0.5
            tip_x, tip_y = dx + math.cos(direction), dy + math.sin(direction)
            cos, sin = math.cos(theta), math.sin(theta)
            rx, ry = dx * cos + dy * sin, -dx * sin + dy * cos
            tx, ty = tip_x * cos + tip_y * sin, -tip_x * sin + tip_y * cos
            expected.append([rx + 0.5, ry + 0.5, math.atan2(ty - ry, tx - rx), shape])
        got = rotate_marks(marks, angle)
        assert np.allclose(got[:, [0, 1, 3]], np.array(expected)[:, [0, 1, 3]])
        assert np.allclose(np.cos(got[:, 2] - np.array(expected)[:, 2]), 1.0)


def test_jitter_parameters_are_seeded_and_bounded():
    draws = np.stack([sample_jitter(np.random.default_rng(seed), 0.4) for seed in range(200)])
    assert draws.dtype == np.float32 and draws.shape == (200, 8)
    assert np.all((draws[:, :3] >= 0.6) & (draws[:, :3] <= 1.4)) and np.all(np.abs(draws[:, 3]) <= 0.4)
    assert all(sorted(order) == [0, 1, 2, 3] for order in draws[:, 4:].tolist())
    assert len({tuple(order) for order in draws[:, 4:].tolist()}) == 24  # every order occurs
    assert np.array_equal(draws[7], sample_jitter(np.random.default_rng(7), 0.4))
    assert np.all(np.abs(sample_jitter(np.random.default_rng(0), 3.0)[3]) <= 0.5)  # hue: half a turn at most
    # always the same number of draws, so what follows in the generator does not depend on strength
    rngs = [np.random.default_rng(5), np.random.default_rng(5)]
    sample_jitter(rngs[0], 0.0), sample_jitter(rngs[1], 0.9)
    assert rngs[0].random() == rngs[1].random()


def test_batched_color_jitter_matches_the_per_image_reference():
    generator = np.random.default_rng(0)
    images = generator.uniform(0, 1, (24, 3, 20, 28)).astype(np.float32)
    images[3] = 0.5  # a gray image: hue and saturation leave it alone
    params = np.stack([sample_jitter(generator, 0.6) for _ in range(24)])
    params[5, :4] = [1.9, 0.2, 1.7, 0.45]  # clamping at every step matters with strong factors
    got = color_jitter(torch.from_numpy(images), torch.from_numpy(params)).numpy()
    assert got.dtype == np.float32 and got.shape == images.shape
    for index in range(len(images)):
        expected = reference_color_jitter(images[index], params[index])
        np.testing.assert_allclose(got[index], expected, atol=2e-5, err_msg=f"image {index}, params {params[index]}")
    assert 0.0 <= got.min() and got.max() <= 1.0 and np.abs(got - images).mean() > 0.01
    identity = np.tile(np.array([1, 1, 1, 0, 3, 1, 0, 2], np.float32), (24, 1))
    np.testing.assert_allclose(color_jitter(torch.from_numpy(images), torch.from_numpy(identity)).numpy(),
                               images, atol=2e-6)


def test_model_input_scales_jitters_and_lays_out():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))
    plain = model_input(image)
    assert plain.dtype == torch.float32 and torch.equal(plain, image.float() / 255.0)
    params = torch.from_numpy(np.stack([sample_jitter(np.random.default_rng(s), 0.3) for s in (2, 3)]))
    jittered = model_input(image, params, channels_last=True)
    assert jittered.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(jittered, color_jitter(plain, params))


def test_jitter_in_the_workers_equals_jitter_on_the_device(synth_root):
    """The two places the engine makes the model input (CPU: the workers' collate; CUDA: after the copy)."""
    dataset = _dataset(synth_root, color_jitter=0.3, rotate=True, seed=2)
    in_workers = next(iter(DataLoader(dataset, batch_size=6, num_workers=2, collate_fn=collate_fn(torch.device("cpu")))))
    raw = next(iter(DataLoader(dataset, batch_size=6, collate_fn=collate_fn(torch.device("cuda")))))
    assert raw["image"].dtype == torch.uint8 and raw["jitter"].shape == (6, 8) and "jitter" not in in_workers
    on_device = model_input(raw["image"], raw["jitter"])
    assert in_workers["image"].dtype == torch.float32
    torch.testing.assert_close(in_workers["image"], on_device, atol=1e-6, rtol=0)
    assert torch.equal(in_workers["marks"], raw["marks"]) and in_workers["name"] == raw["name"]
    with pytest.raises(ValueError, match="already"):
        model_input(in_workers["image"], raw["jitter"])


def test_augmentation_is_a_function_of_seed_epoch_and_index(synth_root):
    make = lambda seed: _dataset(synth_root, color_jitter=0.1, rotate=True, seed=seed)  # noqa: E731
    first, twin, other_seed = make(3), make(3), make(4)
    plain = _dataset(synth_root, train=False)
    for index in (0, 5):
        a, b = first[index], twin[index]
        assert all(torch.equal(a[key], b[key]) for key in ("image", "jitter", "marks"))
        assert not torch.equal(a["image"], plain[index]["image"])
        assert not torch.equal(a["image"], other_seed[index]["image"])
        assert not torch.equal(a["jitter"], other_seed[index]["jitter"])
    before = first[5]
    first.set_epoch(1)
    after = first[5]
    assert not torch.equal(before["image"], after["image"]) and not torch.equal(before["jitter"], after["jitter"])
    assert not torch.equal(before["marks"], after["marks"])
    twin.set_epoch(1)
    assert all(torch.equal(after[key], twin[5][key]) for key in ("image", "jitter", "marks"))


def test_dataloader_workers_do_not_change_samples(synth_root):
    dataset = _dataset(synth_root, color_jitter=0.1, rotate=True, seed=9)
    dataset.set_epoch(2)
    serial = list(DataLoader(dataset, batch_size=4, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=4, num_workers=2))
    for one, two in zip(serial, parallel, strict=True):
        assert all(torch.equal(one[key], two[key]) for key in ("image", "jitter", "marks"))


def test_image_cache_gives_the_same_samples(synth_root):
    cached = _dataset(synth_root, color_jitter=0.1, rotate=True, cache_images=True)
    uncached = _dataset(synth_root, color_jitter=0.1, rotate=True)
    for _ in range(2):  # the second pass reads the cache
        for index in (0, 1):
            assert torch.equal(cached[index]["image"], uncached[index]["image"])
            assert torch.equal(cached[index]["jitter"], uncached[index]["jitter"])
