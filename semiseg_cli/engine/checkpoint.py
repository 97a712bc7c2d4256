"""Checkpoints: one self-describing file per save.

A checkpoint carries the resolved config and class names, so `eval`, `pseudo-label` and `export`
need nothing but its path. Weights are stored unwrapped (no DDP `module.` prefixes). Files are
written to a temporary name and renamed, so a run killed mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from semiseg_cli import __version__
from semiseg_cli.errors import UserError
from semiseg_cli.io import atomic_path

FORMAT = "semiseg-checkpoint"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts/lists/tuples, with a path name, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def tensor_digest(payload: dict[str, Any]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every tensor in `payload` (the digest
    field itself excluded): a flipped byte in a stored weight changes it."""
    h = hashlib.sha256()
    for name, t in _tensors({k: v for k, v in payload.items() if k != "tensor_sha256"}):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        t = t.detach().cpu().contiguous()
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in a (nested) state dict that hold inf or NaN."""
    return [name.lstrip("/") for name, t in _tensors(state) if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "semiseg_version": __version__, **payload}
    payload["tensor_sha256"] = tensor_digest(payload)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False, verify: bool | None = None
) -> dict[str, Any]:
    """Read a checkpoint, refusing missing, corrupt and foreign files with a one-line error.

    The tensors' SHA-256 stored at save time is checked (`verify`, default: unless `mmap`), so a
    file whose bytes changed after it was written is refused instead of evaluated. `mmap=True`
    maps the tensors instead of reading them, for callers that only need the small parts (the
    config, the step): reading them then costs next to nothing whatever the size."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            inside = [n for n in ("best.pt", "last.pt") if (path / n).is_file()]
            hint = f", e.g. -c {path / inside[0]}" if inside else ""
            raise UserError(f"checkpoint {path} is a folder; pass the best.pt or last.pt inside it{hint}")
        raise UserError(f"checkpoint {path} does not exist; pass the best.pt or last.pt of a training run")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # corrupt or truncated files raise many different errors
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); it may be truncated or not a semiseg checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a semiseg checkpoint (no '{FORMAT}' marker); train one with `semiseg train`")
    if (not mmap if verify is None else verify) and "tensor_sha256" in ckpt:
        if tensor_digest(ckpt) != ckpt["tensor_sha256"]:
            raise UserError(
                f"checkpoint {path} is damaged: its weights do not match the checksum stored when it was written; "
                "use another copy or the run's other checkpoint (best.pt / last.pt)"
            )
    return ckpt


def load_for_inference(
    path: str | Path, device: torch.device | str = "cpu", weights: str = "auto"
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild the inference network of a checkpoint: (model in eval mode, config, checkpoint).

    `weights`: "auto" (the EMA teacher when the method has one), "teacher" or "student".
    """
    from semiseg_cli.config import config_from_dict
    from semiseg_cli.methods import get_method

    if weights not in ("auto", "teacher", "student"):
        raise UserError(f"--weights must be auto, teacher or student (got {weights!r})")
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    method_cls = get_method(cfg.method)
    model = method_cls.build_inference_model(cfg, ckpt["num_classes"])
    if weights == "student":
        state = ckpt.get("student_state")
        if state is None:
            raise UserError(f"{path} stores no separate student weights; use --weights auto")
    elif weights == "teacher" and not ckpt.get("has_teacher"):
        raise UserError(f"{path} was trained with {cfg.method}, which has no EMA teacher; use --weights auto")
    else:
        state = ckpt["inference_state"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"{len(missing)} missing tensors, e.g. {missing[0]}" if missing else f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
        raise UserError(
            f"{path} does not match the network its config builds ({what}); it was written by another semiseg "
            "version: evaluate it with that version, or retrain"
        )
    model.to(device).eval()
    return model, cfg, ckpt
