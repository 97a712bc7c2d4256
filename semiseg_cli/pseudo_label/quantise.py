"""Every per-pixel output of a batch, computed on the model's device; only quantised arrays leave it.

From the probabilities of a same-size batch: the max probability and argmax, the normalised
entropy, the reliability mask (`stats.reliable_mask`), the per-class counts
(`stats.batch_counts`), the label map with 255 for unreliable pixels, its copy in the dataset's
stored encoding, the quantised maps and the overlay. What reaches the host is one uint8 byte
per label pixel, two per map pixel, three per overlay pixel, and (B, C) counts.

What can go wrong, and what this module does about it:
- The device has no unsigned 16-bit arithmetic everywhere: maps are quantised in int32, then
  cast to int16, whose bits are the uint16 values (the cast keeps the low 16 bits, exactly what
  numpy's `astype(uint16)` of the int32 did before); `host_arrays` views them as uint16. Values
  are clamped to [0, 65535] first, so a probability rounded above 1 cannot wrap to 0.
- The overlay must match `writer.overlay`, its numpy reference, to the bit: the same float32
  operations in the same order (two products, then their sum; never a fused multiply-add).
- A host sync in the middle of the batch would stop the next batch from being queued behind
  this one: none of these operations reads a value back (`stats.batch_counts` counts with
  `index_add_` on CUDA, where `bincount` synchronises); `to_host` starts the copies
  asynchronously into pinned memory on CUDA and returns an event to wait on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from semiseg_cli.pseudo_label.folder import IGNORE, U16
from semiseg_cli.pseudo_label.stats import batch_counts, normalised_entropy, reliable_mask

if TYPE_CHECKING:  # torch and numpy load lazily: `semiseg --help` should not import them
    import numpy as np
    import torch


def quantise_u16(x: "torch.Tensor") -> "torch.Tensor":
    """[0, 1] floats as round(x * 65535) in the bits of an int16 tensor (read them as uint16)."""
    import torch

    return (x * U16).round_().clamp_(0, U16).to(torch.int32).to(torch.int16)


def blend(rgb: "torch.Tensor", label: "torch.Tensor", colours: "torch.Tensor", alpha: float = 0.5) -> "torch.Tensor":
    """(B,H,W,3) uint8 image with the label colours blended in; 255 pixels left as they are."""
    import torch

    img = rgb.float()
    mixed = img.mul(1 - alpha).add(colours[label.long()].mul(alpha))
    keep = (label != IGNORE).unsqueeze(-1)
    return torch.where(keep, mixed, img).clamp_(0, 255).to(torch.uint8)


def pixel_outputs(
    probs: "torch.Tensor",
    num_classes: int,
    fmt: str = "png",
    min_confidence: float | None = None,
    drop_percent: float | None = None,
    gt: "torch.Tensor | None" = None,
    encoding: "torch.Tensor | None" = None,
    rgb: "torch.Tensor | None" = None,
    colours: "torch.Tensor | None" = None,
) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
    """(arrays, counts) of a batch of (B,C,H,W) float probabilities, all on their device.

    arrays: label (uint8, 255 = unreliable), confidence and entropy (int16 carrying uint16 for
    `fmt` png, float16 for npz), train_label (uint8, `encoding[label]`, with `encoding` a (256,)
    uint8 table), overlay ((B,H,W,3) uint8, with `rgb` and `colours` a (256, 3) float32 table).
    counts: `stats.batch_counts` (against `gt` where given)."""
    import torch

    conf, label = probs.max(1)
    ent = normalised_entropy(probs)
    keep = reliable_mask(conf, ent, min_confidence, drop_percent)
    counts = batch_counts(label, keep, conf, gt, num_classes)
    out_label = torch.where(keep, label, torch.full_like(label, IGNORE)).to(torch.uint8)
    arrays = {"label": out_label}
    if encoding is not None:
        arrays["train_label"] = encoding[out_label.long()]
    if fmt == "png":
        arrays["confidence"], arrays["entropy"] = quantise_u16(conf), quantise_u16(ent)
    else:
        arrays["confidence"], arrays["entropy"] = conf.half(), ent.half()
    if rgb is not None:
        assert colours is not None
        arrays["overlay"] = blend(rgb, out_label, colours)
    return arrays, counts


def to_host(tensors: dict[str, "torch.Tensor"]) -> tuple[dict[str, "torch.Tensor"], Any]:
    """Host copies of `tensors` and an event to wait on before reading them (None: ready).

    On CUDA the copies go asynchronously into pinned memory, so the caller can queue the next
    batch before waiting; elsewhere `.cpu()` (a no-op for CPU tensors)."""
    import torch

    devices = {t.device.type for t in tensors.values()}
    if devices == {"cuda"}:
        host = {k: t.to("cpu", non_blocking=True) for k, t in tensors.items()}
        event = torch.cuda.Event()
        event.record()
        return host, event
    return {k: t.cpu() for k, t in tensors.items()}, None


def host_arrays(tensors: dict[str, "torch.Tensor"]) -> dict[str, "np.ndarray"]:
    """numpy views of host tensors, int16 maps read as the uint16 they carry."""
    import numpy as np
    import torch

    return {k: (t.numpy().view(np.uint16) if t.dtype == torch.int16 else t.numpy()) for k, t in tensors.items()}
