"""An exponential-moving-average teacher.

What can go wrong:
- Initialisation order with DDP: build the EMA copy from the *unwrapped* student before wrapping
  it, and update from the unwrapped module, or the teacher's keys carry `module.` prefixes.
- BatchNorm statistics: averaging parameters alone (as the official U2PL code does) leaves the
  teacher's running mean/var at their initial values unless they are copied; here buffers are
  averaged too by default (`buffers="ema"`), or copied (`"copy"`), or left alone (`"none"`).
- Integer buffers (`num_batches_tracked`) are copied, never averaged.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn


class EMATeacher(nn.Module):
    """Teacher = EMA of the student, with decay `min(1 - 1/(t+1), max_decay)` (t counted by the
    caller, e.g. from the start of the semi-supervised phase), so that early on the teacher
    follows the student closely."""

    def __init__(self, student: nn.Module, max_decay: float = 0.99, buffers: Literal["ema", "copy", "none"] = "ema") -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.max_decay = max_decay
        self.buffers_mode = buffers

    def decay_at(self, t: int) -> float:
        return min(1.0 - 1.0 / (t + 1), self.max_decay)

    @torch.no_grad()
    def update(self, student: nn.Module, t: int) -> float:
        """Blend the student into the teacher; returns the decay used."""
        d = self.decay_at(t)
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        torch._foreach_mul_(t_params, d)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - d)
        if self.buffers_mode != "none":
            for tb, sb in zip(self.module.buffers(), student.buffers()):
                if self.buffers_mode == "ema" and tb.dtype.is_floating_point:
                    tb.mul_(d).add_(sb, alpha=1.0 - d)
                else:
                    tb.copy_(sb)
        return d

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Copy the student into the teacher (the official U2PL code does this every step of
        the first semi-supervised epoch)."""
        for tp, sp in zip(self.module.parameters(), student.parameters()):
            tp.copy_(sp)
        for tb, sb in zip(self.module.buffers(), student.buffers()):
            tb.copy_(sb)

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher always predicts in eval mode (BN running statistics, no dropout).
        super().train(False)
        return self

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.module(*args, **kwargs)
