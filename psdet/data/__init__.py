"""ps2.0-layout data: labels (`labels`), the torch dataset (`dataset`), augmentation
(`transforms`) and the synthetic parking-lot generator (`synth`).

The torch-facing names (`ParkingSlotDataset`, `build_dataset`, `load_image`) are
imported lazily, so `import psdet.data.synth` (the `psdet synth`
command) and `psdet.data.labels` load no torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psdet.data.labels import ParkingLabel, SampleFiles, list_samples, read_label

if TYPE_CHECKING:
    from psdet.data.dataset import ParkingSlotDataset, build_dataset, load_image

_LAZY = ("ParkingSlotDataset", "build_dataset", "load_image")
__all__ = ["ParkingLabel", "SampleFiles", "list_samples", "read_label", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from psdet.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'psdet.data' has no attribute {name!r}")
