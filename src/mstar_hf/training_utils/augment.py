"""H&E augmentation for Stage 2 tiles: flips, right-angle rotations, a small colour jitter and, optionally,
stain jitter in hematoxylin-eosin-DAB space.

Tissue has no canonical orientation, so flips and 90-degree turns are free; stain and scanner colour
varies a little between sites, so brightness / contrast / saturation change by at most `color_jitter`
and hue by at most `hue_jitter` (a large hue shift would turn H&E into a different stain).

The four colour changes are affine maps of RGB (hue as a rotation about the grey axis in YIQ space,
saturation as a blend with the luma, contrast as a blend with the mean luma), so they are composed into
one 3x3 matrix and offset per image and applied in a single pass: about 1 ms per 224 px tile in a
DataLoader worker, where torchvision's HSV round trip costs two orders of magnitude more. Every draw
comes from a `torch.Generator` the caller seeds, so a resumed run sees the same augmented tiles.

Stain jitter (Tellez et al. 2018, "H&E-stain augmentation"): optical density `-log(rgb / 255)` is split
into hematoxylin, eosin and DAB concentrations (Ruifrok-Johnston colour deconvolution), each scaled by
`1 + U(-s, s)` and shifted by `U(-s, s) * 0.05`, and recombined. It imitates the stain differences between
labs and scanners, which are far larger than a colour jitter: a student that sees them learns features
that do not follow the stain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
# Ruifrok & Johnston stain vectors (rows: H, E, DAB optical density per unit concentration), as skimage's rgb2hed
_RGB_FROM_HED = torch.nn.functional.normalize(
    torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]), dim=1)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def stain_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x: [3, P] RGB in 0..255 (float) -> the same pixels with H, E, DAB concentrations `c * scale + shift`."""
    od = -torch.log(x.clamp(min=1.0) / 255.0)
    conc = _HED_FROM_RGB.T @ od  # od = RGB_FROM_HED.T @ conc
    conc = conc * scale[:, None] + shift[:, None]
    return (255.0 * torch.exp(-(_RGB_FROM_HED.T @ conc))).clamp_(0.0, 255.0)


def color_matrix(brightness: float, contrast: float, saturation: float, hue: float, mean_luma: float):
    """(A [3, 3], b [3]) with jittered = A @ rgb + b for rgb in 0..255; `hue` in turns (fractions of 360 deg)."""
    eye = torch.eye(3)
    sat = saturation * eye + (1.0 - saturation) * torch.outer(torch.ones(3), _LUMA)
    angle = 2.0 * math.pi * hue
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)], [0.0, math.sin(angle), math.cos(angle)]])
    hue_m = torch.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ
    # brightness, then contrast around the (brightened) mean luma, then saturation, then hue
    a = hue_m @ sat @ (contrast * brightness * eye)
    b = hue_m @ sat @ torch.full((3,), (1.0 - contrast) * brightness * mean_luma)
    return a, b


@dataclass
class HEAugment:
    flips: bool = True
    rotate90: bool = True
    color_jitter: float = 0.05
    hue_jitter: float = 0.02
    stain_jitter: float = 0.0

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """image: [3, H, W] (uint8, or float in 0..255) -> same dtype, augmented."""
        draws = torch.rand(7, generator=generator).tolist()
        # drawn only when used: a run without stain jitter sees the same tiles as before it existed
        stain = torch.rand(6, generator=generator) * 2 - 1 if self.stain_jitter > 0 else None
        if self.flips:
            if draws[0] < 0.5:
                image = image.flip(-1)
            if draws[1] < 0.5:
                image = image.flip(-2)
        if self.rotate90 and image.shape[-1] == image.shape[-2]:
            image = torch.rot90(image, int(draws[2] * 4) % 4, dims=(-2, -1))
        j, h = self.color_jitter, self.hue_jitter
        if stain is not None:
            out = stain_jitter(image.to(torch.float32).flatten(1), 1.0 + self.stain_jitter * stain[:3],
                               0.05 * self.stain_jitter * stain[3:])
            out = out.view(image.shape)
            image = out.round_().to(torch.uint8) if image.dtype == torch.uint8 else out
        if j > 0 or h > 0:
            x = image.to(torch.float32)
            mean_luma = float((_LUMA @ x.flatten(1).mean(dim=1)))
            a, b = color_matrix(1.0 + j * (2 * draws[3] - 1), 1.0 + j * (2 * draws[4] - 1),
                                1.0 + j * (2 * draws[5] - 1), h * (2 * draws[6] - 1), mean_luma)
            x = torch.addmm(b[:, None], a, x.flatten(1)).clamp_(0.0, 255.0).view_as(x)
            image = x.round_().to(torch.uint8) if image.dtype == torch.uint8 else x
        return image.contiguous()


__all__ = ["HEAugment", "color_matrix", "stain_jitter"]
