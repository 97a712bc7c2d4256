"""Everything that knows about torch.distributed lives here.

One code path: without `torchrun` every helper degrades to the single-process answer, so the
loop never branches on whether it was launched distributed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(device_kind: str) -> None:
    """Initialise the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if launched_by_torchrun() and not is_dist():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every rank; rows may differ in number between ranks.

    Uses tensor collectives only (sizes first, then padded data), never pickled objects.
    """
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    width = max(counts)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts)], 0)


def average_gradients(params) -> None:  # type: ignore[no-untyped-def]
    """Average gradients across ranks for modules not wrapped in DDP (e.g. a discriminator)."""
    if not is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BN running statistics) equal to rank `src`'s.

    Without SyncBN (CPU/gloo) each rank's running statistics drift apart after its last forward;
    evaluation and checkpoints use rank 0's.
    """
    if not is_dist():
        return
    for b in module.buffers():
        dist.broadcast(b, src)


def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s, once, after construction.

    Each rank seeds its RNG with `seed + rank`, so whatever a method initialises randomly outside
    the DDP-wrapped student (an EMA teacher's copy, a discriminator) would otherwise start apart
    on every rank, and a discriminator, updated from averaged gradients, would stay apart.
    """
    if not is_dist():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.detach(), src)


def broadcast_small_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """`broadcast_buffers` in one collective per dtype (for small buffers synced every step, e.g.
    an EMA teacher's BatchNorm statistics); the buffers are flattened into a temporary copy."""
    if not is_dist():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for b in module.buffers():
        groups.setdefault((b.dtype, b.device), []).append(b)
    for bufs in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src)
        offset = 0
        for b in bufs:
            n = b.numel()
            b.detach().copy_(flat[offset : offset + n].view_as(b))
            offset += n
