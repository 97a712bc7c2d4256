"""UniMatch V2 (Yang et al., arXiv 2410.10777), as ../shared/docs/METHODS.md and the official
`unimatch_v2.py` run it, on a DINOv2 ViT + DPT network (`model.arch = "dpt"`, models/dpt.py).

One training step, top to bottom:
1. the EMA teacher (eval mode, no grad) predicts the weak unlabeled batch and its CutMix partner
   batch in one forward: pseudo-labels and confidences of both;
2. two strong views of each unlabeled crop, each with its own colour jitter / grayscale / blur
   draw and its own CutMix box (p 0.5) with the partner's strong view, as UniMatch;
3. one student forward over cat(labeled, strong 1, strong 2) with *complementary channel
   dropout* on the encoder's four feature maps: per strong sample and channel a mask m in {0, 2}
   for view 1 and 2 - m for view 2, both 1 for a random half of the samples; the labeled images
   get 1. The network has no batch-dependent layer, so this is the official code's separate
   labeled forward and strong forward in one call (one forward for DDP);
4. loss = (L_x + (L_s1 + L_s2) / 2) / 2, each L_s the CE on the teacher's weak pseudo-labels
   (the partner's inside the view's box) on pixels with confidence >= tau that are not crop
   padding, divided by the number of non-padding pixels;
5. after the optimiser step, the teacher's EMA update, decay min(1 - 1/(t+1), 0.996), over
   parameters and buffers. `eval`, `pseudo-label` and `export` use the teacher once updated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from semiseg_cli.engine import distributed
from semiseg_cli.engine.ema import EMATeacher
from semiseg_cli.errors import UserError
from semiseg_cli.methods.fixmatch import FixMatch, inside_image, mixed_targets, pseudo_label_accuracy
from semiseg_cli.methods.supervised import sup_losses
from semiseg_cli.methods.unimatch_losses import confident_fraction, masked_ce


def complementary_channel_masks(n: int, channels: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(m1, m2), each (n, channels) float on the CPU, for the two strong views of n images.

    m1 = 2 x Bernoulli(0.5) per sample and channel and m2 = 2 - m1: every channel is dropped in
    exactly one view and doubled in the other, so m1 + m2 = 2. For n // 2 samples drawn at random
    both masks are all ones (no dropout), as the official code keeps half of the pairs clean.
    """
    m1 = torch.bernoulli(torch.full((n, channels), 0.5), generator=generator) * 2.0
    m2 = 2.0 - m1
    clean = torch.randperm(n, generator=generator)[: n // 2]
    m1[clean] = 1.0
    m2[clean] = 1.0
    return m1, m2


class UniMatchV2(FixMatch):
    name = "unimatch_v2"

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__(cfg, num_classes, class_names)
        # Built from the plain student before the loop wraps it in DDP (see EMATeacher). The
        # network has no BatchNorm; its (float) buffers, if any, are averaged as the official code.
        self.teacher = EMATeacher(self.model, max_decay=self.p.ema_decay, buffers="ema")
        # Until the first update the teacher is the initial student: evaluation and checkpoints
        # then ship the student, as U2PL.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._last_decay = 0.0

    @classmethod
    def check_config(cls, cfg: Any, num_classes: int | None) -> None:
        if cfg.model.arch != "dpt":
            raise UserError(
                f'unimatch_v2 drops channels of a ViT encoder\'s features, which needs model.arch = "dpt" with a '
                f"ViT backbone such as dinov2_vitb14 (got {cfg.model.arch!r}); use --method unimatch for DeepLab"
            )
        from semiseg_cli.models.dpt import require_timm

        require_timm()

    def inference_model(self) -> nn.Module:
        return self.teacher.module if int(self.ema_updates) > 0 else self.model

    def training_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int) -> dict[str, Tensor]:
        assert unlabeled is not None, "the loop gives UniMatch V2 an unlabeled batch every step"
        tau = self.p.conf_thresh
        x_l, x_w = labeled["image"], unlabeled["image"]
        valid = inside_image(unlabeled)
        (pl_w, conf_w), partner = self.teacher_pseudo_labels(x_w, unlabeled["partner"])  # 1.
        x_s1, box1 = self.strong_view(x_w, partner)                                        # 2.
        x_s2, box2 = self.strong_view(x_w, partner)
        n_l, n_u = x_l.shape[0], x_w.shape[0]
        scale = self.channel_scale(n_l, n_u).to(x_l.device)                                # 3.
        logits = self.model(torch.cat([x_l, x_s1, x_s2]), channel_scale=scale)["logits"]
        logits_l, logits_s1, logits_s2 = logits.split([n_l, n_u, n_u])
        losses = sup_losses(self.cfg, {"logits": logits_l}, labeled["mask"])
        loss_s1 = masked_ce(logits_s1, *mixed_targets(box1, (pl_w, conf_w, valid), partner), tau)  # 4.
        loss_s2 = masked_ce(logits_s2, *mixed_targets(box2, (pl_w, conf_w, valid), partner), tau)
        loss = (losses["loss"] + (loss_s1 + loss_s2) / 2) / 2
        logs = {"loss_x": losses["loss"].detach(), "loss_s1": loss_s1.detach(), "loss_s2": loss_s2.detach(),
                "conf_frac": confident_fraction(conf_w, valid, tau)}
        logs.update(pseudo_label_accuracy(unlabeled, pl_w, conf_w >= tau, self.cfg.data.ignore_index))
        return {"loss": loss, **{k: v for k, v in losses.items() if k != "loss"}, **logs}

    # ------------------------------------------------------------------ the steps' pieces
    @torch.no_grad()
    def teacher_pseudo_labels(self, x_w: Tensor, partner: dict[str, Any]) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        """((pseudo-labels, confidences) of the weak view, the partner's dict for `strong_view`
        and `mixed_targets`), from one teacher forward over both batches."""
        n = x_w.shape[0]
        conf, pl = self.teacher(torch.cat([x_w, partner["image"]]))["logits"].float().softmax(1).max(1)
        return (pl[:n], conf[:n]), {"image": partner["image"], "pl": pl[n:], "conf": conf[n:], "valid": inside_image(partner)}

    def channel_scale(self, n_labeled: int, n_unlabeled: int) -> Tensor:
        """(n_l + 2 n_u, D) multipliers of the encoder's channels for cat(labeled, strong 1,
        strong 2): ones for the labeled images, complementary masks for the two views."""
        dim = distributed.unwrap(self.model).embed_dim
        m1, m2 = complementary_channel_masks(n_unlabeled, dim)
        return torch.cat([torch.ones(n_labeled, dim), m1, m2])

    def after_optimizer_step(self, step: int) -> None:
        self._last_decay = self.teacher.update(distributed.unwrap(self.model), step)
        self.ema_updates += 1

    def extra_log(self) -> dict[str, float]:
        return {"ema_decay": float(self._last_decay)}
