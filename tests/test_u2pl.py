"""U2PL: each loss on a case small enough to check by hand, then the method through the shared
checks (past the warm-up, so the representation head must get gradients), the EMA schedule and
reset, the config guard for few-class data, and one tiny end-to-end run through the loop."""

from __future__ import annotations

import json
import math
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.errors import UserError
from semiseg_cli.methods.u2pl import U2PL
from semiseg_cli.methods.u2pl_losses import (
    MemoryBank,
    align_distribution,
    prior_adjustment,
    alpha_at,
    contrastive_loss,
    contrastive_masks,
    cutmix,
    cutmix_box_mask,
    drop_percent_at,
    epoch_fraction,
    infonce,
    last_per_class,
    percentiles,
    resize_nearest,
    sample_anchors,
    unsup_loss,
)
from tests.method_harness import MethodChecks, batches_for, build_method, make_cfg

FAST = [
    'model.backbone="mobilenet_v2"',  # ~5x cheaper than resnet18 on CPU
    "model.rep_dim=16",
    "u2pl.queue_size=64",
    "u2pl.queue_size_background=96",
    "u2pl.num_queries=8",
    "u2pl.num_negatives=4",
]


# ----------------------------------------------------------------------------- schedules


def test_schedules_move_once_per_epoch_from_their_start_values() -> None:
    assert epoch_fraction(0, 10, 100) == 0.0
    assert epoch_fraction(9, 10, 100) == 0.0  # still the first epoch
    assert epoch_fraction(55, 10, 100) == 0.5
    assert epoch_fraction(94, 10, 95) == 0.9  # ceil(95 / 10) = 10 epochs; the last is index 9
    assert drop_percent_at(0.0, 80) == 80 and drop_percent_at(0.5, 80) == 90 and drop_percent_at(1.0, 80) == 100
    assert alpha_at(0.0, 20) == 20 and alpha_at(0.5, 20) == 10 and alpha_at(1.0, 20) == 0
    assert drop_percent_at(0.5, 80, end=90) == 85 and drop_percent_at(1.0, 80, end=90) == 90
    assert drop_percent_at(0.0, 80, end=80) == drop_percent_at(0.9, 80, end=80) == 80


# ----------------------------------------------------------------------------- unsupervised loss


def test_percentiles_match_numpy_and_skip_invalid_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 7, 9, generator=g)
    valid = torch.rand(2, 7, 9, generator=g) > 0.3
    got = percentiles(x, valid, [0.0, 20.0, 80.0, 100.0])
    want = np.percentile(x[valid].numpy(), [0, 20, 80, 100])
    assert np.allclose(got.numpy(), want, atol=1e-6)


def _logits_with_ce(ce_pos: list[float]) -> torch.Tensor:
    """(1, 2, 1, n) logits whose CE against class 0 is log(1 + e^-a) for each a."""
    a = torch.tensor(ce_pos)
    return torch.stack([a, torch.zeros_like(a)]).view(1, 2, 1, -1)


def test_unsup_loss_drops_entropy_at_or_above_the_percentile_and_renormalises() -> None:
    a = [0.0, 1.0, 2.0, -1.0, 3.0]
    logits = _logits_with_ce(a)
    ce = torch.log1p(torch.exp(-torch.tensor(a)))
    target = torch.zeros(1, 1, 5, dtype=torch.long)
    ent = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).view(1, 1, 5)
    # 75th percentile of 0..4 is exactly 3.0: "at or above" drops pixels 3 and 4.
    thr = percentiles(ent, None, [75.0])[0]
    assert float(thr) == pytest.approx(3.0)
    loss, keep = unsup_loss(logits, target, ent, thr, "official")
    assert keep.flatten().tolist() == [True, True, True, False, False]
    assert float(loss) == pytest.approx(float(ce[:3].mean() * 5 / 3), rel=1e-6)  # mean x B*H*W/#kept
    loss_mean, _ = unsup_loss(logits, target, ent, thr, "mean")
    assert float(loss_mean) == pytest.approx(float(ce[:3].mean()), rel=1e-6)
    # 80th percentile is 3.2: pixel 3 comes back.
    loss80, keep80 = unsup_loss(logits, target, ent, percentiles(ent, None, [80.0])[0], "official")
    assert int(keep80.sum()) == 4
    assert float(loss80) == pytest.approx(float(ce[:4].mean() * 5 / 4), rel=1e-6)


def test_unsup_loss_with_nothing_kept_is_zero_but_keeps_the_graph() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss, keep = unsup_loss(logits, torch.full((1, 2, 2), 255), torch.zeros(1, 2, 2), torch.tensor(1.0))
    assert float(loss.detach()) == 0.0 and not keep.any()
    loss.backward()
    assert logits.grad is not None


# ----------------------------------------------------------------------------- CutMix


def test_cutmix_moves_image_label_confidence_and_features_together() -> None:
    torch.manual_seed(3)
    b, size = 3, 16
    ids = torch.arange(b, dtype=torch.float32)
    image = ids.view(b, 1, 1, 1).expand(b, 3, size, size).clone()  # image value = sample id
    label = ids.long().view(b, 1, 1).expand(b, size, size).clone()
    conf = ids.view(b, 1, 1).expand(b, size, size) / 10
    feat = ids.view(b, 1, 1, 1).expand(b, 5, size // 4, size // 4).clone()  # stride-4 map
    box = cutmix_box_mask(b, size, size, area=0.5, align=4)
    img_m, lab_m, conf_m, feat_m = (cutmix(box, t) for t in (image, label, conf, feat))
    assert torch.equal(img_m[:, 0], lab_m.float()) and torch.equal(img_m[:, 2], lab_m.float())
    assert torch.allclose(conf_m * 10, lab_m.float())
    partner = (torch.arange(b) + 1) % b
    for i in range(b):
        assert (lab_m[i][box[i]] == partner[i]).all() and (lab_m[i][~box[i]] == i).all()
        area = box[i].float().mean()
        assert 0.4 <= area <= 0.6
        ys, xs = box[i].nonzero(as_tuple=True)
        assert int(ys.min()) % 4 == 0 and (int(ys.max()) + 1) % 4 == 0 and int(xs.min()) % 4 == 0
    # The box is exact on the stride-4 grid: features agree with the downsampled labels.
    assert torch.equal(feat_m[:, 0].long(), resize_nearest(lab_m, (size // 4, size // 4)))


def test_cutmix_box_covers_about_half_the_image_without_alignment() -> None:
    torch.manual_seed(0)
    box = cutmix_box_mask(64, 48, 64, area=0.5, align=1)
    areas = box.float().mean((1, 2))
    assert ((areas > 0.45) & (areas < 0.55)).all(), areas
    assert box.any(1).any(1).all()


# ----------------------------------------------------------------------------- memory bank


def test_queue_wraps_around_in_fifo_order_per_class() -> None:
    bank = MemoryBank([3, 5], dim=1)  # class 0 (background) has its own, different size
    assert bank.bank.shape == (8, 1)
    col = lambda *v: torch.tensor(v, dtype=torch.float32).view(-1, 1)  # noqa: E731
    bank.push(col(1, 2, 3, 4, 5, 6, 7), torch.ones(7, dtype=torch.long))
    assert bank.ordered(1).flatten().tolist() == [3, 4, 5, 6, 7]  # the newest 5 of 7
    assert bank.fill.tolist() == [0, 5] and bank.ptr.tolist() == [0, 0]
    bank.push(col(10, 8, 11, 9), torch.tensor([0, 1, 0, 1]))  # interleaved classes
    assert bank.ordered(1).flatten().tolist() == [5, 6, 7, 8, 9]
    assert bank.ordered(0).flatten().tolist() == [10, 11]
    bank.push(col(12, 13), torch.zeros(2, dtype=torch.long))
    assert bank.ordered(0).flatten().tolist() == [11, 12, 13]
    assert bank.fill.tolist() == [3, 5] and bank.ptr.tolist() == [1, 2]
    torch.manual_seed(0)
    draws = bank.sample(torch.tensor([0, 1]), 200)
    assert set(draws[0].flatten().tolist()) == {11.0, 12.0, 13.0}
    assert set(draws[1].flatten().tolist()) == {5.0, 6.0, 7.0, 8.0, 9.0}


def test_sampling_a_partly_filled_queue_never_reads_empty_slots() -> None:
    bank = MemoryBank([4, 4], dim=1)
    bank.push(torch.tensor([[7.0]]), torch.tensor([1]))
    torch.manual_seed(0)
    assert bank.sample(torch.tensor([1]), 50).unique().tolist() == [7.0]


def test_last_per_class_keeps_only_what_the_queue_can_hold() -> None:
    mask = torch.zeros(5, 2, dtype=torch.bool)
    mask[:, 1] = True
    mask[2, 0] = True
    pix, cls = last_per_class(mask, torch.tensor([10, 2]))
    assert list(zip(cls.tolist(), pix.tolist())) == [(0, 2), (1, 3), (1, 4)]


# ----------------------------------------------------------------------------- contrastive


def test_rank_windows_pick_labeled_confusions_and_unreliable_unlabeled_negatives() -> None:
    prob = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(4, 1)
    label = torch.tensor([1, 0, 0, 255])  # labeled GT 1 | pseudo 0 | pseudo 0 | labeled ignore
    is_labeled = torch.tensor([True, False, False, True])
    reliable = torch.tensor([True, False, True, False])
    unreliable = torch.tensor([True, True, False, False])
    proto, anchor, neg = contrastive_masks(label, prob, reliable, unreliable, is_labeled, 0.3, 1.0, 2, 4)
    # Labeled pixel: teacher top-2 = {0, 1}, label 1 -> negative for class 0 only.
    assert neg[0].tolist() == [True, False, False, False]
    # Unreliable unlabeled pixel: ranks 2..3 are classes 2 and 3.
    assert neg[1].tolist() == [False, False, True, True]
    assert not neg[2].any() and not neg[3].any()  # reliable unlabeled; ignored labeled
    assert proto.nonzero().tolist() == [[0, 1], [2, 0]]
    assert anchor.nonzero().tolist() == [[2, 0]]  # prob 0.3 is not > delta_p = 0.3
    _, _, neg_n = contrastive_masks(label, prob, reliable, unreliable, is_labeled, 0.3, 0.15, 2, 4)
    assert neg_n[1].tolist() == [False, False, False, True]  # delta_n filters prob >= 0.15


def test_negative_mask_code_keeps_only_unreliable_pixels_whose_pseudo_label_is_the_class() -> None:
    # 4 classes, rank window [low_rank, high_rank) = [2, 4); every pixel is reliable or unreliable
    # as marked, delta_n = 1 (no filter).
    prob = torch.tensor([
        [0.50, 0.30, 0.15, 0.05],  # ranks c0..c3 = 0 1 2 3
        [0.10, 0.40, 0.30, 0.20],  # ranks 3 0 1 2: c0 and c3 in the window
        [0.40, 0.30, 0.20, 0.10],  # ranks 0 1 2 3: c2 and c3 in the window
        [0.10, 0.20, 0.30, 0.40],  # ranks 3 2 1 0: c0 and c1 in the window
        [0.50, 0.30, 0.15, 0.05],
    ])
    label = torch.tensor([0, 0, 1, 0, 255])
    is_labeled = torch.tensor([True, False, False, False, True])
    unreliable = torch.tensor([True, True, True, False, False])
    reliable = ~unreliable
    args = (label, prob, reliable, unreliable, is_labeled, 0.3, 1.0, 2, 4, 255)
    _, _, paper = contrastive_masks(*args)
    _, _, code = contrastive_masks(*args, negative_mask="code")
    # Paper, by hand: pixel 0 (labeled, GT 0): top-2 = {0, 1}, minus its label -> {1};
    # pixel 1 (unreliable, pseudo 0): window classes {0, 3}; pixel 2 (unreliable, pseudo 1): {2, 3};
    # pixel 3 is reliable, pixel 4 is ignored -> nothing.
    assert paper.nonzero().tolist() == [[0, 1], [1, 0], [1, 3], [2, 2], [2, 3]]
    # Code = paper x one-hot(label): pixel 0's label 0 is not a negative there (nothing labeled
    # survives), pixel 1 keeps class 0 (its pseudo-label), pixel 2's pseudo-label 1 is not in its
    # window -> only (1, 0).
    assert code.nonzero().tolist() == [[1, 0]]
    assert torch.equal(code, paper & F.one_hot(label.clamp(max=3), 4).bool() & (label != 255)[:, None])
    with pytest.raises(ValueError, match="negative_mask"):
        contrastive_masks(*args, negative_mask="official")


def test_negative_mask_code_leaves_the_queues_almost_empty_with_one_teacher_pass() -> None:
    # The pseudo-label is the same pass's argmax (rank 0), so "code" negatives can only come from
    # the stride-4 resampling (nearest labels vs bilinear probabilities) disagreeing.
    torch.manual_seed(0)
    fills = {}
    for mode in ("paper", "code"):
        overrides = [*FAST, "u2pl.sup_only_iters=1", "u2pl.delta_p=0.0", f'u2pl.negative_mask="{mode}"']
        m = build_method(make_cfg("u2pl", overrides=overrides), 4)
        m.train()
        with torch.no_grad():
            m.model.classifier[-1].weight.mul_(100.0)
        lab, unl = batches_for(m, 4)
        losses = m.training_step(lab, unl, 1)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        fills[mode] = int(m.bank.fill.sum())
    # paper: the queues fill up (288 slots); code: a handful of keys at most (0 or 1 in practice).
    assert fills["paper"] > 100 and fills["code"] * 20 <= fills["paper"], fills


def test_sample_anchors_draws_with_replacement_within_each_class() -> None:
    anchor = torch.zeros(6, 3, dtype=torch.bool)
    anchor[[1, 4], 0] = True
    anchor[2, 1] = True
    torch.manual_seed(0)
    idx, has = sample_anchors(anchor, 64)
    assert has.tolist() == [True, True, False]
    assert set(idx[0].tolist()) == {1, 4} and set(idx[1].tolist()) == {2}


def test_infonce_matches_the_hand_computed_cross_entropy() -> None:
    anchor = torch.tensor([[[2.0, 0.0]]])  # cos with (1,0) = 1 after normalisation
    positive = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[[[0.0, 3.0], [-1.0, 0.0]]]])  # cos 0 and -1
    # logits / T=0.5: [2, 0, -2]; CE = log(e^2 + 1 + e^-2) - 2
    expected = math.log(1 + math.exp(-2) + math.exp(-4))
    assert float(infonce(anchor, positive, negatives, 0.5)[0]) == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_averages_over_valid_classes_and_needs_two() -> None:
    rep = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    rep_t = rep.detach().clone()
    proto = torch.eye(2, dtype=torch.bool)  # pixel i is a reliable pixel of class i
    bank = MemoryBank([8, 8], dim=2)
    bank.push(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))  # class 1's queue stays empty
    loss, n_valid = contrastive_loss(rep, rep_t, proto, proto, bank, num_queries=4, num_negatives=3, temperature=0.5)
    # Class 0: cos(anchor, positive) = 1, three negatives with cos 0; class 1 contributes 0 but counts.
    expected = (math.log(math.exp(2) + 3) - 2) / 2
    assert int(n_valid) == 2 and float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert rep.grad is not None and rep.grad[0].abs().sum() > 0
    one_class = torch.tensor([[True, False], [False, False]])
    loss1, n1 = contrastive_loss(rep, rep_t, one_class, one_class, bank, 4, 3, 0.5)
    assert int(n1) == 1 and float(loss1.detach()) == 0.0


# ----------------------------------------------------------------------------- the method


class TestU2PL(MethodChecks):
    method = "u2pl"
    # Past the warm-up; delta_p = 0 so that a random-init teacher still yields anchors.
    overrides = [*FAST, "u2pl.sup_only_iters=1", "u2pl.delta_p=0.0", "u2pl.cutmix_prob=1.0"]
    step = 1

    def test_step_logs_every_u2pl_metric_and_fills_the_queues(self) -> None:
        m = self.make()
        m.train()
        # A fresh head scores ~N(0, 0.01): near-uniform softmax, entropies tied in float32, and a
        # percentile cut that ties push past alpha_t %. Spread the scores so the cut is sharp
        # (the teacher is reset to the student on this step).
        with torch.no_grad():
            m.model.classifier[-1].weight.mul_(100.0)
        lab, unl = batches_for(m, self.num_classes)
        losses = m.training_step(lab, unl, self.step)
        for k in ("loss_sup", "loss_unsup", "loss_contra", "drop_percent", "alpha_t", "reliable_frac", "unsup_kept", "pl_acc"):
            assert k in losses and losses[k].dim() == 0 and not losses[k].requires_grad, k
        assert float(losses["loss_contra"]) > 0
        assert float(losses["drop_percent"]) == 80.0 and float(losses["alpha_t"]) == 20.0
        assert 0.1 < float(losses["reliable_frac"]) < 0.3  # ~alpha_t % of pixels
        assert 0.7 < float(losses["unsup_kept"]) < 0.9  # ~p_t % of pixels
        losses["loss"].backward()
        rep_grads = [p.grad for n, p in m.model.named_parameters() if n.startswith("rep.")]
        assert rep_grads and all(g is not None for g in rep_grads) and any(g.abs().sum() > 0 for g in rep_grads)
        log = m.extra_log()
        assert log["queue_fill_mean"] > 0 and {f"queue_fill/c{i}" for i in range(4)} <= log.keys()


@pytest.mark.parametrize("labeled_keys", ["teacher", "student"])
def test_labeled_keys_decides_what_the_teacher_sees(labeled_keys: str) -> None:
    torch.manual_seed(0)
    overrides = [*FAST, "u2pl.sup_only_iters=1", "u2pl.delta_p=0.0", f'u2pl.labeled_keys="{labeled_keys}"']
    m = build_method(make_cfg("u2pl", overrides=overrides), 4)
    m.train()
    teacher_batches: list[int] = []
    m.teacher.register_forward_hook(lambda mod, args, out: teacher_batches.append(args[0].shape[0]))
    student_out: list[dict] = []
    m.model.register_forward_hook(lambda mod, args, out: student_out.append(out))
    seen: dict = {}
    contrastive = m._contrastive

    def spy(rep, prob_l, rep_l, prob_u, rep_u, *rest):  # type: ignore[no-untyped-def]
        seen.update(prob_l=prob_l, rep_l=rep_l, rep_u=rep_u)
        return contrastive(rep, prob_l, rep_l, prob_u, rep_u, *rest)

    m._contrastive = spy
    lab, unl = batches_for(m, 4)  # 2 labeled + 2 unlabeled images
    losses = m.training_step(lab, unl, 1)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert float(losses["loss_contra"]) > 0 and int(m.bank.fill.sum()) > 0
    losses["loss"].backward()
    rep_s = student_out[0]["rep"]
    assert seen["rep_u"].shape[0] == 2 and seen["rep_l"].shape[0] == 2 and not seen["rep_l"].requires_grad
    if labeled_keys == "teacher":
        assert teacher_batches == [4]  # cat(labeled, weak unlabeled), as the paper
        assert not torch.allclose(seen["rep_l"], rep_s[:2].detach())
    else:
        assert teacher_batches == [2]  # the unlabeled images only
        assert torch.equal(seen["rep_l"], rep_s[:2].detach())
        assert torch.allclose(seen["prob_l"], torch.softmax(student_out[0]["logits"][:2].detach(), 1))


@pytest.mark.parametrize("photometric", [False, True])
def test_strong_photometric_perturbs_only_the_students_unlabeled_view(photometric: bool) -> None:
    torch.manual_seed(0)
    overrides = [*FAST, "u2pl.sup_only_iters=1", "u2pl.cutmix_prob=0.0", f"u2pl.strong_photometric={str(photometric).lower()}"]
    m = build_method(make_cfg("u2pl", overrides=overrides), 4)
    m.train()
    seen: dict[str, torch.Tensor] = {}
    m.teacher.register_forward_hook(lambda mod, args, out: seen.update(teacher=args[0]))
    m.model.register_forward_hook(lambda mod, args, out: seen.update(student=args[0]))
    lab, unl = batches_for(m, 4)  # 2 labeled + 2 unlabeled images
    m.training_step(lab, unl, 1)
    n_l = lab["image"].shape[0]
    assert torch.equal(seen["teacher"][n_l:], unl["image"])  # pseudo-labels from the weak view
    assert torch.equal(seen["student"][:n_l], lab["image"])  # the labeled half is never perturbed
    same = torch.equal(seen["student"][n_l:], unl["image"])
    assert same != photometric


def test_warmup_runs_no_teacher_and_evaluates_the_student() -> None:
    m = build_method(make_cfg("u2pl", overrides=[*FAST, "u2pl.sup_only_iters=2"]), 4)
    m.train()
    calls = []
    m.teacher.register_forward_hook(lambda *a: calls.append(1))
    lab, unl = batches_for(m, 4)
    losses = m.training_step(lab, unl, 0)
    losses["loss"].backward()
    m.after_optimizer_step(0)
    assert not calls and float(losses["loss_unsup"]) == 0.0 and float(losses["loss_contra"]) == 0.0
    # The rep head stays in the graph with a zero gradient (DDP needs every parameter used).
    rep_grads = [p.grad for n, p in m.model.named_parameters() if n.startswith("rep.")]
    assert rep_grads and all(g is not None and not g.any() for g in rep_grads)
    assert m.inference_model() is m.model and int(m.ema_updates) == 0


def _teacher_run(*overrides: str) -> tuple[Any, Any, Any, Any]:
    """A small U2PL (no contrastive term) and its optimiser step, plus flat views of the student's
    and the teacher's parameters. `run(step, check)` does one training step and calls `check`
    after the forward/backward, before the optimiser step and the EMA update."""
    torch.manual_seed(0)
    cfg = make_cfg("u2pl", overrides=[*FAST, "u2pl.contrastive=false", *overrides])
    m = build_method(cfg, 4)
    m.train()
    spec = m.configure_optimizers(cfg.train.iters)[0]
    lab, unl = batches_for(m, 4)
    student = lambda: torch.cat([p.detach().flatten() for p in m.model.parameters()])  # noqa: E731
    teacher = lambda: torch.cat([p.flatten() for p in m.teacher.module.parameters()])  # noqa: E731

    def run(step: int, check: Any = None) -> None:
        spec.optimizer.zero_grad()
        m.training_step(lab, unl, step)["loss"].backward()
        if check is not None:
            check(step)
        spec.set_lr(step)
        spec.optimizer.step()
        m.after_optimizer_step(step)

    return m, run, student, teacher


def test_teacher_is_reset_during_the_first_semi_epoch_then_follows_the_ema_schedule() -> None:
    m, run, student, teacher = _teacher_run("u2pl.sup_only_iters=1", "u2pl.teacher_reset_iters=1")

    def check(step: int) -> None:
        if step == 1:  # inside the reset window the teacher is the pre-step student
            assert torch.equal(teacher(), student())

    decays, after = [], []
    for step in range(3):  # warm-up, reset step (t=0), EMA step (t=1)
        run(step, check)
        decays.append(m._last_decay)
        after.append((teacher(), student()))
    assert decays[1:] == [0.0, 0.5]  # min(1 - 1/(t+1), 0.99), t counted from step 1
    assert torch.equal(after[1][0], after[1][1])  # decay 0: teacher = student
    assert torch.allclose(after[2][0], 0.5 * after[1][0] + 0.5 * after[2][1], atol=1e-6)
    assert not torch.equal(after[2][0], after[2][1])  # no reset outside the window
    assert m.inference_model() is m.teacher.module and int(m.ema_updates) == 2
    assert all(not p.requires_grad for p in m.teacher.parameters())


def test_without_reset_the_teacher_still_starts_the_semi_phase_as_the_student() -> None:
    """`teacher_reset=false`: no copy window, but the first pseudo-labels after the warm-up come
    from the warmed-up student, not from the untrained initial copy."""
    _, run, student, teacher = _teacher_run("u2pl.sup_only_iters=2", "u2pl.teacher_reset=false")
    for step in range(3):
        before = student()

        def check(step: int) -> None:
            if step == 1:  # warm-up: the teacher is neither used nor updated (still the initial copy)
                assert not torch.equal(teacher(), before)
            elif step == 2:  # first semi-supervised step: a copy of the warmed-up student
                assert torch.equal(teacher(), before)

        run(step, check)


def test_align_distribution_scales_by_the_prior_ratio_and_renormalises() -> None:
    # Two pixels, two classes; the teacher predicts class 0 four times as often as the labels do.
    prob = torch.tensor([[0.5, 0.8], [0.5, 0.2]]).view(1, 2, 1, 2)
    target, current = torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2])
    out = align_distribution(prob, target, current)
    # ratio (0.625, 2.5): (0.3125, 1.25) / 1.5625 and (0.5, 0.5) / 1.0
    assert torch.allclose(out.view(2, 2).T, torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    assert torch.allclose(out.sum(1), torch.ones(1, 1, 2))
    assert torch.allclose(align_distribution(prob, current, current), prob)  # aligned already


def test_distribution_alignment_tracks_label_and_teacher_priors_and_is_saved() -> None:
    m, run, _, _ = _teacher_run("u2pl.sup_only_iters=1", 'u2pl.pseudo_label_align="distribution"', "u2pl.align_momentum=0.5")
    lab, unl = batches_for(m, 4)
    counts = torch.bincount(lab["mask"][lab["mask"] != 255].flatten(), minlength=4).double()
    run(0)  # warm-up: labels counted, no teacher yet
    assert torch.equal(m.label_counts, counts) and not m.pred_prior.any()
    seen: list[torch.Tensor] = []
    m.teacher.register_forward_hook(lambda mod, args, out: seen.append(torch.softmax(out["logits"], 1).mean((0, 2, 3))))
    run(1)  # first semi step: the prior is the teacher's mean prediction on this batch
    assert torch.equal(m.label_counts, 2 * counts)
    assert torch.allclose(m.pred_prior, seen[0], atol=1e-6)
    run(2)  # then an EMA with the momentum
    assert torch.allclose(m.pred_prior, 0.5 * seen[0] + 0.5 * seen[1], atol=1e-6)
    target = counts / counts.sum()
    ratios = m.extra_log()
    assert ratios["align_ratio/c1"] == pytest.approx(float(target[1] / m.pred_prior[1]), rel=1e-5)
    assert {"label_counts", "pred_prior"} <= m.state_dict().keys()
    # Off (the paper): no such state, so checkpoints keep the keys they always had.
    plain = build_method(make_cfg("u2pl", overrides=FAST), 4)
    assert not {"label_counts", "pred_prior"} & plain.state_dict().keys()


def test_distribution_alignment_turns_an_under_predicted_class_into_pseudo_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pseudo-labels (and their accuracy log) come from the aligned probabilities: once the
    labels say a class is common that the teacher rarely predicts, it takes over."""
    m, run, _, _ = _teacher_run("u2pl.sup_only_iters=0", 'u2pl.pseudo_label_align="distribution"', "u2pl.teacher_reset=false")
    lab, unl = batches_for(m, 4)
    m.teacher.reset(m.model)  # what the step does first (sup_only_iters=0)
    with torch.no_grad():
        plain = m.teacher(unl["image"])["logits"].argmax(1)  # the teacher's labels without alignment
    rare = int(torch.bincount(plain.flatten(), minlength=4).argmin())
    prior = torch.ones(4, dtype=torch.float64)
    prior[rare] = 97.0
    m.label_counts.copy_(prior * 1e9)  # dwarfs this batch's own label counts
    captured: dict = {}
    from semiseg_cli.methods import u2pl as u2pl_module

    real = u2pl_module._pseudo_label_accuracy

    def spy(unlabeled, pl_u, *rest):  # type: ignore[no-untyped-def]
        captured["pl"] = pl_u.clone()
        return real(unlabeled, pl_u, *rest)

    monkeypatch.setattr(u2pl_module, "_pseudo_label_accuracy", spy)
    m.training_step(lab, unl, 0)
    share = lambda pl: float((pl == rare).float().mean())  # noqa: E731
    assert share(plain) < 0.25 and share(captured["pl"]) > 0.5


def test_unsup_loss_adds_the_prior_adjustment_to_every_pixels_logits() -> None:
    # Two classes, zero logits, target 0: the adjustment (0, ln 3) makes the softmax (1/4, 3/4).
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    ent = torch.zeros(1, 1, 2)
    adjust = torch.tensor([0.0, math.log(3.0)])
    loss, _ = unsup_loss(logits, target, ent, torch.tensor(1.0), "mean", 255, adjust)
    assert loss.item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert unsup_loss(logits, target, ent, torch.tensor(1.0), "mean")[0].item() == pytest.approx(math.log(2.0))
    # Equal priors: no shift at all.
    pri = torch.tensor([0.2, 0.3, 0.5])
    assert torch.equal(prior_adjustment(pri, pri), torch.zeros(3))
    assert torch.allclose(prior_adjustment(torch.tensor([0.1, 0.9]), torch.tensor([0.4, 0.6])),
                          torch.tensor([math.log(0.25), math.log(1.5)]))


def test_prior_adjustment_makes_the_loss_fit_the_labeled_prior_not_the_pseudo_labels() -> None:
    """Targets drawn with the pseudo-labels' frequencies (class 2 rare): plain CE learns those
    frequencies; with the adjustment the raw logits' softmax learns the labeled prior instead."""
    source = torch.tensor([0.6, 0.38, 0.02])  # kept pseudo-labels
    target = torch.tensor([0.5, 0.3, 0.2])  # labeled pixels
    labels = torch.cat([torch.full((int(n),), c) for c, n in enumerate(source * 1000)]).view(1, 1, -1)
    ent = torch.zeros(labels.shape, dtype=torch.float32)

    def fit(adjust: torch.Tensor | None) -> torch.Tensor:
        z = torch.zeros(3, requires_grad=True)
        opt = torch.optim.LBFGS([z], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = z.view(1, 3, 1, 1).expand(1, 3, 1, labels.shape[-1])
            loss = unsup_loss(logits, labels, ent, torch.tensor(1.0), "mean", 255, adjust)[0]
            loss.backward()
            return loss

        opt.step(closure)
        return torch.softmax(z.detach(), 0)

    assert torch.allclose(fit(None), source, atol=1e-3)
    assert torch.allclose(fit(prior_adjustment(source, target)), target, atol=1e-3)


def test_prior_adjustment_tracks_the_kept_pseudo_labels_and_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    m, run, _, _ = _teacher_run("u2pl.sup_only_iters=1", "u2pl.unsup_prior_adjust=true", "u2pl.align_momentum=0.5")
    from semiseg_cli.methods import u2pl as u2pl_module

    real, seen = u2pl_module.unsup_loss, []

    def spy(logits, target, ent, thresh, norm, ignore, adjust=None):  # type: ignore[no-untyped-def]
        loss, keep = real(logits, target, ent, thresh, norm, ignore, adjust)
        freq = torch.bincount(target[keep].flatten(), minlength=4).float()
        seen.append((freq / freq.sum(), adjust.clone()))
        return loss, keep

    monkeypatch.setattr(u2pl_module, "unsup_loss", spy)
    lab, _ = batches_for(m, 4)
    counts = torch.bincount(lab["mask"][lab["mask"] != 255].flatten(), minlength=4).double()
    run(0)  # warm-up: labels counted, no pseudo-labels yet
    assert not m.pl_prior.any() and not seen
    run(1)  # first semi step: the prior is this batch's kept pseudo-label frequencies
    assert torch.allclose(m.pl_prior, seen[0][0], atol=1e-6)
    label_prior = (counts / counts.sum()).float()
    assert torch.allclose(seen[0][1], prior_adjustment(seen[0][0], label_prior), atol=1e-5)
    run(2)  # then an EMA with the momentum, and the loss uses the updated prior
    assert torch.allclose(m.pl_prior, 0.5 * seen[0][0] + 0.5 * seen[1][0], atol=1e-6)
    assert torch.allclose(seen[1][1], prior_adjustment(m.pl_prior, label_prior), atol=1e-5)
    shift = m.extra_log()
    assert shift["prior_adjust/c1"] == pytest.approx(float(seen[1][1][1]), rel=1e-4, abs=1e-6)
    assert {"label_counts", "pl_prior"} <= m.state_dict().keys() and "pred_prior" not in m.state_dict()
    plain = build_method(make_cfg("u2pl", overrides=FAST), 4)
    assert "pl_prior" not in plain.state_dict()


def test_ema_decay_schedule_caps_at_the_configured_decay() -> None:
    m = build_method(make_cfg("u2pl", overrides=[*FAST, "u2pl.ema_decay=0.9"]), 4)
    assert [m.teacher.decay_at(t) for t in (0, 1, 3, 100)] == [0.0, 0.5, 0.75, 0.9]


def test_method_schedules_use_the_epoch_length() -> None:
    m = build_method(make_cfg("u2pl", overrides=[*FAST, "u2pl.epoch_iters=2"]), 4)  # 4 iters = 2 epochs
    assert m.schedules(1) == (80.0, 20.0) and m.schedules(2) == (90.0, 10.0)
    held = build_method(make_cfg("u2pl", overrides=[*FAST, "u2pl.epoch_iters=2", "u2pl.drop_percent_end=80"]), 4)
    assert held.schedules(2) == (80.0, 10.0)  # p_t held at 80; alpha_t still falls
    m2 = build_method(make_cfg("u2pl", overrides=FAST), 4, unlabeled_size=8)  # 8 / batch 2 = 4 iters
    assert m2.sup_only_iters() == 4 and m2.teacher_reset_iters() == 4


def test_inference_model_has_the_rep_head_so_checkpoints_load() -> None:
    cfg = make_cfg("u2pl", overrides=FAST)
    assert cfg.model.rep_head is False
    net = U2PL.build_inference_model(cfg, 4)
    assert getattr(net, "rep", None) is not None
    assert U2PL.build_inference_model(make_cfg("u2pl", overrides=["u2pl.contrastive=false"]), 4).rep is None


@pytest.mark.parametrize("num_classes", [2, 3])
def test_few_classes_refuse_an_empty_rank_window_with_a_fix(num_classes: int) -> None:
    cfg = make_cfg("u2pl")
    with pytest.raises(UserError, match=rf"u2pl.low_rank=1 u2pl.high_rank={num_classes} or u2pl.contrastive=false"):
        U2PL.check_config(cfg, num_classes)
    fixed = make_cfg("u2pl", overrides=["u2pl.low_rank=1", f"u2pl.high_rank={num_classes}"])
    U2PL.check_config(fixed, num_classes)
    U2PL.check_config(make_cfg("u2pl", overrides=["u2pl.contrastive=false"]), num_classes)
    U2PL.check_config(cfg, 4)  # [3, 4) is a window of one class: allowed


def test_contrastive_needs_the_deeplabv3plus_decoder() -> None:
    with pytest.raises(UserError, match="deeplabv3plus"):
        U2PL.check_config(make_cfg("u2pl", overrides=['model.arch="deeplabv2"']), 21)


def test_end_to_end_training_through_the_loop(demo_root: Path, tmp_path: Path) -> None:
    from semiseg_cli.engine.checkpoint import load_checkpoint
    from semiseg_cli.engine.loop import train

    out = tmp_path / "u2pl"
    cfg = make_cfg("u2pl", root=str(demo_root), out=str(out), overrides=['data.labeled="1/2"', *FAST, "u2pl.sup_only_iters=1", "train.iters=3"])
    res = train(cfg, progress=False)
    assert res.step == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert "loss_contra" in steps[-1] and "queue_fill_mean" in steps[-1] and "reliable_frac" in steps[-1]
    assert steps[-1]["queue_fill_mean"] > 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["has_teacher"]
    net = U2PL.build_inference_model(cfg, ckpt["num_classes"])
    net.load_state_dict(ckpt["inference_state"])
    assert any(k.startswith("bank.") for k in ckpt["method_state"])
