"""Which device a command runs on: `auto`, `cpu`, `cuda` or `cuda:N`, refused in one line when
it does not exist. Under torchrun, `cuda` means this rank's local GPU."""

from __future__ import annotations

import torch

from semiseg_cli.engine import distributed
from semiseg_cli.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
        if name == "cuda":  # an explicit index: set_device needs one, and so do DDP's device_ids
            name = f"cuda:{distributed.local_rank() if distributed.launched_by_torchrun() else torch.cuda.current_device()}"
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
        if dev.index is None or dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible; use cuda:0..")
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")
