"""The supervised baseline through the shared method checks, plus its loss behaviour."""

from __future__ import annotations

import torch

from semiseg_cli.methods.base import supervised_loss
from tests.method_harness import MethodChecks, batches_for, build_method, make_cfg


class TestSupervised(MethodChecks):
    method = "supervised"


class TestSupervisedAux(MethodChecks):
    method = "supervised"
    overrides = ["model.aux_head=true", 'train.loss="ohem"', "train.ohem_min_kept=100"]


def test_training_steps_reduce_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    m = build_method(make_cfg("supervised"), 4)
    m.train()
    spec = m.configure_optimizers(100)[0]
    lab, _ = batches_for(m, 4)
    losses = []
    for step in range(8):
        spec.optimizer.zero_grad()
        loss = m.training_step(lab, None, step)["loss"]
        loss.backward()
        spec.set_lr(step)
        spec.optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_ohem_keeps_only_hard_pixels_but_at_least_min_kept() -> None:
    # Two pixels: one confidently right (p=0.99), one wrong (p~0.27 for the true class).
    logits = torch.tensor([[5.0, 0.4], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (B,C,H,W)
    target = torch.tensor([[[0, 0]]])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").flatten()
    hard_only = supervised_loss(logits, target, kind="ohem", ohem_thresh=0.7, ohem_min_kept=1)
    assert torch.isclose(hard_only, ce[1])
    both = supervised_loss(logits, target, kind="ohem", ohem_thresh=0.7, ohem_min_kept=2)
    assert torch.isclose(both, ce.mean())


def test_ignored_pixels_do_not_count() -> None:
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 255], [255, 2]]])
    full = torch.nn.functional.cross_entropy(logits, target.clamp(max=2), reduction="none")
    expected = (full[0, 0, 0] + full[0, 1, 1]) / 2
    assert torch.isclose(supervised_loss(logits, target), expected)
