"""Shared checks for methods: every method's test module subclasses `MethodChecks` in a few lines.

One CPU training step on a tiny model must give a finite loss, send gradients to every trainable
parameter that should get them, keep frozen parts (teachers) gradient-free, and round-trip its
state through `state_dict`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from semiseg_cli.config import build_config
from semiseg_cli.methods import get_method
from semiseg_cli.methods.base import TrainContext

TINY = [
    'model.backbone="resnet18"',
    "model.output_stride=16",
    "model.aspp_channels=32",
    "model.decoder_channels=32",
    "data.crop_size=[64, 64]",
    "data.batch_size=2",
    "data.workers=0",
    "train.iters=4",
    "train.val_interval=0",
    "train.log_interval=1",
    "train.ckpt_interval=2",
    "train.device=\"cpu\"",
]


def make_cfg(method: str = "supervised", root: str | None = None, out: str | None = None, overrides: list[str] | None = None) -> Any:
    ov = list(TINY)
    if root is not None:
        ov += ['data.dataset="demo"', f'data.root="{root}"']
    if out is not None:
        ov.append(f'out="{out}"')
    return build_config(None, ov + list(overrides or []), method)


def tiny_batch(num_classes: int, b: int = 2, size: int = 64, seed: int = 0, with_mask: bool = True) -> dict[str, Any]:
    """Images whose left half is one class and right half another, so a model can learn them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    mask = torch.zeros(b, size, size, dtype=torch.long)
    for i in range(b):
        a, c = (i % (num_classes - 1)) + 1, 0
        mask[i, :, : size // 2] = a
        mask[i, :, size // 2 :] = c
        x[i, 0, :, : size // 2] += 2.0
    if not with_mask:
        mask.fill_(255)
    tags = torch.zeros(b, num_classes)
    for i in range(b):
        tags[i, mask[i][mask[i] != 255].unique()] = 1.0
    return {
        "image": x,
        "mask": mask,
        "has_mask": torch.full((b,), with_mask),
        "tags": tags,
        "name": [f"img{i}.png" for i in range(b)],
        "index": torch.arange(b),
    }


def build_method(cfg: Any, num_classes: int = 4, unlabeled_size: int = 8) -> Any:
    cls = get_method(cfg.method)
    cls.check_config(cfg, num_classes)
    m = cls(cfg, num_classes, [f"c{i}" for i in range(num_classes)])
    m.setup(TrainContext(total_iters=cfg.train.iters, labeled_size=8, unlabeled_size=unlabeled_size,
                         labeled_batch=2, unlabeled_batch=2, device=torch.device("cpu")))
    return m


def batches_for(method: Any, num_classes: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    lab = tiny_batch(num_classes, seed=seed)
    if method.uses_tags:
        lab["gt_mask"] = lab.pop("mask")
    unl = tiny_batch(num_classes, seed=seed + 100) if method.uses_unlabeled else None
    return lab, unl


class MethodChecks:
    """Subclass and set `method` (and `overrides`, `step` to run past warm-ups)."""

    method: ClassVar[str] = "supervised"
    overrides: ClassVar[list[str]] = []
    step: ClassVar[int] = 0
    num_classes: ClassVar[int] = 4
    # Parameter-name fragments that legitimately get no gradient in one step (e.g. frozen parts).
    no_grad_ok: ClassVar[tuple[str, ...]] = ()

    def make(self) -> Any:
        torch.manual_seed(0)
        return build_method(make_cfg(self.method, overrides=self.overrides), self.num_classes)

    def test_step_is_finite_and_reaches_parameters(self) -> None:
        m = self.make()
        m.train()
        lab, unl = batches_for(m, self.num_classes)
        losses = m.training_step(lab, unl, self.step)
        assert torch.isfinite(losses["loss"]), losses
        losses["loss"].backward()
        specs = m.configure_optimizers(m.cfg.train.iters)
        optimised = {id(p) for s in specs for g in s.optimizer.param_groups for p in g["params"]}
        missing = [
            n for n, p in m.named_parameters()
            if id(p) in optimised and p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
            and not any(frag in n for frag in self.no_grad_ok)
        ]
        assert not missing, f"no (finite) gradient for: {missing[:10]}"
        frozen_with_grad = [n for n, p in m.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad, frozen_with_grad

    def test_state_dict_round_trip(self) -> None:
        m = self.make()
        m.train()
        lab, unl = batches_for(m, self.num_classes)
        m.training_step(lab, unl, self.step)["loss"].backward()
        m.after_optimizer_step(self.step)
        state = m.state_dict()
        m2 = self.make()
        m2.load_state_dict(state)
        for (k, a), (_, b) in zip(state.items(), m2.state_dict().items()):
            assert torch.equal(a, b), k

    def test_inference_model_rebuilds_from_config(self) -> None:
        m = self.make()
        inf = type(m).build_inference_model(m.cfg, self.num_classes)
        inf.load_state_dict(m.inference_model().state_dict())
        inf.eval()
        out = inf(torch.randn(1, 3, 64, 64))
        assert out["logits"].shape == (1, self.num_classes, 64, 64)
