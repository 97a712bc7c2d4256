"""Decoded training images kept in memory (`data.cache_decoded`), so later epochs skip the decode.

What is cached is the deterministic part of reading a training item: the image decoded to RGB
and resized by `data.resize`, its mask after the dataset's label mapping (resized the same way),
and the class ids present in the stored mask (an image's tags when no tags file is given). The
random part (scale, crop, flip, normalisation) runs on every read as before, from the same
per-sample seed, so a batch is the same with or without the cache.

Where the memory lives: one uint8 buffer for all images and one for all masks, torch tensors
allocated by the training process (the "owner"). The loaders fill it in that process before any
DataLoader worker starts, so forked workers (Linux) read the parent's pages without copying them
(nothing writes to them after the fork); under the spawn or forkserver start methods torch moves
the buffers to shared memory when a worker receives the dataset. A worker never adds to the
cache: a cache filled inside a worker would be that worker's alone, and would cost its memory
once per worker. With `data.workers = 0` the main process fills it as it reads.

`auto` caches a dataset when its decoded size, with the caches already made in this process,
fits `data.cache_ram_fraction` of the memory available now (the smaller of MemAvailable and the
cgroup's limit, shared by torchrun's local ranks); where that cannot be read, `auto` does not
cache.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

_live_lock = threading.Lock()
_live_bytes = 0  # bytes held by the caches of this process that are still alive


class Decoded(NamedTuple):
    image: np.ndarray  # HxWx3 uint8, after data.resize
    mask: np.ndarray | None  # HxW uint8 class ids (255 = ignore), after data.resize; None: no mask
    present: tuple[int, ...] | None  # class ids in the stored mask, ignore left out; None: no mask


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup memory limit
    (containers); None where neither can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2 ("max": none)
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            found.append(max(0, limit - usage))
    return min(found) if found else None


def local_ranks() -> int:
    """Processes on this machine that each hold their own caches (torchrun's local world)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def live_bytes() -> int:
    return _live_bytes


def _release(nbytes: int) -> None:
    global _live_bytes
    with _live_lock:
        _live_bytes -= nbytes


def admit(mode: bool | str, nbytes: int, fraction: float, what: str) -> bool:
    """Whether a cache of `nbytes` is made: always for True (refused in one line when it cannot
    fit the memory available), for "auto" when it fits `fraction` of it with the live caches."""
    from semiseg_cli.errors import UserError

    if mode is False:
        return False
    avail = available_memory()
    if mode is True:
        if avail is not None and nbytes > avail // local_ranks():
            raise UserError(
                f"data.cache_decoded = true needs {nbytes / 2**30:.2f} GiB for the decoded {what}, but only "
                f"{avail / local_ranks() / 2**30:.2f} GiB are available per process; set it to \"auto\" or false"
            )
        return True
    if avail is None:
        return False
    return _live_bytes + nbytes <= fraction * (avail + _live_bytes) / local_ranks()


class DecodedCache:
    """Slots for `len(sizes)` decoded items; `sizes` are (width, height) after data.resize and
    `with_mask` says which items have a mask. `get(i)` is None until item i is stored."""

    def __init__(self, sizes: Sequence[tuple[int, int]], with_mask: Sequence[bool]) -> None:
        global _live_bytes
        areas = np.array([w * h for w, h in sizes], np.int64)
        self.shapes = [(int(h), int(w)) for w, h in sizes]
        self.with_mask = np.array(with_mask, bool)
        self.img_start = np.concatenate([[0], np.cumsum(areas * 3)])
        self.mask_start = np.concatenate([[0], np.cumsum(np.where(self.with_mask, areas, 0))])
        self.images = torch.empty(int(self.img_start[-1]), dtype=torch.uint8)
        self.masks = torch.empty(int(self.mask_start[-1]), dtype=torch.uint8)
        self.filled = np.zeros(len(sizes), bool)
        self.present: list[tuple[int, ...] | None] = [None] * len(sizes)
        self.owner = os.getpid()
        self._views()
        with _live_lock:
            _live_bytes += self.nbytes
        weakref.finalize(self, _release, self.nbytes)

    @staticmethod
    def bytes_for(sizes: Sequence[tuple[int, int]], with_mask: Sequence[bool]) -> int:
        return int(sum(w * h * (4 if m else 3) for (w, h), m in zip(sizes, with_mask)))

    @property
    def nbytes(self) -> int:
        return int(self.images.numel() + self.masks.numel())

    def _views(self) -> None:
        self._img = self.images.numpy()
        self._mask = self.masks.numpy()

    def __getstate__(self) -> dict[str, Any]:  # spawn/forkserver workers: the tensors travel, not numpy copies
        state = dict(self.__dict__)
        state.pop("_img"), state.pop("_mask")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._views()

    def __len__(self) -> int:
        return len(self.shapes)

    def is_owner(self) -> bool:
        return os.getpid() == self.owner

    def get(self, i: int) -> Decoded | None:
        if not self.filled[i]:
            return None
        h, w = self.shapes[i]
        image = self._img[self.img_start[i] : self.img_start[i + 1]].reshape(h, w, 3)
        image.flags.writeable = False  # a transform that wrote into it would change every later epoch
        mask = None
        if self.with_mask[i]:
            mask = self._mask[self.mask_start[i] : self.mask_start[i + 1]].reshape(h, w)
            mask.flags.writeable = False
        return Decoded(image, mask, self.present[i])

    def put(self, i: int, item: Decoded) -> bool:
        """Store item i (a no-op outside the owning process, or when its shape is not the one
        reserved, which leaves it decoded on every read)."""
        if self.filled[i] or not self.is_owner():
            return False
        h, w = self.shapes[i]
        if item.image.shape != (h, w, 3) or (item.mask is None) == bool(self.with_mask[i]):
            return False
        if item.mask is not None and item.mask.shape != (h, w):
            return False
        self._img[self.img_start[i] : self.img_start[i + 1]] = item.image.reshape(-1)
        if item.mask is not None:
            self._mask[self.mask_start[i] : self.mask_start[i + 1]] = item.mask.reshape(-1)
        self.present[i] = item.present
        self.filled[i] = True  # last: a reader sees either nothing or the whole item
        return True

    def fill(self, decode: Callable[[int], Decoded], threads: int | None = None) -> int:
        """Decode and store every missing item (threads: Pillow decodes outside the GIL);
        returns how many were stored. Only the owner fills."""
        if not self.is_owner():
            return 0
        missing = [i for i in range(len(self)) if not self.filled[i]]
        if not missing:
            return 0
        threads = threads or min(8, os.cpu_count() or 1)

        def one(i: int) -> bool:
            return self.put(i, decode(i))

        if threads <= 1 or len(missing) < 16:
            return sum(one(i) for i in missing)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode-cache") as ex:
            return sum(ex.map(one, missing, chunksize=8))
