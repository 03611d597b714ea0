"""A simulated unseen domain in pixel space: a photometric, contrast, haze and blur change of each input image.

The paper simulates the unseen domain with Eq. 6 on feature statistics. Measured on the proxy backbone
(``docs/method.md``), a one-batch Eq. 6 at one block changes the Fisher less than redrawing the labels does, while a
per-image change of the pixels moves it reliably and in a direction that agrees with real style changes. This is
that family (``score --shift pixel``). Each image gets its own draws, keyed on (seed, image index), in [0, 1]
pixel space (the input is un-normalised with the backbone's mean and std first, and normalised again after):

    blur        gaussian, sigma ~ U(0, blur) pixels
    contrast    x <- m + c (x - m),  c ~ U(contrast_low, 1.1), m the image's grey mean
    brightness  x <- x + b,          b ~ U(-brightness, brightness)
    tint        x_ch <- t_ch x_ch,   t_ch ~ U(1 - tint, 1 + tint) per channel
    haze        x <- (1 - h) x + h g, h ~ U(0, haze), g a light grey
                then clipped to [0, 1]

``strength`` m scales every change's range (1: the ranges above; the contrast factor is raised to the power m, so it
stays positive). The change of the patch-token statistics it causes
at the first Eq. 6 site (``statistics_change``) sets the shift weight exp(-s), as for Eq. 6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HAZE_GREY = 0.8
DRAWS = 7  # contrast, brightness, three tints, haze, blur sigma


@dataclass(frozen=True)
class PixelShift:
    """The ranges of the pixel-space family; ``strength`` scales them all."""

    contrast_low: float = 0.4
    brightness: float = 0.25
    tint: float = 0.2
    haze: float = 0.4
    blur: float = 1.2
    strength: float = 1.0

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """One image's draws (``DRAWS`` values) from its own generator."""
        u = torch.rand(DRAWS, generator=generator, dtype=torch.float64)
        m = self.strength
        contrast = (self.contrast_low + (1.1 - self.contrast_low) * u[0]) ** m  # in log space: stays positive
        brightness = m * self.brightness * (2 * u[1] - 1)
        tints = 1.0 + m * self.tint * (2 * u[2:5] - 1)
        haze = min(m * self.haze * u[5], 0.95)
        blur = m * self.blur * u[6]
        return torch.cat([torch.stack([contrast, brightness]), tints, torch.stack([torch.as_tensor(haze), blur])])


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of one (3, H, W) image, reflect-padded."""
    if sigma <= 1e-3:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device) / sigma) ** 2)
    taps = taps / taps.sum()
    out = image.unsqueeze(0)
    pad = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)
    out = F.pad(out, (pad, pad, pad, pad), mode="reflect") if pad > 0 else out
    if pad < radius:  # a tiny image: replicate the rest
        out = F.pad(out, (radius - pad,) * 4, mode="replicate")
    out = F.conv2d(out, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    out = F.conv2d(out, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return out[0]


def shift_pixels(x: torch.Tensor, draws: torch.Tensor, mean, std) -> torch.Tensor:
    """The shifted batch: ``x`` (B, 3, H, W) normalised with ``mean``/``std``, ``draws`` (B, DRAWS) from
    ``PixelShift.draw``; the result is normalised the same way."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    pixels = x * std_t + mean_t
    out = []
    for image, d in zip(pixels, draws.to(x.dtype)):
        image = _blur(image, float(d[6]))
        grey = image.mean()
        image = grey + d[0] * (image - grey)
        image = (image + d[1]) * d[2:5].view(3, 1, 1)
        image = (1 - d[5]) * image + d[5] * HAZE_GREY
        out.append(image.clamp(0.0, 1.0))
    return (torch.stack(out) - mean_t) / std_t
