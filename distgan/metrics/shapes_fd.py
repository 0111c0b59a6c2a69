"""A quality measure for the built-in shapes dataset, used by the learning tests and `distgan bench quality`.

Fréchet distance (as in FID) between real and generated images in the feature space of a small CNN that is
trained here, in a few seconds, to tell the four shape classes apart. Features that separate circles from
squares from triangles from crosses are exactly what a GAN must get right for a person to see shapes, and
colour/position statistics enter too. The classifier is deterministic (fixed seed, one thread of work order).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import nn

from distgan.data import shapes


class ShapeNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = len(shapes.CLASSES)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16
            nn.Conv2d(width, 2 * width, 3, 1, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x))


def to_float(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(images_uint8).float() / 127.5 - 1


def train_classifier(n: int = 8000, seed: int = 1234, epochs: int = 2) -> tuple[ShapeNet, float]:
    """A shape classifier trained on images the GAN never saw (another data seed); returns (net, accuracy)."""
    torch.manual_seed(seed)
    images, labels = shapes.generate(n + 1000, seed=seed, resolution=32)
    x, y = to_float(images), torch.as_tensor(labels)
    net = ShapeNet()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(64):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[n:]).argmax(1) == y[n:]).float().mean().item()
    return net, acc


@torch.no_grad()
def features(net: ShapeNet, images: torch.Tensor) -> np.ndarray:
    """images: float [N, 3, 32, 32] in [-1, 1] -> [N, 64]"""
    return torch.cat([net.features(part) for part in images.split(500)]).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    # ReLU features that are never active make the covariances singular: a tiny ridge keeps sqrtm stable.
    ridge = 1e-6 * np.eye(a.shape[1])
    s1, s2 = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def class_match(net: ShapeNet, images: torch.Tensor, classes: torch.Tensor) -> tuple[float, list[float]]:
    """The share of `images` [N, 3, H, W] in [-1, 1] that the classifier puts in the class asked for (`classes` [N]),
    over all and per class (0.25 = chance for the four shapes)."""
    pred = torch.cat([net(part).argmax(1) for part in images.split(500)])
    hit = (pred == classes).float()
    return hit.mean().item(), [hit[classes == k].mean().item() for k in range(len(shapes.CLASSES))]
