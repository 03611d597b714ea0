"""fisherscan.fisher.pixel_shift: the pixel-space family against its formulas written out in numpy here, the blur
against scipy's gaussian filter, the draws against their ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fisherscan.fisher.pixel_shift import HAZE_GREY, PixelShift, shift_pixels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((pixels - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]).float()


def test_the_changes_follow_their_formulas():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0.1, 0.9, (2, 3, 12, 16))
    draws = torch.tensor([[0.6, 0.1, 0.9, 1.1, 1.0, 0.3, 0.0], [1.05, -0.2, 1.2, 0.8, 0.95, 0.0, 0.0]])
    got = shift_pixels(torch.stack([normalised(p) for p in pixels]), draws, MEAN, STD).double().numpy()
    for image, d, out in zip(pixels, draws.double().numpy(), got):
        grey = image.mean()
        expected = (grey + d[0] * (image - grey) + d[1]) * d[2:5][:, None, None]
        expected = np.clip((1 - d[5]) * expected + d[5] * HAZE_GREY, 0, 1)
        pixels_out = out * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]
        np.testing.assert_allclose(pixels_out, expected, atol=1e-5)


def test_the_blur_is_a_gaussian_filter():
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0.2, 0.8, (1, 3, 20, 24))
    draws = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]])  # sigma 1 pixel, nothing else
    got = shift_pixels(torch.stack([normalised(p) for p in pixels]), draws, MEAN, STD)[0].double().numpy()
    got = got * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]
    expected = np.stack([gaussian_filter(channel, 1.0, mode="mirror", truncate=3.0) for channel in pixels[0]])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_draws_lie_in_their_ranges_and_follow_the_generator(strength):
    family = PixelShift(strength=strength)
    draws = torch.stack([family.draw(torch.Generator().manual_seed(i)) for i in range(200)])
    contrast, brightness, tints, haze, blur = draws[:, 0], draws[:, 1], draws[:, 2:5], draws[:, 5], draws[:, 6]
    assert contrast.min() >= 0.4 ** strength - 1e-9 and contrast.max() <= 1.1 ** strength + 1e-9
    assert brightness.abs().max() <= 0.25 * strength + 1e-9 and (tints - 1).abs().max() <= 0.2 * strength + 1e-9
    assert haze.min() >= 0 and haze.max() <= min(0.4 * strength, 0.95) + 1e-9
    assert blur.min() >= 0 and blur.max() <= 1.2 * strength + 1e-9
    assert torch.equal(family.draw(torch.Generator().manual_seed(7)), family.draw(torch.Generator().manual_seed(7)))
    assert contrast.std() > 0.05 * strength  # the draws vary
