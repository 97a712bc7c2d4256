"""The small interface every method implements; the one training loop only talks to this.

A method is an `nn.Module` that owns its networks (student, EMA teacher, discriminator, ...) and
any state it keeps (memory-bank queues as buffers), so `state_dict()` captures all of it.

Per iteration the loop calls, for each micro-batch, `training_step(labeled, unlabeled, step)` and
back-propagates the returned `"loss"`; then it steps every optimizer from `configure_optimizers`
whose `every` divides the step, and calls `after_optimizer_step(step)` (EMA updates live there).

Batches are dicts from `semiseg_cli.data`: `image` (B,3,H,W normalised float), `mask`
(B,H,W long, 255 = ignore; all 255 where an unlabeled image has no mask), `has_mask` (B bool),
`tags` (B,C multi-hot float) and `name` (list of str).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from semiseg_cli.errors import warn


@dataclass
class TrainContext:
    """What the loop knows and a method may need (epoch lengths for per-epoch schedules)."""

    total_iters: int
    labeled_size: int
    unlabeled_size: int
    labeled_batch: int
    unlabeled_batch: int
    device: torch.device
    world_size: int = 1
    rank: int = 0

    @property
    def epoch_iters(self) -> int:
        """Iterations per epoch over the unlabeled pool (the labeled pool without one)."""
        pool, batch = (self.unlabeled_size, self.unlabeled_batch) if self.unlabeled_size else (self.labeled_size, self.labeled_batch)
        return max(1, pool // max(1, batch * self.world_size))


@dataclass
class OptimizerSpec:
    """An optimizer, the LR schedule factor as a function of the step, and how often it steps."""

    optimizer: torch.optim.Optimizer
    lr_lambda: Callable[[int], float]
    every: int = 1
    name: str = "main"
    base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.base_lrs:
            self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def set_lr(self, step: int) -> None:
        f = self.lr_lambda(step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f


def poly_lambda(total_iters: int, power: float = 0.9, warmup_iters: int = 0) -> Callable[[int], float]:
    """Linear warm-up then poly decay `(1 - t/T) ** power`, as a factor of the base LR."""

    def f(step: int) -> float:
        if warmup_iters and step < warmup_iters:
            return (step + 1) / warmup_iters
        return max(0.0, 1.0 - step / max(1, total_iters)) ** power

    return f


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters: the backbone is `model.backbone`; everything else is head."""
    backbone = getattr(model, "backbone", None)
    bb_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    bb = [p for p in model.parameters() if id(p) in bb_ids and p.requires_grad]
    head = [p for p in model.parameters() if id(p) not in bb_ids and p.requires_grad]
    return bb, head


OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "plain")


def _supports_fused(cls: type) -> bool:
    return "fused" in inspect.signature(cls.__init__).parameters


def resolve_optimizer_impl(impl: str, cls: type, on_cuda: bool) -> str:
    """What `optim.impl` means for optimizer class `cls` on CUDA parameters or not ("auto":
    fused where torch has fused kernels for `cls` on CUDA, foreach on CUDA otherwise, plain
    on the CPU, where torch's own default is the plain loop too)."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {', '.join(OPTIMIZER_IMPLS)} (got {impl!r})")
    if impl == "auto":
        return ("fused" if _supports_fused(cls) else "foreach") if on_cuda else "plain"
    return impl


def make_optimizer(cls: type, params: Any, impl: str = "auto", **hyper: Any) -> torch.optim.Optimizer:
    """`cls(params, **hyper)` computed the way `impl` (`optim.impl`) asks; the same update up to
    float rounding whichever it is. "auto": fused kernels when every parameter is on CUDA and
    torch has them for `cls`, else foreach on CUDA, else the plain per-parameter loop (CPU).
    "fused" where torch cannot (another optimizer class, a device without the kernels): one
    warning line, then foreach."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    tensors = [p for g in groups for p in g["params"]]
    impl = resolve_optimizer_impl(impl, cls, bool(tensors) and all(p.device.type == "cuda" for p in tensors))
    if impl == "fused":
        why = f"torch's {cls.__name__} has no fused kernels"
        if _supports_fused(cls):
            try:
                return cls(groups, fused=True, **hyper)
            except (RuntimeError, ValueError) as e:  # e.g. parameters on a device without them
                why = str(e).split("\n", 1)[0]
        warn(f"optim.impl = \"fused\": {why}; using foreach")
        impl = "foreach"
    return cls(groups, foreach=impl == "foreach", **hyper)


def optimizer_impl(opt: torch.optim.Optimizer) -> str:
    """Which implementation an optimizer steps with: "fused", "foreach" or "plain"."""
    g = opt.param_groups[0] if opt.param_groups else opt.defaults
    return "fused" if g.get("fused") else "foreach" if g.get("foreach") else "plain"


def build_optimizer(model: nn.Module, optim_cfg: Any, total_iters: int) -> OptimizerSpec:
    """SGD or AdamW over backbone (lr) and heads (lr x head_lr_mult), with warm-up + poly,
    stepped the way `optim.impl` says (`make_optimizer`)."""
    bb, head = split_params(model)
    groups = [{"params": bb, "lr": optim_cfg.lr}, {"params": head, "lr": optim_cfg.lr * optim_cfg.head_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if optim_cfg.name == "sgd":
        opt = make_optimizer(torch.optim.SGD, groups, optim_cfg.impl, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                             weight_decay=optim_cfg.weight_decay)
    else:
        opt = make_optimizer(torch.optim.AdamW, groups, optim_cfg.impl, lr=optim_cfg.lr, betas=optim_cfg.betas,
                             weight_decay=optim_cfg.weight_decay)
    return OptimizerSpec(opt, poly_lambda(total_iters, optim_cfg.poly_power, optim_cfg.warmup_iters))


class Method(nn.Module):
    """Base class. Subclasses set `name` and implement `training_step`."""

    name: ClassVar[str] = "base"
    uses_unlabeled: ClassVar[bool] = False  # the loop builds an unlabeled loader when True
    uses_tags: ClassVar[bool] = False  # labeled data carry image-level tags only (DuPL)
    # The unlabeled batch also carries `partner`: a batch from a second, independently shuffled
    # pass over the unlabeled pool (FixMatch/UniMatch take their CutMix partners from it).
    unlabeled_partner: ClassVar[bool] = False

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.class_names = class_names
        self.model: nn.Module = self.build_inference_model(cfg, num_classes)
        self.ctx: TrainContext | None = None

    def setup(self, ctx: TrainContext) -> None:
        """Called by the loop once data sizes and the device are known, before optimizers exist."""
        self.ctx = ctx

    def total_iters(self) -> int:
        """The run's length: the loop's, or the config's before `setup` (unit tests)."""
        return self.ctx.total_iters if self.ctx is not None else self.cfg.train.iters

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_inference_model(cls, cfg: Any, num_classes: int) -> nn.Module:
        """The network `eval`, `pseudo-label` and `export` rebuild from a checkpoint's config."""
        from semiseg_cli.models import build_model

        return build_model(cfg.model, num_classes)

    @classmethod
    def check_config(cls, cfg: Any, num_classes: int | None) -> None:
        """Raise `UserError` for settings this method cannot run as itself (cross-field rules:
        e.g. a warm-up as long as the run, rank windows wider than the classes). Called by
        `train` and `--dry-run` before anything is written; `num_classes` is None when the data
        is not at hand, and rules that need it are then left to `train`."""

    @classmethod
    def check_schedule(cls, cfg: Any, ctx: TrainContext) -> None:
        """Raise `UserError` for a schedule that cannot work with these pool sizes (e.g. a warm-up
        of one epoch that is as long as the run). Called by `train` before the method is built."""

    def inference_model(self) -> nn.Module:
        """The network to evaluate and ship: the EMA teacher when there is one."""
        return self.model

    def configure_optimizers(self, total_iters: int) -> list[OptimizerSpec]:
        return [build_optimizer(self.model, self.cfg.optim, total_iters)]

    # ------------------------------------------------------------------ training
    def training_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any] | None, step: int
    ) -> dict[str, torch.Tensor]:
        """Return `{"loss": scalar to back-propagate, other: detached scalars to log}`."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called once per iteration after the optimizers stepped (EMA updates, queues)."""

    def extra_log(self) -> dict[str, float]:
        """Slow-changing numbers logged at log intervals (queue fill, ...)."""
        return {}


def supervised_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    kind: str = "ce",
    ohem_thresh: float = 0.7,
    ohem_min_kept: int = 100000,
) -> torch.Tensor:
    """Cross-entropy, or OHEM cross-entropy (keep pixels whose true-class prob < thresh, at least
    `min_kept` of them), as in the U2PL Cityscapes recipe."""
    logits = logits.float()
    if kind == "ce":
        return nn.functional.cross_entropy(logits, target, ignore_index=ignore_index)
    pixel = nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    valid = target.flatten() != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    with torch.no_grad():
        prob = torch.softmax(logits, 1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).flatten()
        prob = torch.where(valid, prob, torch.ones_like(prob))
        k = min(n_valid, ohem_min_kept)
        thresh = ohem_thresh
        if k > 0:
            kth = torch.kthvalue(prob, k).values.item()
            thresh = max(thresh, kth)
        keep = valid & (prob <= thresh)
    if keep.sum() == 0:
        return logits.sum() * 0.0
    return pixel[keep].mean()
