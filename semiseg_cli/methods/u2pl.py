"""U2PL: semi-supervised segmentation using unreliable pseudo-labels (Wang et al., CVPR 2022).

One training step, read top to bottom in `training_step`:
1. supervised-only warm-up (`sup_only_iters`): labeled CE only, no teacher forward;
2. teacher (EMA of the student, eval mode, no grad) on cat(labeled, weak unlabeled): one softmax
   -> pseudo-label, confidence, entropy on the unlabeled half; probabilities and stride-4
   features on both halves for the contrastive term (`labeled_keys="student"`: the teacher sees
   the unlabeled images only and the labeled half comes from the student's forward, detached);
3. (`strong_photometric`, not in the paper: colour jitter, grayscale and blur per unlabeled image;)
   CutMix (probability 0.5, one box of half the image per sample, sample i with (i+1) mod B)
   applied alike to the unlabeled images, pseudo-labels, confidences, entropies, teacher
   probabilities and teacher features;
4. one student forward over cat(labeled, strong unlabeled) (one call, for DDP);
5. supervised CE + unsupervised CE on pixels below the p_t-th entropy percentile + the
   contrastive loss on the representation head, whose memory bank is updated first.
The teacher's EMA update happens in `after_optimizer_step`.

Paper vs official code choices are fields of `U2PLParams`; docs/methods_u2pl.md lists them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg_cli.data.transforms import strong_photometric
from semiseg_cli.engine import distributed
from semiseg_cli.engine.ema import EMATeacher
from semiseg_cli.errors import UserError
from semiseg_cli.methods.base import Method
from semiseg_cli.methods.supervised import sup_losses
from semiseg_cli.methods.u2pl_losses import (
    MemoryBank,
    align_distribution,
    alpha_at,
    contrastive_loss,
    contrastive_masks,
    cutmix,
    cutmix_box_mask,
    drop_percent_at,
    entropy,
    epoch_fraction,
    last_per_class,
    percentiles,
    prior_adjustment,
    resize_nearest,
    unsup_loss,
)


class U2PL(Method):
    name = "u2pl"
    uses_unlabeled = True

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__(cfg, num_classes, class_names)
        p = cfg.u2pl
        self.p = p
        # Built from the plain student before the loop wraps it in DDP (see EMATeacher).
        self.teacher = EMATeacher(self.model, max_decay=p.ema_decay, buffers="ema" if p.ema_buffers else "copy")
        self.bank: MemoryBank | None = None
        if p.contrastive:
            sizes = [p.queue_size_background] + [p.queue_size] * (num_classes - 1)
            self.bank = MemoryBank(sizes[:num_classes], cfg.model.rep_dim)
        # Number of EMA updates done: 0 means the teacher is still the untrained initial copy,
        # so evaluation and checkpoints use the student (the official code validates the
        # student during the supervised-only epoch too).
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._last_decay = 0.0
        # Distribution alignment and prior adjustment state (only with an option on, so other
        # checkpoints keep their keys): labeled pixel counts per class since step 0, the EMA of the
        # teacher's mean unlabeled prediction and that of the kept pseudo-labels' class
        # frequencies (all zeros until the first semi-supervised step).
        align = p.pseudo_label_align == "distribution"
        adjust = p.unsup_prior_adjust
        self.label_counts: Tensor | None
        self.pred_prior: Tensor | None
        self.pl_prior: Tensor | None
        self.register_buffer("label_counts", torch.zeros(num_classes, dtype=torch.float64) if align or adjust else None)
        self.register_buffer("pred_prior", torch.zeros(num_classes) if align else None)
        self.register_buffer("pl_prior", torch.zeros(num_classes) if adjust else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_inference_model(cls, cfg: Any, num_classes: int) -> nn.Module:
        """The student, teacher and shipped model share one structure, with the representation
        head whenever the contrastive loss is on (so checkpoints load into what `eval` rebuilds;
        the head costs a little at inference and its output is ignored there)."""
        from semiseg_cli.models import build_model

        model_cfg = cfg.model
        if cfg.u2pl.contrastive and not model_cfg.rep_head:
            model_cfg = model_cfg.model_copy(update={"rep_head": True})
        return build_model(model_cfg, num_classes)

    @classmethod
    def check_config(cls, cfg: Any, num_classes: int | None) -> None:
        """Refuse settings under which the run would not be U2PL: a warm-up as long as the run,
        or a contrastive loss that is silently zero. `num_classes` is None when the data is not
        at hand (`--dry-run` elsewhere): the rules that need it then wait for `train`."""
        p = cfg.u2pl
        if p.sup_only_iters is not None and p.sup_only_iters >= cfg.train.iters:
            raise UserError(
                f"u2pl.sup_only_iters ({p.sup_only_iters}) is not below train.iters ({cfg.train.iters}), so no step would "
                "use the unlabeled images (a supervised run named U2PL); lower u2pl.sup_only_iters or raise --iters"
            )
        if not p.contrastive or num_classes is None:
            return
        if cfg.model.arch != "deeplabv3plus":
            raise UserError(
                f'u2pl.contrastive needs model.arch = "deeplabv3plus" (the representation head sits on its '
                f"stride-4 decoder; got {cfg.model.arch!r}); set model.arch=deeplabv3plus or u2pl.contrastive=false"
            )
        if num_classes < 2:
            raise UserError(
                f"u2pl.contrastive needs at least 2 classes (the dataset has {num_classes}); set u2pl.contrastive=false"
            )
        high = min(p.high_rank, num_classes)
        if p.low_rank >= high:
            low_fix = max(1, min(p.low_rank, num_classes // 2))
            raise UserError(
                f"u2pl rank window [low_rank, min(high_rank, classes)) = [{p.low_rank}, {high}) is empty for "
                f"{num_classes} classes, so unlabeled pixels would never become negative keys; "
                f"set u2pl.low_rank={low_fix} u2pl.high_rank={num_classes} or u2pl.contrastive=false"
            )

    def inference_model(self) -> nn.Module:
        return self.teacher.module if int(self.ema_updates) > 0 else self.model

    @classmethod
    def check_schedule(cls, cfg: Any, ctx: Any) -> None:
        """The default warm-up is one epoch over the unlabeled pool: refuse a run no longer than it."""
        p = cfg.u2pl
        epoch = p.epoch_iters if p.epoch_iters > 0 else ctx.epoch_iters
        if p.sup_only_iters is None and epoch >= ctx.total_iters:
            raise UserError(
                f"u2pl's supervised-only warm-up is one epoch ({epoch} iterations over {ctx.unlabeled_size} unlabeled "
                f"images), not below train.iters ({ctx.total_iters}), so no step would use the unlabeled images; "
                "set u2pl.sup_only_iters lower (e.g. 0) or raise --iters"
            )

    # ------------------------------------------------------------------ schedules
    def _epoch_iters(self) -> int:
        if self.p.epoch_iters > 0:
            return self.p.epoch_iters
        if self.ctx is not None:
            return self.ctx.epoch_iters
        return self.cfg.train.iters  # no context (unit tests): the whole run is one epoch

    def _total_iters(self) -> int:
        return self.ctx.total_iters if self.ctx is not None else self.cfg.train.iters

    def sup_only_iters(self) -> int:
        v = self.p.sup_only_iters
        return self._epoch_iters() if v is None else v

    def teacher_reset_iters(self) -> int:
        if not self.p.teacher_reset:
            return 0
        v = self.p.teacher_reset_iters
        return self._epoch_iters() if v is None else v

    def schedules(self, step: int) -> tuple[float, float]:
        """(p_t, alpha_t) at this step; both move once per epoch."""
        frac = epoch_fraction(step, self._epoch_iters(), self._total_iters())
        return drop_percent_at(frac, self.p.drop_percent, self.p.drop_percent_end), alpha_at(frac, self.p.alpha_0)

    # ------------------------------------------------------------------ training
    def training_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int
    ) -> dict[str, Tensor]:
        p = self.p
        p_t, alpha_t = self.schedules(step)
        sup_only = self.sup_only_iters()
        if self.label_counts is not None:
            self._count_labels(labeled["mask"])
        if unlabeled is None or step < sup_only:
            out = self.model(labeled["image"])
            losses = sup_losses(self.cfg, out, labeled["mask"])
            zero = _unused(out)
            losses["loss"] = losses["loss"] + zero
            losses.update(loss_unsup=zero.detach(), loss_contra=zero.detach())
            losses.update(drop_percent=_scalar(p_t, zero), alpha_t=_scalar(alpha_t, zero))
            return {k: (v if k == "loss" else v.detach()) for k, v in losses.items()}

        ignore = self.cfg.data.ignore_index
        # The teacher starts the semi-supervised phase as the student (it is not updated during
        # the warm-up, and its first pseudo-labels come before its first EMA update); with
        # `teacher_reset` it stays a copy for `teacher_reset_iters` steps, as the official code.
        if step - sup_only < max(1, self.teacher_reset_iters()):
            self.teacher.reset(distributed.unwrap(self.model))
            distributed.broadcast_small_buffers(self.teacher)  # one teacher on every rank (see below)
        img_l, mask_l, img_u = labeled["image"], labeled["mask"], unlabeled["image"]
        n_l = img_l.shape[0]

        # -- teacher: pseudo-labels (and, for the contrastive term, features of both halves unless
        # the labeled half comes from the student)
        teacher_labeled = p.contrastive and p.labeled_keys == "teacher"
        with torch.no_grad():
            t_out = self.teacher(torch.cat([img_l, img_u]) if teacher_labeled else img_u)
            # One full-size softmax, shared by the pseudo-labels and the contrastive term.
            t_prob = torch.softmax(t_out["logits"].float(), 1)
            prob_u = t_prob[n_l:] if teacher_labeled else t_prob
            if self.pred_prior is not None:
                prob_u = self._align(prob_u)
            conf_u, pl_u = prob_u.max(1)
            ent_u = entropy(prob_u)
            box = None
            if p.cutmix_prob > 0 and float(torch.rand(())) < p.cutmix_prob:
                h, w = img_u.shape[-2:]
                box = cutmix_box_mask(img_u.shape[0], h, w, p.cutmix_area, p.cutmix_align).to(img_u.device)
            mix = (lambda x: cutmix(box, x)) if box is not None else (lambda x: x)
            if p.strong_photometric:
                img_u = strong_photometric(img_u, self.cfg.data.mean, self.cfg.data.std)
            img_s, pl_s, conf_s, ent_s = mix(img_u), mix(pl_u), mix(conf_u), mix(ent_u)

        # -- student: one forward over labeled + strong unlabeled
        out = self.model(torch.cat([img_l, img_s]))
        head = {k: v[:n_l] for k, v in out.items() if k in ("logits", "aux")}
        losses = sup_losses(self.cfg, head, mask_l)
        loss = losses["loss"]

        valid_u = pl_s != ignore
        thr = percentiles(ent_s, valid_u, [p_t, alpha_t, 100.0 - alpha_t])
        adjust = None
        if self.pl_prior is not None:
            adjust = self._pseudo_label_adjustment(pl_s, valid_u & (ent_s < thr[0]))
        loss_u, keep = unsup_loss(out["logits"][n_l:], pl_s, ent_s, thr[0], p.unsup_norm, ignore, adjust)
        loss = loss + p.unsup_weight * loss_u
        reliable = valid_u & (ent_s <= thr[1])
        unreliable = valid_u & (ent_s >= thr[2])

        if p.contrastive:
            if teacher_labeled:
                prob_l, rep_l, rep_u = t_prob[:n_l], t_out["rep"][:n_l], t_out["rep"][n_l:]
            else:  # the student's training-mode outputs (dropout, batch statistics), detached
                prob_l = torch.softmax(out["logits"][:n_l].detach().float(), 1)
                rep_l, rep_u = out["rep"][:n_l].detach(), t_out["rep"]
            loss_c = self._contrastive(
                out["rep"], prob_l, rep_l, prob_u, rep_u, mask_l, pl_s, reliable, unreliable, mix
            )
            loss = loss + p.contrastive_weight * loss_c
        else:
            loss_c = _unused(out)
            loss = loss + loss_c

        n_u = valid_u.sum().clamp(min=1)
        losses.update(
            loss=loss,
            loss_unsup=loss_u.detach(),
            loss_contra=loss_c.detach(),
            drop_percent=_scalar(p_t, loss),
            alpha_t=_scalar(alpha_t, loss),
            unsup_kept=keep.sum() / n_u,
            reliable_frac=reliable.sum() / n_u,
            pl_conf=conf_s.mean(),
        )
        losses.update(_pseudo_label_accuracy(unlabeled, pl_u, ent_u, thr[0], ignore))
        return {k: (v if k == "loss" else v.detach()) for k, v in losses.items()}

    def _count_labels(self, mask: Tensor) -> None:
        """Add the labeled batch's pixels per class (all ranks') to `label_counts`."""
        valid = (mask >= 0) & (mask < self.num_classes)
        self.label_counts += self._class_counts(mask, valid)

    def _class_counts(self, labels: Tensor, valid: Tensor) -> Tensor:
        """Pixels per class where `valid`, summed over all ranks, without a host sync (invalid
        pixels land in an extra bin that is dropped)."""
        c = self.num_classes
        counts = torch.bincount(torch.where(valid, labels, c).flatten(), minlength=c + 1)[:c]
        return distributed.all_reduce_sum_(counts.double())  # exact well past float32's 2**24

    def _align(self, prob_u: Tensor) -> Tensor:
        """Update the running mean teacher prediction with this batch (all ranks), then align."""
        assert self.pred_prior is not None and self.label_counts is not None
        self._update_prior(self.pred_prior, distributed.all_reduce_mean(prob_u.float().mean((0, 2, 3))))
        return align_distribution(prob_u, self._label_prior().to(prob_u.dtype), self.pred_prior.to(prob_u.dtype))

    def _pseudo_label_adjustment(self, pl: Tensor, keep: Tensor) -> Tensor:
        """Update the running class frequencies of the kept pseudo-labels with this batch (all
        ranks' pixels), then return the unsupervised CE's logit adjustment."""
        assert self.pl_prior is not None
        counts = self._class_counts(pl, keep)
        total = counts.sum()
        self._update_prior(self.pl_prior, counts / total.clamp_min(1), total > 0)
        return prior_adjustment(self.pl_prior, self._label_prior())

    def _update_prior(self, prior: Tensor, cur: Tensor, use: Tensor | None = None) -> None:
        """EMA with `align_momentum`, started at the first value; left as it is where `use` (a
        0-d bool tensor, so no host sync) is false."""
        m = self.p.align_momentum
        new = torch.where(prior.sum() > 0, m * prior + (1 - m) * cur, cur)
        prior.copy_(new if use is None else torch.where(use, new, prior))

    def _label_prior(self) -> Tensor:
        """Class frequencies of the labeled pixels counted so far (alignment's and adjustment's target)."""
        assert self.label_counts is not None
        return self.label_counts / self.label_counts.sum().clamp_min(1)

    def _contrastive(
        self,
        rep: Tensor,
        prob_l: Tensor,
        rep_l: Tensor,
        prob_u: Tensor,
        rep_u: Tensor,
        mask_l: Tensor,
        pl_s: Tensor,
        reliable: Tensor,
        unreliable: Tensor,
        mix: Any,
    ) -> Tensor:
        """Masks at the representation stride, bank update (gathered across ranks), then the loss.

        `rep` is the student's (labeled + strong unlabeled, with grad); `prob_*` (full size) and
        `rep_*` (stride 4) are the detached keys' sources: the teacher's weak-view outputs for
        the unlabeled half (mixed here with the CutMix box), the teacher's or the student's for
        the labeled half (`labeled_keys`)."""
        p, bank = self.p, self.bank
        assert bank is not None
        size = rep.shape[-2:]
        n_l = prob_l.shape[0]
        with torch.no_grad():
            down = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
            prob_small = torch.cat([down(prob_l), mix(down(prob_u))])
            rep_t = torch.cat([rep_l, mix(rep_u)])
            label_l = resize_nearest(mask_l, size)
            lab = torch.cat([label_l, resize_nearest(pl_s, size)])
            valid_l = label_l != self.cfg.data.ignore_index
            rel = torch.cat([valid_l, resize_nearest(reliable, size)])
            unrel = torch.cat([valid_l, resize_nearest(unreliable, size)])
            is_l = torch.zeros_like(rel)
            is_l[:n_l] = True
            flat = lambda x: x.flatten()  # noqa: E731
            proto, anchor, negative = contrastive_masks(
                flat(lab), prob_small.permute(0, 2, 3, 1).flatten(0, 2), flat(rel), flat(unrel), flat(is_l),
                p.delta_p, p.delta_n, p.low_rank, p.high_rank, self.cfg.data.ignore_index, p.negative_mask,
            )
            rep_t = rep_t.permute(0, 2, 3, 1).flatten(0, 2)
            # Queue update before the loss reads it (official order); keys L2-normalised once
            # here since only their direction enters the cosine similarity.
            pix, cls = last_per_class(negative, bank.sizes)
            keys = F.normalize(rep_t.index_select(0, pix).float(), dim=1)
            bank.push(distributed.all_gather_cat(keys), distributed.all_gather_cat(cls))
        loss, _ = contrastive_loss(
            rep.permute(0, 2, 3, 1).flatten(0, 2), rep_t, proto, anchor, bank,
            p.num_queries, p.num_negatives, p.temperature,
        )
        return loss

    def after_optimizer_step(self, step: int) -> None:
        if step < self.sup_only_iters():
            return
        self._last_decay = self.teacher.update(distributed.unwrap(self.model), step - self.sup_only_iters())
        # Without SyncBN (CPU ranks) each rank's student BN statistics differ after its forward,
        # so the teacher's, blended or copied from them, would drift apart across ranks and each
        # rank would pseudo-label with another teacher: all ranks take rank 0's, as the student
        # does (DDP broadcasts its buffers at every forward).
        distributed.broadcast_small_buffers(self.teacher)
        self.ema_updates += 1

    def extra_log(self) -> dict[str, float]:
        log: dict[str, float] = {"ema_decay": float(self._last_decay)}
        if self.bank is not None:
            frac = (self.bank.fill.float() / self.bank.sizes.float()).tolist()
            log["queue_fill_mean"] = sum(frac) / len(frac)
            for name, f in zip(self.class_names, frac):
                log[f"queue_fill/{name}"] = f
        if self.pred_prior is not None and float(self.pred_prior.sum()) > 0:
            ratio = (self._label_prior().float().clamp_min(1e-6) / self.pred_prior.clamp_min(1e-6)).tolist()
            for name, r in zip(self.class_names, ratio):
                log[f"align_ratio/{name}"] = r
        if self.pl_prior is not None and float(self.pl_prior.sum()) > 0:
            shift = prior_adjustment(self.pl_prior, self._label_prior()).tolist()
            for name, a in zip(self.class_names, shift):
                log[f"prior_adjust/{name}"] = a
        return log


def _unused(out: dict[str, Tensor]) -> Tensor:
    """0 x the representation, so every student parameter is in the graph (DDP without
    find_unused_parameters fails otherwise) while the head gets no signal."""
    return out["rep"].sum() * 0.0 if "rep" in out else out["logits"].sum() * 0.0


def _scalar(v: float, like: Tensor) -> Tensor:
    return torch.tensor(v, device=like.device, dtype=torch.float32)


def _pseudo_label_accuracy(
    unlabeled: dict[str, Any], pl: Tensor, ent: Tensor, thresh: Tensor, ignore: int
) -> dict[str, Tensor]:
    """Teacher pseudo-label accuracy on the weak view against the ground truth of unlabeled
    images that have one (`has_mask`): over all labeled pixels, and over those the entropy
    threshold keeps. One host sync (`has_mask.any()`) decides whether to log it at all."""
    has = unlabeled.get("has_mask")
    if has is None or not bool(has.any()):
        return {}
    gt = unlabeled["mask"]
    valid = (gt != ignore) & has.view(-1, 1, 1)
    right = (pl == gt) & valid
    kept = valid & (ent < thresh)
    return {
        "pl_acc": right.sum() / valid.sum().clamp(min=1),
        "pl_acc_kept": (right & kept).sum() / kept.sum().clamp(min=1),
    }
