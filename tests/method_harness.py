"""Shared checks for methods: every method's test module subclasses `MethodChecks` in a few lines.

One CPU training step on a tiny model must give a finite loss, send a finite, non-zero gradient to
every optimised trainable parameter (an all-zero gradient means a loss term silently vanished),
keep frozen parts (teachers) gradient-free, and round-trip its trained state through `state_dict`
into a model built from another seed.
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
    if unl is not None and method.unlabeled_partner:  # the loop's second pass over the unlabeled pool
        unl["partner"] = tiny_batch(num_classes, seed=seed + 200)
    return lab, unl


class MethodChecks:
    """Subclass and set `method` (and `overrides`, `step` to run past warm-ups)."""

    method: ClassVar[str] = "supervised"
    overrides: ClassVar[list[str]] = []
    step: ClassVar[int] = 0
    num_classes: ClassVar[int] = 4
    # Parameter-name fragments that legitimately get no (or an exactly zero) gradient at `step`.
    # Each entry needs a comment saying why; prefer a `step` (or overrides) where the term is active.
    no_grad_ok: ClassVar[tuple[str, ...]] = ()

    def make(self, seed: int = 0) -> Any:
        torch.manual_seed(seed)
        return build_method(make_cfg(self.method, overrides=self.overrides), self.num_classes)

    def test_step_is_finite_and_reaches_parameters(self) -> None:
        """Every optimised trainable parameter gets a finite, non-zero gradient from one step.

        Exactly zero counts as missing: the methods keep unused heads in the graph with
        `x.sum() * 0.0` (for DDP), so a loss term that silently became zero still yields a
        gradient tensor, just an all-zero one. Only `no_grad_ok` fragments are exempt.
        """
        m = self.make()
        m.train()
        lab, unl = batches_for(m, self.num_classes)
        losses = m.training_step(lab, unl, self.step)
        assert torch.isfinite(losses["loss"]), losses
        losses["loss"].backward()
        specs = m.configure_optimizers(m.cfg.train.iters)
        optimised = {id(p) for s in specs for g in s.optimizer.param_groups for p in g["params"]}
        checked = [
            (n, p) for n, p in m.named_parameters()
            if id(p) in optimised and p.requires_grad and not any(frag in n for frag in self.no_grad_ok)
        ]
        assert checked, "no optimised trainable parameter to check"
        no_grad = [n for n, p in checked if p.grad is None]
        not_finite = [n for n, p in checked if p.grad is not None and not torch.isfinite(p.grad).all()]
        zero = [n for n, p in checked if p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any()]
        assert not (no_grad or not_finite or zero), (
            f"of {len(checked)} optimised parameters, no gradient: {len(no_grad)} {no_grad[:10]}; "
            f"non-finite: {len(not_finite)} {not_finite[:10]}; exactly zero: {len(zero)} {zero[:10]}"
        )
        frozen_with_grad = [n for n, p in m.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad, frozen_with_grad

    def test_state_dict_round_trip(self) -> None:
        """A trained method's state loads into one built from another seed, tensor for tensor.

        The optimizer step and the different seed make the two states differ before loading
        (asserted), so a `load_state_dict` that drops any part of the state fails here.
        """
        m = self.make(seed=0)
        m.train()
        specs = m.configure_optimizers(m.cfg.train.iters)
        lab, unl = batches_for(m, self.num_classes)
        m.training_step(lab, unl, self.step)["loss"].backward()
        for s in specs:
            s.optimizer.step()
        m.after_optimizer_step(self.step)
        state = {k: v.detach().clone() for k, v in m.state_dict().items()}
        m2 = self.make(seed=1)
        before = m2.state_dict()
        assert set(before) == set(state), sorted(set(before) ^ set(state))
        differ = [k for k in state if state[k].shape != before[k].shape or not torch.equal(state[k], before[k])]
        assert differ, "a fresh model from another seed equals the trained one: the round trip would prove nothing"
        m2.load_state_dict(state)
        after = m2.state_dict()
        assert set(after) == set(state), sorted(set(after) ^ set(state))
        mismatched = [k for k in state if state[k].shape != after[k].shape or not torch.equal(state[k], after[k])]
        assert not mismatched, f"{len(mismatched)} of {len(state)} tensors not restored: {mismatched[:10]}"

    def test_inference_model_rebuilds_from_config(self) -> None:
        m = self.make()
        inf = type(m).build_inference_model(m.cfg, self.num_classes)
        inf.load_state_dict(m.inference_model().state_dict())
        inf.eval()
        out = inf(torch.randn(1, 3, 64, 64))
        assert out["logits"].shape == (1, self.num_classes, 64, 64)
