"""U2PL: semi-supervised segmentation using unreliable pseudo-labels (Wang et al., CVPR 2022).

One training step, read top to bottom in `training_step`:
1. supervised-only warm-up (`sup_only_iters`): labeled CE only, no teacher forward;
2. teacher (EMA of the student, eval mode, no grad) on cat(labeled, weak unlabeled): one softmax
   -> pseudo-label, confidence, entropy on the unlabeled half; probabilities and stride-4
   features on both halves for the contrastive term (`labeled_keys="student"`: the teacher sees
   the unlabeled images only and the labeled half comes from the student's forward, detached);
3. CutMix (probability 0.5, one box of half the image per sample, sample i with (i+1) mod B)
   applied alike to the unlabeled images, pseudo-labels, confidences, entropies, teacher
   probabilities and teacher features;
4. one student forward over cat(labeled, strong unlabeled) (one call, for DDP);
5. loss = supervised CE + unsup_weight x CE on the pseudo-labels below the p_t-th entropy
   percentile + contrastive_weight x the contrastive loss on the representation head, whose
   memory bank is updated first.
The teacher's EMA update happens in `after_optimizer_step`.

Paper vs official code choices are fields of `U2PLParams`; docs/methods_u2pl.md lists them. The
one extension beyond the paper that a preset uses (`unsup_prior_adjust`) is `PriorAdjustment`,
called in two places marked "not in the paper"; off, the step is the paper's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg_cli.engine import distributed
from semiseg_cli.engine.ema import EMATeacher
from semiseg_cli.errors import UserError
from semiseg_cli.methods.base import Method
from semiseg_cli.methods.supervised import sup_losses
from semiseg_cli.methods.u2pl_losses import (
    MemoryBank,
    PriorAdjustment,
    alpha_at,
    contrastive_loss,
    contrastive_masks,
    cutmix,
    cutmix_box_mask,
    drop_percent_at,
    epoch_fraction,
    last_per_class,
    reliable_split,
    resize_nearest,
    unsup_loss,
)
from semiseg_cli.ops import entropy, keep_low_entropy, percentiles


class U2PL(Method):
    name = "u2pl"
    uses_unlabeled = True

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__(cfg, num_classes, class_names)
        p = cfg.u2pl
        self.p = p
        # Built from the plain student before the loop wraps it in DDP (see EMATeacher); BatchNorm
        # statistics are averaged too (the official code averages parameters only).
        self.teacher = EMATeacher(self.model, max_decay=p.ema_decay)
        self.bank: MemoryBank | None = None
        if p.contrastive:
            sizes = [p.queue_size_background] + [p.queue_size] * (num_classes - 1)
            self.bank = MemoryBank(sizes[:num_classes], cfg.model.rep_dim)
        # Number of EMA updates done: 0 means the teacher is still the untrained initial copy,
        # so evaluation and checkpoints use the student (the official code validates the
        # student during the supervised-only epoch too).
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._last_decay = 0.0
        # Not in the paper (`unsup_prior_adjust`). Absent when off, so the paper's checkpoints
        # carry no state for it; its buffers were the method's own before it was a module.
        self.prior_adjust: PriorAdjustment | None = None
        if p.unsup_prior_adjust:
            self.prior_adjust = PriorAdjustment(num_classes)
            self.register_load_state_dict_pre_hook(_prior_adjust_old_keys)

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
        frac = epoch_fraction(step, self._epoch_iters(), self.total_iters())
        return drop_percent_at(frac, self.p.drop_percent, self.p.drop_percent_end), alpha_at(frac, self.p.alpha_0)

    # ------------------------------------------------------------------ training
    def training_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int
    ) -> dict[str, Tensor]:
        p = self.p
        p_t, alpha_t = self.schedules(step)
        if self.prior_adjust is not None:  # not in the paper: its labeled prior counts every step
            self.prior_adjust.count_labels(labeled["mask"])
        if unlabeled is None or step < self.sup_only_iters():
            return self._warmup_step(labeled, p_t, alpha_t)
        self._start_teacher(step)
        ignore = self.cfg.data.ignore_index
        img_l, mask_l, img_u = labeled["image"], labeled["mask"], unlabeled["image"]
        n_l = img_l.shape[0]

        # -- teacher on the weak view: pseudo-labels (and, for the contrastive term, probabilities
        # and features of the labeled half too, unless they come from the student)
        teacher_labeled = p.contrastive and p.labeled_keys == "teacher"
        with torch.no_grad():
            t_out = self.teacher(torch.cat([img_l, img_u]) if teacher_labeled else img_u)
            # One full-size softmax, shared by the pseudo-labels and the contrastive term.
            t_prob = torch.softmax(t_out["logits"].float(), 1)
            prob_u = t_prob[n_l:] if teacher_labeled else t_prob
            conf_u, pl_u = prob_u.max(1)
            ent_u = entropy(prob_u)
            # -- strong view: CutMix, applied alike to images and everything the teacher said
            mix = self._draw_cutmix(img_u)
            img_s, pl_s, conf_s, ent_s = mix(img_u), mix(pl_u), mix(conf_u), mix(ent_u)

        # -- student: one forward over labeled + strong unlabeled
        out = self.model(torch.cat([img_l, img_s]))
        losses = sup_losses(self.cfg, {k: v[:n_l] for k, v in out.items() if k in ("logits", "aux")}, mask_l)

        # -- unsupervised: CE on the pseudo-labels whose entropy is below the p_t-th percentile
        valid_u = pl_s != ignore
        keep = keep_low_entropy(ent_s, p_t, valid_u, scope="batch")
        adjust = None
        if self.prior_adjust is not None:  # not in the paper: logit adjustment for label shift
            self.prior_adjust.update(pl_s, keep)
            adjust = self.prior_adjust.offsets()
        loss_u = unsup_loss(out["logits"][n_l:], pl_s, keep, ignore, adjust)

        # -- contrastive: reliable pixels are anchors, unreliable ones negative keys
        reliable, unreliable = reliable_split(ent_s, valid_u, alpha_t)
        if p.contrastive:
            if teacher_labeled:
                prob_l, rep_l, rep_u = t_prob[:n_l], t_out["rep"][:n_l], t_out["rep"][n_l:]
            else:  # the student's training-mode outputs (dropout, batch statistics), detached
                prob_l = torch.softmax(out["logits"][:n_l].detach().float(), 1)
                rep_l, rep_u = out["rep"][:n_l].detach(), t_out["rep"]
            loss_c = self._contrastive(
                out["rep"], prob_l, rep_l, prob_u, rep_u, mask_l, pl_s, reliable, unreliable, mix
            )
        else:
            loss_c = _unused(out)

        loss = losses["loss"] + p.unsup_weight * loss_u + p.contrastive_weight * loss_c
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
        losses.update(_pseudo_label_accuracy(unlabeled, pl_u, ent_u, lambda: percentiles(ent_s, valid_u, [p_t])[0], ignore))
        return {k: (v if k == "loss" else v.detach()) for k, v in losses.items()}

    def _warmup_step(self, labeled: dict[str, Any], p_t: float, alpha_t: float) -> dict[str, Tensor]:
        """The supervised-only warm-up: the labeled loss alone, no teacher forward."""
        out = self.model(labeled["image"])
        losses = sup_losses(self.cfg, out, labeled["mask"])
        zero = _unused(out)
        losses["loss"] = losses["loss"] + zero
        losses.update(loss_unsup=zero.detach(), loss_contra=zero.detach())
        losses.update(drop_percent=_scalar(p_t, zero), alpha_t=_scalar(alpha_t, zero))
        return {k: (v if k == "loss" else v.detach()) for k, v in losses.items()}

    def _start_teacher(self, step: int) -> None:
        """The teacher starts the semi-supervised phase as the student (it is not updated during
        the warm-up, and its first pseudo-labels come before its first EMA update); with
        `teacher_reset` it stays a copy for `teacher_reset_iters` steps, as the official code."""
        if step - self.sup_only_iters() < max(1, self.teacher_reset_iters()):
            self.teacher.reset(distributed.unwrap(self.model))
            distributed.broadcast_small_buffers(self.teacher)  # one teacher on every rank (see below)

    def _draw_cutmix(self, img_u: Tensor) -> Callable[[Tensor], Tensor]:
        """One coin per batch (`cutmix_prob`) and, on heads, one box per sample: a function that
        mixes any (B, ...) map with it (the identity on tails)."""
        p = self.p
        if p.cutmix_prob > 0 and float(torch.rand(())) < p.cutmix_prob:
            h, w = img_u.shape[-2:]
            box = cutmix_box_mask(img_u.shape[0], h, w, p.cutmix_area, p.cutmix_align).to(img_u.device)
            return lambda x: cutmix(box, x)
        return lambda x: x

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
            down = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=self.cfg.model.align_corners)  # noqa: E731
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
                p.delta_p, p.delta_n, p.low_rank, p.high_rank, self.cfg.data.ignore_index,
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
        if self.prior_adjust is not None and float(self.prior_adjust.pl_prior.sum()) > 0:
            for name, a in zip(self.class_names, self.prior_adjust.offsets().tolist()):
                log[f"prior_adjust/{name}"] = a
        return log


def _unused(out: dict[str, Tensor]) -> Tensor:
    """0 x the representation, so every student parameter is in the graph (DDP without
    find_unused_parameters fails otherwise) while the head gets no signal."""
    return out["rep"].sum() * 0.0 if "rep" in out else out["logits"].sum() * 0.0


def _scalar(v: float, like: Tensor) -> Tensor:
    return torch.tensor(v, device=like.device, dtype=torch.float32)


def _pseudo_label_accuracy(
    unlabeled: dict[str, Any], pl: Tensor, ent: Tensor, drop_threshold: Callable[[], Tensor], ignore: int
) -> dict[str, Tensor]:
    """Teacher pseudo-label accuracy on the weak view against the ground truth of unlabeled
    images that have one (`has_mask`): over all labeled pixels, and over those the entropy drop
    keeps (`drop_threshold()`, the strong view's p_t-th percentile, computed only when needed).
    One host sync (`has_mask.any()`) decides whether to log it at all."""
    has = unlabeled.get("has_mask")
    if has is None or not bool(has.any()):
        return {}
    gt = unlabeled["mask"]
    valid = (gt != ignore) & has.view(-1, 1, 1)
    right = (pl == gt) & valid
    kept = valid & (ent < drop_threshold())
    return {
        "pl_acc": right.sum() / valid.sum().clamp(min=1),
        "pl_acc_kept": (right & kept).sum() / kept.sum().clamp(min=1),
    }


def _prior_adjust_old_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before `PriorAdjustment` was a module kept its buffers on the method."""
    for key in ("label_counts", "pl_prior"):
        if prefix + key in state_dict:
            state_dict[prefix + "prior_adjust." + key] = state_dict.pop(prefix + key)
