"""FixMatch and UniMatch: the shared losses on cases small enough to check by hand, the mixing
and the views, the loss weights, then both methods through the shared method checks and the loop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from semiseg_cli.methods.unimatch_losses import confident_fraction, cutmix_box, masked_ce, mix
from tests.method_harness import MethodChecks, batches_for, build_method, make_cfg

# ----------------------------------------------------------------------------- losses by hand


def test_masked_ce_sums_confident_pixels_and_divides_by_non_padding_ones() -> None:
    # One image, 2 classes, 4 pixels: logits favour class 0 by log(3) on every pixel.
    logits = torch.zeros(1, 2, 1, 4)
    logits[:, 0] = math.log(3.0)
    target = torch.tensor([[[0, 1, 0, 1]]])
    conf = torch.tensor([[[0.99, 0.99, 0.5, 0.99]]])
    valid = torch.tensor([[[True, True, True, False]]])  # the last pixel is crop padding
    # CE(class 0) = -log(3/4), CE(class 1) = -log(1/4); kept: pixels 0 and 1 (pixel 2 not confident,
    # pixel 3 padding); divided by the 3 non-padding pixels, not by the 2 kept ones.
    expect = (-math.log(0.75) - math.log(0.25)) / 3
    assert masked_ce(logits, target, conf, valid, 0.95).item() == pytest.approx(expect, rel=1e-6)
    assert masked_ce(logits, target, conf, valid, 0.0).item() == pytest.approx((-2 * math.log(0.75) - math.log(0.25)) / 3, rel=1e-6)
    nothing = masked_ce(logits.requires_grad_(), target, conf, torch.zeros_like(valid), 0.95)
    assert nothing.item() == 0.0 and nothing.requires_grad
    assert confident_fraction(conf, valid, 0.95).item() == pytest.approx(2 / 3)


def test_cutmix_boxes_follow_the_official_rule() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = cutmix_box(400, 48, 64, prob=0.5, generator=g)
    has = boxes.flatten(1).any(1)
    assert 0.4 < has.float().mean() < 0.6  # a coin per image
    areas = boxes.flatten(1).float().mean(1)[has]
    assert areas.min() >= 0.015 and areas.max() <= 0.41  # 0.02..0.4 of the crop (int() rounds down)
    for b in boxes[has][:50]:
        ys, xs = torch.nonzero(b, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert b.sum() == h * w  # one solid rectangle
        assert 0.3 * 0.8 <= h / w <= (1 / 0.3) * 1.25  # aspect 0.3..1/0.3, up to int() rounding
    assert not cutmix_box(8, 16, 16, prob=0.0).any() and cutmix_box(8, 16, 16, prob=1.0).flatten(1).any(1).all()


def test_mix_moves_images_labels_confidences_and_padding_together() -> None:
    g = torch.Generator().manual_seed(1)
    box = cutmix_box(3, 8, 8, prob=1.0, generator=g)
    own_x, other_x = torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)
    own_pl, other_pl = torch.zeros(3, 8, 8, dtype=torch.long), torch.full((3, 8, 8), 2)
    own_v, other_v = torch.ones(3, 8, 8, dtype=torch.bool), torch.zeros(3, 8, 8, dtype=torch.bool)
    x, pl, v = mix(box, own_x, other_x), mix(box, own_pl, other_pl), mix(box, own_v, other_v)
    assert torch.equal(x[:, 0] == 1, box) and torch.equal(x[:, 2] == 1, box)
    assert torch.equal(pl == 2, box) and torch.equal(~v, box)


# ----------------------------------------------------------------------------- the method's pieces


def _unimatch(**overrides: Any) -> Any:
    sets = [f"unimatch.{k}={v}" for k, v in overrides.items()]
    torch.manual_seed(0)
    return build_method(make_cfg("unimatch", overrides=sets), 4)


def test_two_strong_views_are_independent_draws() -> None:
    m = _unimatch(cutmix_prob=1.0)
    _, unl = batches_for(m, 4)
    partner = m.partner_pseudo_labels(unl["partner"])
    s1, box1 = m.strong_view(unl["image"], partner)
    s2, box2 = m.strong_view(unl["image"], partner)
    assert not torch.equal(box1, box2) and not torch.allclose(s1, s2)
    # Outside its box a view is the image's own photometric draw; inside, the partner's.
    d = (s1 - unl["image"]).abs().amax(1)
    assert d.shape == box1.shape


def test_feature_perturbation_decodes_the_same_features_with_dropout() -> None:
    m = _unimatch()
    net = m.model
    x = torch.randn(2, 3, 64, 64)
    net.train()
    torch.manual_seed(3)
    out = net(x, feature_dropout=0.5)
    assert out["logits_fp"].shape == out["logits"].shape == (2, 4, 64, 64)
    assert not torch.allclose(out["logits_fp"], out["logits"])
    net.eval()  # dropout off: the perturbed stream is the clean one, and the plain forward agrees
    with torch.no_grad():
        out = net(x, feature_dropout=0.5)
        plain = net(x)["logits"]
    assert torch.allclose(out["logits_fp"], out["logits"], atol=1e-5) and torch.allclose(out["logits"], plain, atol=1e-5)


def test_the_loss_is_the_papers_weighting(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.methods.unimatch as um

    values = iter([torch.tensor(0.4), torch.tensor(0.8), torch.tensor(1.6)])  # L_s1, L_s2, L_fp in call order
    monkeypatch.setattr(um, "masked_ce", lambda *a, **k: next(values))
    m = _unimatch()
    m.train()
    lab, unl = batches_for(m, 4)
    losses = m.training_step(lab, unl, 0)
    expect = (losses["loss_x"] + 0.25 * 0.4 + 0.25 * 0.8 + 0.5 * 1.6) / 2
    assert losses["loss"].item() == pytest.approx(expect.item(), rel=1e-6)
    assert {"loss_s1", "loss_s2", "loss_fp", "conf_frac", "pl_acc", "pl_acc_conf"} <= set(losses)


def test_fixmatch_loss_is_half_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.methods.fixmatch as fm

    monkeypatch.setattr(fm, "masked_ce", lambda *a, **k: torch.tensor(0.6))
    torch.manual_seed(0)
    m = build_method(make_cfg("fixmatch"), 4)
    m.train()
    lab, unl = batches_for(m, 4)
    losses = m.training_step(lab, unl, 0)
    assert losses["loss"].item() == pytest.approx(((losses["loss_x"] + 0.6) / 2).item(), rel=1e-6)


def test_padding_is_never_a_target() -> None:
    """A weak view whose right half is padding: with tau 0 every non-padding pixel counts, and
    the loss equals the one computed with the padding cut away."""
    import semiseg_cli.methods.unimatch as um

    seen: list[torch.Tensor] = []
    real = um.masked_ce
    m = _unimatch(conf_thresh=0.0, cutmix_prob=0.0)
    m.train()
    lab, unl = batches_for(m, 4)
    unl["valid"] = torch.ones(2, 64, 64, dtype=torch.bool)
    unl["valid"][:, :, 32:] = False
    um.masked_ce = lambda logits, target, conf, valid, tau: (seen.append(valid), real(logits, target, conf, valid, tau))[1]
    try:
        m.training_step(lab, unl, 0)
    finally:
        um.masked_ce = real
    assert len(seen) == 3 and all(torch.equal(v, unl["valid"]) for v in seen)


def test_unimatch_refuses_deeplabv2() -> None:
    from semiseg_cli.errors import UserError

    with pytest.raises(UserError, match="deeplabv3plus"):
        build_method(make_cfg("unimatch", overrides=['model.arch="deeplabv2"']), 4)


class TestFixMatch(MethodChecks):
    method = "fixmatch"
    overrides = ["fixmatch.conf_thresh=0.0"]  # every pixel used: the unsupervised term reaches the weights


class TestUniMatch(MethodChecks):
    method = "unimatch"
    overrides = ["unimatch.conf_thresh=0.0"]


# ----------------------------------------------------------------------------- through the loop


@pytest.mark.parametrize("method", ["fixmatch", "unimatch"])
def test_trains_end_to_end_with_a_partner_stream_and_resumes_exactly(
    method: str, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped after its step-2 checkpoint and resumed equals an uninterrupted one: the
    partner stream resumes at the same micro-batch as the other two."""
    import json

    from semiseg_cli.engine.loop import train
    from semiseg_cli.methods import get_method

    def cfg(out: Path) -> Any:
        return make_cfg(method, root=str(demo_root), out=str(out),
                        overrides=['data.labeled="1/2"', "train.iters=4", "train.ckpt_interval=2", f"{method}.conf_thresh=0.5"])

    full = train(cfg(tmp_path / "full"), progress=False)
    cls = get_method(method)
    original = cls.training_step

    def killed_at_2(self: Any, labeled: Any, unlabeled: Any, step: int) -> Any:
        if step == 2:
            raise KeyboardInterrupt  # a kill right after the step-2 checkpoint
        return original(self, labeled, unlabeled, step)

    monkeypatch.setattr(cls, "training_step", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut"), progress=False)
    monkeypatch.setattr(cls, "training_step", original)
    train(cfg(tmp_path / "cut"), resume=True, progress=False)
    a = full.method.state_dict()
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["method_state"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rec = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rec)
    assert {"loss_x", "conf_frac", "pl_acc"} <= keys and ("loss_fp" in keys) == (method == "unimatch")


def test_torchrun_two_cpu_ranks_end_with_identical_weights(demo_root: Path, tmp_path: Path) -> None:
    """UniMatch under DDP (two gloo ranks): the feature stream runs inside the one DDP forward,
    the eval-mode partner pass outside the graph, and both ranks end with the same weights."""
    from tests.test_engine import run_two_cpu_ranks

    script = tmp_path / "worker.py"
    script.write_text(
        "import os, torch\n"
        "from semiseg_cli.engine.loop import train\n"
        "from tests.method_harness import make_cfg\n"
        f"cfg = make_cfg('unimatch', root={str(demo_root)!r}, out={str(tmp_path / 'ddp')!r},"
        " overrides=['data.labeled=\"1/2\"', 'train.iters=3', 'unimatch.conf_thresh=0.5'])\n"
        "res = train(cfg, progress=False)\n"
        f"torch.save(res.method.model.state_dict(), {str(tmp_path)!r} + f'/rank{{os.environ[\"RANK\"]}}.pt')\n"
    )
    run_two_cpu_ranks(script)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        if "running_" in k or "num_batches" in k:
            continue  # BN statistics are per rank between forwards on CPU (DDP broadcasts rank 0's)
        assert torch.equal(a[k], b[k]), k
