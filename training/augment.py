"""Per-sample augmentation, as the papers describe it (torchvision v2 on float tensors in [0, 1]).

Geometric: flips, rotation (±15°), shift and zoom (±10 %), applied to the image and, for
segmentation, to its mask with the same parameters (nearest-neighbour for the mask). Photometric,
on the image only: brightness, contrast, gamma, Gaussian noise, blur or sharpening. Randomness
comes from torch's generator, so a seeded run (and a seeded DataLoader worker) repeats itself.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from training.recipe import AugmentConfig


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def _chance(p: float) -> bool:
    return p > 0 and float(torch.rand(1)) < p


class Augment:
    """``augment(image)`` or ``augment(image, mask)`` with (1, H, W) float tensors."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        geometric: list[v2.Transform] = []
        if config.hflip:
            geometric.append(v2.RandomHorizontalFlip(config.hflip))
        if config.vflip:
            geometric.append(v2.RandomVerticalFlip(config.vflip))
        if config.affine_prob and (config.rotate_degrees or config.shift or config.zoom):
            affine = v2.RandomAffine(degrees=config.rotate_degrees, translate=(config.shift, config.shift),
                                     scale=(1 - config.zoom, 1 + config.zoom),
                                     interpolation=v2.InterpolationMode.BILINEAR)
            geometric.append(v2.RandomApply([affine], p=config.affine_prob))
        self.geometric = v2.Compose(geometric) if geometric else None
        self.blur = v2.GaussianBlur(kernel_size=5, sigma=(0.3, 1.2))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.geometric is not None:
            if mask is None:
                image = self.geometric(tv_tensors.Image(image)).as_subclass(torch.Tensor)
            else:
                image, mask = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
                image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        image = self.photometric(image)
        return image if mask is None else (image, mask)

    def photometric(self, image: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.brightness:
            image = image * _uniform(1 - c.brightness, 1 + c.brightness)
        if c.contrast:
            mean = image.mean()
            image = (image - mean) * _uniform(1 - c.contrast, 1 + c.contrast) + mean
        image = image.clamp(0.0, 1.0)
        if c.gamma:
            image = F.adjust_gamma(image, _uniform(1 - c.gamma, 1 + c.gamma))
        if c.noise_std and _chance(c.noise_prob):
            image = image + torch.randn_like(image) * c.noise_std
        if _chance(c.blur_prob):
            image = self.blur(image)
        elif _chance(c.sharpen_prob):
            image = F.adjust_sharpness(image.clamp(0.0, 1.0), _uniform(1.5, 3.0))
        return image.clamp(0.0, 1.0)
