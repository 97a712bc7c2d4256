"""Paired transforms keep image and mask aligned through scale, pad, crop and flip; the batch-level
strong photometric view does what its parameters say."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_cli.data import EvalTransform, TrainTransform, denormalize
from semiseg_cli.data.transforms import normalize, strong_photometric

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
    x, y, inside = t(image, mask)
    assert x.shape == (3, 64, 72) and y.shape == (64, 72) and y.dtype == torch.long
    # `valid` marks the image, not the padding: the mask's own padding (255 outside it) agrees.
    assert inside.dtype == torch.bool and not ((y != 255) & ~inside).any()
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
    x, y, inside = t(image, mask)  # scaled to 40x48, padded to 128x128
    pad = (y == 255).numpy()
    assert pad.sum() == 128 * 128 - 40 * 48
    assert torch.equal(inside, ~torch.from_numpy(pad)) and inside[:40, :48].all()
    assert x[:, torch.from_numpy(pad)].abs().max() < 0.02


def test_same_seed_same_crop_and_masks_optional() -> None:
    image, mask = _encoded_pair()
    t = TrainTransform(48, (0.75, 1.5), True, *IDENTITY)
    random.seed(3)
    a = t(image, mask)
    random.seed(3)
    b = t(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y, inside = t(image, None)
    assert y is None and x.shape == (3, 48, 48) and inside.shape == (48, 48)


def test_eval_transform_and_denormalize_round_trip() -> None:
    image, mask = _encoded_pair()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x, y = EvalTransform(mean, std)(image, mask)
    assert x.shape == (3, 80, 96) and torch.equal(y, torch.from_numpy(mask).long())
    back = denormalize(x, mean, std)
    assert torch.allclose(back * 255, torch.from_numpy(np.array(image)).permute(2, 0, 1).float(), atol=1e-3)
    assert denormalize(x[None], mean, std).shape == (1, 3, 80, 96)
    assert EvalTransform(mean, std)(image, None)[1] is None


# ----------------------------------------------------------------------------- strong photometric view

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalised(img01: torch.Tensor) -> torch.Tensor:
    return normalize(img01, MEAN, STD)


def test_normalize_inverts_denormalize() -> None:
    x = torch.rand(2, 3, 4, 5)
    assert torch.allclose(denormalize(normalize(x, MEAN, STD), MEAN, STD), x, atol=1e-6)
    assert torch.allclose(normalize(x[0], MEAN, STD)[1], (x[0, 1] - MEAN[1]) / STD[1])


def test_strong_photometric_with_every_probability_zero_returns_the_batch() -> None:
    x = _normalised(torch.rand(3, 3, 12, 16))
    y = strong_photometric(x, MEAN, STD, p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(y, x, atol=1e-5)


def test_strong_photometric_grayscale_makes_the_channels_equal() -> None:
    x = _normalised(torch.rand(2, 3, 8, 8))
    y = denormalize(strong_photometric(x, MEAN, STD, p_jitter=0.0, p_gray=1.0, p_blur=0.0), MEAN, STD)
    assert torch.allclose(y[:, 0], y[:, 1], atol=1e-5) and torch.allclose(y[:, 1], y[:, 2], atol=1e-5)
    assert not torch.allclose(y, denormalize(x, MEAN, STD), atol=1e-3)


def test_strong_photometric_blur_smooths_but_keeps_a_flat_image_flat() -> None:
    checker = (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2
    x = _normalised(checker.float().expand(1, 3, 16, 16).clone())
    flat = _normalised(torch.full((1, 3, 16, 16), 0.3))
    y = denormalize(strong_photometric(torch.cat([x, flat]), MEAN, STD, p_jitter=0.0, p_gray=0.0, p_blur=1.0, sigma=(1.0, 2.0)), MEAN, STD)
    assert float(y[0].std()) < 0.5 * float(checker.float().std())
    assert torch.allclose(y[1], torch.full_like(y[1], 0.3), atol=1e-4)


def test_strong_photometric_draws_per_image_stays_in_range_and_is_seeded() -> None:
    img = torch.rand(1, 3, 10, 10).expand(4, 3, 10, 10).clone()  # four copies of one image
    x = _normalised(img)
    torch.manual_seed(3)
    y = strong_photometric(x, MEAN, STD, p_jitter=1.0, p_gray=0.0, p_blur=0.0)
    torch.manual_seed(3)
    assert torch.equal(y, strong_photometric(x, MEAN, STD, p_jitter=1.0, p_gray=0.0, p_blur=0.0))
    y01 = denormalize(y, MEAN, STD)
    assert float(y01.min()) >= -1e-5 and float(y01.max()) <= 1 + 1e-5
    # Each copy got its own factors: no two outputs alike, all different from the input.
    for i in range(4):
        assert not torch.allclose(y[i], x[i], atol=1e-3)
        for j in range(i + 1, 4):
            assert not torch.allclose(y[i], y[j], atol=1e-3)


def test_strong_photometric_brightness_alone_scales_the_pixels() -> None:
    img = torch.rand(2, 3, 6, 6) * 0.5  # room to brighten without clipping
    torch.manual_seed(0)
    u = torch.rand(2, 8)
    torch.manual_seed(0)
    y01 = denormalize(strong_photometric(_normalised(img), MEAN, STD, jitter=(0.5, 0.0, 0.0, 0.0), p_jitter=1.0, p_gray=0.0, p_blur=0.0), MEAN, STD)
    factor = 1 + (2 * u[:, 1] - 1) * 0.5  # the documented draw: brightness in [0.5, 1.5]
    assert torch.allclose(y01, img * factor.view(2, 1, 1, 1), atol=1e-4)


def test_training_items_carry_where_the_image_is(folder_root) -> None:  # type: ignore[no-untyped-def]
    """A 24x24 image in a 40x40 crop: `valid` is the image's share of the crop, so methods that
    label pixels themselves (DuPL) can leave the padding out; evaluation items have no `valid`."""
    from semiseg_cli.config import build_config
    from semiseg_cli.data import build_dataset, get_layout

    cfg = build_config(None, ['data.dataset="folder"', f'data.root="{folder_root}"', "data.crop_size=[40, 40]",
                              "data.scale_range=[1.0, 1.0]"]).data
    pairs = get_layout("folder", folder_root).list_pairs("train")
    random.seed(0)
    item = build_dataset(cfg, pairs, train=True)[0]
    assert item["valid"].shape == (40, 40) and int(item["valid"].sum()) == 24 * 24
    assert not ((item["mask"] != 255) & ~item["valid"]).any()
    assert "valid" not in build_dataset(cfg, pairs, train=False)[0]
