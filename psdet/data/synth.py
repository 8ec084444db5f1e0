"""Seeded synthetic parking lots, written in exactly the ps2.0 layout (see `psdet.data.labels`).

`generate(out_dir, n_train, n_val, seed)` renders 600x600 bird's-eye JPEGs and their json
labels into ``out_dir/{training,testing/all}`` and ``out_dir/ps_json_label/{training,testing/all}``.
Nothing else in psdet reads the generator's internals: the dataset reads the files.

What an image holds:

- asphalt: a grey base with low- and mid-frequency texture, grain and dark stains;
- 0 (one image in ten; sometimes with a lone lane line), 1 or 2 rows of 1-4 slots:
  perpendicular (entrance 135-190 px, depth 220-300), parallel (entrance 240-330,
  depth 95-130) or slanted (50-70 or 110-130 degrees); neighbouring slots of a row share
  their marks; a second row faces the first across a 200-330 px lane;
- white or yellowish paint, 7-11 px wide, a little worn; parked cars with soft shadows in
  some slots; soft cast shadows; a lighting gradient, gain and colour cast; sensor noise;
  a slight blur; JPEG quality 92.

Labels, following ps2.0 (DMPR-PS / MarkToolForParkingLotPoint conventions):

- A marking point sits where the entrance line meets a separator line. Inner points are
  T-shaped (0); a row end is L-shaped (1) when the entrance line stops there, T-shaped
  when it runs on. (x2, y2) lies 50 px along the point's direction: for a T, the separator
  (into the slot); for an L, the arm that turns clockwise (on screen) into the other arm,
  i.e. the separator at the entrance's first point and the entrance line, back toward the
  first point, at its last point.
- A slot ``[p1, p2, type, angle]`` is ordered so that walking p1 -> p2 the slot lies on the
  left as seen on screen: separators point along ``cos(angle) e + sin(angle) (ey, -ex)``
  for the unit entrance vector e (y down). type 1 = right angle (angle 90), 2 = slanted
  < 90, 3 = slanted > 90. A single slot is written as a flat list, as in ps2.0.
- Coordinates are label pixels whose first pixel centre is 1.0 (the MATLAB convention of
  ps2.0), so the continuous image point u (0..600) is written as u + 0.5.

Guarantees that keep it learnable by a small CNN at 256x256 (stride 32): every mark is
at least 45 px inside the border, marks are at least ~130 px apart, at most 10 per image.

Determinism: image i of a split is drawn from ``SeedSequence([seed, split, i])`` alone, so
the same seed gives byte-identical labels (and, with the same libjpeg, images), and
adding images never changes the earlier ones. Importing this module does no torch work.
"""
from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from psdet.data.labels import (IMAGE_SUFFIX, LABEL_DIR, LABEL_SUFFIX, MAT_LABEL_DIR, MAT_SUFFIX, PSV_IMAGE_DIR,
                               label_json)
from psdet.errors import DataError

IMAGE_SIZE = 600
MARK_MARGIN = 45.0  # px: marks stay at least this far inside the border
ARM_LENGTH = 50.0  # px from a mark to the label's direction point
MAX_MARKS = 10
JPEG_QUALITY = 92
SPLITS = (("training", "train"), ("testing/all", "test"))  # (directory, name prefix)
PSV_SPLITS = (("train", "train"), ("test", "test"))
LABEL_FORMATS = ("json", "ps2_mat", "psv_mat")

_PIXEL_CENTRES = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
_PERPENDICULAR, _PARALLEL, _SLANTED = 0, 1, 2
_CAR_COLOURS = np.array([[40, 40, 45], [215, 215, 220], [160, 160, 165], [150, 30, 30], [30, 50, 120], [20, 20, 22]])


@dataclass
class SlotRow:
    """A row of slots sharing marks. Points in continuous pixels (0..600), [K, 2] along `entrance`."""

    points: np.ndarray
    entrance: np.ndarray  # unit vector p1 -> p2 of every slot of the row
    separator: np.ndarray  # unit vector from each point into its slots
    depth: float  # separator length, px
    kind: int
    angle_deg: float  # between entrance and separator
    end_shapes: tuple[int, int]  # shape of the first and last point: 0 T (line runs on), 1 L

    @property
    def slot_type(self) -> int:
        return 1 if self.angle_deg == 90 else 2 if self.angle_deg < 90 else 3


# ----------------------------------------------------------------------------- public


def _layout(root: Path, fmt: str, split: str) -> tuple[Path, Path, str]:
    """(label dir, image dir, label suffix) of `split` in layout `fmt` (psdet.data.labels)."""
    if fmt == "json":
        return root / LABEL_DIR / split, root / split, LABEL_SUFFIX
    image_dir = root / PSV_IMAGE_DIR / split if fmt == "psv_mat" else root / split
    return root / MAT_LABEL_DIR / split, image_dir, MAT_SUFFIX


def write_mat_label(path: Path, marks: np.ndarray, slots: np.ndarray, decimals: int = 2) -> None:
    """A `.mat` label (psdet.data.mat_labels): marks [N, 5], slots [M, 4], rounded as
    `label_json` rounds them (so both layouts hold the same label), written to a temporary
    file and renamed into place."""
    from scipy.io import savemat

    tmp = path.with_name(f".tmp-{path.name}")
    savemat(str(tmp), {"marks": np.round(np.asarray(marks, dtype=np.float64).reshape(-1, 5), decimals),
                       "slots": np.round(np.asarray(slots, dtype=np.float64).reshape(-1, 4), decimals)})
    tmp.replace(path)


def generate(out_dir: str | Path, n_train: int, n_val: int, seed: int, progress: bool = True,
             fmt: str = "json", workers: int = 1) -> dict:
    """Render `n_train` training and `n_val` test images with labels into the layout `fmt`:
    `json` (ps2.0 with DMPR-PS's json labels), `ps2_mat` (ps2.0's own `.mat` labels, under
    annotations/) or `psv_mat` (the PSV dataset's, splits train and test, images under
    images/). `.mat` marks carry all five columns (x1, y1, x2, y2, shape).

    Images are named ``train_000000`` ... and ``test_000000`` .... Rerunning with the same
    arguments rewrites the same files; a split directory holding labels of any other name
    raises `DataError` (nothing is deleted). Progress goes to stderr every ~10%. `workers`
    processes render at once (each image depends on its seed alone, so the files are the
    same for any count). Returns counts: {"root", "train", "val", "marks", "slots", "seconds"}.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"image counts must be >= 0, got n_train={n_train}, n_val={n_val}")
    if fmt not in LABEL_FORMATS:
        raise ValueError(f"unknown label format {fmt!r}; choose one of {', '.join(LABEL_FORMATS)}")
    root = Path(out_dir)
    jobs, directories = [], []
    for split_code, ((split, prefix), count) in enumerate(zip(PSV_SPLITS if fmt == "psv_mat" else SPLITS,
                                                               (n_train, n_val))):
        label_dir, image_dir, suffix = _layout(root, fmt, split)
        names = [f"{prefix}_{i:06d}" for i in range(count)]
        existing = {p.stem for p in label_dir.glob("*" + suffix)} if label_dir.is_dir() else set()
        foreign = sorted(existing - set(names))
        if foreign:
            raise DataError(
                f"{label_dir}: already holds {len(foreign)} label(s) this run would not write "
                f"(e.g. {foreign[0]}{suffix}); choose an empty output directory"
            )
        jobs += [
            (split_code, i, label_dir / (name + suffix), image_dir / (name + IMAGE_SUFFIX))
            for i, name in enumerate(names)
        ]
        directories += [label_dir, image_dir]
    for directory in directories:  # only once both splits are known to be free
        directory.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    total_marks = total_slots = 0
    report_every = max(1, math.ceil(len(jobs) / 10))
    render = functools.partial(_render_job, seed, fmt)
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(workers, len(jobs))))
            counts = pool.imap(render, jobs, chunksize=8)
        else:
            counts = map(render, jobs)
        for done, (num_marks, num_slots) in enumerate(counts, start=1):
            total_marks += num_marks
            total_slots += num_slots
            if progress and (done % report_every == 0 or done == len(jobs)):
                percent = 100 * done // len(jobs)
                print(f"synth: {done}/{len(jobs)} images ({percent}%) -> {root}", file=sys.stderr, flush=True)
    return {
        "root": str(root),
        "train": n_train,
        "val": n_val,
        "marks": total_marks,
        "slots": total_slots,
        "seconds": time.perf_counter() - start,
    }


def _render_job(seed: int, fmt: str, job: tuple[int, int, Path, Path]) -> tuple[int, int]:
    """Render and write one image and its label; -> (marks, slots) in it."""
    split_code, index, label_path, image_path = job
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, split_code, index]))
    image, marks, slots = render_lot(rng)
    Image.fromarray(image).save(image_path, format="JPEG", quality=JPEG_QUALITY)
    if fmt == "json":
        label_path.write_text(label_json(marks, slots))
    else:
        write_mat_label(label_path, marks, slots)
    return len(marks), len(slots)


def render_lot(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One parking-lot image and its label.

    Returns (uint8 [600, 600, 3] RGB, marks float64 [N, 5] x1, y1, x2, y2, shape in label
    pixels, slots float64 [M, 4] p1, p2 (1-based), type, angle).
    """
    rows = sample_rows(rng) if rng.random() >= 0.1 else []
    marks, slots = label_rows(rows, rng)
    image = paint_lot(rows, rng)
    return image, marks, slots


# ----------------------------------------------------------------------------- geometry


def sample_rows(rng: np.random.Generator) -> list[SlotRow]:
    """One row of slots, and sometimes a second one facing it across a lane."""
    kind = int(rng.choice(3, p=[0.5, 0.2, 0.3]))
    if kind == _PERPENDICULAR:
        spacing, depth, angle = rng.uniform(135, 190), rng.uniform(220, 300), 90.0
    elif kind == _PARALLEL:
        spacing, depth, angle = rng.uniform(240, 330), rng.uniform(95, 130), 90.0
    else:
        spacing, depth = rng.uniform(150, 195), rng.uniform(220, 290)
        slant = rng.uniform(50, 70) if rng.random() < 0.5 else rng.uniform(110, 130)
        angle = float(round(slant))  # whole degrees, as ps2.0 labels them
    max_slots = 2 if kind == _PARALLEL else 4
    if rng.random() < 0.75:  # ps2.0 rows mostly run along an image axis
        heading = rng.integers(4) * math.pi / 2 + rng.normal(0.0, math.radians(3))
    else:
        heading = rng.uniform(0, 2 * math.pi)
    entrance = np.array([math.cos(heading), math.sin(heading)])
    slot_side = np.array([entrance[1], -entrance[0]])  # left of p1 -> p2 on screen (y down)
    theta = math.radians(angle)
    separator = math.cos(theta) * entrance + math.sin(theta) * slot_side

    want_second = rng.random() < 0.25
    lane = rng.uniform(200, 330)
    centre = np.full(2, IMAGE_SIZE / 2.0)
    for attempt in range(30):
        slots_first = max(1, int(rng.integers(1, max_slots + 1)) - attempt // 10)
        # Offset of the entrance line from the centre along the slot side: mostly positive,
        # so slots reach toward the border and the lane lies around the image centre.
        offset = rng.uniform(lane / 2 - 60, lane / 2 + 60) if want_second else rng.uniform(-120, 180)
        first = _place_row(rng, centre + offset * slot_side, entrance, slots_first * spacing)
        if first is None:
            continue
        rows = [_make_row(rng, first, slots_first, spacing, entrance, separator, depth, kind, angle)]
        if want_second:
            slots_second = int(rng.integers(1, max_slots + 1))
            origin = centre + (offset - lane) * slot_side
            for count in range(slots_second, 0, -1):
                second = _place_row(rng, origin, -entrance, count * spacing)
                if second is not None:
                    # facing the first row: entrance and slot side both flip, so the separator does too
                    rows.append(_make_row(rng, second, count, spacing, -entrance, -separator, depth, kind, angle))
                    break
        return rows
    return []


def _place_row(rng: np.random.Generator, through: np.ndarray, direction: np.ndarray, length: float):
    """First point of a segment of `length` along `direction` on the line through `through`,
    uniformly among the positions that keep the whole segment inside the mark margin; None if none does."""
    low, high = -np.inf, np.inf
    for axis in range(2):
        bounds = (MARK_MARGIN - through[axis], IMAGE_SIZE - MARK_MARGIN - through[axis])
        if abs(direction[axis]) < 1e-9:
            if not bounds[0] <= 0 <= bounds[1]:
                return None
            continue
        ends = sorted(b / direction[axis] for b in bounds)
        low, high = max(low, ends[0]), min(high, ends[1])
    if high - low < length:
        return None
    return through + rng.uniform(low, high - length) * direction


def _make_row(rng, first_point, num_slots, spacing, entrance, separator, depth, kind, angle) -> SlotRow:
    """`num_slots` slots from `first_point` along `entrance`; each row end is an L (60%) or a T."""
    steps = np.arange(num_slots + 1)[:, None] * spacing
    points = first_point[None, :] + steps * entrance[None, :]
    end_shapes = (int(rng.random() < 0.6), int(rng.random() < 0.6))
    return SlotRow(points, entrance, separator, float(depth), kind, float(angle), end_shapes)


def label_rows(rows: list[SlotRow], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Marks [N, 5] and slots [M, 4] of the rows, in label pixels; mark order shuffled."""
    marks, slots = [], []
    for row in rows:
        base = len(marks)
        last = len(row.points) - 1
        for k, point in enumerate(row.points):
            shape = row.end_shapes[0] if k == 0 else row.end_shapes[1] if k == last else 0
            # an L at the last point points back along the entrance; everything else along the separator
            direction = -row.entrance if (shape == 1 and k == last) else row.separator
            tip = point + ARM_LENGTH * direction
            marks.append([point[0] + 0.5, point[1] + 0.5, tip[0] + 0.5, tip[1] + 0.5, shape])
        slots += [[base + k, base + k + 1, row.slot_type, row.angle_deg] for k in range(last)]
    if not marks:
        return np.zeros((0, 5)), np.zeros((0, 4))
    if len(marks) > MAX_MARKS:
        raise AssertionError(f"generator placed {len(marks)} marks, more than {MAX_MARKS}")
    order = rng.permutation(len(marks))
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    marks_arr = np.asarray(marks, dtype=np.float64)[order]
    slots_arr = np.asarray(slots, dtype=np.float64).reshape(-1, 4)
    slots_arr[:, :2] = position[slots_arr[:, :2].astype(np.int64)] + 1
    return marks_arr, slots_arr


# ----------------------------------------------------------------------------- rendering


def paint_lot(rows: list[SlotRow], rng: np.random.Generator) -> np.ndarray:
    """Render the rows onto asphalt with cars, shadows, lighting and noise: uint8 [600, 600, 3]."""
    size = IMAGE_SIZE
    gray = np.full((size, size), rng.uniform(75, 135), dtype=np.float32)
    gray += _smooth_noise(rng, 6) * np.float32(rng.uniform(6, 14))
    gray += _smooth_noise(rng, 30) * np.float32(rng.uniform(3, 7))
    gray += _cheap_noise(rng, (size, size)) * np.float32(rng.uniform(3, 8))
    for _ in range(rng.integers(0, 4)):  # oil stains and patches
        stain = _ellipse_window(rng.uniform(0, size, 2), rng.uniform(15, 70, 2), rng.uniform(0, math.pi), 8.0)
        _darken(gray, stain, rng.uniform(0.1, 0.3))
    rgb = gray[..., None] + rng.normal(0, 4, 3).astype(np.float32)

    paint = np.zeros((size, size), np.float32)
    half_width = rng.uniform(7, 11) / 2
    for row in rows:
        _paint_row(paint, row, half_width)
    if not rows and rng.random() < 0.5:  # a lone lane line: paint without any marking point
        heading = rng.uniform(0, 2 * math.pi)
        lane_axis = np.array([math.cos(heading), math.sin(heading)])
        _max_into(paint, _box_window(rng.uniform(100, 500, 2), lane_axis, 900, half_width))
    if rows or paint.any():
        paint *= 1 - np.float32(rng.uniform(0, 0.35)) * np.clip(_smooth_noise(rng, 40) * 0.5 + 0.5, 0, 1)  # wear
        if rng.random() < 0.75:
            colour = np.full(3, rng.uniform(225, 250))
        else:  # yellowish
            colour = np.array([rng.uniform(215, 240), rng.uniform(185, 215), rng.uniform(70, 120)])
        rgb += paint[..., None] * (colour.astype(np.float32) - rgb)

    light = rng.uniform(0, 2 * math.pi)
    light_offset = 14 * np.array([math.cos(light), math.sin(light)])
    for row in rows:
        for k in range(len(row.points) - 1):
            if rng.random() < 0.3:
                _park_car(rgb, row, k, light_offset, rng)

    for _ in range(rng.integers(0, 3)):  # cast shadows: buildings (half planes) or trees (blobs)
        strength = rng.uniform(0.2, 0.45)
        if rng.random() < 0.5:
            normal_angle = rng.uniform(0, 2 * math.pi)
            distance = (_PIXEL_CENTRES[None, :] - size / 2) * np.float32(math.cos(normal_angle)) + (
                _PIXEL_CENTRES[:, None] - size / 2
            ) * np.float32(math.sin(normal_angle))
            edge = np.clip(0.5 + (distance - np.float32(rng.uniform(-250, 250))) / np.float32(rng.uniform(8, 40)), 0, 1)
            _darken(rgb, ((slice(None), slice(None)), edge), strength)
        else:
            centre, radii = rng.uniform(0, size, 2), rng.uniform(40, 160, 2)
            _darken(rgb, _ellipse_window(centre, radii, rng.uniform(0, math.pi), rng.uniform(15, 40)), strength)

    gradient_angle = rng.uniform(0, 2 * math.pi)
    ramp = (_PIXEL_CENTRES[None, :] / size - 0.5) * np.float32(math.cos(gradient_angle)) + (
        _PIXEL_CENTRES[:, None] / size - 0.5
    ) * np.float32(math.sin(gradient_angle))
    gain = np.float32(rng.uniform(0.75, 1.2)) * (1 + np.float32(rng.uniform(0, 0.3)) * ramp)
    cast = (1 + rng.uniform(-0.05, 0.05) * np.array([1.0, 0.0, -1.0])).astype(np.float32)
    rgb *= gain[..., None] * cast
    rgb += _cheap_noise(rng, (size, size, 3)) * np.float32(rng.uniform(1.5, 5))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 0.8)))
    return np.asarray(image)


def _paint_row(paint: np.ndarray, row: SlotRow, half_width: float) -> None:
    """Entrance line and separators of a row; square caps make clean L corners."""
    first, last = row.points[0], row.points[-1]
    run_on = [900.0 if shape == 0 else 0.0 for shape in row.end_shapes]  # a T end: the line runs on
    start = first - run_on[0] * row.entrance
    end = last + run_on[1] * row.entrance
    half_length = np.linalg.norm(end - start) / 2 + half_width
    _max_into(paint, _box_window((start + end) / 2, row.entrance, half_length, half_width))
    for point in row.points:
        centre = point + row.separator * row.depth / 2
        _max_into(paint, _box_window(centre, row.separator, row.depth / 2 + half_width, half_width))


def _park_car(rgb: np.ndarray, row: SlotRow, k: int, light_offset: np.ndarray, rng: np.random.Generator) -> None:
    """A car inside slot k of the row, clear of its lines and marks, with a soft shadow."""
    p1, p2 = row.points[k], row.points[k + 1]
    spacing = float(np.linalg.norm(p2 - p1))
    if row.kind == _PARALLEL:
        axis, length, width = row.entrance, min(0.8 * spacing, 270.0), min(0.75 * row.depth, 105.0)
        reach = row.depth / 2
    else:
        across = spacing * math.sin(math.radians(row.angle_deg))
        axis, length, width = row.separator, min(0.85 * row.depth, 270.0), 0.62 * across
        reach = 22 + length / 2
    centre = (p1 + p2) / 2 + row.separator * reach
    _darken(rgb, _box_window(centre + light_offset, axis, length / 2 + 6, width / 2 + 6, soft=14.0), 0.45)
    colour = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] * rng.uniform(0.85, 1.1)
    _blend(rgb, _box_window(centre, axis, length / 2, width / 2, soft=2.5), colour)
    for along, span in ((0.22, 0.12), (-0.3, 0.08)):  # windscreen and rear window
        window = _box_window(centre + axis * along * length, axis, span * length, 0.4 * width, soft=2.0)
        _blend(rgb, window, (25, 25, 28), 0.8)


def _box_window(centre, axis, half_length: float, half_width: float, soft: float = 1.0):
    """Anti-aliased coverage of a rotated rectangle, only over its bounding box.

    `axis` is the unit direction of the `half_length` side; `soft` the edge ramp in px.
    Returns (window, coverage float32 [h, w]) to index a [600, 600, ...] array, or None
    when the rectangle misses the image.
    """
    ux, uy = float(axis[0]), float(axis[1])
    pad = soft + 1.0
    extent_x = abs(ux) * half_length + abs(uy) * half_width + pad
    extent_y = abs(uy) * half_length + abs(ux) * half_width + pad
    window = _window(centre, extent_x, extent_y)
    if window is None:
        return None
    dx = _PIXEL_CENTRES[window[1]][None, :] - np.float32(centre[0])
    dy = _PIXEL_CENTRES[window[0]][:, None] - np.float32(centre[1])
    along = np.abs(dx * np.float32(ux) + dy * np.float32(uy)) - np.float32(half_length)
    across = np.abs(dy * np.float32(ux) - dx * np.float32(uy)) - np.float32(half_width)
    coverage = np.clip(0.5 - along / np.float32(soft), 0, 1) * np.clip(0.5 - across / np.float32(soft), 0, 1)
    return window, coverage


def _ellipse_window(centre, radii, angle: float, soft: float):
    """Coverage of an ellipse with an edge ramp of about `soft` px, over its bounding box (or None)."""
    extent = max(radii) + soft + 1.0
    window = _window(centre, extent, extent)
    if window is None:
        return None
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    dx = _PIXEL_CENTRES[window[1]][None, :] - np.float32(centre[0])
    dy = _PIXEL_CENTRES[window[0]][:, None] - np.float32(centre[1])
    u = (dx * cos + dy * sin) / np.float32(radii[0])
    v = (dy * cos - dx * sin) / np.float32(radii[1])
    coverage = np.clip((1 - np.sqrt(u * u + v * v)) * np.float32(min(radii) / soft) + 0.5, 0, 1)
    return window, coverage


def _window(centre, extent_x: float, extent_y: float):
    x0, x1 = max(0, int(centre[0] - extent_x)), min(IMAGE_SIZE, int(centre[0] + extent_x) + 2)
    y0, y1 = max(0, int(centre[1] - extent_y)), min(IMAGE_SIZE, int(centre[1] + extent_y) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _max_into(alpha: np.ndarray, shape) -> None:
    """alpha = max(alpha, shape's coverage), in place; `shape` from _box_window / _ellipse_window."""
    if shape is not None:
        window, coverage = shape
        np.maximum(alpha[window], coverage, out=alpha[window])


def _blend(rgb: np.ndarray, shape, colour, opacity: float = 1.0) -> None:
    """rgb -> colour by the shape's coverage (times opacity), in place."""
    if shape is not None:
        window, coverage = shape
        rgb[window] += (coverage * np.float32(opacity))[..., None] * (np.asarray(colour, np.float32) - rgb[window])


def _darken(image: np.ndarray, shape, strength: float) -> None:
    """image *= 1 - strength * coverage, in place (image [600, 600] or [600, 600, 3])."""
    if shape is not None:
        window, coverage = shape
        factor = 1 - np.float32(strength) * coverage
        image[window] *= factor if image.ndim == 2 else factor[..., None]


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """float32 [600, 600] smooth noise, unit-ish amplitude: a cells x cells grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    field = Image.fromarray(grid).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _cheap_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 noise of unit variance, zero mean (sum of two uniform bytes: triangular); ~10x faster than normal."""
    count = int(np.prod(shape))
    raw = np.frombuffer(rng.bytes(2 * count), dtype=np.uint8).astype(np.float32).reshape(2, *shape)
    return (raw[0] + raw[1] - np.float32(255.0)) * np.float32(1 / 104.5)
