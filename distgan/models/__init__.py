"""Model families, by registry: each family is one module, one registry entry and one options dataclass.

The contract every family keeps (the trainer, samples, export, generate and eval know nothing else):

    G = build_generator(cfg.model)       G(z, c)  -> images [N, C, H, W] in [-1, 1]   z: [N, z_dim]
    D = build_discriminator(cfg.model)   D(x, c)  -> logits [N]
    c: class indices, int64 [N], or None when the model is unconditional (model.num_classes = 0)

Models are plain `nn.Module`s: they know nothing about processes, devices or precision (distgan/distributed wraps
them). A family's own knobs live in its config section, `model.<family>.*`, next to the shared fields
(resolution, channels, z_dim, num_classes) of `ModelConfig`; a key of another family's section is an error
naming that family (distgan/config.py).

This file imports no torch, so that config validation can ask what a family supports (and its options) before
anything heavy is loaded; a family's module is imported when a network is built. Adding a family:

    @dataclass
    class MyOptions:                      # model.mine.*; every field with a default and a doc (config._f)
        width: int = _f(64, "...")

    register(Family("mine", MyOptions, module="distgan.models.mine", resolutions=(32, 64), conditional=True,
                    doc="one line for the config reference"))

where distgan/models/mine.py defines `build_generator(model_cfg)` and `build_discriminator(model_cfg)`
(tests/unit/test_models.py registers a toy family from the test itself).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, doc: str):
    """A config field with a doc string (the same convention as distgan/config.py, which imports this module)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Family:
    """What config validation and the builders need to know about a family, without importing it."""

    name: str
    options: type  # the dataclass of the family's own config section, model.<name>.*
    module: str  # import path of the module that defines build_generator(cfg) and build_discriminator(cfg)
    resolutions: tuple[int, ...]  # output sizes (square) the family can make
    conditional: bool = True  # whether it takes class labels (model.num_classes > 0)
    doc: str = ""


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (replacing one of the same name: a test may re-register)."""
    FAMILIES[family.name] = family
    return family


def family(name: str) -> Family:
    return FAMILIES[name]


def build_generator(cfg):
    """G of `cfg` (a ModelConfig with `num_classes` resolved to an int): G(z, c) -> [N, C, H, W]."""
    return importlib.import_module(FAMILIES[cfg.family].module).build_generator(cfg)


def build_discriminator(cfg):
    """D of `cfg`: D(x, c) -> [N] logits."""
    return importlib.import_module(FAMILIES[cfg.family].module).build_discriminator(cfg)


# ---------------------------------------------------------------------- the families


@dataclass
class DCGANOptions:
    """DCGAN (Radford et al. 2015): transposed convolutions up from the latent, strided convolutions down to a logit;
    conditional: a class embedding joins z in G, and D gets a projection head (Miyato & Koyama 2018)."""

    g_width: int = _f(64, "G's last hidden width (ngf); it doubles per layer towards the latent")
    d_width: int = _f(64, "D's first hidden width (ndf); it doubles per layer towards the logit")
    norm: Literal["batch", "none"] = _f("batch", "normalisation of hidden layers")
    embed_dim: int = _f(0, "conditional: size of G's class embedding joined to z (0 = z_dim)")

    def problems(self, model) -> list[str]:
        out = [f"{k}={getattr(self, k)} must be >= 1" for k in ("g_width", "d_width") if getattr(self, k) < 1]
        return out + ([f"embed_dim={self.embed_dim} must be >= 0"] if self.embed_dim < 0 else [])


register(
    Family(
        "dcgan",
        DCGANOptions,
        module="distgan.models.dcgan",
        resolutions=(32, 64, 128),
        doc="DCGAN (Radford et al. 2015); conditional with a class embedding in G and a projection D",
    )
)
