"""AdvSemiSeg: each loss on hand-checkable tensors, the gradient separation between G and D,
one training step on a tiny model, state round-trip and the D-accuracy warning state machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from semiseg_cli.config import build_config
from semiseg_cli.errors import UserError
from tests.method_harness import MethodChecks
from tests.method_harness import make_cfg as harness_cfg
from semiseg_cli.methods.advsemiseg import (
    AdvSemiSeg,
    DAccuracyMonitor,
    adversarial_loss,
    discriminator_accuracy,
    discriminator_loss,
    frozen,
    masked_bce_with_logits,
    one_hot_labels,
    semi_loss,
    semi_pseudo_labels,
)

LN2 = math.log(2.0)
C = 3


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- pure losses


def test_masked_bce_ignores_masked_pixels() -> None:
    logits = torch.tensor([[[0.0, 2.0], [-50.0, 100.0]]])  # (1,2,2)
    valid = torch.tensor([[[True, True], [False, False]]])
    # BCE(x, 1) = softplus(-x); the huge values on masked pixels must not count.
    expected = (LN2 + softplus(-2.0)) / 2
    assert masked_bce_with_logits(logits, 1.0, valid).item() == pytest.approx(expected, abs=1e-6)
    # BCE(x, 0) = softplus(x), over all pixels without a mask.
    expected0 = (LN2 + softplus(2.0) + softplus(-50.0) + 100.0) / 4
    assert masked_bce_with_logits(logits, 0.0).item() == pytest.approx(expected0, rel=1e-5)
    # Nothing valid: zero, and still differentiable.
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    out = masked_bce_with_logits(x, 1.0, torch.zeros(1, 2, 2, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and x.grad is not None and torch.all(x.grad == 0)


def test_one_hot_is_plain_and_zero_on_ignore() -> None:
    mask = torch.tensor([[[0, 2], [255, 1]]])
    oh = one_hot_labels(mask, C)
    expected = torch.tensor(
        [[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]]]
    )
    assert torch.equal(oh, expected)
    with pytest.raises(UserError, match="outside"):
        one_hot_labels(torch.tensor([[[0, 3]]]), C)


def test_adversarial_loss_targets_real_on_valid_pixels() -> None:
    d = torch.tensor([[[[0.0, -3.0]]]])  # (1,1,1,2)
    assert adversarial_loss(d).item() == pytest.approx((LN2 + softplus(3.0)) / 2, abs=1e-6)
    assert adversarial_loss(d, torch.tensor([[[True, False]]])).item() == pytest.approx(LN2, abs=1e-6)


def test_discriminator_loss_halves_and_masks_per_pixel() -> None:
    d_fake = torch.tensor([[[[0.0, 1.0]]]])
    d_real = torch.tensor([[[[0.0, -100.0]]]])
    valid_real = torch.tensor([[[True, False]]])  # the -100 sits on an ignore pixel
    # fake: mean(softplus(0), softplus(1)); real: softplus(-0) on the one valid pixel.
    expected = 0.5 * (LN2 + softplus(1.0)) / 2 + 0.5 * LN2
    got = discriminator_loss(d_fake, d_real, None, valid_real)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Without the mask the ignored pixel dominates: the mask really is what excludes it.
    assert discriminator_loss(d_fake, d_real).item() > 20


def test_semi_pseudo_labels_threshold_on_sigmoid_of_d() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[1.0, 5.0]]]])  # (1,3,1,2): argmax 0, 2
    d = torch.tensor([[[[-1.0, -2.0]]]])  # sigmoid 0.269 (kept at 0.2), 0.119 (dropped)
    target, kept = semi_pseudo_labels(logits, d, 0.2)
    assert kept.tolist() == [[[True, False]]]
    assert target.tolist() == [[[0, 255]]]
    _, kept_low = semi_pseudo_labels(logits, d, 0.1)
    assert kept_low.all()


def test_semi_loss_means_over_kept_pixels_only() -> None:
    logits = torch.zeros(1, 2, 1, 3, requires_grad=True)  # uniform over two classes: CE = ln 2
    target = torch.tensor([[[0, 255, 1]]])
    assert semi_loss(logits, target).item() == pytest.approx(LN2, abs=1e-6)
    none = semi_loss(logits, torch.full((1, 1, 3), 255))
    none.backward()
    assert none.item() == 0.0 and torch.all(logits.grad == 0)


def test_discriminator_accuracy() -> None:
    d_fake = torch.tensor([[[[-1.0, 2.0, -3.0, 9.0]]]])  # 2 of 3 valid right (< 0)
    d_real = torch.tensor([[[[1.0, -1.0, 0.5, 0.2]]]])  # 3 of 4 right (> 0)
    valid_fake = torch.tensor([[[True, True, True, False]]])
    acc_real, acc_fake = discriminator_accuracy(d_fake, d_real, valid_fake, None)
    assert acc_real.item() == pytest.approx(0.75)
    assert acc_fake.item() == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- warning state machine


def test_monitor_warns_once_when_d_saturates() -> None:
    m = DAccuracyMonitor(window=3)
    assert m.update(1.0) is None
    assert m.update(0.995) is None
    msg = m.update(0.99)
    assert msg is not None and "99%" in msg and "d_update_every" in msg
    assert all(m.update(1.0) is None for _ in range(10))  # once, not every step


def test_monitor_chance_streak_resets_and_nan_breaks() -> None:
    m = DAccuracyMonitor(window=3)
    seq = [0.5, 0.51, 0.3, 0.49, float("nan"), 0.5, 0.52]
    assert [m.update(a) for a in seq] == [None] * 7  # 0.3 and NaN break the streaks; 0.52 is in (±2%)
    msg = m.update(0.485)
    assert msg is not None and "50%" in msg and "g_update_every" in msg
    assert m.update(0.5) is None
    # The saturation warning is independent of the chance warning.
    assert [m.update(1.0) for _ in range(3)][-1] is not None


def test_frozen_blocks_param_grads_but_not_input_grads() -> None:
    lin = nn.Linear(2, 1)
    lin.bias.requires_grad_(False)  # a flag that must come back as it was
    x = torch.ones(1, 2, requires_grad=True)
    with frozen(lin):
        y = lin(x).sum()
    y.backward()
    assert lin.weight.grad is None and x.grad is not None and x.grad.abs().sum() > 0
    assert lin.weight.requires_grad and not lin.bias.requires_grad


# ----------------------------------------------------------------------------- the method


def make_cfg(**adv: object) -> object:
    overrides = [
        "model.backbone=resnet18",
        "model.arch=deeplabv3plus",
        "model.aspp_channels=32",
        "model.decoder_channels=32",
        "data.crop_size=[64, 64]",
        "data.batch_size=2",
        "advsemiseg.semi_start=0",
        # Large weights so a leak of G's adversarial gradient into D would be obvious.
        "advsemiseg.lambda_adv=1.0",
        "advsemiseg.lambda_semi_adv=1.0",
        "advsemiseg.t_semi=0.0",
    ] + [f"advsemiseg.{k}={v}" for k, v in adv.items()]
    return build_config(None, overrides, method="advsemiseg")


def make_batches(has_mask: bool = False) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, C, (2, 64, 64), generator=g)
    mask[:, :4] = 255
    labeled = {"image": torch.randn(2, 3, 64, 64, generator=g), "mask": mask, "has_mask": torch.ones(2, dtype=torch.bool)}
    u_mask = torch.randint(0, C, (2, 64, 64), generator=g) if has_mask else torch.full((2, 64, 64), 255)
    unlabeled = {
        "image": torch.randn(2, 3, 64, 64, generator=g),
        "mask": u_mask,
        "has_mask": torch.full((2,), has_mask),
    }
    return labeled, unlabeled


@pytest.fixture(scope="module")
def method() -> AdvSemiSeg:
    torch.manual_seed(0)
    return AdvSemiSeg(make_cfg(), C, ["a", "b", "c"])


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters() if p.requires_grad]


def run_step(m: AdvSemiSeg, step: int, has_mask: bool = False) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    labeled, unlabeled = make_batches(has_mask)
    losses = m.training_step(labeled, unlabeled, step)
    losses["loss"].backward()
    return losses


def test_one_step_trains_both_networks(method: AdvSemiSeg) -> None:
    method.train()
    losses = run_step(method, step=0, has_mask=True)
    for key in ("loss", "loss_sup", "loss_adv", "loss_semi_adv", "loss_semi", "loss_d", "d_acc_real", "d_acc_fake"):
        assert torch.isfinite(losses[key]), key
    for key in ("semi_ratio", "semi_acc", "pl_acc_all"):
        assert 0.0 <= losses[key].item() <= 1.0, key
    assert losses["semi_ratio"].item() == 1.0  # t_semi = 0 keeps every pixel
    assert losses["loss_semi"].item() > 0
    assert all(not v.requires_grad for k, v in losses.items() if k != "loss")
    assert all(torch.isfinite(g).all() for g in grads(method))
    assert all(g.abs().sum() > 0 for g in grads(method.discriminator))
    assert sum(g.abs().sum() for g in grads(method.model)) > 0
    # Every head parameter gets a gradient (the backbone's BN/conv too, through the heads).
    assert all(g.abs().sum() > 0 for g in grads(method.model))


def test_d_gets_no_gradient_from_g_terms(method: AdvSemiSeg) -> None:
    # d_update_every=2 at an odd step: the D loss weighs 0, so whatever reaches D came from
    # G's adversarial terms; they are computed with D frozen and must leave nothing.
    method.cfg.advsemiseg.d_update_every = 2
    try:
        losses = run_step(method, step=1)
    finally:
        method.cfg.advsemiseg.d_update_every = 1
    assert losses["loss_adv"].item() > 0 and losses["loss_semi_adv"].item() > 0
    assert all(torch.all(g == 0) for g in grads(method.discriminator))
    assert sum(g.abs().sum() for g in grads(method.model)) > 0
    assert all(p.requires_grad for p in method.discriminator.parameters())  # flags restored


def test_g_gets_no_gradient_from_d_loss(method: AdvSemiSeg) -> None:
    method.cfg.advsemiseg.g_update_every = 2
    try:
        run_step(method, step=1)
    finally:
        method.cfg.advsemiseg.g_update_every = 1
    assert all(torch.all(g == 0) for g in grads(method.model))
    assert all(g.abs().sum() > 0 for g in grads(method.discriminator))


def test_semi_terms_start_on_schedule(method: AdvSemiSeg) -> None:
    # The unlabeled adversarial term runs from step 0 (paper and code); self-training from semi_start.
    method.cfg.advsemiseg.semi_start = 10
    try:
        labeled, unlabeled = make_batches()
        with torch.no_grad():
            early = method.training_step(labeled, unlabeled, 0)
            before = method.training_step(labeled, unlabeled, 9)
            on = method.training_step(labeled, unlabeled, 10)
    finally:
        method.cfg.advsemiseg.semi_start = 0
    assert early["loss_semi_adv"].item() > 0 and early["loss_semi"].item() == 0
    assert before["loss_semi"].item() == 0 and on["loss_semi"].item() > 0
    assert "semi_ratio" in early and "semi_acc" not in early  # no ground truth on these


def test_supervised_term_is_the_shared_sup_losses_on_the_labeled_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """Value: `loss_sup`/`loss_aux` equal `sup_losses` of the labeled rows of one forward over
    labeled + unlabeled (eval mode, so both forwards agree). Call: the shared function is what
    the step uses, on the labeled half only."""
    from semiseg_cli.methods import advsemiseg as mod
    from semiseg_cli.methods.supervised import sup_losses

    cfg = build_config(
        None,
        ["model.backbone=resnet18", "model.aux_head=true", "model.aspp_channels=32", "model.decoder_channels=32",
         "data.crop_size=[64, 64]", "train.loss=\"ohem\"", "train.ohem_min_kept=1000"],
        method="advsemiseg",
    )
    torch.manual_seed(0)
    m = AdvSemiSeg(cfg, C, ["a", "b", "c"]).eval()
    labeled, unlabeled = make_batches()
    calls: list[tuple[int, tuple[str, ...]]] = []

    def spy(cfg_: object, out: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append((out["logits"].shape[0], tuple(sorted(out))))
        return sup_losses(cfg_, out, mask)

    monkeypatch.setattr(mod, "sup_losses", spy)
    with torch.no_grad():
        losses = m.training_step(labeled, unlabeled, 0)
        out = m.model(torch.cat([labeled["image"], unlabeled["image"]]))
    assert calls == [(2, ("aux", "logits"))]
    want = sup_losses(cfg, {"logits": out["logits"][:2], "aux": out["aux"][:2]}, labeled["mask"])
    assert torch.allclose(losses["loss_sup"], want["loss_sup"], rtol=1e-6, atol=0)
    assert torch.allclose(losses["loss_aux"], want["loss_aux"], rtol=1e-6, atol=0)
    # The aux term enters G's loss with train.aux_weight, as in every other method.
    assert cfg.train.aux_weight == pytest.approx(0.4)


def test_frozen_bn_stays_frozen_through_method_train() -> None:
    """model.freeze_bn = "all" (caffe DeepLab-v2): the loop's `method.train()` must leave the
    backbone's BN in eval mode, a training step must not move its statistics, and its affine
    parameters get no gradient and are not in G's optimizer."""
    cfg = build_config(
        None,
        ["model.arch=deeplabv2", "model.backbone=resnet18", "model.freeze_bn=\"all\"", "data.crop_size=[64, 64]",
         "advsemiseg.semi_start=0"],
        method="advsemiseg",
    )
    torch.manual_seed(0)
    m = AdvSemiSeg(cfg, C, ["a", "b", "c"])
    m.train()
    bns = [x for x in m.model.backbone.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not b.training for b in bns) and m.discriminator.training
    stats = [t.clone() for b in bns for t in (b.running_mean, b.running_var)]
    bn_params = {id(p) for b in bns for p in b.parameters()}
    specs = m.configure_optimizers(10)
    assert not bn_params & {id(p) for g in specs[0].optimizer.param_groups for p in g["params"]}
    losses = run_step(m, step=0)
    assert torch.isfinite(losses["loss"])
    assert all(p.grad is None for b in bns for p in b.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stats, [t for b in bns for t in (b.running_mean, b.running_var)]))


def test_removed_options_load_at_their_fixed_values_only() -> None:
    # Run folders and checkpoints written before the simplification still load...
    cfg = make_cfg(semi_start_adv=0, d_channels=64, d_betas="[0.9, 0.99]")
    assert not hasattr(cfg.advsemiseg, "semi_start_adv")
    # ... but a value the code no longer has is refused, naming the key.
    for key, value in (("semi_start_adv", 5), ("d_channels", 32), ("d_betas", "[0.5, 0.9]")):
        with pytest.raises(UserError, match=f"advsemiseg.{key}"):
            make_cfg(**{key: value})


def test_optimizers_and_state_round_trip(method: AdvSemiSeg) -> None:
    cfg = make_cfg(d_update_every=3, g_update_every=2)
    m = AdvSemiSeg(cfg, C, ["a", "b", "c"])
    specs = m.configure_optimizers(100)
    assert [s.name for s in specs] == ["main", "disc"]
    assert [s.every for s in specs] == [2, 3]
    d_opt = specs[1].optimizer
    assert isinstance(d_opt, torch.optim.Adam)
    assert d_opt.param_groups[0]["lr"] == pytest.approx(1e-4) and d_opt.param_groups[0]["betas"] == (0.9, 0.99)
    d_ids = {id(p) for p in m.discriminator.parameters()}
    assert {id(p) for p in d_opt.param_groups[0]["params"]} == d_ids
    assert not d_ids & {id(p) for g in specs[0].optimizer.param_groups for p in g["params"]}
    assert specs[1].lr_lambda(50) == pytest.approx(0.5**0.9)

    state = method.state_dict()
    assert any(k.startswith("discriminator.") for k in state) and any(k.startswith("model.") for k in state)
    m.load_state_dict(state)
    x = torch.rand(1, C, 64, 64)
    assert torch.equal(m.discriminator(x), method.discriminator(x))


def test_check_config_rejects_tiny_crops() -> None:
    cfg = build_config(None, ["data.crop_size=[16, 64]"], method="advsemiseg")
    with pytest.raises(UserError, match="crop_size"):
        AdvSemiSeg.check_config(cfg, C)
    AdvSemiSeg.check_config(make_cfg(), C)


# ----------------------------------------------------------------------------- shared checks, end to end


class TestAdvSemiSegChecks(MethodChecks):
    method = "advsemiseg"
    overrides = ["advsemiseg.semi_start=0"]


def test_trains_end_to_end_and_resumes(tmp_path: Path) -> None:
    from semiseg_cli.data.demo import generate_demo
    from semiseg_cli.engine.loop import train

    root = generate_demo(tmp_path / "demo", n_train=8, n_val=2, size=64)
    out = tmp_path / "run"
    cfg = harness_cfg(
        "advsemiseg", root=str(root), out=str(out),
        overrides=["data.labeled=\"1/2\"", "train.iters=2", "advsemiseg.semi_start=1", "advsemiseg.d_update_every=2", "data.scale_range=[1.0, 1.0]"],
    )
    train(cfg, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss_d" in r]
    assert len(steps) == 2
    for key in ("loss_sup", "loss_adv", "loss_semi_adv", "loss_semi", "loss_d", "d_acc_real", "d_acc_fake", "semi_ratio"):
        assert all(math.isfinite(r[key]) for r in steps), key
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith("discriminator.") for k in ckpt["method_state"])
    assert len(ckpt["optimizers"]) == 2 and ckpt["optimizers"][1]["state"]  # Adam moments saved
    # Resume for one more iteration: the discriminator and its optimizer state come back.
    cfg3 = harness_cfg("advsemiseg", root=str(root), out=str(out), overrides=["data.labeled=\"1/2\"", "train.iters=3"])
    result = train(cfg3, resume=True, progress=False)
    assert result.step == 3


def test_discriminator_map_is_resized_with_model_align_corners() -> None:
    """The official code resizes D's map with the same (align_corners=True) resize as the logits."""
    for flag in (False, True):
        cfg = build_config(None, ["model.backbone=resnet18", f"model.align_corners={str(flag).lower()}"], method="advsemiseg")
        m = AdvSemiSeg(cfg, C, ["a", "b", "c"])
        assert m.discriminator.align_corners is flag and m.model.align_corners is flag
