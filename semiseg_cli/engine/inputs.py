"""What `eval` and `pseudo-label` run on: a checkpoint's config, its dataset and a split of it.

Both commands run a checkpoint's inference network over a split of the dataset it was trained
on. `open_split` reads everything but the weights (the config from a memory-mapped checkpoint
costs next to nothing) and `load_model` loads them, so a command checks its outputs, its options
and every image header in between, and a typo fails in a second instead of after the load.

What can go wrong, and what is done about it:
- The dataset moved since training: `root` (`--root`) replaces the config's `data.root`.
- `--root` points at another dataset: its class names differ from the checkpoint's, and the
  metrics or labels would silently be of other classes; refused.
- `split` is ambiguous: an existing path or a name ending in `.txt` is a split file (paths in it
  relative to the dataset root), anything else a split name of the dataset (`train`, `val`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from semiseg_cli.errors import UserError

if TYPE_CHECKING:  # torch loads lazily: `semiseg --help` should not import it
    import torch
    from torch import nn

    from semiseg_cli.data.layouts import Layout

WEIGHTS = ("auto", "teacher", "student")


@dataclass
class SplitInputs:
    """A checkpoint's config, the device, the dataset layout and a split's (image, mask) pairs."""

    cfg: Any
    device: "torch.device"
    layout: "Layout"
    pairs: list[tuple[str, str | None]]
    class_names: list[str]
    num_classes: int
    split: str  # what was asked for, or the run's own validation split when that was None


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise UserError(f"--weights must be auto, teacher or student (got {weights!r})")


def split_pairs(split: str, layout: "Layout") -> list[tuple[str, str | None]]:
    """The (image, mask or None) pairs of a split file (any existing path or *.txt) or of a
    split name of the dataset, in their order, duplicates included."""
    from semiseg_cli.data.splits import read_split_file

    if split.endswith(".txt") or Path(split).is_file():
        return read_split_file(split, layout.root)
    return layout.list_pairs(split)


def open_split(
    checkpoint: Path,
    split: str | None,
    root: Path | None = None,
    device: str | None = None,
    weights: str = "auto",
    configure: Callable[[dict[str, Any]], Any] | None = None,
) -> SplitInputs:
    """Everything `checkpoint` runs on except its weights: `weights` checked, the stored config
    (through `configure(stored_config)` when given, so a command can apply and validate its own
    options; else as stored), the device, the layout at `root` or the config's `data.root`, the
    class names checked against the checkpoint's, and the split's pairs."""
    from semiseg_cli.config import config_from_dict
    from semiseg_cli.data import layout_for
    from semiseg_cli.engine.checkpoint import load_checkpoint
    from semiseg_cli.engine.device import resolve_device

    check_weights(weights)
    stored = load_checkpoint(checkpoint, mmap=True)  # the tensors stay on disk for now
    cfg = configure(stored["config"]) if configure is not None else config_from_dict(stored["config"])
    dev = resolve_device(device or "auto")
    data_root = Path(root) if root is not None else Path(cfg.data.root)
    layout = layout_for(cfg.data, data_root)
    class_names = list(stored["class_names"])
    if list(layout.class_names) != class_names:
        raise UserError(f"the dataset at {data_root} has classes {layout.class_names[:5]}... but the checkpoint was trained on {class_names[:5]}...; is --root right?")
    if split is None:  # the run's own validation set: its val.txt (prepare-splits --val) or split name
        split = cfg.data.val_list or cfg.data.val_split
    return SplitInputs(cfg, dev, layout, split_pairs(split, layout), class_names, int(stored["num_classes"]), split)


def load_model(checkpoint: Path, device: "torch.device", weights: str = "auto") -> tuple["nn.Module", dict[str, Any]]:
    """(the inference network in eval mode on `device`, the checkpoint read in full and verified):
    the EMA teacher for `weights="auto"` when the method has one."""
    from semiseg_cli.engine import checkpoint as ckpt_io  # looked up per call: tests replace it

    model, _, ckpt = ckpt_io.load_for_inference(checkpoint, device, weights)
    return model, ckpt
