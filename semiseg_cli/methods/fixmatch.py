"""FixMatch for semantic segmentation (Sohn et al., NeurIPS 2020), as the UniMatch paper and its
official `fixmatch.py` run it.

One training step, top to bottom:
1. the CutMix partner batch (a second, independently shuffled pass over the unlabeled pool) is
   predicted by the same network in eval mode, without gradients: its pseudo-labels, confidences;
2. a strong view of each unlabeled crop: colour jitter, grayscale and blur, each image with its
   own draw, then CutMix with the partner's strong view inside one box per image (p 0.5);
3. one train-mode forward over cat(labeled, weak unlabeled): labeled logits and, detached, the
   weak pseudo-labels and confidences; one forward over the strong view;
4. loss = (L_x + L_s) / 2: L_x the supervised CE, L_s the CE of the strong view on the weak
   pseudo-labels (the partner's inside the box), on pixels with confidence >= tau that are not
   crop padding, divided by the number of non-padding pixels.
No teacher: the network labels for itself. `UniMatch` (unimatch.py) adds a second strong view and
the feature-perturbation stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from semiseg_cli.data.transforms import strong_photometric
from semiseg_cli.methods.base import Method
from semiseg_cli.methods.supervised import sup_losses
from semiseg_cli.methods.unimatch_losses import confident_fraction, cutmix_box, masked_ce, mix


class FixMatch(Method):
    name = "fixmatch"
    uses_unlabeled = True
    unlabeled_partner = True

    @property
    def p(self) -> Any:
        return getattr(self.cfg, self.name)

    def training_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int) -> dict[str, Tensor]:
        assert unlabeled is not None, "the loop gives FixMatch an unlabeled batch every step"
        tau = self.p.conf_thresh
        x_l, x_w = labeled["image"], unlabeled["image"]
        valid = inside_image(unlabeled)
        partner = self.partner_pseudo_labels(unlabeled["partner"])                      # 1.
        x_s, box = self.strong_view(x_w, partner)                                        # 2.
        n_l = x_l.shape[0]
        out = self.model(torch.cat([x_l, x_w]))                                           # 3.
        conf_w, pl_w = out["logits"][n_l:].detach().softmax(1).max(1)
        logits_s = self.model(x_s)["logits"]
        losses = sup_losses(self.cfg, {k: v[:n_l] for k, v in out.items() if k in ("logits", "aux")}, labeled["mask"])
        target, conf, ok = mixed_targets(box, (pl_w, conf_w, valid), partner)
        loss_s = masked_ce(logits_s, target, conf, ok, tau)                              # 4.
        loss = (losses["loss"] + loss_s) / 2
        logs = {"loss_x": losses["loss"].detach(), "loss_s": loss_s.detach(),
                "conf_frac": confident_fraction(conf_w, valid, tau)}
        logs.update(pseudo_label_accuracy(unlabeled, pl_w, conf_w >= tau, self.cfg.data.ignore_index))
        return {"loss": loss + unused_heads(out), **{k: v for k, v in losses.items() if k != "loss"}, **logs}

    # ------------------------------------------------------------------ the steps' pieces
    @torch.no_grad()
    def partner_pseudo_labels(self, partner: dict[str, Any]) -> dict[str, Tensor]:
        """The partner batch predicted in eval mode without gradients, as the official code:
        its weak image, pseudo-labels, confidences and padding mask."""
        was_training = self.model.training
        self.model.eval()
        try:
            conf, pl = self.model(partner["image"])["logits"].float().softmax(1).max(1)
        finally:
            self.model.train(was_training)
        return {"image": partner["image"], "pl": pl, "conf": conf, "valid": inside_image(partner)}

    def strong_view(self, x_w: Tensor, partner: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(strong view, CutMix box): the image's and the partner's own photometric draws, the
        partner's inside the box."""
        d = self.cfg.data
        own = strong_photometric(x_w, d.mean, d.std)
        other = strong_photometric(partner["image"], d.mean, d.std)
        b, _, h, w = x_w.shape
        box = cutmix_box(b, h, w, prob=self.p.cutmix_prob).to(x_w.device)
        return mix(box, own, other), box


def inside_image(batch: dict[str, Any]) -> Tensor:
    """(B, H, W) bool, False on crop padding (the batch's `valid`; all True without one)."""
    v = batch.get("valid")
    if v is None:
        x = batch["image"]
        return torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
    return v.to(torch.bool)


def mixed_targets(box: Tensor, own: tuple[Tensor, Tensor, Tensor], partner: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(pseudo-labels, confidences, valid) of a mixed view: the partner's inside the box."""
    pl, conf, valid = own
    return mix(box, pl, partner["pl"]), mix(box, conf, partner["conf"]), mix(box, valid, partner["valid"])


def pseudo_label_accuracy(unlabeled: dict[str, Any], pl: Tensor, used: Tensor, ignore: int) -> dict[str, Tensor]:
    """Pseudo-label accuracy against the unlabeled images' masks where they have one: over all
    labeled pixels (`pl_acc`) and over the confident ones the loss uses (`pl_acc_conf`)."""
    has = unlabeled.get("has_mask")
    if has is None or not bool(has.any()):
        return {}
    gt = unlabeled["mask"]
    gt_ok = (gt != ignore) & has.view(-1, 1, 1)
    right = (pl == gt) & gt_ok
    conf_ok = gt_ok & used
    return {"pl_acc": right.sum() / gt_ok.sum().clamp(min=1), "pl_acc_conf": (right & used).sum() / conf_ok.sum().clamp(min=1)}


def unused_heads(out: dict[str, Tensor]) -> Tensor | float:
    """0 x a head the loss does not read (a representation head, when configured), so DDP sees
    every parameter in the graph; 0 when there is none."""
    return out["rep"].sum() * 0.0 if "rep" in out else 0.0
