"""`ParkingSlotDataset`: images and labels in any layout of `psdet.data.labels` -> the sample dicts of docs/CONTRACTS.md."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from psdet.config import DataConfig
from psdet.data.labels import ParkingLabel, SampleFiles, list_samples, read_label
from psdet.data import transforms
from psdet.data.batch import model_input
from psdet.errors import DataError

BACKBONE_STRIDE = 32  # the target map has image_size / 32 cells a side


log = logging.getLogger("psdet")


class ParkingSlotDataset(Dataset):
    """One split of a dataset in the layout `fmt` (json, ps2_mat, psv_mat or auto; see
    `psdet.data.labels`). `.mat` labels without slots are skipped, as the original skips them.

    `__getitem__(i)` returns the sample of docs/CONTRACTS.md (Batch):
        image          uint8 [3, S, S], RGB, S = image_size (`psdet.data.batch.model_input`
                       makes the model's float32 input of a batch, on its device)
        jitter         float32 [8], colour-jitter parameters; only when training with
                       `color_jitter` > 0 (applied by `model_input`, batched, on the device)
        marks          float32 [P, 4], P = max_points, zero-padded: x, y in [0, 1] of the
                       (resized, augmented) image, direction (rad, atan2 of the label's
                       two points, y down), shape (0 T, 1 L)
        num_marks      int64 scalar
        slot_adjacency bool [P, P]; [i, j] true when i -> j is a slot entrance
        name           str, the label's stem

    Training augmentation (`train=True`; a validation set is never augmented): a rotation
    about the image centre that keeps every mark at least 0.05 inside the border and puts
    no two marks into one target cell (`rotate`, up to `max_rotation_deg`; no rotation
    when ten random angles all fail), then colour jitter (`color_jitter`: its parameters
    are drawn here, and `model_input` applies them to the batch on the device). All of it is
    drawn from a generator seeded with (seed, epoch, index), so a sample is the same
    whatever the DataLoader workers and whenever it is loaded: exact resume works.
    Call `set_epoch(epoch)` before creating each epoch's DataLoader iterator (with
    `persistent_workers=True` the workers keep the dataset copy they started with and
    would not see it).

    Labels are read and validated when the dataset is built, so a broken file fails at
    once with a `DataError`. With `cache_images`, decoded, resized uint8 images are kept
    in memory (per process: each DataLoader worker fills its own cache).
    `build_dataset(data_config, split, train=..., seed=...)` builds one from a `DataConfig`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        image_size: int,
        max_points: int,
        train: bool,
        color_jitter: float = 0.0,
        rotate: bool = False,
        max_rotation_deg: float = 180.0,
        cache_images: bool = False,
        seed: int = 0,
        fmt: str = "auto",
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.max_points = max_points
        self.train = train
        self.color_jitter = color_jitter if train else 0.0
        self.rotate = rotate and train and max_rotation_deg > 0
        self.max_rotation_deg = max_rotation_deg
        self.cache_images = cache_images
        self.seed = seed
        self.epoch = 0
        files = list_samples(self.root, split, fmt)
        labels = [read_label(f.label_path, max_points) for f in files]
        kept = [i for i, label in enumerate(labels) if label is not None]
        if len(kept) < len(files):
            log.info("%s/%s: %d of %d labels have no slots and are skipped", root, split, len(files) - len(kept),
                     len(files))
        if not kept:
            raise DataError(f"{root}: no label of split '{split}' has a slot (images without slots are skipped)")
        self.files: list[SampleFiles] = [files[i] for i in kept]
        self.labels: list[ParkingLabel] = [labels[i] for i in kept]
        self._image_cache: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of this epoch (it is a pure function of seed, epoch and index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def augmentation_rng(self, index: int) -> np.random.Generator:
        """The generator for sample `index` in the current epoch."""
        return np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, self.epoch, index]))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, (width, height) = self._load_image(index)
        label = self.labels[index]
        marks = normalised_marks(label, width, height)

        rng = self.augmentation_rng(index) if self.train else None
        if rng is not None and self.rotate:
            grid = self.image_size // BACKBONE_STRIDE
            angle = transforms.sample_rotation(marks[:, :2], rng, self.max_rotation_deg, grid)
            if angle != 0.0:
                image = transforms.rotate_image(image, angle)
                marks = transforms.rotate_marks(marks, angle)
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}
        if rng is not None and self.color_jitter > 0:
            sample["jitter"] = torch.from_numpy(transforms.sample_jitter(rng, self.color_jitter))

        num_marks = label.num_marks
        padded_marks = np.zeros((self.max_points, 4), dtype=np.float32)
        padded_marks[:num_marks] = marks
        adjacency = np.zeros((self.max_points, self.max_points), dtype=bool)
        pairs = label.entrance_pairs
        adjacency[pairs[:, 0], pairs[:, 1]] = True
        return {
            **sample,
            "marks": torch.from_numpy(padded_marks),
            "num_marks": torch.tensor(num_marks, dtype=torch.int64),
            "slot_adjacency": torch.from_numpy(adjacency),
            "name": label.name,
        }

    def _load_image(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        cached = self._image_cache.get(index)
        if cached is not None:
            return cached
        try:
            loaded = transforms.decode_image(self.files[index].image_path, self.image_size)
        except OSError as exc:
            raise DataError(f"{self.files[index].image_path}: cannot decode image: {exc}") from None
        if self.cache_images:
            loaded[0].setflags(write=False)
            self._image_cache[index] = loaded
        return loaded


def build_dataset(data: DataConfig, split: str, *, train: bool, seed: int) -> ParkingSlotDataset:
    """`split` of the dataset under `data.root`, augmented as `data` says when `train`."""
    return ParkingSlotDataset(
        data.root,
        split,
        image_size=data.image_size,
        max_points=data.max_points,
        train=train,
        color_jitter=data.color_jitter,
        rotate=data.rotate,
        max_rotation_deg=data.max_rotation_deg,
        cache_images=data.cache_images,
        seed=seed,
        fmt=data.format,
    )


def load_image(path: str | Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image as the network sees it: float32 [3, S, S] RGB in [0, 1], and the file's (width, height)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image does not exist")
    try:
        image, original_size = transforms.decode_image(path, image_size)
    except OSError as exc:
        raise DataError(f"{path}: cannot decode image: {exc}") from None
    return model_input(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))), original_size


def normalised_marks(label: ParkingLabel, width: int, height: int) -> np.ndarray:
    """float64 [N, 4]: x, y in [0, 1] (label pixels are 1-based: (x - 0.5) / width), direction (rad), shape."""
    raw = label.marks
    marks = np.empty((raw.shape[0], 4))
    marks[:, 0] = (raw[:, 0] - 0.5) / width
    marks[:, 1] = (raw[:, 1] - 0.5) / height
    marks[:, 2] = np.arctan2(raw[:, 3] - raw[:, 1], raw[:, 2] - raw[:, 0])
    marks[:, 3] = raw[:, 4]
    return marks
