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


def train_augmentation(image_size: int = 224) -> v2.Compose:
    """Flip, rotation within +-15 degrees, affine shift/scale, brightness/contrast, noise."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            GaussianNoise(sigma=4.0, p=0.5),
        ]
    )
