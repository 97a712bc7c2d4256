"""Training and validation loaders with resumable, rank-sharded, seeded sample order.

Every sample carries its own augmentation seed, drawn from (run seed, stream, epoch): the same run
sees the same crops and flips whatever the number of workers, and a resumed run picks up the
stream at the exact micro-batch where it stopped. Under torchrun each rank takes a disjoint
shard of every epoch's permutation (what DistributedSampler does), so ranks never see the same
image in the same step.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from semiseg_cli.engine import distributed


class SeededDataset(Dataset):
    """Wraps a dataset so that `ds[(index, seed)]` seeds Python's and torch's RNGs first."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:  # a worker process: its RNG state is ours to set
            random.seed(seed)
            torch.manual_seed(seed)
            np.random.seed(seed % (2**32))
            return self.base[index]
        # Loading in the main process: leave the training RNG streams as they were.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            np.random.seed(seed % (2**32))
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class InfiniteBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (index, augmentation seed), starting at micro-batch `start`."""

    def __init__(self, size: int, batch: int, seed: int, stream: int, start: int = 0) -> None:
        if size == 0:
            raise ValueError("empty dataset")
        self.size, self.batch, self.seed, self.stream, self.start = size, batch, seed, stream, start
        self.rank, self.world = distributed.rank(), distributed.world_size()
        per_rank = max(size // self.world, 1)
        self.per_epoch = max(per_rank // batch, 1)

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        g = np.random.default_rng([self.seed, self.stream, epoch])
        perm = g.permutation(self.size)
        need = self.per_epoch * self.batch * self.world
        if need > len(perm):  # tiny pools: repeat the permutation to fill the epoch
            perm = np.concatenate([perm] * (need // len(perm) + 1))
        return perm[:need][self.rank :: self.world]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = self.start
        epoch = it // self.per_epoch
        idx = self._epoch_indices(epoch)
        while True:
            e, pos = divmod(it, self.per_epoch)
            if e != epoch:
                epoch, idx = e, self._epoch_indices(e)
            chunk = idx[pos * self.batch : (pos + 1) * self.batch]
            seeds = np.random.default_rng([self.seed, self.stream, e, pos, self.rank]).integers(0, 2**62, len(chunk))
            yield [(int(i), int(s)) for i, s in zip(chunk, seeds)]
            it += 1

    def __len__(self) -> int:  # pragma: no cover - infinite
        return 2**62


def infinite_loader(dataset: Dataset, batch: int, workers: int, seed: int, stream: int, start: int, pin: bool) -> Iterator[dict[str, Any]]:
    sampler = InfiniteBatchSampler(len(dataset), batch, seed, stream, start)  # type: ignore[arg-type]
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return iter(loader)


class ShardedEval(Sampler[int]):
    """Each rank evaluates a disjoint shard, without DistributedSampler's duplicate padding, so
    the reduced confusion matrix counts every image exactly once."""

    def __init__(self, size: int) -> None:
        self.indices = list(range(size))[distributed.rank() :: distributed.world_size()]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, batch: int, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=ShardedEval(len(dataset)), num_workers=workers, pin_memory=pin)  # type: ignore[arg-type]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
