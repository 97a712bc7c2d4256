"""Paired transforms keep image and mask aligned through scale, pad, crop and flip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_cli.data import EvalTransform, TrainTransform, denormalize

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
# Far-apart colours, so a resampled pixel maps back to its class unambiguously.
COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)


def _encoded_pair(seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """An asymmetric 80x96 mask of 16px blocks and an image whose colours spell it out."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, len(COLOURS), (5, 6)), np.ones((16, 16), int)).astype(np.uint8)
    return Image.fromarray(COLOURS[mask]), mask


def _decode(image: torch.Tensor) -> np.ndarray:
    """Class per pixel from the nearest colour of a (denormalised) image tensor."""
    rgb = (image.permute(1, 2, 0).numpy() * 255).reshape(-1, 1, 3)
    dist = ((rgb - COLOURS[None].astype(np.float32)) ** 2).sum(-1)
    return dist.argmin(1).reshape(image.shape[1:])


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours share their class."""
    c = mask[1:-1, 1:-1]
    out = np.zeros(mask.shape, bool)
    out[1:-1, 1:-1] = (c == mask[:-2, 1:-1]) & (c == mask[2:, 1:-1]) & (c == mask[1:-1, :-2]) & (c == mask[1:-1, 2:])
    return out


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_image_and_mask_aligned(seed: int) -> None:
    image, mask = _encoded_pair()
    t = TrainTransform((64, 72), (0.5, 2.0), True, *IDENTITY)
    random.seed(seed)
    x, y = t(image, mask)
    assert x.shape == (3, 64, 72) and y.shape == (64, 72) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= set(range(len(COLOURS))) | {255}  # nearest: no new ids
    y_np, decoded = y.numpy(), _decode(x)
    valid = y_np != 255
    assert (decoded == y_np)[valid].mean() > 0.97
    # Away from block edges bilinear blending cannot explain a difference: demand exact agreement.
    inner = _interior(y_np) & valid
    assert inner.sum() > 1000 and (decoded == y_np)[inner].all()


def test_padding_is_ignore_in_the_mask_and_zero_after_normalisation() -> None:
    image, mask = _encoded_pair()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = TrainTransform(128, (0.5, 0.5), False, mean, std)
    x, y = t(image, mask)  # scaled to 40x48, padded to 128x128
    pad = (y == 255).numpy()
    assert pad.sum() == 128 * 128 - 40 * 48
    assert x[:, torch.from_numpy(pad)].abs().max() < 0.02


def test_same_seed_same_crop_and_masks_optional() -> None:
    image, mask = _encoded_pair()
    t = TrainTransform(48, (0.75, 1.5), True, *IDENTITY)
    random.seed(3)
    a = t(image, mask)
    random.seed(3)
    b = t(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = t(image, None)
    assert y is None and x.shape == (3, 48, 48)


def test_eval_transform_and_denormalize_round_trip() -> None:
    image, mask = _encoded_pair()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x, y = EvalTransform(mean, std)(image, mask)
    assert x.shape == (3, 80, 96) and torch.equal(y, torch.from_numpy(mask).long())
    back = denormalize(x, mean, std)
    assert torch.allclose(back * 255, torch.from_numpy(np.array(image)).permute(2, 0, 1).float(), atol=1e-3)
    assert denormalize(x[None], mean, std).shape == (1, 3, 80, 96)
    assert EvalTransform(mean, std)(image, None)[1] is None
