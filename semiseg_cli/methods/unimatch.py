"""UniMatch: unified dual-stream perturbations (Yang et al., CVPR 2023), as the paper and its
official `unimatch.py` run it.

FixMatch (fixmatch.py) with two additions, one training step top to bottom:
1. the CutMix partner batch is predicted in eval mode without gradients (pseudo-labels,
   confidences);
2. *two* strong views of each unlabeled crop, each with its own colour jitter / grayscale / blur
   draw and its own CutMix box (p 0.5) with the partner's strong view;
3. one train-mode forward over cat(labeled, weak unlabeled) whose encoder features are decoded
   twice, as they are and through Dropout2d(0.5) on the low- and high-level features (the
   *feature perturbation* stream); one forward over cat(strong 1, strong 2);
4. loss = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, every unsupervised term the CE on the
   weak pseudo-labels (the partner's inside a view's box) on pixels with confidence >= tau that
   are not crop padding, divided by the number of non-padding pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from semiseg_cli.errors import UserError
from semiseg_cli.methods.fixmatch import FixMatch, inside_image, mixed_targets, pseudo_label_accuracy, unused_heads
from semiseg_cli.methods.supervised import sup_losses
from semiseg_cli.methods.unimatch_losses import confident_fraction, masked_ce


class UniMatch(FixMatch):
    name = "unimatch"

    @classmethod
    def check_config(cls, cfg: Any, num_classes: int | None) -> None:
        if cfg.model.arch != "deeplabv3plus":
            raise UserError(
                f'unimatch decodes perturbed encoder features again, which needs model.arch = "deeplabv3plus" '
                f"(got {cfg.model.arch!r}); use --method fixmatch for DeepLab-v2"
            )

    def training_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int) -> dict[str, Tensor]:
        assert unlabeled is not None, "the loop gives UniMatch an unlabeled batch every step"
        tau = self.p.conf_thresh
        x_l, x_w = labeled["image"], unlabeled["image"]
        valid = inside_image(unlabeled)
        partner = self.partner_pseudo_labels(unlabeled["partner"])                       # 1.
        x_s1, box1 = self.strong_view(x_w, partner)                                       # 2.
        x_s2, box2 = self.strong_view(x_w, partner)
        n_l = x_l.shape[0]
        out = self.model(torch.cat([x_l, x_w]), feature_dropout=self.p.fp_dropout)       # 3.
        logits_fp = out["logits_fp"][n_l:]
        conf_w, pl_w = out["logits"][n_l:].detach().softmax(1).max(1)
        logits_s1, logits_s2 = self.model(torch.cat([x_s1, x_s2]))["logits"].chunk(2)
        losses = sup_losses(self.cfg, {k: v[:n_l] for k, v in out.items() if k in ("logits", "aux")}, labeled["mask"])
        loss_s1 = masked_ce(logits_s1, *mixed_targets(box1, (pl_w, conf_w, valid), partner), tau)  # 4.
        loss_s2 = masked_ce(logits_s2, *mixed_targets(box2, (pl_w, conf_w, valid), partner), tau)
        loss_fp = masked_ce(logits_fp, pl_w, conf_w, valid, tau)
        loss = (losses["loss"] + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2
        logs = {"loss_x": losses["loss"].detach(), "loss_s1": loss_s1.detach(), "loss_s2": loss_s2.detach(),
                "loss_fp": loss_fp.detach(), "conf_frac": confident_fraction(conf_w, valid, tau)}
        logs.update(pseudo_label_accuracy(unlabeled, pl_w, conf_w >= tau, self.cfg.data.ignore_index))
        return {"loss": loss + unused_heads(out), **{k: v for k, v in losses.items() if k != "loss"}, **logs}
