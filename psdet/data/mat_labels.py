"""`.mat` labels of the official ps2.0 release and of the PSV dataset -> `ParkingLabel`.

A label file holds two MATLAB matrices (read with `scipy.io.loadmat`):

- `marks`: one row per marking point, in label pixels (first pixel centre = 1.0, as the
  json labels): 2 columns `x, y` (the releases' own files), 4 `x1, y1, x2, y2` or 5
  `x1, y1, x2, y2, shape`. With 2 columns a mark has no direction (it reads as 0 rad) and
  is T-shaped: fine for the GAT detector, which uses positions only; DMPR needs 5.
- `slots`: one row per slot, `p1, p2[, type[, angle]]`, marks indexed from 1.

A single mark or slot may come as a flat row or column; `slots` may be empty. As the
original's readers (gcn-parking-slot `ps2_dataset.py`, `psv_dataset.py`) do, a label
without slots is skipped (`read_mat_label` returns None), and marks beyond `max_points`
are dropped together with every slot that uses one. Every problem (unreadable or
truncated file, a missing key, a non-numeric or wrongly shaped matrix, an index out of
range) is one `DataError` line naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from psdet.data.labels import ParkingLabel, check_marks_and_slots
from psdet.errors import DataError

MARK_COLUMNS = (2, 4, 5)


def _matrix(data: dict, key: str, path: Path) -> np.ndarray:
    if key not in data:
        present = sorted(k for k in data if not k.startswith("__"))
        raise DataError(f"{path}: no '{key}' matrix in this .mat label (it holds: {', '.join(present) or 'nothing'})")
    try:
        matrix = np.asarray(data[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: '{key}' is not a numeric matrix") from None
    if matrix.size == 0:
        return matrix.reshape(0, 0)
    if matrix.ndim == 1 or (matrix.ndim == 2 and matrix.shape[1] == 1):  # one row, given flat or as a column
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2:
        raise DataError(f"{path}: '{key}' must be a 2-D matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise DataError(f"{path}: '{key}' holds a non-finite value")
    return matrix


def read_mat_label(path: str | Path, max_points: int | None = None) -> ParkingLabel | None:
    """The label of one `.mat` file (see the module docstring); None when it has no slots."""
    path = Path(path)
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: reading .mat labels needs scipy (pip install scipy)") from None
    try:
        data = loadmat(str(path))
    except Exception as exc:  # truncated or foreign files fail in many ways inside scipy
        raise DataError(f"{path}: cannot read .mat label: {' '.join(str(exc).split())[:160] or type(exc).__name__}") from None

    def fail(why: str) -> DataError:
        return DataError(f"{path}: {why}")

    marks = _matrix(data, "marks", path)
    slots = _matrix(data, "slots", path)
    if slots.size == 0:
        return None
    if marks.size == 0:
        marks = marks.reshape(0, 2)
    if marks.shape[1] not in MARK_COLUMNS:
        raise fail(f"'marks' has {marks.shape[1]} columns; expected 2 (x, y), 4 (x1, y1, x2, y2) or 5 (..., shape)")
    if slots.shape[1] < 2:
        raise fail(f"'slots' has {slots.shape[1]} column(s); expected p1, p2[, type[, angle]]")
    full_marks = np.zeros((marks.shape[0], 5))
    full_marks[:, : marks.shape[1]] = marks
    if marks.shape[1] == 2:  # no direction point: the mark itself
        full_marks[:, 2:4] = marks
    full_slots = np.zeros((slots.shape[0], 4))
    full_slots[:, : min(4, slots.shape[1])] = slots[:, :4]
    check_marks_and_slots(full_marks, full_slots, fail)
    if max_points is not None and len(full_marks) > max_points:
        keep = (full_slots[:, 0] <= max_points) & (full_slots[:, 1] <= max_points)
        full_marks, full_slots = full_marks[:max_points], full_slots[keep]
    return ParkingLabel(path.stem, full_marks, full_slots)
