"""A bounded pool of writer processes, fed through shared memory.

The pool runs `task(context, meta, arrays)` in worker processes for jobs made of a small
picklable `meta` and a few numpy arrays. It knows nothing about pseudo-labels (`writer` gives it
the task); it owns the processes, the memory the arrays travel in, backpressure and errors.

What can go wrong, and what this module does about it:
- Encoding in the main process, or in its threads (they share the GIL with the loop that feeds
  the GPU), makes the host the bottleneck: jobs run in separate processes, started with `spawn`
  (never `fork`: the parent holds CUDA and OpenMP state); a worker imports numpy and Pillow, not
  torch.
- Pickling the arrays into a pipe would cost the main process a copy and block it while the
  worker is busy: every job in flight owns a *slot*, a shared memory block (a Linux memfd, passed
  to each worker once as a file descriptor, so no name in /dev/shm and nothing to clean up after
  a kill); the parent fills it in place, the worker reads it in place, and the message is a few
  hundred bytes. Where memfd is missing (macOS) or a slot cannot be allocated, the arrays travel
  inside the message instead (slower, same result).
- An unbounded queue exhausts memory when the disk is slower than the GPU: at most `depth` jobs
  wait per worker (`bound` = workers x depth in all, one slot each); `submit` blocks until one
  finishes (backpressure), and `peak_in_flight` / `wait_s` say how often.
- A worker's exception would be lost, and a dead worker would hang a parent waiting for it: the
  parent waits on the workers' pipes *and* their process sentinels, so an exception comes back
  as one `PoolError` line naming the job, and a worker that died (OOM kill, signal) is reported
  as such instead of waited for. After the first error no job is accepted; the jobs already in
  flight on the other workers still finish (their files are complete), then the error is raised.
- A parent killed with SIGKILL must not leave workers behind: a worker exits when its pipe to
  the parent closes or its parent process changes.
- Ctrl-C reaches every process of the terminal's process group: workers ignore SIGINT, and the
  parent finishes the jobs in flight and stops them (`close`).
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

from semiseg_cli.errors import UserError

if TYPE_CHECKING:  # numpy loads lazily: `semiseg --help` should not import it
    import numpy as np

ALIGN = 64  # byte alignment of each array in a slot
# (name, numpy dtype string, shape, byte offset) of each array of a job, in its slot
Layout = Sequence[tuple[str, str, tuple[int, ...], int]]
Task = Callable[[Any, Any, dict[str, "np.ndarray"]], None]


class PoolError(UserError):
    """A job failed in a worker, or a worker died; the message is one line."""


def shared_memory_available() -> bool:
    return hasattr(os, "memfd_create")


def layout(specs: Sequence[tuple[str, Any, tuple[int, ...]]]) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    """Offsets of arrays (name, dtype, shape) packed into one buffer, each ALIGN-aligned; total bytes."""
    import numpy as np

    out, pos = [], 0
    for name, dtype, shape in specs:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out.append((name, dt.str, tuple(int(s) for s in shape), pos))
        pos += -(-n // ALIGN) * ALIGN
    return out, max(pos, ALIGN)


def views(buf: Any, lay: Layout) -> dict[str, "np.ndarray"]:
    """The arrays of a job as views into `buf` (a slot's mmap or a message's bytes)."""
    import numpy as np

    out = {}
    for name, dtype, shape, offset in lay:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(buf, dtype=dt, count=count, offset=offset).reshape(shape)
    return out


# ----------------------------------------------------------------------------- the worker side


def _worker_main(conn: Any, task: Task, context: Any, parent_pid: int) -> None:
    """A worker's loop: map slots, run jobs, answer each with ("done", id) or ("error", id, ...)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from multiprocessing.reduction import recv_handle

    maps: dict[int, tuple[int, mmap.mmap]] = {}
    try:
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:  # orphaned: the parent was killed
                    return
                continue
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "stop":
                return
            if kind == "map":
                _, index, generation, size = msg
                try:
                    fd = recv_handle(conn)
                except (EOFError, OSError, RuntimeError):  # the parent died mid-message
                    return
                try:
                    old = maps.pop(index, None)
                    if old is not None:
                        _close_map(old[1])
                    maps[index] = (generation, mmap.mmap(fd, size))
                finally:
                    os.close(fd)
                continue
            _, job, index, lay, meta, payload = msg
            try:
                buf = payload if payload is not None else maps[index][1]
                arrays = views(buf, lay)
                try:
                    task(context, meta, arrays)
                finally:
                    del arrays  # no view may outlive the job: the slot is refilled next
                reply: tuple[Any, ...] = ("done", job)
            except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
                reply = ("error", job, isinstance(e, UserError), _one_line(e))
            try:
                conn.send(reply)
            except OSError:
                return
    finally:
        for _, m in maps.values():
            _close_map(m)


def _one_line(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    import traceback

    where = ""
    tb = traceback.extract_tb(e.__traceback__)
    if tb:
        f = tb[-1]
        where = f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}{where}" if text else f"{type(e).__name__}{where}"


def _close_map(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a view still exists somewhere: the mapping goes with the process
        pass


# ----------------------------------------------------------------------------- the parent side


@dataclass
class _Slot:
    index: int
    size: int = 0
    generation: int = 0
    fd: int = -1
    mm: mmap.mmap | None = None


@dataclass
class _Worker:
    proc: Any
    conn: Any
    jobs: dict[int, int] = field(default_factory=dict)  # job id -> slot index, in flight here
    mapped: dict[int, int] = field(default_factory=dict)  # slot index -> generation it has mapped
    alive: bool = True
    eof: bool = False  # its pipe closed: only its sentinel is still worth waiting on


class WriterPool:
    """`workers` processes running `task(context, meta, arrays)`, at most `depth` jobs each.

    `submit(tag, meta, specs, fill)` reserves a slot for arrays of the given (name, dtype, shape),
    lets `fill(views)` write them in place, and hands the job to the least busy worker; it blocks
    while every worker has `depth` jobs. `completed` lists the tags of finished jobs, in the order
    they finished. `close()` waits for everything, stops the workers and raises the first error.
    """

    def __init__(self, task: Task, context: Any, workers: int, depth: int = 2, shared: bool | None = None) -> None:
        if workers < 1 or depth < 1:
            raise ValueError("a pool needs at least one worker and a depth of at least one")
        self.depth = depth
        self.bound = workers * depth
        self.shared = shared_memory_available() if shared is None else (shared and shared_memory_available())
        self.completed: list[Hashable] = []
        self.error: PoolError | None = None
        self.dead_pids: list[int] = []  # workers that died or were killed: their temp files may remain
        self.peak_in_flight = 0
        self.wait_s = 0.0  # time `submit` and `drain` spent waiting for workers
        self._tags: dict[int, Hashable] = {}
        self._labels: dict[int, str] = {}
        self._next_job = 0
        self._slots = [_Slot(i) for i in range(self.bound)]
        self._free = list(range(self.bound))
        self._closed = False
        ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        try:
            for i in range(workers):
                parent_conn, child_conn = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_worker_main, args=(child_conn, task, context, os.getpid()),
                                   name=f"semiseg-writer-{i}", daemon=True)
                proc.start()
                child_conn.close()  # the worker's end lives in the worker only: it sees EOF if we die
                self._workers.append(_Worker(proc, parent_conn))
        except BaseException:
            self.terminate()
            raise

    # ------------------------------------------------------------------ public

    @property
    def in_flight(self) -> int:
        return sum(len(w.jobs) for w in self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def submit(self, tag: Hashable, meta: Any, specs: Sequence[tuple[str, Any, tuple[int, ...]]],
               fill: Callable[[dict[str, "np.ndarray"]], None], label: str = "") -> None:
        """Queue one job; blocks while all workers are busy. Raises the pool's first error."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        self._collect(block=False)
        self._raise_error()
        worker = self._idle_worker()
        slot = self._slots[self._free.pop()]
        job = self._next_job
        self._next_job += 1
        try:
            lay, total = layout(specs)
            payload = None
            if self.shared and self._reserve(slot, total):
                v = views(slot.mm, lay)
            else:
                payload = bytearray(total)
                v = views(payload, lay)
            try:
                fill(v)
            finally:
                del v
            try:
                if payload is None and worker.mapped.get(slot.index) != slot.generation:
                    self._send_map(worker, slot)
                worker.conn.send(("job", job, slot.index, lay, meta, payload))
            except OSError:  # the worker is gone (its pipe broke): report it as such
                worker.proc.join(timeout=5)
                self._died(worker)
                self._raise_error()
                raise
        except BaseException:
            self._free.append(slot.index)
            raise
        worker.jobs[job] = slot.index
        self._tags[job], self._labels[job] = tag, label
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def drain(self) -> None:
        """Wait for every job in flight; raise the first error."""
        t = time.perf_counter()
        while self.in_flight:
            self._collect(block=True)
        self.wait_s += time.perf_counter() - t
        self._raise_error()

    def close(self) -> None:
        """Finish the jobs in flight, stop the workers, free the slots; raise the first error.
        Interrupted (a second Ctrl-C), it stops the workers without waiting."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._stop()

    def terminate(self) -> None:
        """Stop now: jobs in flight are abandoned (their workers are killed)."""
        if not self._closed:
            self._stop(wait=False)

    def __enter__(self) -> "WriterPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.terminate()

    # ------------------------------------------------------------------ internals

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _idle_worker(self) -> _Worker:
        t = time.perf_counter()
        try:
            while True:
                alive = [w for w in self._workers if w.alive]
                if not alive:
                    self._raise_error()
                    raise PoolError("every writer process has stopped")
                w = min(alive, key=lambda x: len(x.jobs))
                if len(w.jobs) < self.depth and self._free:
                    return w
                self._collect(block=True)
                self._raise_error()
        finally:
            self.wait_s += time.perf_counter() - t

    def _reserve(self, slot: _Slot, size: int) -> bool:
        """Make `slot` at least `size` bytes of shared memory; False if that is impossible."""
        if slot.mm is not None and slot.size >= size:
            return True
        self._release(slot)
        size = -(-size // (1 << 20)) * (1 << 20)  # whole MiB: a slightly larger image reuses it
        fd = -1
        try:
            fd = os.memfd_create(f"semiseg-writer-slot-{slot.index}", getattr(os, "MFD_CLOEXEC", 0))
            os.ftruncate(fd, size)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)  # fail here (ENOSPC/ENOMEM), not with SIGBUS later
            slot.mm = mmap.mmap(fd, size)
        except OSError:
            if fd >= 0:
                os.close(fd)
            self.shared = False  # memory is short: the rest of the run passes arrays in messages
            return False
        slot.fd, slot.size = fd, size
        slot.generation += 1
        return True

    def _release(self, slot: _Slot) -> None:
        if slot.mm is not None:
            _close_map(slot.mm)
            slot.mm = None
        if slot.fd >= 0:
            os.close(slot.fd)
            slot.fd = -1
        slot.size = 0

    def _send_map(self, worker: _Worker, slot: _Slot) -> None:
        from multiprocessing.reduction import send_handle

        worker.conn.send(("map", slot.index, slot.generation, slot.size))
        send_handle(worker.conn, slot.fd, worker.proc.pid)
        worker.mapped[slot.index] = slot.generation

    def _collect(self, block: bool) -> None:
        """Handle the answers that arrived (waiting for one if `block`), and dead workers."""
        alive = [w for w in self._workers if w.alive]
        if not alive:
            return
        waitables: list[Any] = [w.conn for w in alive if not w.eof] + [w.proc.sentinel for w in alive]
        ready = mp_wait(waitables, timeout=None if block else 0)
        for w in alive:
            if not w.eof and w.conn in ready:
                self._read_answers(w)
        for w in alive:
            if w.alive and w.proc.sentinel in ready:
                if not w.eof:
                    self._read_answers(w)  # what it sent before it died
                self._died(w)

    def _read_answers(self, w: _Worker) -> None:
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                job = msg[1]
                self._free.append(w.jobs.pop(job))
                tag, label = self._tags.pop(job), self._labels.pop(job)
                if msg[0] == "done":
                    self.completed.append(tag)
                elif self.error is None:
                    is_user, text = msg[2], msg[3]
                    self.error = PoolError(text if is_user else f"writing {label or tag} failed in a writer process: {text}")
        except (EOFError, OSError):
            w.eof = True  # the worker is gone; its sentinel will say so

    def _died(self, w: _Worker) -> None:
        w.alive = False
        w.proc.join(timeout=1)
        code = w.proc.exitcode
        self.dead_pids.append(w.proc.pid)
        lost = [self._labels.pop(j) or str(self._tags[j]) for j in w.jobs]
        for j, s in w.jobs.items():
            self._tags.pop(j, None)
            self._free.append(s)
        w.jobs.clear()
        if self.error is None and (lost or not self._closed):
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            what = f" while writing {lost[0]}" + (f" and {len(lost) - 1} more" if len(lost) > 1 else "") if lost else ""
            hint = " (out of memory?)" if code == -signal.SIGKILL else ""
            self.error = PoolError(f"a writer process {how}{hint}{what}; the images finished so far are kept, rerun to continue")

    def _stop(self, wait: bool = True) -> None:
        self._closed = True
        for w in self._workers:
            if w.alive:
                try:
                    w.conn.send(("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + (10 if wait else 0)
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
                if w.alive:
                    self.dead_pids.append(w.proc.pid)
            elif w.alive and w.proc.exitcode not in (0, None):
                self.dead_pids.append(w.proc.pid)
            w.alive = False
            try:
                w.conn.close()
            except OSError:
                pass
        for s in self._slots:
            self._release(s)
