"""Every dataset layout the original reads: json labels, the ps2.0 release's `.mat`
labels and the PSV dataset's; `--data` detects which, and nothing after the reader cares."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from psdet.cli import main
from psdet.config import DataConfig, load_config
from psdet.data import build_dataset
from psdet.data.labels import detect_format, list_samples, read_label
from psdet.data.mat_labels import read_mat_label
from psdet.data.synth import generate
from psdet.errors import DataError

MARK = [100.5, 200.5, 150.5, 200.5, 0]


def write_sample(root: Path, split: str, name: str, marks, slots, *, psv: bool = False, **savemat_args) -> Path:
    """A `.mat` label and a blank 600x600 image in the ps2.0 (or PSV) layout."""
    label_dir = root / "annotations" / split
    image_dir = root / "images" / split if psv else root / split
    label_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    path = label_dir / f"{name}.mat"
    savemat(str(path), {"marks": np.asarray(marks, dtype=np.float64), "slots": np.asarray(slots, dtype=np.float64)},
            **savemat_args)
    Image.new("RGB", (600, 600), (90, 90, 90)).save(image_dir / f"{name}.jpg")
    return path


# ----------------------------------------------------------------------------- the reader


def test_two_column_marks_and_a_flat_single_slot(tmp_path):
    # The releases' own files: marks x, y only; a single slot saved as a flat vector.
    path = write_sample(tmp_path, "training", "a", [[100.5, 200.5], [300.5, 200.5]], [1, 2, 1, 90])
    label = read_mat_label(path)
    assert label.marks.shape == (2, 5) and label.slots.tolist() == [[1, 2, 1, 90]]
    assert label.marks[:, :2].tolist() == [[100.5, 200.5], [300.5, 200.5]]
    assert label.marks[:, 2:4].tolist() == label.marks[:, :2].tolist() and not label.marks[:, 4].any()


@pytest.mark.parametrize("oned_as", ["row", "column"])
def test_a_single_mark_given_as_a_flat_vector_is_one_mark(tmp_path, oned_as):
    # One mark, flat (loadmat gives 1x5 or 5x1): read as one 5-column mark, so its slot
    # [1, 2] is out of range -- not five 1-column marks, nor a shape error.
    path = write_sample(tmp_path, "training", "one", MARK, [[1, 2, 1, 90]], oned_as=oned_as)
    with pytest.raises(DataError, match=r"slots\[0\] = \[1, 2, \.\.\.\] indexes a mark outside 1\.\.1"):
        read_mat_label(path)
    alone = write_sample(tmp_path, "training", "alone", MARK, np.zeros((0, 4)), oned_as=oned_as)
    assert read_mat_label(alone) is None  # no slots: skipped


def test_an_image_without_slots_is_skipped(tmp_path):
    for name, slots in (("empty", np.zeros((0, 4))), ("blank", [])):
        assert read_mat_label(write_sample(tmp_path, "training", name, [MARK, MARK], slots)) is None
    write_sample(tmp_path, "training", "kept", [MARK, [300.5, 200.5, 300.5, 250.5, 1]], [[1, 2, 1, 90]])
    dataset = build_dataset(DataConfig(root=str(tmp_path), format="ps2_mat"), "training", train=False, seed=0)
    assert [f.name for f in dataset.files] == ["kept"] and len(dataset) == 1


def test_marks_beyond_max_points_are_dropped_with_their_slots(tmp_path):
    marks = [[20.5 + 30 * i, 300.5] for i in range(17)]
    slots = [[1, 2, 1, 90], [14, 15, 1, 90], [15, 16, 1, 90], [17, 3, 1, 90]]
    label = read_mat_label(write_sample(tmp_path, "training", "many", marks, slots), max_points=15)
    assert label.num_marks == 15
    assert label.slots[:, :2].tolist() == [[1, 2], [14, 15]]
    # without a max_points every mark stays (read_label dispatches on the suffix)
    assert read_label(tmp_path / "annotations" / "training" / "many.mat", max_points=20).num_marks == 17


@pytest.mark.parametrize("contents, why", [
    ({"marks": [MARK, MARK]}, "no 'slots' matrix"),
    ({"slots": [[1, 2, 1, 90]]}, "no 'marks' matrix"),
    ({"marks": [MARK, MARK], "slots": [[1, 3, 1, 90]]}, "outside 1..2"),
    ({"marks": [MARK, MARK], "slots": [[0, 1, 1, 90]]}, "outside 1..2"),
    ({"marks": [MARK, MARK], "slots": [[1, 1, 1, 90]]}, "to itself"),
    ({"marks": [MARK, MARK], "slots": [[1.5, 2, 1, 90]]}, "whole numbers"),
    ({"marks": [[1, 2, 3], [4, 5, 6]], "slots": [[1, 2, 1, 90]]}, "'marks' has 3 columns"),
    ({"marks": [[1, 2, 3, 4, 7], [4, 5, 6, 7, 0]], "slots": [[1, 2, 1, 90]]}, "expected 0 (T) or 1 (L)"),
    ({"marks": np.array(["ab", "cd"]), "slots": [[1, 2, 1, 90]]}, "'marks' is not a numeric matrix"),
])
def test_bad_mat_labels_are_one_line_naming_the_file(tmp_path, contents, why):
    path = tmp_path / "bad.mat"
    savemat(str(path), contents)
    with pytest.raises(DataError) as error:
        read_mat_label(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and why in message and "\n" not in message


def test_a_truncated_mat_file(tmp_path):
    path = write_sample(tmp_path, "training", "cut", [MARK, MARK], [[1, 2, 1, 90]])
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=rf"^{path}: cannot read .mat label"):
        read_mat_label(path)


# ----------------------------------------------------------------------------- layouts


def test_layout_detection(tmp_path):
    json_root, ps2_root, psv_root = tmp_path / "json", tmp_path / "ps2", tmp_path / "psv"
    generate(json_root, 1, 1, seed=0, progress=False)
    write_sample(ps2_root, "training", "a", [MARK, MARK], [[1, 2, 1, 90]])
    write_sample(psv_root, "train", "a", [MARK, MARK], [[1, 2, 1, 90]], psv=True)
    assert [detect_format(root) for root in (json_root, ps2_root, psv_root)] == ["json", "ps2_mat", "psv_mat"]
    assert list_samples(psv_root, "train")[0].image_path == psv_root / "images" / "train" / "a.jpg"
    assert list_samples(ps2_root, "training")[0].image_path == ps2_root / "training" / "a.jpg"
    with pytest.raises(DataError, match=r"neither ps_json_label/ .* nor annotations/"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match=r"annotations/testing/all: split directory .* ROOT/annotations/SPLIT/NAME.mat"):
        list_samples(ps2_root, "testing/all", "ps2_mat")
    write_sample(psv_root, "training", "b", [MARK, MARK], [[1, 2, 1, 90]])  # its image under ROOT/training
    with pytest.raises(DataError, match=r"psv/images/training: split directory .* PSV layout"):
        list_samples(psv_root, "training")


@pytest.mark.parametrize("fmt", ["ps2_mat", "psv_mat"])
def test_mat_layout_gives_the_same_samples_as_json(tmp_path, fmt):
    # The same synthetic lots in two layouts: every image with slots is the same sample.
    # (Unaugmented: augmentation is drawn per sample index, which skipping empty images shifts.)
    generate(tmp_path / "json", 5, 1, seed=3, progress=False)
    generate(tmp_path / "mat", 5, 1, seed=3, progress=False, fmt=fmt)
    split = "train" if fmt == "psv_mat" else "training"
    from_json = build_dataset(DataConfig(root=str(tmp_path / "json"), image_size=128), "training", train=False, seed=0)
    from_mat = build_dataset(DataConfig(root=str(tmp_path / "mat"), image_size=128), split, train=False, seed=0)
    by_name = {f.name: i for i, f in enumerate(from_json.files)}
    assert from_mat.files and len(from_mat) == sum(len(label.slots) > 0 for label in from_json.labels)
    for index, files in enumerate(from_mat.files):
        ours, theirs = from_mat[index], from_json[by_name[files.name]]
        for key in ("image", "marks", "num_marks", "slot_adjacency"):
            assert torch.equal(ours[key], theirs[key]), (files.name, key)


def test_synth_mat_then_train_and_eval_on_it(tmp_path, capsys):
    root = tmp_path / "lots"
    assert main(["synth", "--out", str(root), "--train", "6", "--val", "2", "--seed", "7", "--format", "mat"]) == 0
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["testing", "training"]
    assert not (root / "ps_json_label").exists()
    tiny = ["-o", "data.image_size=64", "-o", "data.batch_size=2", "-o", "train.epochs=1",
            "-o", "train.progress=false", "-o", "model.depth_factor=2"]
    run = tmp_path / "run"
    assert main(["train", "-c", "ps_gat_tiny", "--data", str(root), "--out", str(run), *tiny]) == 0
    capsys.readouterr()
    assert main(["eval", "-c", "ps_gat_tiny", "--data", str(root), "--ckpt", str(run), "--json", *tiny]) == 0
    assert json.loads(capsys.readouterr().out)["images"] >= 1


def test_psv_gat_reads_the_psv_layout_and_bad_data_exits_2(tmp_path, capsys):
    root = tmp_path / "psv"
    assert main(["synth", "--out", str(root), "--train", "2", "--val", "1", "--seed", "1", "--format", "psv"]) == 0
    cfg = load_config("psv_gat", [f"data.root={root}"])
    assert len(build_dataset(cfg.data, cfg.data.train_split, train=False, seed=0)) >= 1
    capsys.readouterr()
    broken = write_sample(root, "train", "zz_broken", [MARK, MARK], [[1, 9, 1, 90]], psv=True)
    assert main(["train", "-c", "psv_gat", "--data", str(root), "--out", str(tmp_path / "run"),
                 "-o", "data.image_size=64", "-o", "train.epochs=1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's log lines
    assert last.startswith("psdet train: error: ") and str(broken) in last and "outside 1..2" in last
