"""Generator/discriminator families, looked up by name.

Models are plain `nn.Module`s: they know nothing about processes, devices or precision (distgan/distributed.py
wraps them). This file imports no torch so that config validation can ask what an architecture supports before
anything heavy is loaded; the families themselves are imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """What config validation needs to know about a family, without building it."""

    module: str  # import path of the family's module, which defines Generator and Discriminator
    resolutions: tuple[int, ...]  # output sizes (square) the family can make


ARCHITECTURES: dict[str, Architecture] = {
    "dcgan": Architecture("distgan.models.dcgan", resolutions=(32, 64, 128)),
}


def build_generator(cfg):
    """Build G from a `ModelConfig`."""
    family = importlib.import_module(ARCHITECTURES[cfg.arch].module)
    return family.Generator(
        z_dim=cfg.z_dim, resolution=cfg.resolution, channels=cfg.channels, width=cfg.g_width, norm=cfg.norm
    )


def build_discriminator(cfg):
    """Build D from a `ModelConfig`; it returns one logit per image."""
    family = importlib.import_module(ARCHITECTURES[cfg.arch].module)
    return family.Discriminator(resolution=cfg.resolution, channels=cfg.channels, width=cfg.d_width, norm=cfg.norm)
