"""Data loaders, including an exactly resumable training stream.

How the trainer resumes exactly
-------------------------------
Training is iteration-based. The training stream is one endless sequence of samples: epoch e is a
permutation of the dataset drawn from a generator seeded by (seed, e), and every position in it also
carries a `sample_seed` drawn from that same generator. `ResumableSampler` yields `(index,
sample_seed)` pairs and `CocoDataset.__getitem__` seeds its flip decision from `sample_seed`, so what
a sample looks like depends only on (seed, global position), never on a global RNG or on which worker
loaded it. Batches are consecutive runs of `batch_size` samples (they may straddle an epoch
boundary), so after `step` optimizer steps the stream sits at position `step * batch_size`:

    loader = make_train_loader(dataset, batch_size, workers, seed, start_step=step)
    batches = iter(loader)            # endless
    images, targets = next(batches)   # the batch of global step `step`

Stopping after step k and restarting with start_step=k gives exactly the batches an uninterrupted run
would have seen from step k on.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_SEED_MAX = 2**62


def derive_seed(*parts: int) -> int:
    """A well-mixed 62-bit seed from integers (neighbouring inputs give unrelated streams)."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_MAX


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images as a list (sizes differ); torchvision detectors batch and pad them themselves."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from the per-worker torch seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class ResumableSampler(Sampler):
    """Endless, seeded sample order that can start at any global position.

    Yields `(index, sample_seed)`. Epoch e (positions e*n .. e*n+n-1) visits every index once, in a
    permutation seeded by (seed, e) when `shuffle`, else in order; `sample_seed` is drawn from the
    same per-epoch generator and seeds the dataset's augmentation of that one sample.
    """

    def __init__(self, dataset_len: int, seed: int, start_index: int = 0, shuffle: bool = True):
        if dataset_len <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if start_index < 0:
            raise ValueError("start_index must be >= 0")
        self.dataset_len = dataset_len
        self.seed = seed
        self.start_index = start_index
        self.shuffle = shuffle

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [n], sample_seeds [n]) of one epoch."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=g)
        else:
            order = torch.arange(self.dataset_len)
        seeds = torch.randint(0, _SEED_MAX, (self.dataset_len,), generator=g, dtype=torch.int64)
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start_index, self.dataset_len)
        while True:
            order, seeds = self.epoch_order(epoch)
            for i in range(offset, self.dataset_len):
                yield int(order[i]), int(seeds[i])
            epoch, offset = epoch + 1, 0


def _loader_kwargs(workers: int, seed: int, pin_memory: bool) -> dict[str, Any]:
    return {
        "num_workers": workers,
        "collate_fn": collate_detection,
        "worker_init_fn": seed_worker,
        "generator": torch.Generator().manual_seed(seed),
        "persistent_workers": workers > 0,
        "pin_memory": pin_memory,
    }


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A finite, seeded loader (evaluation, or epoch-based use). Yields (images list, targets list)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        **_loader_kwargs(workers, seed, pin_memory),
    )


def make_batched_loader(dataset: Dataset, batches: Sequence[Sequence[int]], workers: int = 0) -> DataLoader:
    """A finite loader over explicit batches of dataset indices (e.g. evaluation batches of equal-size images)."""
    return DataLoader(dataset, batch_sampler=[list(b) for b in batches], **_loader_kwargs(workers, 0, False))


def make_train_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    seed: int,
    start_step: int = 0,
    shuffle: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless training loader whose first batch is the one of global step `start_step`."""
    sampler = ResumableSampler(len(dataset), seed, start_index=start_step * batch_size, shuffle=shuffle)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **_loader_kwargs(workers, seed, pin_memory)
    )


def infinite_batches(loader: DataLoader) -> Iterator[Any]:
    """Cycle a finite loader forever (each pass reshuffles with the loader's own generator)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the loader yields no batches (empty dataset, or drop_last with too few samples)")


class RankSlice(Sampler):
    """One rank's share of the global training stream: in every global batch of `global_batch`
    positions, rank r takes the consecutive slice [r*b, (r+1)*b) with b = global_batch / world.

    The global stream is `ResumableSampler`'s, so the union over ranks of a step's slices is exactly
    the batch a single process would train on at that step, and resume needs only the global step.
    """

    def __init__(self, stream: ResumableSampler, global_batch: int, rank: int, world: int):
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} does not divide over {world} ranks")
        self.stream = stream
        self.per_rank = global_batch // world
        self.global_batch = global_batch
        self.rank = rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        for position, item in enumerate(self.stream):
            if lo <= position % self.global_batch < hi:
                yield item


def make_rank_train_loader(
    dataset: Dataset,
    global_batch: int,
    rank: int,
    world: int,
    workers: int,
    seed: int,
    start_step: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """`make_train_loader` for one rank of a data-parallel group: batches of global_batch / world."""
    stream = ResumableSampler(len(dataset), seed, start_index=start_step * global_batch)
    sampler = RankSlice(stream, global_batch, rank, world)
    return DataLoader(
        dataset,
        batch_size=global_batch // world,
        sampler=sampler,
        drop_last=False,
        **_loader_kwargs(workers, seed, pin_memory),
    )
