"""The supervised baseline: cross-entropy (or OHEM) on the labeled images only."""

from __future__ import annotations

from typing import Any

import torch

from semiseg_cli.methods.base import Method, supervised_loss


class Supervised(Method):
    name = "supervised"

    def training_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int
    ) -> dict[str, torch.Tensor]:
        out = self.model(labeled["image"])
        return sup_losses(self.cfg, out, labeled["mask"])


def sup_losses(cfg: Any, out: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Labeled loss of a model output, with the aux head when there is one; shared by methods."""
    t = cfg.train
    ignore = cfg.data.ignore_index
    loss_sup = supervised_loss(out["logits"], mask, ignore, t.loss, t.ohem_thresh, t.ohem_min_kept)
    losses = {"loss_sup": loss_sup}
    total = loss_sup
    if "aux" in out:
        loss_aux = supervised_loss(out["aux"], mask, ignore, t.loss, t.ohem_thresh, t.ohem_min_kept)
        losses["loss_aux"] = loss_aux
        total = total + t.aux_weight * loss_aux
    losses["loss"] = total
    return losses
