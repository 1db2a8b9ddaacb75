"""Training-only augmentation (paper 4.4). Never imported by the serving path.

Applied to the Preprocessor's uint8 (1, S, S) output, so train and serve share every step
before it byte for byte.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class GaussianNoise(torch.nn.Module):
    """Additive Gaussian noise on a uint8 image, sigma in grey levels."""

    def __init__(self, sigma: float = 4.0, p: float = 0.5) -> None:
        super().__init__()
        self.sigma, self.p = sigma, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        noisy = x.float() + torch.randn_like(x, dtype=torch.float32) * self.sigma
        return noisy.clamp_(0, 255).to(torch.uint8)


class RandomGamma(torch.nn.Module):
    """Gamma in [lo, hi] on a uint8 image: exposure differences between radiographs."""

    def __init__(self, lo: float = 0.7, hi: float = 1.4, p: float = 0.5) -> None:
        super().__init__()
        self.lo, self.hi, self.p = lo, hi, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        gamma = self.lo + float(torch.rand(())) * (self.hi - self.lo)
        return ((x.float() / 255.0) ** gamma * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def train_augmentation(image_size: int = 224, kind: str = "paper") -> v2.Compose:
    """The training transform of `TrainConfig.augmentation`.

    "paper": flip, rotation within +-15 degrees, affine shift/scale, brightness/contrast,
    noise. "radiograph": a random-resized crop bounded to 70-100% of the area (the finding
    stays in view), +-10 degrees, gamma, then the paper's photometric steps.
    """
    if kind == "paper":
        geometric = [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        ]
    elif kind == "radiograph":
        geometric = [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True),
            v2.RandomAffine(degrees=10),
            RandomGamma(0.7, 1.4, p=0.5),
        ]
    else:
        raise ValueError(f"unknown augmentation {kind!r}")
    return v2.Compose(
        [*geometric, v2.ColorJitter(brightness=0.2, contrast=0.2), GaussianNoise(sigma=4.0, p=0.5)]
    )
