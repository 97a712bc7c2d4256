"""The single-network weak baseline (`--method cam_baseline`): one DuPL sub-network trained from
its own CAM pseudo-labels. Random-init ResNet-18s on 64x64 images (conftest pins one thread)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.config import build_config, config_to_toml, validate
from semiseg_cli.errors import UserError
from semiseg_cli.methods import get_method
from semiseg_cli.methods.cam import IGNORE
from semiseg_cli.methods.dupl_net import DuPLSubNet, SingleNet
from semiseg_cli.methods.params import CAMBaselineParams, CAMParams, DuPLParams
from tests.method_harness import MethodChecks
from tests.method_harness import make_cfg as harness_cfg

FAST = ["cam_baseline.seg_channels=32", "cam_baseline.cam_scales=[1.0, 0.5]", "cam_baseline.par_dilations=[1, 2, 4]"]
TAGS = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])


def make_cfg(**p: Any) -> Any:
    return validate(
        {
            "method": "cam_baseline",
            "data": {"crop_size": [64, 64], "batch_size": 2},
            "model": {"backbone": "resnet18", "output_stride": 16},
            "optim": {"name": "adamw", "lr": 6e-5, "weight_decay": 0.01, "warmup_iters": 2},
            "train": {"iters": 100},
            "cam_baseline": {"seg_channels": 32, "cam_scales": [1.0, 0.5], "par_dilations": [1, 2, 4], **p},
        }
    )


def make_method(**p: Any) -> Any:
    torch.manual_seed(0)
    return get_method("cam_baseline")(make_cfg(**p), 4, ["bg", "a", "b", "c"]).train()


class TestCAMBaseline(MethodChecks):
    method = "cam_baseline"
    overrides = [*FAST, "cam_baseline.seg_start=0"]  # every term runs


# ----------------------------------------------------------------------------- the method


def test_one_subnetwork_and_no_second_set_of_weights() -> None:
    method = make_method()
    net = method.model
    assert isinstance(net, SingleNet)
    subnets = [m for m in method.modules() if isinstance(m, DuPLSubNet)]
    assert len(subnets) == 1 and subnets[0] is net.net and net.subnets == [net.net]  # DualNet's interface
    alone = sum(p.numel() for p in net.net.parameters())
    assert sum(p.numel() for p in method.parameters()) == alone  # nothing outside the one sub-net
    assert all(k.startswith("net.") for k in method.model.state_dict())
    assert not any(k.startswith("backbone.") for k in net.state_dict())  # the property is not registered
    (spec,) = method.configure_optimizers(100)
    groups = spec.optimizer.param_groups
    assert sorted(g["lr"] for g in groups) == pytest.approx([6e-5, 6e-4])
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)) == len(list(net.parameters()))
    backbone_group = min(groups, key=lambda g: g["lr"])
    assert {id(p) for p in backbone_group["params"]} == {id(p) for p in net.net.backbone.parameters()}


def test_segmentation_loss_is_off_before_seg_start_and_on_after(monkeypatch: pytest.MonkeyPatch) -> None:
    method = make_method(seg_start=3, log_cam_miou=False)
    assert type(method).uses_tags and not type(method).uses_unlabeled
    calls: list[int] = []
    real = method.pseudo_labels

    def spy(*a: Any) -> torch.Tensor:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(method, "pseudo_labels", spy)
    batch = {"image": torch.randn(2, 3, 64, 64), "tags": TAGS}
    head = method.model.net.seg_head.conv8.weight

    before = method.training_step(batch, None, 2)
    assert float(before["loss_seg"]) == 0.0 and not calls and "pl_miou" not in before
    assert torch.allclose(before["loss"], before["loss_cls"])
    before["loss"].backward()
    assert head.grad is not None and not head.grad.any()  # in the graph (DDP), weight 0

    head.grad = None
    after = method.training_step(batch, None, 3)
    assert calls == [1] and float(after["loss_seg"]) > 0.0
    seg_weight = method.cfg.cam_baseline.seg_weight
    assert torch.allclose(after["loss"], after["loss_cls"] + seg_weight * after["loss_seg"])
    after["loss"].backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert set(after) == {"loss", "loss_cls", "loss_seg", "tau_h"}  # no DuPL terms


def test_the_pseudo_labels_come_from_the_network_they_train(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.methods.cam_baseline as mod

    method = make_method(seg_start=0)
    cam_owners: list[Any] = []
    refined: list[torch.Tensor] = []
    supervised: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_cam, real_refine, real_seg = mod.multi_scale_cam, mod.refine_pseudo_labels, mod.seg_loss

    def spy_cam(fn: Any, *a: Any) -> torch.Tensor:
        cam_owners.append(fn.__self__)
        return real_cam(fn, *a)

    def spy_refine(*a: Any) -> torch.Tensor:
        refined.append(real_refine(*a))
        return refined[-1]

    def spy_seg(logits: torch.Tensor, label: torch.Tensor, *a: Any) -> torch.Tensor:
        supervised.append((logits, label))
        return real_seg(logits, label, *a)

    monkeypatch.setattr(mod, "multi_scale_cam", spy_cam)
    monkeypatch.setattr(mod, "refine_pseudo_labels", spy_refine)
    monkeypatch.setattr(mod, "seg_loss", spy_seg)
    forward_inputs: list[torch.Tensor] = []
    real_forward = method.model.forward

    def spy_forward(x: torch.Tensor, **kw: Any) -> dict[str, Any]:
        forward_inputs.append(x)
        return real_forward(x, **kw)

    monkeypatch.setattr(method.model, "forward", spy_forward)
    batch = {"image": torch.randn(2, 3, 64, 64), "tags": TAGS}
    method.training_step(batch, None, 0)
    assert cam_owners == [method.model.net]  # one CAM pass, of the trained sub-net itself
    (label,) = refined
    (logits, target) = supervised[0]
    assert len(supervised) == 1 and torch.equal(target, label)  # its own labels, nothing between
    # the head trained is that sub-net's: its gradient reaches the seg head of the same net
    logits.sum().backward()
    assert method.model.net.seg_head.conv8.weight.grad is not None
    (x,) = forward_inputs
    assert not torch.allclose(x, batch["image"])  # the photometric training view, as DuPL


def test_frozen_bn_statistics_during_the_cam_pass() -> None:
    method = make_method(seg_start=0)
    bn = method.model.net.backbone.bn1
    before = bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    method.pseudo_labels(method.model.net, x, TAGS[:, 1:], torch.full((2,), 0.7), torch.ones(2, 64, 64, dtype=torch.bool))
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1


def test_crop_padding_is_never_pseudo_labelled_and_quality_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.methods.cam_baseline as mod

    method = make_method(seg_start=0)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, :, 40:] = False
    x = torch.randn(2, 3, 64, 64).masked_fill(~valid[:, None], 0.0)
    gt = torch.randint(0, 4, (2, 64, 64)).masked_fill(~valid, IGNORE)
    labels: list[torch.Tensor] = []
    real_seg = mod.seg_loss
    monkeypatch.setattr(mod, "seg_loss", lambda lg, lab, *a: labels.append(lab) or real_seg(lg, lab, *a))
    logs = method.training_step({"image": x, "tags": TAGS, "gt_mask": gt, "valid": valid}, None, 0)
    (label,) = labels
    assert (label[~valid] == IGNORE).all() and (label[valid] != IGNORE).any()
    assert "pl_miou" in logs and 0.0 < float(logs["pl_cover"]) <= 1.0
    assert torch.isfinite(logs["pl_miou"]) and math.isclose(float(logs["tau_h"]), 0.7, abs_tol=1e-6)


def test_tau_h_follows_the_cosine_schedule_and_per_class_targets() -> None:
    m = get_method("cam_baseline")(make_cfg(seg_start=10, per_class_tau=True, fixed_tau_classes=(1,)), 3, ["bg", "a", "b"])
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(m.tau_high(5, tags), torch.tensor([0.7, 0.7]))
    assert torch.allclose(m.tau_high(99, tags), torch.tensor([0.7, 0.55]))


def test_inference_is_the_sub_net_head_at_input_size() -> None:
    method = make_method().eval()
    fresh = get_method("cam_baseline").build_inference_model(method.cfg, 4).eval()
    fresh.load_state_dict(method.inference_model().state_dict())
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        out = fresh(x)["logits"]
        expect = F.interpolate(method.model.net.segment(x), size=(48, 40), mode="bilinear", align_corners=False)
    assert out.shape == (1, 4, 48, 40) and torch.allclose(out, expect, atol=1e-6)


# ----------------------------------------------------------------------------- config


def test_section_holds_exactly_the_shared_fields_with_dupls_defaults() -> None:
    shared = set(CAMParams.model_fields)
    assert set(CAMBaselineParams.model_fields) == shared and shared < set(DuPLParams.model_fields)
    base, dupl = CAMBaselineParams().model_dump(), DuPLParams().model_dump()
    assert base == {k: dupl[k] for k in base}
    for key in ("gmm_start", "discrepancy_weight", "consistency", "inference", "single_net"):
        with pytest.raises(UserError, match="unknown key"):
            make_cfg(**{key: 1})
    with pytest.raises(UserError, match="tau_low"):
        make_cfg(tau_low=0.6)
    cfg = make_cfg(seg_start=7)
    import tomllib

    assert validate(tomllib.loads(config_to_toml(cfg))).model_dump() == cfg.model_dump()


def test_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    M = get_method("cam_baseline")
    with pytest.raises(UserError, match="background"):
        M.check_config(make_cfg(), 1)
    with pytest.raises(UserError, match="fixed_tau_classes"):
        M.check_config(make_cfg(per_class_tau=True, fixed_tau_classes=(5,)), 3)
    with pytest.raises(UserError, match="patch"):
        M.check_config(make_cfg(backbone="vit_b_16", cam_scales=(1.0, 0.2)), 3)
    M.check_config(make_cfg(seg_start=100), 3)
    assert "warning: cam_baseline.seg_start (100) is not below train.iters" in capsys.readouterr().err


def test_camvid_preset_runs_dupls_protocol() -> None:
    base = build_config("cam_baseline_mbv2-os16_1x4-300it_camvid-176x224")
    dupl = build_config("dupl_mbv2-os16_1x4-300it_camvid-176x224")
    assert base.method == "cam_baseline"
    for section in ("data", "model", "optim", "train", "eval"):
        assert getattr(base, section) == getattr(dupl, section), section
    shared = base.cam_baseline.model_dump()
    assert shared == {k: v for k, v in dupl.dupl.model_dump().items() if k in shared}
    assert base.cam_baseline.seg_start == 90 and base.cam_baseline.cam_scales == (1.0, 0.5)


def test_a_preset_that_changes_method_drops_its_bases_method_section(tmp_path: Path) -> None:
    (tmp_path / "parent.toml").write_text('method = "dupl"\n[train]\niters = 7\n[dupl]\ngmm_start = 3\n')
    (tmp_path / "child.toml").write_text('base = "parent.toml"\nmethod = "cam_baseline"\n[cam_baseline]\nseg_start = 2\n')
    (tmp_path / "same.toml").write_text('base = "parent.toml"\n[dupl]\nseg_start = 2\n')
    child = build_config(str(tmp_path / "child.toml"))
    assert child.method == "cam_baseline" and child.train.iters == 7 and child.cam_baseline.seg_start == 2
    same = build_config(str(tmp_path / "same.toml"))  # same method: the base's section still merges
    assert same.dupl.gmm_start == 3 and same.dupl.seg_start == 2


# ----------------------------------------------------------------------------- the loop


def test_two_iterations_through_the_loop_then_eval_of_the_checkpoint(demo_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from semiseg_cli.cli import app
    from semiseg_cli.engine.checkpoint import load_for_inference
    from semiseg_cli.engine.loop import train

    out = tmp_path / "cam_baseline"
    cfg = harness_cfg(
        "cam_baseline", root=str(demo_root), out=str(out),
        overrides=[*FAST, 'optim.name="adamw"', "optim.lr=1e-4", "cam_baseline.seg_start=1", "train.iters=2"],
    )
    res = train(cfg, progress=False)
    assert res.step == 2 and math.isfinite(res.best_miou)
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["loss_seg"] == 0.0 for r in steps] == [True, False]  # on from seg_start = 1
    assert all("pl_miou" in r and "loss_cls" in r and "tau_h" in r for r in steps)  # gt_mask reached the metric
    assert not any("loss_dis" in r or "loss_cons" in r or "pl_miou_2" in r for r in steps)
    model, loaded, _ = load_for_inference(out / "last.pt")
    assert isinstance(model, SingleNet) and loaded.method == "cam_baseline"
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", "-c", str(out / "last.pt"), "--json", str(report), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert math.isfinite(json.loads(report.read_text())["mIoU"])
