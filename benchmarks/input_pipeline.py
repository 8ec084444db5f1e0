"""Input pipeline: uint8 images + colour jitter on the device (ours) against float32 images
jittered in the DataLoader workers (the reference, how psdet loaded data before).

    python benchmarks/input_pipeline.py [--small] [--device cpu|cuda] [--workers 4 12] [--data DIR]

Both variants read the same ps2.0-layout training split through the same
`ParkingSlotDataset` (ps_gat's data settings, 512x512, colour jitter 0.1, with rotation on):
the workers decode, resize and rotate. Then:
- reference: each worker converts its sample to float32 and jitters it with the
  per-image numpy reference of psdet/testing/reference_augment.py (the code psdet's workers ran
  before); the batch, 4 bytes a pixel, goes through shared memory, pinned memory (CUDA)
  and the host-to-device copy;
- ours: the engine's loader (`psdet.data.batch.collate_fn`). On CUDA the batch goes as
  uint8 with each sample's jitter parameters, and `model_input` makes the float32 input
  and jitters the whole batch on the GPU; on the CPU the workers' collate does that,
  batched, in torch.
One "epoch" = a fresh DataLoader over `--images` images (as the engine makes one per
epoch, worker start-up included), until the last batch is on the device, ready for the
model (CUDA synchronised). The variants interleave over `--repeats` rounds; the table
shows median images/s and the largest difference between the two first batches, which
must agree within float32 rounding (2e-5). The last line is
`input_pipeline: ratio=X ours_img_s=X ref_img_s=X workers=N`, ratio = ours / reference
images/s at the last worker count N. Without `--data`, a synthetic dataset is rendered
into a temporary directory first.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import Column, Table, interleaved, median, summary_line  # noqa: E402
from psdet.config import load_config  # noqa: E402
from psdet.data import build_dataset, synth  # noqa: E402
from psdet.data.batch import collate_fn, model_input  # noqa: E402
from psdet.testing.reference_augment import color_jitter as reference_color_jitter  # noqa: E402


class WorkerJitter(Dataset):
    """The reference: a sample's float32 image, jittered in the worker that loads it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        pixels = sample.pop("image").numpy().astype(np.float32) / np.float32(255.0)
        if "jitter" in sample:
            pixels = reference_color_jitter(pixels, sample.pop("jitter").numpy())
        sample["image"] = torch.from_numpy(np.ascontiguousarray(pixels))
        return sample


def reference_input(batch: dict, device: torch.device) -> torch.Tensor:
    return batch["image"].to(device, non_blocking=True)


def our_input(batch: dict, device: torch.device) -> torch.Tensor:
    jitter = batch.get("jitter")
    return model_input(batch["image"].to(device, non_blocking=True),
                       None if jitter is None else jitter.to(device, non_blocking=True))


def epoch(variant: tuple, device: torch.device, batch_size: int, workers: int) -> torch.Tensor:
    """One pass as the engine's loader makes it; returns the first batch's model input.

    variant: (dataset, the DataLoader's collate_fn or None for the default, batch -> model input)."""
    dataset, collate, to_input = variant
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        collate_fn=collate, generator=torch.Generator().manual_seed(0))
    first = None
    for batch in loader:
        images = to_input(batch, device)
        first = images if first is None else first
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CI smoke test: 16 images at 256x256, 1 round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, nargs="+", help="DataLoader workers (default: 2 and the CPU count)")
    parser.add_argument("--data", help="a ps2.0-layout dataset (default: render a synthetic one)")
    parser.add_argument("--images", type=int, help="images per epoch (default 256; --small 16)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, help="network input size (default ps_gat's 512; --small 256)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5; --small 1)")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = args.images or (16 if args.small else 256)
    image_size = args.image_size or (256 if args.small else 512)
    repeats = args.repeats or (1 if args.small else 5)
    batch_size = min(args.batch_size, images)
    workers = args.workers or ([0] if args.small else sorted({2, os.cpu_count() or 2}))

    with tempfile.TemporaryDirectory(prefix="psdet-input-") as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            synth.generate(root, images, 1, seed=0, progress=False)
        # ps_gat follows the original (no rotation); the loader is measured with it on, its heaviest work
        cfg = load_config("ps_gat", [f"data.root={root}", f"data.image_size={image_size}", "data.rotate=true"])
        dataset = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=0)
        dataset = Subset(dataset, range(min(images, len(dataset))))
        variants = {"reference": (WorkerJitter(dataset), None, reference_input),
                    "ours": (dataset, collate_fn(device), our_input)}
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"input pipeline, ps_gat data ({image_size}x{image_size}, rotation, colour jitter "
              f"{cfg.data.color_jitter}), {len(dataset)} images per epoch, batch {batch_size}, {name}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, median of {repeats}")
        float_mib = batch_size * 3 * image_size**2 * 4 / 2**20
        ours = f"{float_mib / 4:.1f} MiB (uint8)" if device.type == "cuda" else f"{float_mib:.1f} MiB (float32, on a CPU)"
        print(f"bytes per batch from the workers: reference {float_mib:.1f} MiB (float32), ours {ours}")
        table = Table(Column("workers", ">7"), Column("reference img/s", "15.1f"), Column("ours img/s", "10.1f"),
                      Column("ratio", "6.2f"), Column("first batch max diff", "20.1e"))
        table.print_header()
        rates = {}
        for count in workers:
            firsts = {key: epoch(variant, device, batch_size, count) for key, variant in variants.items()}
            torch.testing.assert_close(firsts["ours"], firsts["reference"], atol=2e-5, rtol=0)
            max_diff = float((firsts["ours"] - firsts["reference"]).abs().max())
            times = interleaved({key: lambda variant=variant, count=count: epoch(variant, device, batch_size, count)
                                 for key, variant in variants.items()}, repeats, warmup=0)
            rates = {key: len(dataset) / median(seconds) for key, seconds in times.items()}
            table.print_row(str(count), rates["reference"], rates["ours"], rates["ours"] / rates["reference"], max_diff)
    print(summary_line("input_pipeline", ratio=rates["ours"] / rates["reference"], ours_img_s=f"{rates['ours']:.1f}",
                       ref_img_s=f"{rates['reference']:.1f}", workers=workers[-1]))


if __name__ == "__main__":
    main()
