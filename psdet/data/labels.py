"""The dataset layouts and the json labels: find samples, read, validate and write labels.

Three layouts (`data.format`; `auto` tells them apart by ROOT's top-level directories)::

    json     ROOT/ps_json_label/SPLIT/NAME.json  beside  ROOT/SPLIT/NAME.jpg
             (DMPR-PS's labels for ps2.0; splits `training`, `testing/all`)
    ps2_mat  ROOT/annotations/SPLIT/NAME.mat     beside  ROOT/SPLIT/NAME.jpg
             (the official ps2.0 release; splits `training`, `testing/all`)
    psv_mat  ROOT/annotations/SPLIT/NAME.mat     beside  ROOT/images/SPLIT/NAME.jpg
             (the PSV dataset; splits `train`, `test`)

`auto`: `ps_json_label/` -> json; else `annotations/` with `images/` -> psv_mat, without
-> ps2_mat. The `.mat` labels are read by `psdet.data.mat_labels`; whatever the layout,
a label becomes the same `ParkingLabel`, and nothing downstream knows which it was.

A label is ``{"marks": [[x1, y1, x2, y2, shape], ...], "slots": [[p1, p2, type, angle], ...]}``:

- marks, in pixels of the image: ``(x1, y1)`` the marking point, ``(x2, y2)`` a second
  point on one of its arms giving its direction; ``shape`` 0 = T, 1 = L. Coordinates are
  MATLAB-style (the first pixel's centre is 1.0), so ``(x - 0.5) / width`` is the point in
  [0, 1] image coordinates, as the original DMPR-PS / gcn-parking-slot code computes it.
- slots index marks from 1. ``p1 -> p2`` is the entrance in the order ps2.0 uses: walking
  from p1 to p2 (image coordinates, y down) the slot lies on the left-hand side as seen on
  screen, i.e. its separators point along ``(ey, -ex)`` for the unit entrance vector
  ``e = p2 - p1`` (rotated toward it by ``angle`` for slanted slots). ``type`` 1 = right
  angle (perpendicular or parallel, ``angle`` 90), 2 = slanted with ``angle`` < 90,
  3 = slanted with ``angle`` > 90; ``angle`` (degrees) is between ``p1 -> p2`` and the separator.
- A single mark may be a flat list ``[x1, y1, x2, y2, shape]``, a single slot a flat list
  ``[p1, p2, type, angle]`` (MATLAB's json export does this); either may be empty.

Every problem a user's data can have raises `DataError` with one line naming the file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psdet import userfiles
from psdet.errors import DataError

LABEL_DIR = "ps_json_label"
MAT_LABEL_DIR = "annotations"
PSV_IMAGE_DIR = "images"
IMAGE_SUFFIX = ".jpg"
LABEL_SUFFIX = ".json"
MAT_SUFFIX = ".mat"
LABEL_KEYS = ("marks", "slots")
LAYOUT_HINT = "expected the ps2.0 layout ROOT/ps_json_label/SPLIT/NAME.json beside ROOT/SPLIT/NAME.jpg"
LAYOUT_HINTS = {
    "json": LAYOUT_HINT,
    "ps2_mat": "expected the ps2.0 .mat layout ROOT/annotations/SPLIT/NAME.mat beside ROOT/SPLIT/NAME.jpg",
    "psv_mat": "expected the PSV layout ROOT/annotations/SPLIT/NAME.mat beside ROOT/images/SPLIT/NAME.jpg",
}
FORMATS = ("auto", "json", "ps2_mat", "psv_mat")


@dataclass(frozen=True)
class ParkingLabel:
    """One image's label, validated.

    marks: float64 [N, 5] — x1, y1, x2, y2 (label pixels, first pixel centre = 1.0), shape (0 T, 1 L)
    slots: float64 [M, 4] — p1, p2 (1-based mark indices, entrance p1 -> p2), type, angle (degrees)
    """

    name: str
    marks: np.ndarray
    slots: np.ndarray

    @property
    def num_marks(self) -> int:
        return int(self.marks.shape[0])

    @property
    def entrance_pairs(self) -> np.ndarray:
        """int64 [M, 2]: 0-based (i, j) mark indices of each slot entrance i -> j."""
        return self.slots[:, :2].astype(np.int64) - 1


@dataclass(frozen=True)
class SampleFiles:
    """Where one sample's label and image live."""

    name: str
    label_path: Path
    image_path: Path


# ----------------------------------------------------------------------------- layout


def detect_format(root: str | Path, fmt: str = "auto") -> str:
    """The layout of `root`: `fmt` itself, or for `auto` the one its directories show."""
    root = Path(root)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root does not exist; {LAYOUT_HINTS['json' if fmt == 'auto' else fmt]}")
    if fmt != "auto":
        return fmt
    if (root / LABEL_DIR).is_dir():
        return "json"
    if (root / MAT_LABEL_DIR).is_dir():
        return "psv_mat" if (root / PSV_IMAGE_DIR).is_dir() else "ps2_mat"
    raise DataError(f"{root}: neither {LABEL_DIR}/ (json labels) nor {MAT_LABEL_DIR}/ (.mat labels) in the dataset "
                    f"root; {LAYOUT_HINT}, or ROOT/annotations/SPLIT/NAME.mat (ps2.0 .mat, PSV)")


def split_dirs(root: str | Path, split: str, fmt: str = "auto") -> tuple[Path, Path]:
    """(label dir, image dir) of `split` under `root` in layout `fmt`; DataError when either is missing."""
    root = Path(root)
    fmt = detect_format(root, fmt)
    label_dir = root / (LABEL_DIR if fmt == "json" else MAT_LABEL_DIR) / split
    image_dir = root / PSV_IMAGE_DIR / split if fmt == "psv_mat" else root / split
    for directory in (label_dir, image_dir):
        if not directory.is_dir():
            raise DataError(f"{directory}: split directory for '{split}' does not exist; {LAYOUT_HINTS[fmt]}")
    return label_dir, image_dir


def list_samples(root: str | Path, split: str, fmt: str = "auto") -> list[SampleFiles]:
    """Every label of a split with its image, sorted by name; DataError on a missing image or an empty split."""
    fmt = detect_format(root, fmt)
    label_dir, image_dir = split_dirs(root, split, fmt)
    suffix = LABEL_SUFFIX if fmt == "json" else MAT_SUFFIX
    samples = []
    for label_path in sorted(label_dir.glob("*" + suffix)):
        image_path = image_dir / (label_path.stem + IMAGE_SUFFIX)
        if not image_path.is_file():
            raise DataError(f"{label_path}: no image for this label (expected {image_path})")
        samples.append(SampleFiles(label_path.stem, label_path, image_path))
    if not samples:
        raise DataError(f"{label_dir}: no *{suffix} labels in split '{split}'; {LAYOUT_HINTS[fmt]}")
    return samples


# ----------------------------------------------------------------------------- reading


def read_label(path: str | Path, max_points: int | None = None) -> ParkingLabel | None:
    """Read and validate one label, json or `.mat` (by its suffix); DataError naming the file
    on any problem. A json label with more than `max_points` marks is an error; a `.mat`
    label's extra marks are dropped with their slots, and a `.mat` label without slots gives
    None (the image is skipped), as the original's `.mat` readers do
    (`psdet.data.mat_labels.read_mat_label`)."""
    path = Path(path)
    if path.suffix == MAT_SUFFIX:
        from psdet.data.mat_labels import read_mat_label

        return read_mat_label(path, max_points)
    return parse_label(userfiles.read_json(path, "label", DataError), path, max_points)


def parse_label(tree: Any, source: str | Path, max_points: int | None = None) -> ParkingLabel:
    """Validate a decoded label mapping (see the module docstring); `source` names it in errors."""

    def fail(why: str) -> DataError:
        return DataError(f"{source}: {why}")

    if not isinstance(tree, dict):
        raise fail(f"label must be a mapping with keys 'marks' and 'slots', got {type(tree).__name__}")
    missing = [key for key in LABEL_KEYS if key not in tree]
    unknown = sorted(set(tree) - set(LABEL_KEYS))
    if missing or unknown:
        parts = ([f"missing key(s) {', '.join(map(repr, missing))}"] if missing else []) + (
            [f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else []
        )
        raise fail(f"label has {'; '.join(parts)}; expected exactly 'marks' and 'slots'")
    marks = _rows(tree["marks"], 5, "marks", "[x1, y1, x2, y2, shape]", fail)
    slots = _rows(tree["slots"], 4, "slots", "[p1, p2, type, angle]", fail)

    num_marks = marks.shape[0]
    if max_points is not None and num_marks > max_points:
        raise fail(f"{num_marks} marks, more than data.max_points = {max_points}")
    check_marks_and_slots(marks, slots, fail)
    return ParkingLabel(Path(source).stem, marks, slots)


def check_marks_and_slots(marks: np.ndarray, slots: np.ndarray, fail) -> None:
    """Raise `fail(why)` unless every mark's shape is 0 or 1 and every slot joins two
    different marks by whole 1-based indices in range. marks [N, 5], slots [M, 4]."""
    num_marks = marks.shape[0]
    bad_shape = np.flatnonzero((marks[:, 4] != 0) & (marks[:, 4] != 1))
    if bad_shape.size:
        raise fail(f"marks[{bad_shape[0]}] has shape {marks[bad_shape[0], 4]:g}; expected 0 (T) or 1 (L)")
    if slots.size:
        indices = slots[:, :2]
        if not np.all(indices == np.round(indices)):
            raise fail("slot mark indices must be whole numbers (marks are indexed from 1)")
        bad = np.flatnonzero(np.any((indices < 1) | (indices > num_marks), axis=1))
        if bad.size:
            row = slots[bad[0]]
            raise fail(f"slots[{bad[0]}] = [{int(row[0])}, {int(row[1])}, ...] indexes a mark outside 1..{num_marks}")
        same = np.flatnonzero(indices[:, 0] == indices[:, 1])
        if same.size:
            raise fail(f"slots[{same[0]}] joins mark {int(indices[same[0], 0])} to itself")


def _rows(value: Any, width: int, key: str, row_form: str, fail) -> np.ndarray:
    """A list of `width`-number rows, a single flat row, or empty -> float64 [K, width]."""
    if not isinstance(value, list):
        raise fail(f"'{key}' must be a list of {row_form}, got {type(value).__name__}")
    if not value:
        return np.zeros((0, width))
    rows = [value] if not isinstance(value[0], list) else value
    for index, row in enumerate(rows):
        if (
            not isinstance(row, list)
            or len(row) != width
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)
        ):
            where = f"'{key}'" if rows is not value else f"'{key}'[{index}]"
            raise fail(f"{where} must be {row_form} ({width} finite numbers), got {_short(row)}")
    return np.asarray(rows, dtype=np.float64).reshape(-1, width)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- writing


def label_json(marks: np.ndarray, slots: np.ndarray, decimals: int = 2) -> str:
    """The json text of a label, written the way ps2.0's exporter writes it.

    marks [N, 5] and slots [M, 4] as in `ParkingLabel`. A single slot is written as a flat
    list, like the MATLAB export; coordinates are rounded to `decimals`. Deterministic.
    """
    mark_rows = [[_number(v, decimals) for v in row[:4]] + [int(row[4])] for row in np.asarray(marks)]
    slot_rows = [[int(row[0]), int(row[1]), int(row[2]), _number(row[3], decimals)] for row in np.asarray(slots)]
    tree = {"marks": mark_rows, "slots": slot_rows[0] if len(slot_rows) == 1 else slot_rows}
    return json.dumps(tree, separators=(",", ":")) + "\n"


def _number(value: float, decimals: int) -> int | float:
    rounded = round(float(value), decimals)
    return int(rounded) if rounded.is_integer() else rounded
