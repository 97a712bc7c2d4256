"""Paired transforms: the image and its mask always get the same geometry.

The image is resampled bilinearly and the mask with nearest neighbour, so mask values stay class
ids (interpolating ids would invent classes at boundaries). Randomness comes from Python's
`random` module, which the loaders seed per sample; numpy's global state is never used, since
forked workers would otherwise repeat the same crops.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

IGNORE = 255


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def to_tensor(image: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float (contiguous).

    The bytes are put in channel order first (one uint8 copy, which also takes care of a flipped
    view), so that the float work runs over contiguous memory: several times faster than on the
    channels-last view, and the same values, since every step is one rounded operation per
    element ((x / 255 - mean) / std, in place)."""
    arr = np.asarray(image, dtype=np.uint8)
    x = torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C")).float().div_(255.0)
    m, s = _mean_std(x, mean, std)
    return x.sub_(m).div_(s)


def mask_to_tensor(mask: np.ndarray | None) -> torch.Tensor | None:
    return None if mask is None else torch.from_numpy(mask.astype(np.int64))  # a copy: masks from PIL are read-only


def _mean_std(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    return m, torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the normalisation of a 3xHxW or Bx3xHxW tensor (back to about 0..1, for viewing)."""
    m, s = _mean_std(x, mean, std)
    return x * s + m


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise a 3xHxW or Bx3xHxW tensor in 0..1 (the inverse of `denormalize`)."""
    m, s = _mean_std(x, mean, std)
    return (x - m) / s


def strong_photometric(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    p_blur: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The image-level "strong" perturbation of FixMatch-style segmentation (ST++, UniMatch), on a
    normalised (B, 3, H, W) batch already on its device; no geometry, so labels stay aligned.

    Per image, each with its own draw: with probability `p_jitter` a colour jitter (brightness,
    contrast and saturation factors uniform in [1 - j, 1 + j], hue shift uniform in [-j, j], in
    that fixed order), with `p_gray` grayscale, with `p_blur` a Gaussian blur of sigma uniform in
    `sigma` (kernel 2*ceil(3 sigma) + 1). Random numbers come from the CPU generator (no device
    sync, reproducible with `torch.manual_seed`). Returns a new normalised batch.
    """
    b = x.shape[0]
    img = denormalize(x.float(), mean, std).clamp(0, 1)
    u = torch.rand(b, 8, generator=generator)
    jb, jc, js, jh = jitter
    fac = 1 + (2 * u[:, 1:4] - 1) * torch.tensor([jb, jc, js])  # brightness, contrast, saturation
    hue = (2 * u[:, 4] - 1) * jh
    coin = lambda i, p: (u[:, i] < p).view(b, 1, 1, 1).to(img.device)  # noqa: E731
    view = lambda v: v.view(b, 1, 1, 1).to(img.device, img.dtype)  # noqa: E731
    jit = coin(0, p_jitter)
    out = (img * view(fac[:, 0])).clamp(0, 1)
    gray_mean = TF.rgb_to_grayscale(out).mean((1, 2, 3), keepdim=True)
    out = (gray_mean + view(fac[:, 1]) * (out - gray_mean)).clamp(0, 1)
    gray = TF.rgb_to_grayscale(out)
    out = (gray + view(fac[:, 2]) * (out - gray)).clamp(0, 1)
    out = torch.stack([TF.adjust_hue(o, float(h)) if h != 0 else o for o, h in zip(out, hue)])
    img = torch.where(jit, out, img)
    img = torch.where(coin(5, p_gray), TF.rgb_to_grayscale(img, num_output_channels=3), img)
    s = sigma[0] + u[:, 7] * (sigma[1] - sigma[0])
    k_max = 2 * min(x.shape[-2:]) - 1  # reflect padding needs the half-kernel inside the image
    kernels = (2 * torch.ceil(3 * s).long() + 1).clamp(max=k_max).tolist()
    blurred = [
        TF.gaussian_blur(im, [k, k], [float(sg), float(sg)]) if float(v) < p_blur else im
        for im, sg, v, k in zip(img, s, u[:, 6], kernels)
    ]
    img = torch.stack(blurred)
    return normalize(img, mean, std).to(x.dtype)


class EvalTransform:
    """No geometry: the network sees the whole image at its stored (or `resize`d) size."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, mask: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return to_tensor(image.convert("RGB"), self.mean, self.std), mask_to_tensor(mask)


class TrainTransform:
    """Random scale, pad to the crop, random crop, random horizontal flip, normalise.

    `crop_size` is (height, width). Padding uses the mean colour for the image, so padded pixels
    are 0 after normalisation, and `ignore_index` for the mask, so they never count in the loss.
    Returns (image, mask, valid): `valid` (H,W bool) is False on the padding, for methods that
    make their own labels (DuPL's CAM pseudo-labels must not cover pixels outside the image).
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        scale_range: Sequence[float] = (0.5, 2.0),
        flip: bool = True,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        ignore_index: int = IGNORE,
    ) -> None:
        self.crop = _pair(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        self.fill = tuple(int(round(255 * m)) for m in self.mean)

    def __call__(
        self, image: Image.Image, mask: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        image = image.convert("RGB")
        if mask is not None and mask.shape != (image.size[1], image.size[0]):
            raise ValueError(f"mask {mask.shape} and image {image.size[::-1]} differ in size")
        img, msk = self._scale(image, mask)
        h, w = img.shape[:2]
        img, msk = self._pad(img, msk)
        img, msk, (top, left) = self._crop(img, msk)
        ch, cw = self.crop
        valid = np.zeros((ch, cw), bool)
        valid[: max(0, h - top), : max(0, w - left)] = True
        if self.flip and random.random() < 0.5:
            img = img[:, ::-1]
            msk = None if msk is None else msk[:, ::-1]
            valid = valid[:, ::-1]
        return to_tensor(img, self.mean, self.std), mask_to_tensor(msk), torch.from_numpy(valid.copy())

    def _scale(self, image: Image.Image, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        s = random.uniform(*self.scale_range)
        w, h = image.size
        size = (max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5)))
        img = np.asarray(image.resize(size, Image.BILINEAR))
        if mask is None:
            return img, None
        return img, np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))

    def _pad(self, img: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        ch, cw = self.crop
        h, w = img.shape[:2]
        if h >= ch and w >= cw:
            return img, mask
        H, W = max(h, ch), max(w, cw)
        out = np.empty((H, W, 3), np.uint8)
        out[:] = self.fill
        out[:h, :w] = img
        if mask is None:
            return out, None
        dtype = np.uint8 if 0 <= self.ignore_index <= 255 else np.int64
        m = np.full((H, W), self.ignore_index, dtype)
        m[:h, :w] = mask
        return out, m

    def _crop(
        self, img: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        ch, cw = self.crop
        h, w = img.shape[:2]
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        img = img[top : top + ch, left : left + cw]
        return img, None if mask is None else mask[top : top + ch, left : left + cw], (top, left)
