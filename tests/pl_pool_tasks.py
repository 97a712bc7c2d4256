"""Tasks for `semiseg_cli.pseudo_label.pool` tests, in a module the writer processes can import
(spawned processes import a task by name) and that does not import torch, like the real task."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def copy(ctx: Any, meta: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Write every array's bytes (in name order) to meta["path"]; sleep meta["sleep"] first;
    raise or die on request."""
    time.sleep(meta.get("sleep", 0))
    if meta.get("fail"):
        raise RuntimeError("injected\nfailure")
    if meta.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    with open(meta["path"], "wb") as f:
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())


def modules(ctx: Any, meta: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Record which heavy modules a writer process holds once the real task's module is loaded."""
    import semiseg_cli.pseudo_label.writer  # noqa: F401

    with open(meta["path"], "w") as f:
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "typer", "numpy", "PIL")), f)


def die_mid_write(ctx: Any, meta: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Start an atomic write under ctx.out, then die as an out-of-memory kill would."""
    from pathlib import Path

    from semiseg_cli.io import atomic_path

    with atomic_path(Path(ctx.out) / "labels" / "x.png") as tmp:
        tmp.write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
