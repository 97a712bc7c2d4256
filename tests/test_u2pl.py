"""U2PL: each loss on a case small enough to check by hand, then the method through the shared
checks (past the warm-up, so the representation head must get gradients), the EMA schedule and
reset, the prior-adjustment hook (off: the paper's loss), the config guards for few-class data
and removed options, and one tiny end-to-end run through the loop."""

from __future__ import annotations

import json
import math
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.config import build_config
from semiseg_cli.errors import UserError
from semiseg_cli.methods.params import U2PLParams
from semiseg_cli.methods.u2pl import U2PL
from semiseg_cli.methods.u2pl_losses import (
    MemoryBank,
    PriorAdjustment,
    alpha_at,
    contrastive_loss,
    contrastive_masks,
    cutmix,
    cutmix_box_mask,
    drop_percent_at,
    epoch_fraction,
    infonce,
    last_per_class,
    reliable_split,
    resize_nearest,
    sample_anchors,
    unsup_loss,
)
from semiseg_cli.ops import keep_low_entropy, percentiles
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
    assert float(percentiles(ent, None, [75.0])[0]) == pytest.approx(3.0)
    keep = keep_low_entropy(ent, 75.0, target != 255, scope="batch")
    assert keep.flatten().tolist() == [True, True, True, False, False]
    loss = unsup_loss(logits, target, keep)
    assert float(loss) == pytest.approx(float(ce[:3].mean() * 5 / 3), rel=1e-6)  # mean x B*H*W/#kept
    # 80th percentile is 3.2: pixel 3 comes back.
    keep80 = keep_low_entropy(ent, 80.0, target != 255, scope="batch")
    assert int(keep80.sum()) == 4
    assert float(unsup_loss(logits, target, keep80)) == pytest.approx(float(ce[:4].mean() * 5 / 4), rel=1e-6)


def test_the_batch_drop_keeps_valid_pixels_below_the_percentile_of_the_valid_ones() -> None:
    """`keep_low_entropy(scope="batch")` is U2PL's drop: one threshold over the batch's valid
    pixels (the p_t-th percentile), strict `<` (ties with the threshold dropped), invalid pixels
    never kept."""
    g = torch.Generator().manual_seed(1)
    ent = torch.rand(3, 5, 7, generator=g)
    ent[0, 0, :4] = ent[1, 1, 1]  # ties
    valid = torch.rand(3, 5, 7, generator=g) > 0.2
    valid[0, 0, :4] = valid[1, 1, 1] = True
    for pct in (0.0, 37.5, 80.0, 100.0):
        thresh = percentiles(ent, valid, [pct])[0]
        assert float(thresh) == pytest.approx(float(np.percentile(ent[valid].numpy(), pct)), abs=1e-6)
        keep = keep_low_entropy(ent, pct, valid, scope="batch")
        assert torch.equal(keep, valid & (ent < thresh)), pct
    # A percentile that lands exactly on the tied value: all five tied pixels go, those below stay.
    tie, v = ent[1, 1, 1], ent[valid]
    keep = keep_low_entropy(ent, 100.0 * int((v < tie).sum()) / (v.numel() - 1), valid)
    assert not keep[0, 0, :4].any() and not keep[1, 1, 1] and torch.equal(keep, valid & (ent < tie))


def test_reliable_split_takes_the_lowest_and_highest_alpha_percent() -> None:
    ent = torch.arange(10, dtype=torch.float32).view(1, 2, 5)
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    valid[0, 1, 4] = False  # entropy 9 is ignored: the valid ones are 0..8
    reliable, unreliable = reliable_split(ent, valid, 25.0)  # percentiles 2 and 6 of 0..8
    assert ent[reliable].tolist() == [0.0, 1.0, 2.0] and ent[unreliable].tolist() == [6.0, 7.0, 8.0]
    reliable0, unreliable0 = reliable_split(ent, valid, 0.0)  # alpha_t = 0: only the extremes
    assert ent[reliable0].tolist() == [0.0] and ent[unreliable0].tolist() == [8.0]


def test_unsup_loss_with_nothing_kept_is_zero_but_keeps_the_graph() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = unsup_loss(logits, torch.full((1, 2, 2), 255), torch.zeros(1, 2, 2, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
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


def test_cutmix_is_the_only_strong_augmentation() -> None:
    """As the paper: with CutMix off the student sees the very images the teacher labeled."""
    torch.manual_seed(0)
    overrides = [*FAST, "u2pl.sup_only_iters=1", "u2pl.cutmix_prob=0.0"]
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
    assert torch.equal(seen["student"][n_l:], unl["image"])


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


# ----------------------------------------------------------------------------- prior adjustment (not in the paper)


def _hook(label_prior: list[float], pl_prior: list[float]) -> PriorAdjustment:
    h = PriorAdjustment(len(label_prior))
    h.label_counts.copy_(torch.tensor(label_prior, dtype=torch.float64) * 1000)
    h.pl_prior.copy_(torch.tensor(pl_prior))
    return h


def test_prior_adjustment_offsets_are_log_pseudo_label_prior_minus_log_label_prior() -> None:
    assert torch.allclose(_hook([0.4, 0.6], [0.1, 0.9]).offsets(), torch.tensor([math.log(0.25), math.log(1.5)]))
    assert torch.allclose(_hook([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]).offsets(), torch.zeros(3), atol=1e-6)  # no shift
    assert _hook([0.5, 0.5], [0.5, 0.5]).offsets().dtype == torch.float32


def test_prior_adjustment_counts_labels_and_keeps_an_ema_of_the_kept_pseudo_labels() -> None:
    h = PriorAdjustment(3, momentum=0.5)
    h.count_labels(torch.tensor([[0, 0, 1, 255, 7]]))  # ignore and out-of-range labels are not counted
    assert h.label_counts.tolist() == [2.0, 1.0, 0.0] and h.label_counts.dtype == torch.float64
    pl = torch.tensor([[0, 1, 1, 2]])
    h.update(pl, torch.tensor([[True, True, True, False]]))  # the first batch sets the prior
    first = torch.tensor([1 / 3, 2 / 3, 0.0])
    assert torch.allclose(h.pl_prior, first)
    h.update(torch.tensor([[2, 2, 0, 1]]), torch.tensor([[True, True, False, False]]))  # then an EMA
    assert torch.allclose(h.pl_prior, 0.5 * first + 0.5 * torch.tensor([0.0, 0.0, 1.0]))
    before = h.pl_prior.clone()
    h.update(pl, torch.zeros(1, 4, dtype=torch.bool))  # nothing kept: left as it is
    assert torch.equal(h.pl_prior, before)


def test_unsup_loss_adds_the_offsets_to_every_pixels_logits() -> None:
    # Two classes, zero logits, target 0, every pixel kept (so the official re-weighting is 1):
    # the offsets (0, ln 3) make the softmax (1/4, 3/4).
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    keep = torch.ones(1, 1, 2, dtype=torch.bool)
    adjust = torch.tensor([0.0, math.log(3.0)])
    assert unsup_loss(logits, target, keep, 255, adjust).item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert unsup_loss(logits, target, keep).item() == pytest.approx(math.log(2.0))


def test_prior_adjustment_makes_the_loss_fit_the_labeled_prior_not_the_pseudo_labels() -> None:
    """Targets drawn with the pseudo-labels' frequencies (class 2 rare): plain CE learns those
    frequencies; with the offsets the raw logits' softmax learns the labeled prior instead."""
    source = [0.6, 0.38, 0.02]  # kept pseudo-labels
    target = [0.5, 0.3, 0.2]  # labeled pixels
    labels = torch.cat([torch.full((int(round(n * 1000)),), c) for c, n in enumerate(source)]).view(1, 1, -1)
    keep = torch.ones(labels.shape, dtype=torch.bool)

    def fit(adjust: torch.Tensor | None) -> torch.Tensor:
        z = torch.zeros(3, requires_grad=True)
        opt = torch.optim.LBFGS([z], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = z.view(1, 3, 1, 1).expand(1, 3, 1, labels.shape[-1])
            loss = unsup_loss(logits, labels, keep, 255, adjust)
            loss.backward()
            return loss

        opt.step(closure)
        return torch.softmax(z.detach(), 0)

    assert torch.allclose(fit(None), torch.tensor(source), atol=1e-3)
    assert torch.allclose(fit(_hook(target, source).offsets()), torch.tensor(target), atol=1e-3)


def _spy_unsup_loss(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    from semiseg_cli.methods import u2pl as u2pl_module

    real, seen = u2pl_module.unsup_loss, []

    def spy(logits, target, keep, ignore, adjust=None):  # type: ignore[no-untyped-def]
        loss = real(logits, target, keep, ignore, adjust)
        seen.append(dict(logits=logits.detach().clone(), target=target, keep=keep, adjust=adjust, loss=loss.detach()))
        return loss

    monkeypatch.setattr(u2pl_module, "unsup_loss", spy)
    return seen


def test_without_the_hook_the_unsupervised_loss_is_the_papers_and_with_it_only_the_offsets_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _spy_unsup_loss(monkeypatch)
    common = [*FAST, "u2pl.sup_only_iters=0", "u2pl.teacher_reset=false", "u2pl.contrastive=false"]
    runs = {}
    for on in (False, True):
        torch.manual_seed(0)
        m = build_method(make_cfg("u2pl", overrides=[*common, f"u2pl.unsup_prior_adjust={str(on).lower()}"]), 4)
        m.train()
        assert (m.prior_adjust is not None) == on
        lab, unl = batches_for(m, 4)
        torch.manual_seed(1)
        runs[on] = m.training_step(lab, unl, 0)
    off, on = seen
    # Off: no offsets, and the loss is the official normalisation of the CE on the kept pixels.
    assert off["adjust"] is None
    tgt = torch.where(off["keep"], off["target"], torch.full_like(off["target"], 255))
    ce = F.cross_entropy(off["logits"], tgt, ignore_index=255, reduction="none")[off["keep"]]
    kept = off["keep"].sum()
    assert torch.allclose(runs[False]["loss_unsup"], ce.sum() / kept * (off["target"].numel() / kept), rtol=1e-6)
    # On: the same student, pseudo-labels and drop; the offsets are log(pi_pl) - log(pi_lab) of
    # this first semi-supervised batch (kept pseudo-labels vs labeled pixels).
    assert torch.equal(on["logits"], off["logits"]) and torch.equal(on["keep"], off["keep"])
    assert torch.equal(runs[True]["loss_sup"], runs[False]["loss_sup"])
    pi_pl = torch.bincount(on["target"][on["keep"]], minlength=4).double()
    pi_lab = torch.bincount(lab["mask"][lab["mask"] != 255], minlength=4).double()
    want = torch.log((pi_pl / pi_pl.sum()).float().clamp_min(1e-6)) - torch.log((pi_lab / pi_lab.sum()).float().clamp_min(1e-6))
    assert torch.allclose(on["adjust"], want, atol=1e-6)
    adjusted = F.cross_entropy(on["logits"] + want.view(1, -1, 1, 1), tgt, ignore_index=255, reduction="none")[on["keep"]]
    assert torch.allclose(runs[True]["loss_unsup"], adjusted.sum() / kept * (on["target"].numel() / kept), rtol=1e-6)


def test_prior_adjustment_tracks_the_kept_pseudo_labels_and_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    m, run, _, _ = _teacher_run("u2pl.sup_only_iters=1", "u2pl.unsup_prior_adjust=true")
    m.prior_adjust.momentum = 0.5
    seen = _spy_unsup_loss(monkeypatch)
    lab, _ = batches_for(m, 4)
    counts = torch.bincount(lab["mask"][lab["mask"] != 255].flatten(), minlength=4).double()

    def kept_freq(call: dict[str, Any]) -> torch.Tensor:
        f = torch.bincount(call["target"][call["keep"]], minlength=4).float()
        return f / f.sum()

    run(0)  # warm-up: labels counted, no pseudo-labels yet
    assert torch.equal(m.prior_adjust.label_counts, counts) and not m.prior_adjust.pl_prior.any() and not seen
    assert "prior_adjust/c1" not in m.extra_log()
    run(1)  # first semi step: the prior is this batch's kept pseudo-label frequencies
    assert torch.equal(m.prior_adjust.label_counts, 2 * counts)
    assert torch.allclose(m.prior_adjust.pl_prior, kept_freq(seen[0]), atol=1e-6)
    label_prior = (counts / counts.sum()).float()
    assert torch.allclose(seen[0]["adjust"], torch.log(kept_freq(seen[0]).clamp_min(1e-6)) - torch.log(label_prior.clamp_min(1e-6)), atol=1e-5)
    run(2)  # then an EMA with the momentum, and the loss uses the updated prior
    assert torch.allclose(m.prior_adjust.pl_prior, 0.5 * kept_freq(seen[0]) + 0.5 * kept_freq(seen[1]), atol=1e-6)
    assert torch.equal(seen[1]["adjust"], m.prior_adjust.offsets())
    assert m.extra_log()["prior_adjust/c1"] == pytest.approx(float(seen[1]["adjust"][1]), rel=1e-6)
    state = m.state_dict()
    assert {"prior_adjust.label_counts", "prior_adjust.pl_prior"} <= state.keys()
    plain = build_method(make_cfg("u2pl", overrides=FAST), 4)  # off (the paper): no such state
    assert not any(k.startswith("prior_adjust.") or k in ("label_counts", "pl_prior") for k in plain.state_dict())
    # Checkpoints written before the hook was a module kept its buffers on the method: they load.
    old = {k.removeprefix("prior_adjust."): v for k, v in state.items()}
    fresh, _, _, _ = _teacher_run("u2pl.sup_only_iters=1", "u2pl.unsup_prior_adjust=true")
    fresh.load_state_dict(old)  # strict
    assert torch.equal(fresh.prior_adjust.pl_prior, m.prior_adjust.pl_prior)
    assert torch.equal(fresh.prior_adjust.label_counts, m.prior_adjust.label_counts)


# ----------------------------------------------------------------------------- removed options


def test_removed_options_load_at_the_behaviour_that_remains_and_are_refused_otherwise() -> None:
    for key, kept in U2PLParams.REMOVED.items():
        assert key not in U2PLParams.model_fields
        assert key not in U2PLParams.model_validate({key: kept}).model_dump()  # older checkpoints' configs
    with pytest.raises(UserError, match=r"u2pl\.negative_mask = 'code' was removed .*delete the key"):
        build_config(None, ['u2pl.negative_mask="code"'], "u2pl")
    with pytest.raises(UserError, match=r"u2pl\.pseudo_label_align = 'distribution' was removed"):
        build_config(None, ['u2pl.pseudo_label_align="distribution"'], "u2pl")
    assert build_config(None, ["u2pl.ema_buffers=true", "u2pl.align_momentum=0.99"], "u2pl").u2pl == U2PLParams()


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
