"""Helpers of the metrics tests (tests/unit/test_metrics.py, tests/integration/test_eval.py,
tests/distributed/test_metrics_dist.py): a tiny TorchScript extractor, folders of random images, random weights
of the FID Inception's shape (the real ones cannot be downloaded here)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TinyNet(nn.Module):
    """A TorchScript-able extractor: features [N, 8] and 4 class logits from images in [-1, 1] of any size."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return f, self.head(f)


def save_tinynet(path, channels: int = 3, seed: int = 0):
    import warnings

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; distgan reads it because users have it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinyNet(channels)).save(str(path))
    return path


def write_folder(folder, n, seed, high=256, size=16):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, high, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def random_inception_weights(path):
    """A state dict of the FID Inception's shape with random values (the real one cannot be downloaded here)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    module = "torch_fidelity.feature_extractor_inceptionv3"
    with mock.patch(f"{module}.load_state_dict_from_url"), mock.patch.object(nn.Module, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path
