"""Training order as a pure function of (seed, epoch): what makes a resumed run repeat the batches.

A ``DataLoader(shuffle=True, generator=...)`` draws each epoch's order from one generator that
advances epoch after epoch, so a process started from a checkpoint at epoch 7 would draw epoch
0's order again. :class:`EpochSampler` seeds every epoch's permutation with ``(seed, epoch)``
(Lightning calls ``set_epoch`` at each epoch start, resumed or not), can skip the batches a
resumed epoch already trained on, and can tell the dataset which epoch an index belongs to
(``epoch * n + index``), so random augmentations can be seeded per (seed, epoch, image) too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

__all__ = ["DistributedEpochBatchSampler", "DistributedEpochSampler", "EpochBatchSampler", "EpochSampler",
           "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one image's augmentation in one epoch."""
    return (seed * 1_000_003 + epoch * 7_919 * 65_537 + index * 2_654_435_761) % (2**32)


class EpochSampler(Sampler[int]):
    """Indices of ``n`` items, shuffled by ``(seed, epoch)``.

    Args:
        n: number of items.
        seed: the run's seed.
        shuffle: shuffle (training) or keep the order.
        encode_epoch: yield ``epoch * n + index`` (the dataset decodes both), for per-epoch
            augmentation seeds.
        epoch_fn: returns the epoch about to start (the datamodule passes
            ``trainer.current_epoch``), read when an epoch's iteration begins.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, encode_epoch: bool = False,
                 epoch_fn: Callable[[], int | None] | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.encode_epoch = int(n), int(seed), shuffle, encode_epoch
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch_fn = epoch_fn
        self.epoch = 0
        self.skip = 0
        self.keep: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (``epoch_fn``, when given, has the last word:
        after a resume Lightning's number here can run one ahead of ``trainer.current_epoch``)."""
        self.epoch = int(epoch)

    def skip_next(self, items: int, keep: int | None = None) -> None:
        """Leave out the first ``items`` indices of the next pass (a resumed, half-done epoch), and
        yield at most ``keep`` after them (None: all the rest)."""
        self.skip = max(0, int(items))
        self.keep = None if keep is None else max(0, int(keep))

    def order(self, epoch: int) -> list[int]:
        """The item order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        if self.epoch_fn is not None and (epoch := self.epoch_fn()) is not None:
            self.epoch = int(epoch)
        skip, self.skip = self.skip, 0
        keep, self.keep = self.keep, None
        offset = self.epoch * self.n if self.encode_epoch else 0
        order = self.order(self.epoch)[skip:]
        order = [offset + i for i in (order if keep is None else order[:keep])]
        if self.world_size > 1:  # rank r: every world_size-th index, padded to equal shares (as DistributedSampler)
            order += order[:(-len(order)) % self.world_size]
            order = order[self.rank::self.world_size]
        return iter(order)

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


class DistributedEpochSampler(EpochSampler, DistributedSampler):
    """An :class:`EpochSampler` for one rank of a distributed run (``rank``, ``world_size``): rank
    r takes every ``world_size``-th index of the one-process order, so the ranks' batches together
    are the one-process batch. A ``DistributedSampler`` for Lightning, which then keeps it instead
    of wrapping it in its own (which reshuffles the order with its own seed)."""

    @property
    def num_replicas(self) -> int:  # DistributedSampler's names
        return self.world_size


class EpochBatchSampler(BatchSampler):
    """A ``BatchSampler`` over an :class:`EpochSampler` that passes ``set_epoch`` on (Lightning looks
    for it on a loader's ``sampler`` or ``batch_sampler.sampler`` only)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class DistributedEpochBatchSampler(EpochBatchSampler, DistributedSampler):
    """Batches of one rank's :class:`DistributedEpochSampler`, for a loader whose dataset reads whole
    batches (its ``sampler`` yields index lists); a ``DistributedSampler`` so Lightning keeps it."""

    def __init__(self, sampler: DistributedEpochSampler, batch_size: int, drop_last: bool) -> None:
        EpochBatchSampler.__init__(self, sampler, batch_size, drop_last)

    @property
    def rank(self) -> int:
        return self.sampler.rank

    @property
    def num_replicas(self) -> int:
        return self.sampler.world_size
