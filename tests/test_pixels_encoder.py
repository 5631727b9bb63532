"""`pixels:SIDE`, the raw-pixel floor: its features are the pixels, and it runs through the tasks."""
from __future__ import annotations

import torch
from PIL import Image

from distill.encoders import load_encoder


def test_raw_pixel_features_are_the_pixels():
    enc = load_encoder("pixels:4")
    img = Image.new("RGB", (48, 32), (255, 0, 0))
    x = enc.preprocess(img)
    assert tuple(x.shape) == (3, 32, 48)           # native size: within the 128^2 budget, multiples of 16
    f = enc.encode([x])
    assert f.summary["pixels"].shape == (1, 3 * 4 * 4) and f.grids == [(2, 3)]
    assert f.patches["pixels"][0].shape == (6, 3 * 16 * 16)
    # every patch of a uniform red image holds the normalised red value in its first 256 entries
    red = (1.0 - 0.485) / 0.229
    assert torch.allclose(f.patches["pixels"][0][:, :256], torch.full((6, 256), red), atol=1e-4)
    assert torch.allclose(f.summary["pixels"][0, :16], torch.full((16,), red), atol=1e-4)
    big = enc.preprocess(Image.new("RGB", (400, 300)))
    assert big.shape[1] * big.shape[2] <= 128 * 128 and big.shape[1] % 16 == 0 == big.shape[2] % 16


def test_a_bad_side_is_one_line():
    import pytest

    from distill.errors import AmoeError
    with pytest.raises(AmoeError, match="SIDE must be a positive integer"):
        load_encoder("pixels:x")
