"""User-facing errors.

A `UserError` is bad input the user can fix (a missing file, an unknown preset key, a label value
out of range). The CLI prints its message as one line and exits non-zero without a traceback;
`UserWarning`-style notes go through `warn`. Everything else is a bug and keeps its traceback.

A `UserError` raised inside a DataLoader worker reaches the main process re-raised by torch as
`UserError("Caught UserError in DataLoader worker process 0.\\nOriginal Traceback ...")`: the
worker's whole traceback as the message. The constructor recognises that form and keeps only the
original message (the traceback's last line), so the user still reads one line.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

_WORKER_PREFIX = "Caught "


def _unwrap_worker_message(message: str) -> str:
    if not message.startswith(_WORKER_PREFIX) or "DataLoader worker" not in message.split("\n", 1)[0]:
        return message
    lines = [ln for ln in message.rstrip().splitlines() if ln.strip()]
    last = lines[-1] if lines else message
    # The traceback's last line is "module.ClassName: the original message".
    head, sep, rest = last.partition(": ")
    if sep and "Error" in head.rsplit(".", 1)[-1] and " " not in head:
        return rest
    return last


class UserError(Exception):
    """Bad input: the message names what is wrong and how to fix it, on one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(_unwrap_worker_message(str(message)).split()))


_held: list[str] | None = None


def warn(message: str) -> None:
    """A questionable input that does not stop the run: one line on stderr starting `warning:`.

    Inside `held_warnings()` (every CLI command) the line waits for `flush_warnings()`, which a
    command calls once its checks have passed and the work starts: a command refused by a later
    check prints its one error line and nothing else. Repeats of a line are dropped."""
    line = "warning: " + " ".join(message.split())
    if _held is None:
        print(line, file=sys.stderr, flush=True)
    elif line not in _held:
        _held.append(line)


def flush_warnings() -> None:
    """Print the held warnings (the checks are over, the work begins)."""
    if _held:
        for line in _held:
            print(line, file=sys.stderr, flush=True)
        _held.clear()


@contextmanager
def held_warnings() -> Iterator[None]:
    """Hold warnings until `flush_warnings()`; at a normal exit the rest are printed, on an
    error they are dropped (the error line says what to fix first)."""
    global _held
    outer, _held = _held, []
    try:
        yield
        flush_warnings()
    finally:
        _held = outer
