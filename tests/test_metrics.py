"""Confusion-matrix metrics against hand-computed values."""

from __future__ import annotations

import math

import torch

from semiseg_cli.metrics import ConfusionMatrix


def test_hand_computed_matrix() -> None:
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm.update(pred, target)
    # rows = gt, cols = pred; the ignored pixel (255) is not counted.
    assert cm.mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = cm.compute()
    # IoU_c = tp / (gt + pred - tp)
    assert math.isclose(m.iou[0], 2 / (3 + 3 - 2))
    assert math.isclose(m.iou[1], 2 / (2 + 3 - 2))
    assert math.isclose(m.iou[2], 1 / (2 + 1 - 1))
    assert math.isclose(m.miou, (0.5 + 2 / 3 + 0.5) / 3)
    assert math.isclose(m.aacc, 5 / 7)
    assert math.isclose(m.macc, (2 / 3 + 1 + 0.5) / 3)


def test_absent_classes_are_nan_and_left_out_of_the_mean() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    m = cm.compute()
    assert math.isnan(m.iou[2]) and math.isnan(m.iou[3])
    assert m.absent == [2, 3]
    assert math.isclose(m.miou, (0.5 + 0.5) / 2)
    report = m.as_dict(["a", "b", "c", "d"])
    assert report["per_class"]["c"]["IoU"] is None
    assert report["absent_classes"] == ["c", "d"]


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([2, 1]), torch.tensor([0, 1]))
    m = cm.compute()
    assert m.iou[2] == 0.0 and m.iou[0] == 0.0 and m.iou[1] == 1.0
    assert math.isclose(m.miou, 1 / 3)


def test_rejects_out_of_range_targets() -> None:
    cm = ConfusionMatrix(2)
    try:
        cm.update(torch.tensor([0]), torch.tensor([5]))
    except ValueError as e:
        assert "outside" in str(e)
    else:
        raise AssertionError("expected ValueError")
