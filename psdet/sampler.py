"""A distributed, resumable sampler: the epoch's order is a pure function of (seed, epoch)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles `num_samples` indices with a generator seeded by (seed, epoch), pads the
    permutation to a multiple of `world_size` (as DistributedSampler does), gives rank r
    every world_size-th index from r, and can start `skip_batches` batches into the epoch.
    With `drop_last` (the default) each rank's partial last batch is dropped; without it
    (the original's DataLoader) it is the epoch's last, shorter batch.

    Nothing here touches the global RNG, so a run resumed mid-epoch sees exactly the
    batches it would have seen.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    @property
    def per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank per epoch: the full ones, and the partial last one unless `drop_last`."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def _order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        padded = self.per_rank * self.world_size
        order += order[: padded - len(order)]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        mine = self._order()[: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.skip_batches * self.batch_size :])

    def __len__(self) -> int:
        kept = min(self.batches_per_epoch * self.batch_size, self.per_rank)
        return max(kept - self.skip_batches * self.batch_size, 0)
