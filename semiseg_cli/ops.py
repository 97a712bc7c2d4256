"""Tensor operations shared by methods and pseudo-label dumps: entropy and entropy percentiles.

U2PL's unsupervised loss and `semiseg pseudo-label --drop-percent` both drop the most uncertain
pixels, but not in the same way, and the difference is a parameter here rather than two
functions: U2PL takes one threshold over the whole batch (the official `np.percentile` over the
valid pixels; pixels at or above it dropped), a pseudo-label dump one per image (so a pixel's
fate does not depend on the other images of a batch; ties with the threshold kept, so a
saturated image with many zero entropies is not wiped out).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

_QUANTILE_MAX = 2**24  # torch.quantile's input limit


def entropy(prob: Tensor, dim: int = 1, normalise: bool = False) -> Tensor:
    """Shannon entropy (nats) of probabilities along `dim`, with the official U2PL's +1e-10 inside
    the log. `normalise`: divided by ln(C) and clamped to [0, 1] (0 = one-hot, 1 = uniform; a
    single class gives 0)."""
    ent = -(prob * torch.log(prob + 1e-10)).sum(dim)
    if not normalise:
        return ent
    c = prob.shape[dim]
    if c < 2:
        return torch.zeros_like(ent)
    return (ent / math.log(c)).clamp_(0.0, 1.0)


def percentiles(values: Tensor, valid: Tensor | None, percents: list[float]) -> Tensor:
    """`np.percentile(values[valid], percents)` (linear interpolation) without a host sync:
    invalid entries become NaN and `nanquantile` skips them. All-invalid input gives NaN, which
    compares False everywhere (nothing is kept/dropped by a NaN threshold; callers guard counts).

    Inputs above 2**24 elements (torch's limit) are subsampled uniformly at random, which moves
    the threshold by far less than one percentile point at these sizes.
    """
    v = values.detach().float().flatten()
    if valid is not None:
        v = torch.where(valid.flatten(), v, torch.full_like(v, float("nan")))
    if v.numel() > _QUANTILE_MAX:
        v = v[torch.randint(v.numel(), (_QUANTILE_MAX,), device=v.device)]
    q = torch.tensor([p / 100.0 for p in percents], device=v.device, dtype=v.dtype).clamp(0, 1)
    return torch.nanquantile(v, q)


def keep_low_entropy(
    ent: Tensor, keep_percent: float, valid: Tensor | None = None, scope: Literal["batch", "image"] = "batch"
) -> Tensor:
    """Bool mask of the pixels kept: the `keep_percent`% of lowest entropy.

    - `scope="batch"` (U2PL, paper and official code): one threshold, the `keep_percent`-th
      percentile of the valid pixels' entropies over the whole batch (linear interpolation);
      pixels at or above it are dropped, ties included.
    - `scope="image"` (pseudo-label dumps; `valid` unused): a threshold per image (dim 0), the
      largest entropy among its `keep_percent`% lowest (an order statistic: at most
      `round(n * (100 - keep_percent) / 100)` pixels go); pixels tied with it are kept.
    """
    if scope == "batch":
        thresh = percentiles(ent, valid, [keep_percent])[0]
        keep = ent < thresh
        return keep if valid is None else keep & valid
    if scope != "image":
        raise ValueError(f"unknown scope {scope!r}")
    flat = ent.flatten(1)
    n = flat.shape[1]
    n_drop = int(round(n * (100.0 - keep_percent) / 100.0))
    if n_drop <= 0:
        return torch.ones_like(ent, dtype=torch.bool)
    if n_drop >= n:
        return torch.zeros_like(ent, dtype=torch.bool)
    thresh = flat.kthvalue(n - n_drop, dim=1).values  # kthvalue has no input size limit
    return ent <= thresh.view(-1, *([1] * (ent.dim() - 1)))
