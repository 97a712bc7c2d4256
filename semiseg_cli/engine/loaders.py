"""Training and validation loaders with resumable, rank-sharded, seeded sample order.

Every sample carries its own augmentation seed, drawn from (run seed, stream, epoch): the same run
sees the same crops and flips whatever the number of workers, and a resumed run picks up the
stream at the exact micro-batch where it stopped. Under torchrun each rank takes a disjoint
shard of every epoch's permutation (what DistributedSampler does), so ranks never see the same
image in the same step.

How fast batches come (`LoaderSettings`, from `data.pin_memory`, `data.persistent_workers`,
`data.prefetch_factor`) never changes what they hold: the sampler fixes every batch's images and
seeds before any worker sees them, and torch returns batches in sampler order.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from semiseg_cli.engine import distributed
from semiseg_cli.errors import UserError


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


class LoaderSettings(NamedTuple):
    """How the DataLoaders run (speed only): `pin` page-locked batches (CUDA only), `persistent`
    workers kept between evaluation passes, `prefetch` batches in flight per worker."""

    pin: bool = False
    persistent: bool = True
    prefetch: int = 2

    @staticmethod
    def of(pin: "bool | LoaderSettings") -> "LoaderSettings":
        """Settings from either these settings or a bare `pin` flag (callers that only pin)."""
        return pin if isinstance(pin, LoaderSettings) else LoaderSettings(pin=bool(pin))


def loader_settings(data_cfg: Any, device: torch.device) -> LoaderSettings:
    """The loader switches of a `DataConfig` on `device`: pinned memory only where a CUDA copy
    follows (on a CPU there is nothing to pin for)."""
    return LoaderSettings(
        pin=bool(data_cfg.pin_memory) and device.type == "cuda",
        persistent=bool(data_cfg.persistent_workers),
        prefetch=int(data_cfg.prefetch_factor),
    )


def _fill_before_fork(dataset: Any, workers: int) -> None:
    """Fill the dataset's decoded cache (`data.cache_decoded`) in this process before workers
    start, so that they all read the same pages; without workers it fills as it reads."""
    fill = getattr(dataset, "fill_cache", None)
    if workers > 0 and fill is not None:
        fill()


def infinite_loader(
    dataset: Dataset, batch: int, workers: int, seed: int, stream: int, start: int, pin: bool | LoaderSettings
) -> Iterator[dict[str, Any]]:
    """Endless training batches from micro-batch `start` (`InfiniteBatchSampler`). One iterator
    for the whole run: its workers live until it is dropped (`persistent` has nothing to keep),
    and it is created here, before the caller restores a resumed run's RNG state, so the one
    number a DataLoader iterator draws from torch's generator is drawn from the fresh state."""
    opts = LoaderSettings.of(pin)
    _fill_before_fork(dataset, workers)
    sampler = InfiniteBatchSampler(len(dataset), batch, seed, stream, start)  # type: ignore[arg-type]
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=opts.pin,
        persistent_workers=workers > 0,
        prefetch_factor=opts.prefetch if workers > 0 else None,
    )
    return iter(loader)


class ShardedEval(Sampler[int]):
    """Each rank evaluates a disjoint shard, without DistributedSampler's duplicate padding, so
    the reduced confusion matrix counts every image exactly once."""

    def __init__(self, size: int, rank: int | None = None, world: int | None = None) -> None:
        rank = distributed.rank() if rank is None else rank
        world = distributed.world_size() if world is None else world
        self.indices = list(range(size))[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------- same-size batches
# Evaluation (and pseudo-labelling) batches hold images of one size only: torch cannot stack
# different sizes, padding would change every prediction (ASPP's global pooling sees the
# padding) and resizing would change the labels. A dataset of all-different sizes runs at batch 1.


def image_sizes(layout: Any, images: Sequence[str]) -> list[tuple[int, int]]:
    """(width, height) of each root-relative image from its header (cheap: no decoding), so
    batches can group equal sizes; a missing file or unreadable header is a one-line UserError
    naming the file, before any work starts."""
    from PIL import Image

    sizes = []
    for rel in images:
        path = layout.root / rel
        if not path.is_file():
            raise UserError(f"image {path} does not exist; check --root and the split file")
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image {path}: {str(e) or type(e).__name__}") from None
        sizes.append((int(w), int(h)))
    return sizes


def size_batches(indices: Iterable[int], sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of at most `batch_size` indices whose images share one size, in first-seen order
    (deterministic: the same indices and sizes give the same batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(sizes[i]), []).append(int(i))  # type: ignore[arg-type]
    batches = []
    for members in groups.values():
        for k in range(0, len(members), batch_size):
            batches.append(members[k : k + batch_size])
    return batches


def dataset_sizes(dataset: Any) -> list[tuple[int, int]]:
    """Stored image sizes of a `SegDataset` (its `.layout` and `.pairs`). `data.resize` scales
    every image by the same factor, so equal stored sizes stay equal after it."""
    return image_sizes(dataset.layout, [p[0] for p in dataset.pairs])


class SizeBatchedEval(Sampler[list[int]]):
    """Batches for evaluation: this rank's shard (`ShardedEval`'s disjoint `rank::world` slice,
    so every image is counted exactly once across ranks), grouped into same-size batches of at
    most `batch` images, in a fixed order."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch: int, rank: int | None = None, world: int | None = None) -> None:
        shard = ShardedEval(len(sizes), rank, world).indices
        self.batches = size_batches(shard, sizes, batch)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


class PersistentPasses:
    """Passes over a DataLoader whose workers stay alive between passes.

    A fresh DataLoader iterator draws one number from torch's global generator (its workers'
    base seed); a persistent loader's later passes reuse the first iterator and draw nothing.
    Training validates from inside the RNG stream that checkpoints store, so a resumed run (a new
    loader, whose first pass draws) would leave that stream elsewhere than the uninterrupted run.
    Each pass therefore makes the same draw a fresh iterator makes, and the loader itself seeds
    its workers from a generator of its own (evaluation reads no random numbers)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        torch.empty((), dtype=torch.int64).random_()  # what `_BaseDataLoaderIter.__init__` draws
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def eval_loader(
    dataset: Dataset, batch: int, workers: int, pin: bool | LoaderSettings, sizes: Sequence[tuple[int, int]] | None = None
) -> DataLoader | PersistentPasses:
    """Evaluation batches of same-size images, sharded across ranks. `sizes` (width, height per
    index) defaults to the headers of the dataset's images (read now: a bad file fails here).
    `pin` is a bare flag (one pass, e.g. `semiseg eval`) or the run's `LoaderSettings`, whose
    `persistent` keeps the workers between the validation passes of a training run."""
    opts = pin if isinstance(pin, LoaderSettings) else LoaderSettings(pin=bool(pin), persistent=False)
    if sizes is None:
        sizes = dataset_sizes(dataset)
    if len(sizes) != len(dataset):  # type: ignore[arg-type]
        raise ValueError(f"{len(sizes)} sizes for {len(dataset)} images")  # type: ignore[arg-type]
    sampler = SizeBatchedEval(sizes, batch)
    _fill_before_fork(dataset, workers)
    persistent = opts.persistent and workers > 0
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=opts.pin,
        persistent_workers=persistent, prefetch_factor=opts.prefetch if workers > 0 else None,
        generator=torch.Generator() if persistent else None,
    )
    return PersistentPasses(loader) if persistent else loader


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`; copies from pinned memory (`data.pin_memory`) are
    non-blocking, so the next batch's host work overlaps the copy."""
    cuda = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=cuda and v.is_pinned()) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
