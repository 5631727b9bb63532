"""The release's image processor (SIGLINO_FACTS.md §6), reproduced exactly.

    image -> RGB uint8 -> smart_resize to multiples of 16 within [min_pixels, max_pixels]
          -> Pillow BICUBIC -> float32 /255 -> (x - 0.5) / 0.5 -> patches (row, col, channel) in raster order

`__call__` batches images with zero padding, a padding mask and int64 spatial shapes, and its result
can be passed straight to `Student.forward(**batch)`. `to_tensor` gives the normalised CHW tensor
used by `Student.forward_packed`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 128 * 128,
                 max_pixels: int = 256 * 256, strict: bool = True) -> tuple[int, int]:
    """Target (H', W'): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.
    Rounding is Python's round() (half to even): 200x136 -> 192x128.

    `strict` (the release's processor) refuses a side under one patch and an extreme aspect ratio.
    `strict=False` is the training pool's rule for dirty data, which must never stop a run: a side
    under one patch is scaled up to one first, any aspect is accepted, and a shrunk side never goes
    below one patch (`distill.train.pool.fit_token_budget` then keeps the token budget)."""
    if height < factor or width < factor:
        if strict:
            raise ValueError(f"image {height}x{width} is smaller than one {factor}x{factor} patch; "
                             f"both sides must be >= {factor}")
        s = factor / min(height, width)
        height, width = max(factor, round(height * s)), max(factor, round(width * s))
    if strict and max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}; crop the image first")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
        if not strict:
            h, w = max(factor, h), max(factor, w)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb_uint8(image) -> np.ndarray:
    """PIL image (any mode) or array -> HWC uint8 RGB. A 2-D array is grey; a (3, H, W) array is CHW."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image or an array, got {type(image).__name__}")
    arr = image
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), a (3, H, W) array or a grey (H, W) array; "
                         f"got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            raise ValueError("float image arrays in [0, 1] are ambiguous; pass uint8 RGB (0..255) or a PIL image")
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


class ImageProcessor:
    def __init__(self, patch_size: int = 16, min_pixels: int = 128 * 128, max_pixels: int = 256 * 256,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")
        self.patch_size = patch_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def for_resolution(cls, side: int, **kw) -> "ImageProcessor":
        """The eval scripts' setting: max_pixels = side^2 (use max_num_patches = side^2 / 256)."""
        return cls(max_pixels=side * side, **kw)

    def config(self) -> dict:
        return {"patch_size": self.patch_size, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "mean": self.mean.tolist(), "std": self.std.tolist(), "resample": "PIL.BICUBIC"}

    def normalized_hwc(self, image) -> np.ndarray:
        """Resized, normalised float32 HWC array."""
        arr = to_rgb_uint8(image)
        H, W = arr.shape[:2]
        h, w = smart_resize(H, W, self.patch_size, self.min_pixels, self.max_pixels)
        pil = Image.fromarray(arr, mode="RGB")
        if (h, w) != (H, W):
            pil = pil.resize((w, h), Image.BICUBIC)
        x = np.asarray(pil, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        return (x - self.mean) / self.std

    def to_tensor(self, image) -> torch.Tensor:
        """Normalised (3, H', W') float32 tensor, sides multiples of the patch size (for forward_packed)."""
        return torch.from_numpy(np.ascontiguousarray(self.normalized_hwc(image).transpose(2, 0, 1)))

    def patches(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(Hp*Wp, p*p*3) patch vectors, (row-in-patch, col-in-patch, channel) order, and the grid."""
        x = self.normalized_hwc(image)
        return hwc_to_patches(torch.from_numpy(x), self.patch_size)

    def __call__(self, images, max_num_patches: int = 256, pad: bool = True) -> dict[str, torch.Tensor]:
        """Batch -> {"pixel_values" (N, L, p*p*3) float32, "padding_mask" (N, L) float32 (1 = real patch),
        "spatial_shapes" (N, 2) int64}. With pad=True, L = max_num_patches (no truncation: an image with
        more patches is an error); with pad=False all images must have the same patch count."""
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        per = [self.patches(im) for im in images]
        shapes = torch.tensor([g for _, g in per], dtype=torch.int64)
        lengths = [p.shape[0] for p, _ in per]
        if pad:
            too_big = [(i, n) for i, n in enumerate(lengths) if n > max_num_patches]
            if too_big:
                raise ValueError(f"images {too_big} (index, patches) exceed max_num_patches={max_num_patches}; "
                                 "raise max_num_patches or lower max_pixels (max_num_patches = max_pixels / 256)")
            L = max_num_patches
        else:
            if len(set(lengths)) != 1:
                raise ValueError(f"pad=False needs equal patch counts, got {lengths}; use pad=True")
            L = lengths[0]
        dim = per[0][0].shape[1]
        pixel_values = torch.zeros(len(per), L, dim, dtype=torch.float32)
        padding_mask = torch.zeros(len(per), L, dtype=torch.float32)
        for i, (p, _) in enumerate(per):
            pixel_values[i, : p.shape[0]] = p
            padding_mask[i, : p.shape[0]] = 1.0
        return {"pixel_values": pixel_values, "padding_mask": padding_mask, "spatial_shapes": shapes}


def hwc_to_patches(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, C) -> (Hp*Wp, p*p*C) processor patch vectors (row-in-patch, col-in-patch, channel), raster order."""
    H, W, C = x.shape
    hp, wp = H // patch, W // patch
    vecs = x.reshape(hp, patch, wp, patch, C).permute(0, 2, 1, 3, 4).reshape(hp * wp, patch * patch * C)
    return vecs, (hp, wp)


def chw_to_patches(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(C, H, W) -> the same processor (channel-last) patch vectors as `hwc_to_patches`."""
    C, H, W = x.shape
    hp, wp = H // patch, W // patch
    vecs = x.reshape(C, hp, patch, wp, patch).permute(1, 3, 2, 4, 0).reshape(hp * wp, patch * patch * C)
    return vecs, (hp, wp)


def patchify_channel_major(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The release's raw 4-D path (`SigLino._patchify`): (N, C, H, W) -> (N, Hp*Wp, C*p*p) with each
    vector ordered (channel, row-in-patch, col-in-patch). NOT the processor's order: a raw tensor and
    processor patches of the same image give different features (as in the release)."""
    N, C, H, W = images.shape
    hp, wp = H // patch, W // patch
    vecs = images.reshape(N, C, hp, patch, wp, patch).permute(0, 2, 4, 1, 3, 5).reshape(N, hp * wp, C * patch * patch)
    return vecs, (hp, wp)
