"""UniMatch V2 and its DPT network: the complementary masks and the EMA rule by hand, the loss
weights, the teacher as labeller, the DPT's sizes, hook and weights, the missing-timm error, then
the method through the shared checks and two iterations of the demo preset through the loop.

Everything runs on a tiny random-init ViT (`vit_tiny14`); nothing is downloaded. The tests that
build a DPT need timm (the `timm` extra, also in the `test` extra) and skip without it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from semiseg_cli.config import build_config
from semiseg_cli.errors import UserError
from semiseg_cli.methods.unimatch_v2 import complementary_channel_masks
from semiseg_cli.models.dpt import patch_multiple
from tests.method_harness import MethodChecks, batches_for, build_method, make_cfg

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm (pip install 'semiseg[timm]')")

TINY_DPT = ['model.arch="dpt"', 'model.backbone="vit_tiny14"']
DEMO_PRESET = "unimatch_v2_vit-tiny14_1x4+4-400it_demo-98"


def _v2(*sets: str) -> Any:
    torch.manual_seed(0)
    return build_method(make_cfg("unimatch_v2", overrides=TINY_DPT + list(sets)), 4)


def _dpt(*sets: str, classes: int = 4) -> Any:
    from semiseg_cli.models import build_model

    torch.manual_seed(0)
    return build_model(build_config(None, TINY_DPT + list(sets)).model, classes)


# ----------------------------------------------------------------------------- by hand


def test_complementary_masks_sum_to_two_and_leave_half_the_pairs_clean() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = complementary_channel_masks(8, 300, generator=g)
    assert m1.shape == m2.shape == (8, 300)
    assert torch.equal(m1 + m2, torch.full((8, 300), 2.0))  # each channel dropped in exactly one view
    clean = (m1 == 1).all(1)
    assert int(clean.sum()) == 4 and torch.equal(clean, (m2 == 1).all(1))  # half the samples: both all ones
    dropped = m1[~clean]
    assert set(dropped.unique().tolist()) <= {0.0, 2.0}  # the others: 0 or 2 per channel ...
    assert 0.4 < (dropped == 2).float().mean() < 0.6  # ... a fair coin each
    one, _ = complementary_channel_masks(1, 16, generator=g)  # n // 2 = 0 clean samples
    assert set(one.unique().tolist()) <= {0.0, 2.0}


def test_patch_multiple_rounds_to_the_nearest_multiple_of_14() -> None:
    assert [patch_multiple(s) for s in (518, 50, 77, 20, 21, 13, 7, 6, 1)] == [518, 56, 84, 14, 28, 14, 14, 14, 14]


@needs_timm
def test_channel_scale_gives_ones_to_the_labeled_images_and_masks_to_the_views() -> None:
    m = _v2()
    s = m.channel_scale(2, 3)
    assert s.shape == (8, 64)
    assert torch.equal(s[:2], torch.ones(2, 64))
    assert torch.equal(s[2:5] + s[5:], torch.full((3, 64), 2.0))  # view 1 and view 2 of the same image pair up


@needs_timm
def test_ema_teacher_follows_min_1_minus_1_over_t_plus_1_and_0_996() -> None:
    m = _v2()
    student, teacher = m.model, m.teacher.module
    assert m.inference_model() is student  # no update yet: the student ships
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    m.after_optimizer_step(0)  # decay min(1 - 1/1, 0.996) = 0: the teacher becomes the student
    assert all(torch.equal(p, torch.ones_like(p)) for p in teacher.parameters())
    assert m.inference_model() is teacher
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(3.0)
    m.after_optimizer_step(3)  # decay 1 - 1/4 = 0.75: 0.75 * 1 + 0.25 * 3 = 1.5
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in teacher.parameters())
    m.after_optimizer_step(10_000)  # capped at 0.996: 0.996 * 1.5 + 0.004 * 3 = 1.506
    assert all(torch.allclose(p, torch.full_like(p, 1.506)) for p in teacher.parameters())
    assert m.extra_log()["ema_decay"] == pytest.approx(0.996)
    assert int(m.ema_updates) == 3


@needs_timm
def test_the_loss_is_the_papers_weighting(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.methods.unimatch_v2 as v2

    values = iter([torch.tensor(0.4), torch.tensor(0.8)])  # L_s1, L_s2 in call order
    monkeypatch.setattr(v2, "masked_ce", lambda *a, **k: next(values))
    m = _v2()
    m.train()
    lab, unl = batches_for(m, 4)
    losses = m.training_step(lab, unl, 0)
    expect = (losses["loss_x"] + (0.4 + 0.8) / 2) / 2
    assert losses["loss"].item() == pytest.approx(expect.item(), rel=1e-6)
    assert {"loss_s1", "loss_s2", "conf_frac", "pl_acc", "pl_acc_conf"} <= set(losses)


@needs_timm
def test_pseudo_labels_come_from_the_teacher_for_the_image_and_its_partner(monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher that says class 3 everywhere and a student that never does: every target the
    strong views learn, inside the CutMix boxes (the partner's) and outside, is 3."""
    import semiseg_cli.methods.unimatch_v2 as v2

    m = _v2("unimatch_v2.cutmix_prob=1.0")
    with torch.no_grad():
        m.teacher.module.head.classifier[-1].bias[3] = 100.0
        m.model.head.classifier[-1].bias[3] = -100.0
    seen: list[torch.Tensor] = []
    real = v2.masked_ce
    monkeypatch.setattr(v2, "masked_ce", lambda logits, target, *a: (seen.append(target), real(logits, target, *a))[1])
    m.train()
    lab, unl = batches_for(m, 4)
    m.training_step(lab, unl, 0)
    assert len(seen) == 2 and all(bool((t == 3).all()) for t in seen)


# ----------------------------------------------------------------------------- the DPT


@needs_timm
@pytest.mark.parametrize("size", [(64, 64), (50, 77), (98, 70), (13, 20)])
def test_dpt_logits_have_the_input_size_whatever_the_sides(size: tuple[int, int]) -> None:
    net = _dpt(classes=5).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size))
    assert out["logits"].shape == (2, 5, *size)
    # The encoder saw the sides resized to multiples of 14: its grid is theirs.
    assert out["feat"].shape == (2, 64, patch_multiple(size[0]) // 14, patch_multiple(size[1]) // 14)


@needs_timm
def test_channel_scale_hook_acts_per_sample_and_ones_are_the_plain_forward() -> None:
    net = _dpt().eval()
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        plain = net(x)["logits"]
        ones = net(x, channel_scale=torch.ones(3, 64))["logits"]
        scale = torch.ones(3, 64)
        scale[1, ::2] = 0.0
        scale[1, 1::2] = 2.0
        dropped = net(x, channel_scale=scale)["logits"]
        alone = net(x[:1])["logits"]
    assert torch.allclose(ones, plain, atol=1e-6)
    assert not torch.allclose(dropped[1], plain[1])  # the scaled sample changes ...
    assert torch.allclose(dropped[[0, 2]], plain[[0, 2]], atol=1e-5)  # ... the others do not
    assert torch.allclose(alone, plain[:1], atol=1e-5)  # no batch-dependent layer: one forward may hold several streams
    with pytest.raises(ValueError, match="channel_scale"):
        net(x, channel_scale=torch.ones(3, 63))


@needs_timm
def test_local_encoder_weights_load_from_pth_safetensors_and_whole_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = _dpt()
    torch.manual_seed(1)
    for p in src.parameters():  # weights no fresh build would have, the head's too
        torch.nn.init.normal_(p)
    enc = src.backbone.state_dict()
    files = {
        "enc.pth": enc,
        "whole.pth": {"model": {f"module.{k}": v for k, v in src.state_dict().items()}},  # DDP-wrapped whole DPT
        "original.pth": {**enc, "mask_token": torch.zeros(1, 64)},  # DINOv2's own release format (timm converts it)
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in enc.items()}, str(tmp_path / "enc.safetensors"))
    for name in [*files, "enc.safetensors"]:
        net = _dpt(f'model.pretrained="{tmp_path / name}"')
        got = net.backbone.state_dict()
        assert all(torch.equal(got[k], enc[k]) for k in enc), name
        assert not torch.equal(net.head.project[0].weight, src.head.project[0].weight)  # the head is not loaded


@needs_timm
def test_bad_encoder_weights_are_one_line_errors(tmp_path: Path) -> None:
    enc = _dpt().backbone.state_dict()
    torch.save({k: v for k, v in enc.items() if not k.startswith("blocks.3.")}, tmp_path / "short.pth")
    torch.save({k: (v[:32] if k == "norm.weight" else v) for k, v in enc.items()}, tmp_path / "odd.pth")
    cases = [
        (tmp_path / "short.pth", "lacks"),
        (tmp_path / "nope.pth", "does not exist"),
        ("dinov2_vitb14", "names another encoder"),  # refused before any download
    ]
    for source, fragment in cases:
        with pytest.raises(UserError, match=fragment) as e:
            _dpt(f'model.pretrained="{source}"')
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"lacks 1 .*first: norm.weight, found with shape \(32,\)"):
        _dpt(f'model.pretrained="{tmp_path / "odd.pth"}"')


def test_without_timm_building_a_dpt_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg_cli.methods.unimatch_v2 import UniMatchV2
    from semiseg_cli.models import build_model

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    cfg = make_cfg("unimatch_v2", overrides=TINY_DPT)
    for call in (lambda: build_model(cfg.model, 4), lambda: UniMatchV2.check_config(cfg, 4)):
        with pytest.raises(UserError, match=r"pip install 'semiseg\[timm\]'") as e:
            call()
        assert "\n" not in str(e.value)


def test_unimatch_v2_needs_the_dpt_and_deeplab_refuses_a_vit() -> None:
    from semiseg_cli.methods.unimatch_v2 import UniMatchV2
    from semiseg_cli.models import build_model

    with pytest.raises(UserError, match='model.arch = "dpt"'):
        UniMatchV2.check_config(make_cfg("unimatch_v2"), 4)
    with pytest.raises(UserError, match="ViT encoder"):
        build_model(build_config(None, ['model.backbone="vit_tiny14"']).model, 4)
    with pytest.raises(UserError, match="ViT encoder"):
        build_model(build_config(None, ['model.arch="dpt"']).model, 4)  # resnet18 under a DPT


# ----------------------------------------------------------------------------- the method


@needs_timm
class TestUniMatchV2(MethodChecks):
    method = "unimatch_v2"
    overrides = TINY_DPT + ["unimatch_v2.conf_thresh=0.0"]  # every pixel used: the unsupervised terms reach the weights


def _demo_overrides(demo_root: Path, out: Path, iters: int, ckpt_interval: int) -> list[str]:
    return [
        f'data.root="{demo_root}"', f'out="{out}"', 'data.labeled="1/2"', "data.batch_size=2",
        "data.unlabeled_batch_size=2", "data.workers=0", f"train.iters={iters}", "train.val_interval=0",
        f"train.ckpt_interval={ckpt_interval}", "train.log_interval=1", 'train.device="cpu"', "unimatch_v2.conf_thresh=0.5",
    ]


def _demo_run(demo_root: Path, out: Path, iters: int = 2, ckpt_interval: int | None = None, resume: bool = False) -> Any:
    from semiseg_cli.engine.loop import train

    cfg = build_config(DEMO_PRESET, _demo_overrides(demo_root, out, iters, ckpt_interval or iters))
    return train(cfg, resume=resume, progress=False)


@needs_timm
def test_demo_preset_trains_two_iterations_on_cpu_and_ships_the_teacher(demo_root: Path, tmp_path: Path) -> None:
    import json

    from semiseg_cli.engine.checkpoint import load_checkpoint, load_for_inference

    res = _demo_run(demo_root, tmp_path / "run")
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rec)
    assert {"loss_x", "loss_s1", "loss_s2", "conf_frac", "ema_decay"} <= keys
    assert all(r["loss"] == r["loss"] for r in rec if "loss" in r)  # finite (not NaN)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["has_teacher"] and int(res.method.ema_updates) == 2
    model, _, _ = load_for_inference(tmp_path / "run" / "last.pt")
    teacher = res.method.teacher.module.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items())


@needs_timm
def test_the_dpt_exports_to_onnx_with_dynamic_sides(demo_root: Path, tmp_path: Path) -> None:
    """The resize to multiples of 14 stays a function of the input size in the graph: the export
    check runs sizes other than the example's (61x97 resizes to 56x98, the example 64x96 to 70x98)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from semiseg_cli.export import run_export

    _demo_run(demo_root, tmp_path / "run", iters=1)
    report = run_export(tmp_path / "run" / "last.pt", tmp_path / "m.onnx")  # raises unless the check passes
    assert all(c.agreement >= 0.999 for c in report.checks)


@needs_timm
def test_a_killed_run_resumes_to_the_same_student_teacher_and_ema_count(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped right after its step-2 checkpoint and resumed, a V2 run equals an uninterrupted
    one: student, EMA teacher and the EMA step count all come back from last.pt."""
    from semiseg_cli.methods import get_method

    full = _demo_run(demo_root, tmp_path / "full", iters=4, ckpt_interval=2)
    cls = get_method("unimatch_v2")
    original = cls.training_step

    def killed_at_2(self: Any, labeled: Any, unlabeled: Any, step: int) -> Any:
        if step == 2:
            raise KeyboardInterrupt
        return original(self, labeled, unlabeled, step)

    monkeypatch.setattr(cls, "training_step", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        _demo_run(demo_root, tmp_path / "cut", iters=4, ckpt_interval=2)
    monkeypatch.setattr(cls, "training_step", original)
    cut = _demo_run(demo_root, tmp_path / "cut", iters=4, ckpt_interval=2, resume=True)
    a, b = full.method.state_dict(), cut.method.state_dict()
    assert a.keys() == b.keys() and any("teacher" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(cut.method.ema_updates) == int(full.method.ema_updates) == 4


@needs_timm
def test_torchrun_two_cpu_ranks_end_with_identical_student_and_teacher(demo_root: Path, tmp_path: Path) -> None:
    """UniMatch V2 under DDP (two gloo ranks): the teacher's EMA runs on each rank from the
    all-reduced student, so both ranks end with the same student and the same teacher."""
    from tests.test_engine import run_two_cpu_ranks

    overrides = _demo_overrides(demo_root, tmp_path / "ddp", 3, 3)
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, torch\n"
        "from semiseg_cli.config import build_config\n"
        "from semiseg_cli.engine.loop import train\n"
        f"res = train(build_config({DEMO_PRESET!r}, {overrides!r}), progress=False)\n"
        f"torch.save(res.method.state_dict(), {str(tmp_path)!r} + f'/rank{{os.environ[\"RANK\"]}}.pt')\n"
    )
    run_two_cpu_ranks(script)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys() and any("teacher" in k for k in a)
    for k in a:
        if "running_" in k or "num_batches" in k:
            continue  # BN statistics are per rank between forwards on CPU (DDP broadcasts rank 0's)
        assert torch.equal(a[k], b[k]), k
