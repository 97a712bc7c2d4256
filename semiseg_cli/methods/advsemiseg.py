"""AdvSemiSeg (Hung et al., BMVC 2018): a fully convolutional discriminator for semi-supervised
segmentation.

The discriminator D looks at a C-channel class-probability map and says, per pixel, whether it
came from the ground truth (one-hot, "real") or from the segmentation network (softmax, "fake").
The segmentation network G is trained with

- labeled:   CE(pred_l, y) (+ aux, the shared `sup_losses`)
             + lambda_adv * BCE(D(softmax(pred_l)), real)   on non-ignore pixels
- unlabeled: lambda_semi_adv * BCE(D(softmax(pred_u)), real)
             + lambda_semi * CE(pred_u, argmax pred_u) on pixels where sigmoid(D) >= T_semi
               (from `semi_start`): D's confidence map picks the pixels worth self-training on,

and D with 0.5 * BCE(D(fake), 0) + 0.5 * BCE(D(one-hot y), 1) on detached predictions.

One backward per step. The G adversarial terms are computed with D's parameters temporarily
frozen (`requires_grad_(False)`), so they only send gradients into G; the D loss is computed on
detached inputs, so it only sends gradients into D. The sum goes back as `"loss"`; the loop steps
G's SGD and D's Adam ("disc") from the same backward. This is the official code's order of
updates (G's terms use D before its update) folded into one pass.

What can go wrong: D separates one-hot maps from softmax maps almost perfectly early on
(accuracy ~100%), and the confidence map then marks almost nothing as trustworthy; or D collapses
to chance (~50%) and the T_semi mask is noise. Both are logged (`d_acc_real`, `d_acc_fake`,
`semi_ratio`) and warned about once; `d_update_every` / `g_update_every` slow one side down.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.engine import distributed
from semiseg_cli.errors import UserError, warn
from semiseg_cli.methods.base import Method, OptimizerSpec, build_optimizer, make_optimizer, poly_lambda
from semiseg_cli.methods.supervised import sup_losses

# The discriminator has five 4x4 stride-2 convs: each side shrinks by 32; smaller inputs give an
# empty map.
_D_MIN_SIDE = 32
# D's Adam betas (paper and official code).
_D_BETAS = (0.9, 0.99)


# ----------------------------------------------------------------------------- the losses, in the paper's order


def masked_bce_with_logits(logits: torch.Tensor, target: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE-with-logits of a (B,1,H,W) or (B,H,W) map against a constant label, over `valid`.

    As the official `BCEWithLogitsLoss2d`: ignored pixels are dropped from both the sum and the
    count, not given a target. With no valid pixel the result is a graph-connected zero (so a
    backward still works and puts zeros, not None, into the gradients).
    """
    logits = logits.float().reshape(logits.shape[0], -1)
    pixel = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)), reduction="none")
    if valid is None:
        return pixel.mean()
    w = valid.reshape(valid.shape[0], -1).to(pixel.dtype)
    n = w.sum()
    return (pixel * w).sum() / n.clamp(min=1.0)


def adversarial_loss(d_logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """G's adversarial term: make D call the prediction real (label 1) on `valid` pixels."""
    return masked_bce_with_logits(d_logits, 1.0, valid)


def semi_pseudo_labels(
    logits_u: torch.Tensor, d_logits_u: torch.Tensor, t_semi: float, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-training targets: argmax of the prediction where sigmoid(D) >= t_semi, else ignore.

    Returns (target (B,H,W) long, kept (B,H,W) bool). No gradient flows through either.
    """
    with torch.no_grad():
        conf = torch.sigmoid(d_logits_u.float()).reshape(logits_u.shape[0], *logits_u.shape[2:])
        kept = conf >= t_semi
        target = logits_u.argmax(1)
        target = torch.where(kept, target, torch.full_like(target, ignore_index))
    return target, kept


def semi_loss(logits_u: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Self-training CE, averaged over the kept pixels only (the official normalisation).

    With nothing kept it is a graph-connected zero; the official code then skips the whole
    unlabeled backward (dropping the unlabeled adversarial term too), which is not copied here.
    """
    if not bool((target != ignore_index).any()):
        return logits_u.float().sum() * 0.0
    return F.cross_entropy(logits_u.float(), target, ignore_index=ignore_index)


def one_hot_labels(mask: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(B,H,W) labels -> (B,C,H,W) plain 0/1 maps; ignore pixels are all zeros.

    All-zero is just what the one-hot of "no class" looks like; it is NOT how ignore pixels are
    kept out of D's loss (that is the per-pixel mask of `discriminator_loss`). Labels outside
    [0, C) other than `ignore_index` raise a UserError, since they would silently become all-zero too.
    """
    valid = mask != ignore_index
    if bool(((mask[valid] < 0) | (mask[valid] >= num_classes)).any()):
        bad = mask[valid & ((mask < 0) | (mask >= num_classes))][0].item()
        raise UserError(
            f"mask label {bad} is outside [0, {num_classes}) and is not the ignore index {ignore_index}; "
            "check the dataset's class list or data.ignore_index"
        )
    safe = torch.where(valid, mask, torch.zeros_like(mask))
    onehot = F.one_hot(safe.long(), num_classes).permute(0, 3, 1, 2).float()
    return onehot * valid.unsqueeze(1).float()


def discriminator_loss(
    d_fake: torch.Tensor,
    d_real: torch.Tensor,
    valid_fake: torch.Tensor | None = None,
    valid_real: torch.Tensor | None = None,
) -> torch.Tensor:
    """D's loss: 0.5 * BCE(D(fake), 0) + 0.5 * BCE(D(real), 1), each a masked per-pixel mean.

    `d_fake` must come from detached predictions, or this loss trains G to look fake.
    """
    return 0.5 * masked_bce_with_logits(d_fake, 0.0, valid_fake) + 0.5 * masked_bce_with_logits(d_real, 1.0, valid_real)


# ----------------------------------------------------------------------------- the method


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop a module's parameters from requiring grad (restoring each flag after).

    A graph built inside still propagates gradients through the module to its inputs; only the
    module's own parameters get none. Flags are restored even if the body raises.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class AdvSemiSeg(Method):
    name = "advsemiseg"
    uses_unlabeled = True

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__(cfg, num_classes, class_names)
        from semiseg_cli.models.discriminator import FCDiscriminator

        # D's map is resized to the input like the logits (the official code uses one resize).
        self.discriminator = FCDiscriminator(num_classes, align_corners=cfg.model.align_corners)
        self.monitor = DAccuracyMonitor(cfg.advsemiseg.warn_window)

    @classmethod
    def check_config(cls, cfg: Any, num_classes: int | None) -> None:
        h, w = cfg.data.crop_size
        if min(h, w) < _D_MIN_SIDE:
            raise UserError(
                f"data.crop_size {h}x{w} is too small for the AdvSemiSeg discriminator (five stride-2 convs); "
                f"use crops of at least {_D_MIN_SIDE}x{_D_MIN_SIDE}"
            )
        if num_classes is not None and num_classes < 2:
            raise UserError(f"AdvSemiSeg needs at least 2 classes, the dataset has {num_classes}")
        p = cfg.advsemiseg
        if p.semi_start >= cfg.train.iters and p.lambda_semi > 0:
            warn(
                f"advsemiseg.semi_start ({p.semi_start}) is not below train.iters ({cfg.train.iters}): the "
                "confidence-masked self-training never starts; lower advsemiseg.semi_start to use it"
            )

    def configure_optimizers(self, total_iters: int) -> list[OptimizerSpec]:
        p = self.cfg.advsemiseg
        g = build_optimizer(self.model, self.cfg.optim, total_iters)
        g.every = p.g_update_every
        d_opt = make_optimizer(torch.optim.Adam, self.discriminator.parameters(), self.cfg.optim.impl, lr=p.d_lr, betas=_D_BETAS)
        d = OptimizerSpec(d_opt, poly_lambda(total_iters, self.cfg.optim.poly_power), every=p.d_update_every, name="disc")
        return [g, d]

    def training_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int
    ) -> dict[str, torch.Tensor]:
        p = self.cfg.advsemiseg
        ignore = self.cfg.data.ignore_index
        x_l, y_l = labeled["image"], labeled["mask"]
        bl = x_l.shape[0]
        x = x_l if unlabeled is None else torch.cat([x_l, _same_crop(unlabeled["image"], x_l)])
        # One forward on all images (DDP needs a single forward per backward).
        out = self.model(x)
        logits = out["logits"].float()
        probs = torch.softmax(logits, 1)
        pred_u = logits[bl:]
        valid_l = y_l != ignore
        with frozen(self.discriminator):  # G's adversarial terms train G only
            d_g = self.discriminator(probs).float()

        # ---- G, labeled: CE (+ aux) + lambda_adv * BCE(D(softmax(pred_l)), real)
        sup = sup_losses(self.cfg, {k: v[:bl] for k, v in out.items() if k in ("logits", "aux")}, y_l)
        loss_adv = adversarial_loss(d_g[:bl], valid_l)
        loss_g = sup["loss"] + p.lambda_adv * loss_adv

        # ---- G, unlabeled: lambda_semi_adv * BCE(D(softmax(pred_u)), real)
        #                   + lambda_semi * CE(pred_u, argmax pred_u) where sigmoid(D) >= t_semi
        logs: dict[str, torch.Tensor] = {}
        zero = logits.sum() * 0.0
        loss_semi_adv, loss_semi = zero, zero
        if pred_u.shape[0] > 0:
            d_u = d_g[bl:]
            loss_semi_adv = adversarial_loss(d_u)
            loss_g = loss_g + p.lambda_semi_adv * loss_semi_adv
            target_u, kept = semi_pseudo_labels(pred_u, d_u, p.t_semi, ignore)
            if step >= p.semi_start:
                loss_semi = semi_loss(pred_u, target_u, ignore)
                loss_g = loss_g + p.lambda_semi * loss_semi
            logs["semi_ratio"] = kept.float().mean()
            logs.update(_pseudo_label_accuracy(unlabeled, pred_u, kept, ignore))

        # ---- D: fake = detached predictions (unlabeled ones too with d_remain, never ignored,
        # as the official `ignore_mask_remain`), real = one-hot labels; one D forward on both.
        fake = probs.detach() if p.d_remain else probs[:bl].detach()
        valid_fake = torch.cat([valid_l, valid_l.new_ones((fake.shape[0] - bl, *valid_l.shape[1:]))])
        real = one_hot_labels(y_l, self.num_classes, ignore).to(fake.dtype)
        d_out = self.discriminator(torch.cat([fake, real])).float()
        d_fake, d_real = d_out[: fake.shape[0]], d_out[fake.shape[0] :]
        loss_d = discriminator_loss(d_fake, d_real, valid_fake, valid_l)

        acc_real, acc_fake = discriminator_accuracy(d_fake, d_real, valid_fake, valid_l)
        self._watch((acc_real + acc_fake) / 2)
        g_w = 1.0 if step % p.g_update_every == 0 else 0.0
        d_w = 1.0 if step % p.d_update_every == 0 else 0.0
        logs.update({k: v.detach() for k, v in sup.items() if k != "loss"})
        logs.update(
            loss=g_w * loss_g + d_w * loss_d,
            loss_adv=loss_adv.detach(),
            loss_semi_adv=loss_semi_adv.detach(),
            loss_semi=loss_semi.detach(),
            loss_d=loss_d.detach(),
            d_acc_real=acc_real,
            d_acc_fake=acc_fake,
        )
        return logs

    def _watch(self, acc: torch.Tensor) -> None:
        if not distributed.is_main():
            return
        msg = self.monitor.update(float(acc))
        if msg:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _same_crop(x_u: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
    if x_u.shape[1:] != x_l.shape[1:]:
        raise ValueError(
            f"labeled crops {tuple(x_l.shape[2:])} and unlabeled crops {tuple(x_u.shape[2:])} "
            "differ; AdvSemiSeg runs both through one forward"
        )
    return x_u


# ----------------------------------------------------------------------------- diagnostics


def discriminator_accuracy(
    d_fake: torch.Tensor,
    d_real: torch.Tensor,
    valid_fake: torch.Tensor | None = None,
    valid_real: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy on real, accuracy on fake): fractions of valid pixels with sigmoid > 0.5 on real
    maps and < 0.5 on fake maps (logit > 0 and < 0). NaN where no pixel is valid."""

    def frac(hit: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        hit = hit.reshape(hit.shape[0], -1).float()
        if valid is None:
            return hit.mean()
        w = valid.reshape(valid.shape[0], -1).float()
        n = w.sum()
        return (hit * w).sum() / n if n > 0 else torch.tensor(float("nan"), device=hit.device)

    with torch.no_grad():
        return frac(d_real.float() > 0, valid_real), frac(d_fake.float() < 0, valid_fake)


@dataclass
class DAccuracyMonitor:
    """Watches D's accuracy for the two known failure modes and reports each once.

    `update(acc)` returns a message the step a streak reaches `window` consecutive values at or
    above `high` (D wins outright: it tells one-hot from softmax, its confidence map marks
    nothing trustworthy) or within `chance_tol` of 0.5 (D guesses: the T_semi mask is noise);
    otherwise None. Each kind is reported at most once per run; a non-finite value breaks both
    streaks. Plain Python state: a resumed run starts counting again.
    """

    window: int
    high: float = 0.99
    chance_tol: float = 0.02
    streak_high: int = 0
    streak_chance: int = 0
    warned: set[str] = field(default_factory=set)

    def update(self, acc: float) -> str | None:
        finite = acc == acc and abs(acc) != float("inf")
        self.streak_high = self.streak_high + 1 if finite and acc >= self.high - 1e-9 else 0
        self.streak_chance = self.streak_chance + 1 if finite and abs(acc - 0.5) <= self.chance_tol + 1e-9 else 0
        if self.streak_high >= self.window and "high" not in self.warned:
            self.warned.add("high")
            return (
                f"AdvSemiSeg: the discriminator's accuracy has been >= {self.high:.0%} for {self.window} steps; "
                "it separates predictions from ground truth outright, so few unlabeled pixels pass t_semi. "
                "Try advsemiseg.d_update_every=2 or more, a lower advsemiseg.d_lr, or a larger lambda_adv."
            )
        if self.streak_chance >= self.window and "chance" not in self.warned:
            self.warned.add("chance")
            return (
                f"AdvSemiSeg: the discriminator's accuracy has stayed within {self.chance_tol:.0%} of 50% for "
                f"{self.window} steps; its confidence map is noise and the t_semi mask is random. "
                "Try advsemiseg.g_update_every=2 or more, a higher advsemiseg.d_lr, or a smaller lambda_adv."
            )
        return None


def _pseudo_label_accuracy(
    unlabeled: dict[str, Any] | None, pred_u: torch.Tensor, kept: torch.Tensor, ignore_index: int
) -> dict[str, torch.Tensor]:
    """Accuracy of argmax pseudo-labels on unlabeled images that have ground truth: over kept
    pixels (`semi_acc`, what self-training learns from) and all pixels (`pl_acc_all`); the gap
    says whether D's confidence map picks the right pixels. Empty without ground truth."""
    if unlabeled is None or "has_mask" not in unlabeled:
        return {}
    has = unlabeled["has_mask"].to(pred_u.device).bool()
    if not bool(has.any()):
        return {}
    with torch.no_grad():
        y = unlabeled["mask"].to(pred_u.device)
        valid = (y != ignore_index) & has.view(-1, 1, 1)
        correct = pred_u.argmax(1) == y
        logs: dict[str, torch.Tensor] = {}
        if bool(valid.any()):
            logs["pl_acc_all"] = correct[valid].float().mean()
        if bool((valid & kept).any()):
            logs["semi_acc"] = correct[valid & kept].float().mean()
    return logs
