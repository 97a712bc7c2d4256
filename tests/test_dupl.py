"""DuPL: CAMs, thresholds, tau_h, PAR, the loss terms, one training step and the networks.

Everything runs on tiny tensors; the training-step tests use two random-init ResNet-18s on
64x64 images (conftest pins torch to one thread).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

from semiseg_cli.config import validate
from semiseg_cli.errors import UserError
from semiseg_cli.methods import get_method
from semiseg_cli.methods.cam import (
    IGNORE,
    PAR,
    cam_to_label,
    cosine_descent,
    dilated_neighbours,
    minmax_normalise,
    multi_scale_cam,
    per_image_tau,
    pseudo_label_stats,
    refine_pseudo_labels,
    tau_high_schedule,
)
from semiseg_cli.data.transforms import normalize
from semiseg_cli.methods.dupl import (
    consistency_loss,
    discrepancy_loss,
    discrepancy_term,
    frozen_bn_stats,
    inside_image,
    seg_loss,
    strong_colour_augment,
    strong_view,
)
from semiseg_cli.methods.dupl_net import DualNet, DuPLSubNet, LargeFOV
from semiseg_cli.models.vit import ViTBackbone, load_vit_weights, timm_vit_to_torchvision
from tests.cli_checks import one_line_error
from tests.method_harness import MethodChecks
from tests.method_harness import make_cfg as harness_cfg


def make_cfg(**dupl: Any) -> Any:
    return validate(
        {
            "method": "dupl",
            "data": {"crop_size": [64, 64], "batch_size": 2},
            "model": {"backbone": "resnet18", "output_stride": 16},
            "optim": {"name": "adamw", "lr": 6e-5, "weight_decay": 0.01, "warmup_iters": 2},
            "train": {"iters": 100},
            "dupl": dupl,
        }
    )


# ----------------------------------------------------------------------------- CAMs


def test_minmax_normalise_per_image_and_class() -> None:
    cam = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 4.0]]]])
    out = minmax_normalise(cam, eps=0.0)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.allclose(out[0, 1], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(minmax_normalise(torch.zeros(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2))  # no NaN


def test_multi_scale_cam_undoes_the_flip_and_masks_untagged_classes() -> None:
    ramp = torch.arange(4.0).view(1, 1, 1, 4)  # not flip-equivariant: catches a missing flip-back

    def cam_fn(t: torch.Tensor) -> torch.Tensor:
        r = torch.arange(float(t.shape[-1])).view(1, 1, 1, -1)
        return torch.cat([t[:, :1] + r, -t[:, 1:2]], 1)

    x = torch.rand(1, 3, 3, 4)
    out = multi_scale_cam(cam_fn, x, scales=(1.0,), tags=torch.tensor([[1.0, 1.0]]))
    expect = F.relu(x[:, :1] + torch.maximum(ramp, ramp.flip(-1)))
    assert torch.allclose(out[:, :1], minmax_normalise(expect), atol=1e-6)
    assert torch.equal(out[:, 1], torch.zeros(1, 3, 4))  # -x: all negative before the ReLU
    masked = multi_scale_cam(cam_fn, x, scales=(1.0, 0.5), tags=torch.tensor([[0.0, 1.0]]))
    assert masked.shape == (1, 2, 3, 4) and torch.equal(masked[:, 0], torch.zeros(1, 3, 4))


def test_cam_to_label_thresholds() -> None:
    # classes 1 and 2 (channels 0 and 1); pixels: low, middle, high for channel 0, high channel 1
    cam = torch.tensor([[[[0.1, 0.5, 0.9, 0.2, 0.25]], [[0.0, 0.3, 0.2, 0.8, 0.1]]]])
    tags = torch.tensor([[1.0, 1.0]])
    assert cam_to_label(cam, tags, 0.7, 0.25).tolist() == [[[0, IGNORE, 1, 2, 0]]]
    # untagged class 2 does not count: its 0.8 pixel falls back to class 1's 0.2 -> background
    assert cam_to_label(cam, torch.tensor([[1.0, 0.0]]), 0.7, 0.25).tolist() == [[[0, IGNORE, 1, 0, 0]]]
    # per-image tau_h
    two = torch.cat([cam, cam])
    out = cam_to_label(two, torch.ones(2, 2), torch.tensor([0.7, 0.4]), 0.25)
    assert out[0, 0, 1] == IGNORE and out[1, 0, 1] == 1


def test_refined_labels_equal_thresholds_without_par() -> None:
    torch.manual_seed(0)
    cam = torch.rand(2, 3, 8, 8)
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    tau = torch.tensor([0.7, 0.6])
    refined = refine_pseudo_labels(None, torch.rand(2, 3, 8, 8), cam, tags, tau, 0.25, downscale=1)
    assert torch.equal(refined, cam_to_label(cam, tags, tau, 0.25))
    assert torch.equal(refined[1], torch.zeros(8, 8, dtype=torch.long))  # no tags: all background


def test_refining_only_the_tagged_channels_gives_the_labels_of_refining_all() -> None:
    """80 classes, a few tagged per image: PAR over the batch's tagged channels only must give
    exactly the labels of PAR over every channel (the untagged ones are 0 and stay 0)."""
    torch.manual_seed(1)
    b, c, h, w = 3, 80, 24, 20
    cam = torch.rand(b, c, h, w)
    tags = torch.zeros(b, c)
    tags[0, [3, 17]] = 1
    tags[1, [17, 42, 79]] = 1  # image 2 untagged: all background
    img, tau = torch.rand(b, 3, h, w), torch.tensor([0.7, 0.6, 0.65])
    par = PAR((1, 2, 4), 5)

    def refine_every_channel() -> torch.Tensor:
        hs, ws = h // 2, w // 2
        valid = torch.cat([torch.ones(b, 1), tags], 1) > 0
        stacks = []
        for bg in (tau.view(b, 1, 1, 1).expand(b, 1, h, w), torch.full((b, 1, h, w), 0.25)):
            m = F.interpolate(torch.cat([bg, cam], 1), size=(hs, ws), mode="bilinear", align_corners=False)
            stacks.append(torch.softmax(m.masked_fill(~valid[:, :, None, None], float("-inf")), 1))
        maps = par(F.interpolate(img, size=(hs, ws), mode="bilinear", align_corners=False), torch.cat(stacks, 1))
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        lab_h, lab_l = maps[:, : c + 1].argmax(1), maps[:, c + 1 :].argmax(1)
        label = torch.where(lab_h == 0, torch.full_like(lab_h, IGNORE), lab_h)
        return torch.where((lab_h == 0) & (lab_l == 0), torch.zeros_like(label), label)

    got = refine_pseudo_labels(par, img, cam, tags, tau, 0.25, downscale=2)
    assert torch.equal(got, refine_every_channel())
    assert set(got.unique().tolist()) - {0, IGNORE} <= {4, 18, 43, 80} and (got[2] == 0).all()


def test_pseudo_label_stats() -> None:
    label = torch.tensor([[[0, 1, IGNORE, 1]]])
    gt = torch.tensor([[[0, 1, 1, 0]]])
    miou, cover = pseudo_label_stats(label, gt, 2)
    # class 0: tp 1, union 2 ; class 1: tp 1, union 2
    assert math.isclose(float(miou), 0.5) and math.isclose(float(cover), 0.75)
    # coverage over the image proper: the last pixel is crop padding
    _, cover = pseudo_label_stats(label, gt, 2, inside=torch.tensor([[[True, True, True, False]]]))
    assert math.isclose(float(cover), 2 / 3, rel_tol=1e-6)


# ----------------------------------------------------------------------------- tau_h


def test_tau_high_cosine_schedule() -> None:
    assert cosine_descent(0.7, 0.55, 0, 2000, 20000) == 0.7
    assert cosine_descent(0.7, 0.55, 2000, 2000, 20000) == 0.7
    assert math.isclose(cosine_descent(0.7, 0.55, 2000 + 8999, 2000, 20000), 0.625, abs_tol=1e-3)
    assert cosine_descent(0.7, 0.55, 19999, 2000, 20000) == 0.55
    quarter = cosine_descent(0.7, 0.55, 2000 + 17999 // 4, 2000, 20000)
    assert math.isclose(quarter, 0.7 - 0.15 * (1 - math.cos(math.pi / 4)) / 2, abs_tol=1e-4)


def test_per_class_tau_and_image_max() -> None:
    tau = tau_high_schedule(19999, 0, 20000, 0.7, 0.55, num_fg=4, fixed_classes=(2,))
    assert torch.allclose(tau, torch.tensor([0.55, 0.7, 0.55, 0.55]))
    tags = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(per_image_tau(tau, tags, 0.6), torch.tensor([0.55, 0.7, 0.6]))


def test_method_tau_follows_config() -> None:
    m = get_method("dupl")(make_cfg(seg_start=10, per_class_tau=True, fixed_tau_classes=(1,)), 3, ["bg", "a", "b"])
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(m.tau_high(5, tags), torch.tensor([0.7, 0.7]))
    assert torch.allclose(m.tau_high(99, tags), torch.tensor([0.7, 0.55]))


# ----------------------------------------------------------------------------- PAR


def test_par_keeps_a_constant_map_constant() -> None:
    torch.manual_seed(0)
    par = PAR((1, 2, 4), iters=10)
    out = par(torch.rand(1, 3, 12, 16), torch.full((1, 2, 12, 16), 0.3))
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-5)


def test_par_propagation_equals_the_neighbour_stack_formula() -> None:
    torch.manual_seed(0)
    par = PAR((1, 3), iters=1)
    img, maps = torch.rand(2, 3, 9, 11), torch.rand(2, 4, 9, 11)
    aff = par.affinity(img)
    assert torch.allclose(aff.sum(2), torch.ones(2, 1, 9, 11), atol=1e-5)
    expect = (dilated_neighbours(maps, (1, 3)) * aff).sum(2)
    assert torch.allclose(par(img, maps), expect, atol=1e-5)
    # neighbour order: offset (-1, -1) at dilation 3 is the pixel 3 up and 3 left (edge-replicated)
    nb = dilated_neighbours(maps, (1, 3))
    assert torch.equal(nb[:, :, 8, 5, 6], maps[:, :, 2, 3])
    assert torch.equal(nb[:, :, 8, 0, 0], maps[:, :, 0, 0])


def test_par_spreads_within_a_region_but_not_across_an_edge() -> None:
    par = PAR((1, 2, 4), iters=10)
    h, w = 16, 32
    band = torch.zeros(1, 1, h, w)
    band[..., 8:12] = 1.0
    edge = torch.zeros(1, 3, h, w)
    edge[..., 16:] = 1.0  # dark left half, bright right half
    flat = par(torch.zeros(1, 3, h, w), band)[0, 0].mean(0)
    cut = par(edge, band)[0, 0].mean(0)
    assert flat[14] > 0.15 and cut[14] > 0.15  # moved 3+ pixels through the homogeneous region
    assert flat[16] > 0.1  # and keeps going without an edge...
    assert cut[16] < 0.01 and cut[16:].max() < 0.01  # ...but not across it


# ----------------------------------------------------------------------------- losses


def test_discrepancy_forms_by_hand() -> None:
    f1 = torch.tensor([[[[1.0, 0.0]]]])  # (B=1, D=1, 1, 2): one channel, spatial vector (1, 0)
    f2 = torch.tensor([[[[0.0, 1.0]]]])
    f3 = torch.tensor([[[[1.0, 1.0]]]])
    assert math.isclose(float(discrepancy_loss(f1, f2, "code")), 2.0, abs_tol=1e-6)  # (1 + 0) twice
    assert math.isclose(float(discrepancy_loss(f1, f2, "paper")), 0.0, abs_tol=1e-6)  # -log(1 - 0)
    c = 1 / math.sqrt(2)
    assert math.isclose(float(discrepancy_term(f1, f3, "code")), 1 + c, rel_tol=1e-5)
    assert math.isclose(float(discrepancy_term(f1, f3, "paper")), -math.log(1 - c), rel_tol=1e-5)
    # identical features: finite (clamped), large
    assert math.isfinite(float(discrepancy_term(f1, f1, "paper"))) and float(discrepancy_term(f1, f1, "paper")) > 10


@pytest.mark.parametrize("form", ["paper", "code"])
def test_discrepancy_stops_the_gradient_of_the_other_branch(form: str) -> None:
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    discrepancy_term(a, b, form).backward()
    assert b.grad is None and a.grad is not None and a.grad.abs().sum() > 0
    # the symmetric loss: a's gradient comes only from the term where a is the live branch
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    discrepancy_loss(a2, b2, form).backward()
    assert torch.allclose(a2.grad, a.grad)


def test_seg_loss_empty_and_balanced() -> None:
    logits = torch.zeros(1, 3, 1, 4, requires_grad=True)
    empty = seg_loss(logits, torch.full((1, 1, 4), IGNORE))
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    label = torch.tensor([[[0, 0, 0, 2]]])
    logits = torch.tensor([[[[5.0, 5.0, 5.0, 0.0]], [[0.0] * 4], [[0.0, 0.0, 0.0, 0.0]]]])
    ce_bg = -math.log(math.exp(5) / (math.exp(5) + 2))
    ce_fg = -math.log(1 / (math.exp(0) * 3))
    assert math.isclose(float(seg_loss(logits, label, "ce")), (3 * ce_bg + ce_fg) / 4, rel_tol=1e-5)
    assert math.isclose(float(seg_loss(logits, label, "balanced")), 0.5 * (ce_bg + ce_fg), rel_tol=1e-5)


def test_consistency_loss_masks_by_peer_ignore_and_confidence() -> None:
    # 3 pixels: ignored+confident, ignored+unsure, labelled+confident
    clean = torch.tensor([[[[10.0, 0.1, 10.0]], [[0.0, 0.0, 0.0]]]])
    peer = torch.tensor([[[IGNORE, IGNORE, 1]]])
    strong = torch.tensor([[[[0.0, 3.0, -3.0]], [[0.0, 0.0, 0.0]]]], requires_grad=True)
    loss, mask = consistency_loss(strong, clean, peer, thresh=0.9)
    assert mask.tolist() == [[[True, False, False]]]
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5)  # only pixel 0: target 0, logits (0, 0)
    loss.backward()
    assert strong.grad[..., 1:].abs().sum() == 0
    none, _ = consistency_loss(strong, clean, torch.ones(1, 1, 3, dtype=torch.long))
    assert float(none.detach()) == 0.0
    # crop padding is ignored in the peer's labels but is never a consistency target
    padded, mask = consistency_loss(strong, clean, peer, thresh=0.9, inside=torch.tensor([[[False, True, True]]]))
    assert not mask.any() and float(padded.detach()) == 0.0


def test_strong_view_is_flipped_resized_and_normalised() -> None:
    torch.manual_seed(0)
    img = torch.rand(3, 3, 8, 8)
    assert torch.equal(strong_colour_augment(img, n_ops=0), img)
    out = strong_colour_augment(img, n_ops=5, magnitude=10)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, img)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    view = strong_view(img, 0, 10.0, 1.0, mean, std)
    assert torch.allclose(view, normalize(img, mean, std).flip(-1))  # every image flipped (official)
    assert strong_view(img, 5, 10.0, 0.75, mean, std).shape == (3, 3, 6, 6)


def test_frozen_bn_stats_keeps_running_stats() -> None:
    bn = torch.nn.BatchNorm2d(3).train()
    before = bn.running_mean.clone()
    with frozen_bn_stats(bn):
        bn(torch.randn(4, 3, 2, 2) + 5)
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1


# ----------------------------------------------------------------------------- training


def test_one_training_step_runs_every_term_and_reaches_both_subnets() -> None:
    torch.manual_seed(0)
    C = 4
    cfg = make_cfg(seg_start=0, gmm_start=0, cam_scales=(1.0, 0.5), par_dilations=(1, 2, 4))
    M = get_method("dupl")
    M.check_config(cfg, C)
    method = M(cfg, C, ["bg", "a", "b", "c"])
    assert M.uses_tags and not M.uses_unlabeled
    specs = method.configure_optimizers(cfg.train.iters)
    head_lrs = sorted(g["lr"] for g in specs[0].optimizer.param_groups)
    assert head_lrs == pytest.approx([6e-5, 6e-4]) and isinstance(specs[0].optimizer, torch.optim.AdamW)
    tags = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    batch = {"image": torch.randn(2, 3, 64, 64), "tags": tags, "gt_mask": torch.randint(0, C, (2, 64, 64))}
    method.train()
    losses = method.training_step(batch, None, 0)
    for key in ("loss_cls", "loss_dis", "loss_seg", "loss_cons", "tau_h", "noise_frac", "pl_miou", "pl_cover"):
        assert key in losses and torch.isfinite(losses[key]), key
        assert not losses[key].requires_grad or key == "loss"
    losses["loss"].backward()
    net: DualNet = method.model  # type: ignore[assignment]
    for sub in (net.net1, net.net2):
        for part in (sub.backbone.conv1, sub.backbone.layer4, sub.classifier, sub.aux_classifier, sub.seg_head.conv8):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    specs[0].set_lr(0)
    specs[0].optimizer.step()


def test_warmup_step_has_no_pseudo_label_losses_but_keeps_heads_in_graph() -> None:
    torch.manual_seed(0)
    cfg = make_cfg(seg_start=1000, gmm_start=2000, log_cam_miou=False)
    method = get_method("dupl")(cfg, 3, ["bg", "a", "b"])
    batch = {"image": torch.randn(2, 3, 64, 64), "tags": torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])}
    losses = method.training_step(batch, None, 0)
    assert float(losses["loss_seg"]) == 0.0 and "loss_cons" not in losses and "pl_miou" not in losses
    losses["loss"].backward()
    head = method.model.net2.seg_head.conv8.weight  # type: ignore[union-attr]
    assert head.grad is not None and float(head.grad.abs().sum()) == 0.0  # in the graph (DDP), weight 0


def test_inference_model_round_trip() -> None:
    torch.manual_seed(0)
    cfg = make_cfg(inference="mean")
    method = get_method("dupl")(cfg, 3, ["bg", "a", "b"]).eval()
    fresh = get_method("dupl").build_inference_model(cfg, 3).eval()
    fresh.load_state_dict(method.inference_model().state_dict())
    x = torch.randn(1, 3, 48, 40)
    out = fresh(x)["logits"]
    assert out.shape == (1, 3, 48, 40)
    assert torch.allclose(out, method.inference_model()(x)["logits"])
    assert hasattr(fresh, "backbone")
    bb_ids = {id(p) for p in fresh.backbone.parameters()}
    assert {id(p) for p in fresh.net2.backbone.parameters()} <= bb_ids
    assert not any(k.startswith("backbone.") for k in fresh.state_dict())  # not registered twice


def _padded_batch(C: int = 4) -> dict[str, Any]:
    """Two 64x64 crops whose right 24 columns (and, for image 1, bottom 16 rows) are padding."""
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, :, 40:] = False
    valid[1, 48:] = False
    x = torch.randn(2, 3, 64, 64)
    x[~valid[:, None].expand_as(x)] = 0.0  # the transform pads with the mean colour: 0 once normalised
    tags = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    gt = torch.randint(0, C, (2, 64, 64)).masked_fill(~valid, IGNORE)
    return {"image": x, "tags": tags, "gt_mask": gt, "valid": valid}


def test_crop_padding_is_never_pseudo_labelled_nor_trained_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.methods.dupl as dupl_module

    torch.manual_seed(0)
    cfg = make_cfg(seg_start=0, gmm_start=0, cam_scales=(1.0,), par_dilations=(1, 2), consistency_thresh=0.0)
    method = get_method("dupl")(cfg, 4, ["bg", "a", "b", "c"]).train()
    batch = _padded_batch()
    valid = batch["valid"]
    seen: dict[str, list[torch.Tensor]] = {"labels": [], "masks": []}
    real_seg, real_cons = dupl_module.seg_loss, dupl_module.consistency_loss

    def spy_seg(logits: torch.Tensor, label: torch.Tensor, *a: Any) -> torch.Tensor:
        seen["labels"].append(label)
        return real_seg(logits, label, *a)

    def spy_cons(*a: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loss, mask = real_cons(*a)
        seen["masks"].append(mask)
        return loss, mask

    monkeypatch.setattr(dupl_module, "seg_loss", spy_seg)
    monkeypatch.setattr(dupl_module, "consistency_loss", spy_cons)
    losses = method.training_step(batch, None, 0)
    assert len(seen["labels"]) == 2 and len(seen["masks"]) == 2
    for label in seen["labels"]:  # both peers' maps, after the GMM filter
        assert (label[~valid] == IGNORE).all()
        assert (label[valid] != IGNORE).any()  # the image itself is labelled
    for mask in seen["masks"]:  # every confident pixel is a target (thresh 0) except the padding
        assert not mask[~valid].any() and mask[valid].any()
    assert torch.isfinite(losses["loss"]) and 0.0 < float(losses["pl_cover"]) <= 1.0
    # no `valid` in the batch: every pixel is the image's; a wrong shape is a bug, not padding
    assert inside_image({}, batch["image"]).all()
    with pytest.raises(ValueError, match="valid"):
        inside_image({"valid": valid[:, :32]}, batch["image"])


def test_training_view_is_photometrically_augmented_and_eval_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.methods.cam as cam_module  # training_view lives there (shared with cam_baseline)
    import semiseg_cli.methods.dupl as dupl_module

    torch.manual_seed(0)
    cfg = make_cfg(seg_start=0, gmm_start=1000, cam_scales=(1.0,), par_dilations=(1, 2))
    method = get_method("dupl")(cfg, 4, ["bg", "a", "b", "c"]).train()
    net: DualNet = method.model  # type: ignore[assignment]
    calls: list[dict[str, Any]] = []
    real_photometric, real_cam = cam_module.strong_photometric, dupl_module.multi_scale_cam

    def spy_photometric(x: torch.Tensor, mean: Any, std: Any, **kw: Any) -> torch.Tensor:
        calls.append(kw)
        return real_photometric(x, mean, std, **kw)

    cam_inputs: list[torch.Tensor] = []

    def spy_cam(fn: Any, x: torch.Tensor, *a: Any) -> torch.Tensor:
        cam_inputs.append(x)
        return real_cam(fn, x, *a)

    forward_inputs: list[torch.Tensor] = []
    real_forward = net.forward

    def spy_forward(x: torch.Tensor, **kw: Any) -> dict[str, Any]:
        forward_inputs.append(x)
        return real_forward(x, **kw)

    monkeypatch.setattr(cam_module, "strong_photometric", spy_photometric)
    monkeypatch.setattr(dupl_module, "multi_scale_cam", spy_cam)
    monkeypatch.setattr(net, "forward", spy_forward)
    batch = {"image": torch.randn(2, 3, 64, 64), "tags": torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])}
    method.training_step(batch, None, 0)
    # the official recipe, as the default and only training view
    assert calls == [{"jitter": (0.4, 0.4, 0.2, 0.1), "p_jitter": 0.8, "p_gray": 0.2, "p_blur": 1.0}]
    (seen,) = forward_inputs
    assert not torch.allclose(seen, batch["image"])  # blur p 1.0: never the raw crop
    assert len(cam_inputs) == 2 and all(torch.equal(c, seen) for c in cam_inputs)  # the CAMs see the same view
    # evaluation sees the image as it is: no augmentation call, deterministic, sub-net 1's head
    method.eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        out = method.inference_model()(x)["logits"]
        again = method.inference_model()(x)["logits"]
        expect = F.interpolate(net.net1.segment(x), size=(48, 40), mode="bilinear", align_corners=False)
    assert len(calls) == 1 and torch.equal(out, again) and torch.allclose(out, expect)


def test_large_fov_has_no_biases() -> None:
    head = LargeFOV(16, 5, channels=8)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.bias is None for c in convs)
    net = get_method("dupl").build_inference_model(make_cfg(seg_channels=8), 3)
    assert not [k for k in net.state_dict() if ".seg_head." in f".{k}" and k.endswith(".bias")]


def test_removed_options_load_at_their_former_default_only() -> None:
    for key, kept, other in (("single_net", False, True), ("gmm_guard_low", False, True), ("strong_flip_prob", 1.0, 0.5)):
        assert key not in make_cfg(**{key: kept}).dupl.model_dump()  # old run folders and checkpoints load
        with pytest.raises(UserError, match=f"dupl.{key} = .* was removed"):
            make_cfg(**{key: other})


def test_check_config_and_params_errors() -> None:
    M = get_method("dupl")
    with pytest.raises(UserError, match="background"):
        M.check_config(make_cfg(), 1)
    with pytest.raises(UserError, match="fixed_tau_classes"):
        M.check_config(make_cfg(per_class_tau=True, fixed_tau_classes=(5,)), 3)
    with pytest.raises(UserError, match="patch"):
        M.check_config(make_cfg(backbone="vit_b_16", cam_scales=(1.0, 0.2)), 3)
    with pytest.raises(UserError, match="tau_low"):
        make_cfg(tau_low=0.6)
    with pytest.raises(UserError, match="per_class_tau"):
        make_cfg(fixed_tau_classes=(1,))
    with pytest.raises(UserError, match="unknown key"):
        make_cfg(gmm_typo=1)
    with pytest.raises(UserError, match="aux_layer"):  # ViT-B/16 has 12 blocks
        make_cfg(aux_layer=-13)


# ----------------------------------------------------------------------------- ViT


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(image_size=32, patch_size=16, num_layers=4, num_heads=2, hidden_dim=16, mlp_dim=32)


def test_vit_tokens_become_feature_maps_at_any_size() -> None:
    torch.manual_seed(0)
    bb = ViTBackbone(tiny_vit(), aux_layer=-3)
    f = bb(torch.randn(2, 3, 32, 32))
    assert f["out"].shape == (2, 16, 2, 2) and f["mid"].shape == (2, 16, 2, 2)
    f = bb(torch.randn(1, 3, 48, 72))  # interpolated position grid (3x4)
    assert f["out"].shape == (1, 16, 3, 4)
    # token (row r, col c) is feature-map pixel (r, c): a change in one patch shows up there first
    x = torch.zeros(1, 3, 32, 64)
    bb.encoder.layers = bb.encoder.layers[:0]  # no attention mixing: tokens stay independent
    bb.aux_index = 0
    a = bb(x)["out"]
    x[..., 16:32, 48:64] = 1.0  # patch at row 1, col 3
    d = (bb(x)["out"] - a).abs().sum(1)[0]
    assert d[1, 3] > 0 and d.sum() == d[1, 3]
    with pytest.raises(ValueError, match="aux_layer"):
        ViTBackbone(tiny_vit(), aux_layer=-9)


def test_vit_subnet_and_dual_forward_shapes() -> None:
    torch.manual_seed(0)
    net = DualNet(DuPLSubNet(ViTBackbone(tiny_vit()), 5, 8), DuPLSubNet(ViTBackbone(tiny_vit()), 5, 8))
    x = torch.randn(2, 3, 32, 48)
    out = net(x, strong=torch.randn(2, 3, 24, 36), train_outputs=True)
    o = out["net2"]
    assert o["cls"].shape == (2, 4) and o["cls_aux"].shape == (2, 4)
    assert o["seg"].shape == (2, 5, 2, 3) and o["feat"].shape == (2, 16, 2, 3) and o["seg_strong"].shape[:2] == (2, 5)
    assert net.net1.cam(x).shape == (2, 4, 2, 3)
    assert net(x)["logits"].shape == (2, 5, 32, 48)


def test_deit_checkpoint_names_load(tmp_path: Any) -> None:
    torch.manual_seed(0)
    src = tiny_vit()
    sd = src.state_dict()
    # write the same weights under timm/DeiT names, with a head and a 1+2x2 -> resized table
    timm: dict[str, torch.Tensor] = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"]}
    timm["patch_embed.proj.weight"], timm["patch_embed.proj.bias"] = sd["conv_proj.weight"], sd["conv_proj.bias"]
    timm["norm.weight"], timm["norm.bias"] = sd["encoder.ln.weight"], sd["encoder.ln.bias"]
    timm["head.weight"] = torch.zeros(1000, 16)
    names = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_weight": "attn.qkv.weight",
             "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    for k, v in sd.items():
        if k.startswith("encoder.layers."):
            i, rest = k[len("encoder.layers.encoder_layer_") :].split(".", 1)
            for a, b in names.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
            timm[f"blocks.{i}.{rest}"] = v
    assert set(timm_vit_to_torchvision(timm)) == {k for k in sd if not k.startswith("heads.")}
    path = tmp_path / "deit.pth"
    torch.save({"model": timm}, path)
    dst = tiny_vit()
    load_vit_weights(dst, str(path))
    assert torch.equal(dst.encoder.layers[2].self_attention.in_proj_weight, src.encoder.layers[2].self_attention.in_proj_weight)
    torch.save({"nothing": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="lacks"):
        load_vit_weights(tiny_vit(), str(path))


# ----------------------------------------------------------------------------- harness + loop

FAST = ["dupl.seg_channels=32", "dupl.cam_scales=[1.0, 0.5]", "dupl.par_dilations=[1, 2, 4]"]


class TestDuPL(MethodChecks):
    method = "dupl"
    overrides = [*FAST, "dupl.seg_start=0", "dupl.gmm_start=0"]  # every term runs


def test_end_to_end_training_through_the_loop(demo_root: Path, tmp_path: Path) -> None:
    from semiseg_cli.engine.checkpoint import load_checkpoint
    from semiseg_cli.engine.loop import train

    out = tmp_path / "dupl"
    cfg = harness_cfg(
        "dupl", root=str(demo_root), out=str(out),
        overrides=[*FAST, 'optim.name="adamw"', "optim.lr=1e-4", "dupl.seg_start=1", "dupl.gmm_start=2", "train.iters=3"],
    )
    res = train(cfg, progress=False)
    assert res.step == 3 and math.isfinite(res.best_miou)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert "pl_miou" in steps[0] and "loss_cls" in steps[0]  # gt_mask reached the metric, not a loss
    assert "loss_cons" in steps[-1] and "noise_frac" in steps[-1] and steps[-1]["tau_h"] <= 0.7
    ckpt = load_checkpoint(out / "last.pt")
    net = get_method("dupl").build_inference_model(cfg, ckpt["num_classes"])
    net.load_state_dict(ckpt["inference_state"])


# ----------------------------------------------------------------------------- user tags file


def _user_tags(demo_root: Path) -> dict[str, list[int]]:
    """A tags file for the whole demo train pool whose tags all differ from the masks' own."""
    from semiseg_cli.data import derive_tags, get_layout

    layout = get_layout("demo", demo_root)
    derived = derive_tags(layout, layout.list_pairs("train"), layout.tag_exclude)
    tags = {img: [0] + [c for c in range(1, 5) if c not in ids] for img, ids in derived.items()}
    tags = {img: ids if len(ids) > 1 else [0, 1] for img, ids in tags.items()}
    assert all(tags[img] != derived[img] for img in tags)
    return tags


def test_training_uses_exactly_the_user_tags_file(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg_cli.engine.loop import train
    from semiseg_cli.methods.dupl import DuPL

    tags = _user_tags(demo_root)
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"/" + k if i == 0 else k: v for i, (k, v) in enumerate(tags.items())}))  # a leading / is fine
    seen: list[tuple[str, list[int]]] = []
    original = DuPL.training_step

    def spy(self, labeled, unlabeled, step):  # type: ignore[no-untyped-def]
        for name, row in zip(labeled["name"], labeled["tags"]):
            seen.append((name, row.nonzero().flatten().tolist()))
        return original(self, labeled, unlabeled, step)

    monkeypatch.setattr(DuPL, "training_step", spy)
    cfg = harness_cfg(
        "dupl", root=str(demo_root), out=str(tmp_path / "run"),
        overrides=[*FAST, f'data.tags_file="{path}"', "dupl.seg_start=100", "train.iters=2", "train.ckpt_interval=100"],
    )
    res = train(cfg, progress=False)
    assert res.step == 2 and len(seen) == 4
    for name, ids in seen:
        assert ids == tags[name], name  # the file's tags, not the mask's


@pytest.mark.parametrize(
    "content, fragments",
    [
        (None, ["cannot read tags file", "No such file", "prepare-splits --tags"]),
        ('{"a.png": [1, 2]', ["is not valid JSON", "line 1"]),
        ("[[1, 2]]", ["one JSON object", "not a list"]),
        ('{"images/train/train_0000.png": "1 2"}', ["train_0000.png", "list of integer class ids"]),
        ("OUT_OF_RANGE", ["class id 9 outside 0..4", "5 classes"]),
        ("MISSING", ["no entry for 3 of 12 training images", "prepare-splits --tags", "add them"]),
    ],
)
def test_a_bad_tags_file_is_refused_in_one_line_before_the_run_folder(
    demo_root: Path, tmp_path: Path, content: str | None, fragments: list[str]
) -> None:
    from typer.testing import CliRunner

    from semiseg_cli.cli import app

    path = tmp_path / "tags.json"
    tags = _user_tags(demo_root)
    if content == "OUT_OF_RANGE":
        first = sorted(tags)[5]
        tags[first] = [0, 9]
        content = json.dumps(tags)
    elif content == "MISSING":
        missing = sorted(tags)[-3:]
        content = json.dumps({k: v for k, v in tags.items() if k not in missing})
        fragments = [*fragments, missing[0]]
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    args = ["train", "--method", "dupl", "--root", str(demo_root), "--out", str(out), "--device", "cpu", "--iters", "1",
            "--set", f'data.tags_file="{path}"', "--set", 'model.backbone="resnet18"']
    err = one_line_error(CliRunner().invoke(app, args), code=2)
    for f in fragments:
        assert f in err, (f, err)
    assert not out.exists()  # refused before the run folder is made
