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


# ---------------------------------------------------------------------- stylegan2 (options and registration)


@dataclass
class StyleGAN2Options:
    """StyleGAN2 (Karras et al. 2020): a mapping network z -> w, a skip generator of modulated, demodulated
    convolutions with per-layer noise, and a residual D with minibatch stddev; conditional: a class embedding joins
    z in the mapping, and D is a projection discriminator. Widths: min(channel_base // resolution, channel_max);
    the paper's config F is channel_base 32768, StyleGAN2-ADA's cifar config channel_base 16384 with map_layers 2
    (that recipe also turns style mixing and the path-length penalty off)."""

    channel_base: int = _f(16384, "feature maps at resolution r: min(channel_base // r, channel_max); 32768 = config F")
    channel_max: int = _f(512, "the most feature maps of any layer")
    map_layers: int = _f(8, "FC layers of the mapping network z -> w (8 in the paper, 2 in StyleGAN2-ADA's cifar)")
    w_dim: int = _f(512, "size of the intermediate latent w (each layer's style is an affine map of it)")
    embed_dim: int = _f(0, "conditional: size of the class embedding in G's and D's mapping networks (0 = w_dim)")
    mbstd_group: int = _f(4, "D's minibatch-stddev group size (gcd(group, batch) when it does not divide the batch)")
    style_mixing: float = _f(0.9, "probability that a training forward of G mixes the styles of two latents")
    conv_clamp: float | None = _f(
        256.0, "clamp every conv layer's output to +-this (the paper's fp16 safeguard; null = no clamp)"
    )
    fused_modconv: bool = _f(
        True, "G's modulated convs as one grouped conv per layer (true) or by scaling activations (false: same maths)"
    )

    def problems(self, model) -> list[str]:
        out = [
            f"{k}={getattr(self, k)} must be >= 1"
            for k in ("channel_base", "channel_max", "map_layers", "w_dim", "mbstd_group")
            if getattr(self, k) < 1
        ]
        if self.embed_dim < 0:
            out.append(f"embed_dim={self.embed_dim} must be >= 0")
        if not 0 <= self.style_mixing <= 1:
            out.append(f"style_mixing={self.style_mixing} must be in [0, 1]")
        if self.conv_clamp is not None and self.conv_clamp <= 0:
            out.append(f"conv_clamp={self.conv_clamp} must be > 0 (or null for no clamp)")
        if self.channel_base >= 1 and isinstance(model.resolution, int) and self.channel_base < model.resolution:
            out.append(
                f"channel_base={self.channel_base} gives no feature maps at {model.resolution}x{model.resolution}"
                f" (channel_base // resolution must be >= 1)"
            )
        return out


register(
    Family(
        "stylegan2",
        StyleGAN2Options,
        module="distgan.models.stylegan2",
        resolutions=(32, 64, 128, 256, 512, 1024),
        doc="StyleGAN2 (Karras et al. 2020): mapping network, modulated convs, skip G, residual D; projection D",
    )
)


# ---------------------------------------------------------------------- biggan (options and registration)


@dataclass
class BigGANOptions:
    """BigGAN (Brock et al. 2019): residual G and D, spectral norm in both, class-conditional BatchNorm in G fed by a
    shared class embedding and per-block chunks of z, a projection D, one self-attention block
    (distgan/models/biggan.py). At 128x128 with g_width = d_width = 96 and z_dim = 120 it is the paper's model."""

    g_width: int = _f(64, "G's channel unit ch: block widths ch x (4,4,4) at 32, (16,8,4,2) at 64, (16,8,4,2,1) at 128")
    d_width: int = _f(64, "D's channel unit ch: block widths ch x (4,4,4,4) at 32, (1,2,4,8,16[,16]) at 64 [128]")
    shared_dim: int = _f(128, "conditional: size of G's shared class embedding, fed to every BatchNorm's gain/bias")
    hier: bool = _f(True, "hierarchical latents: z split into equal chunks, one to G's input and one per G block")
    attn_res: int | Literal["auto"] = _f(
        "auto", "feature size with self-attention in G and D (0 = none; auto = res/2 at 64 and 128, none at 32)"
    )
    init: Literal["ortho", "N02", "xavier"] = _f("ortho", "weight init: orthogonal (BigGAN), N(0, 0.02), xavier")

    def problems(self, model) -> list[str]:
        out = [f"{k}={getattr(self, k)} must be >= 1" for k in ("g_width", "d_width", "shared_dim")
               if getattr(self, k) < 1]  # fmt: skip
        res = model.resolution
        if res not in (32, 64, 128):
            return out  # the resolution check names the family's sizes
        chunks = res.bit_length() - 2  # 1 + number of G blocks (4 at 32x32, 5 at 64, 6 at 128)
        if self.hier and model.z_dim % chunks:
            near = sorted({max(chunks, model.z_dim // chunks * chunks), -(-model.z_dim // chunks) * chunks})
            out.append(
                f"hier=true splits z into {chunks} equal chunks at {res}x{res} (G's input and each of its "
                f"{chunks - 1} blocks), but model.z_dim={model.z_dim} is not a multiple of {chunks}: use "
                f"{' or '.join(map(str, near))} (BigGAN: 120 at 128x128), or hier=false"
            )
        sizes = [2**k for k in range(3, res.bit_length() - 1)]  # 8 .. res/2: a G block's and a D block's output
        if self.attn_res != "auto" and self.attn_res != 0 and self.attn_res not in sizes:
            out.append(f"attn_res={self.attn_res} is not a feature size of both networks at {res}x{res}: "
                       f"choose 0 (none), auto or one of {sizes}")  # fmt: skip
        return out


register(
    Family(
        "biggan",
        BigGANOptions,
        module="distgan.models.biggan",
        resolutions=(32, 64, 128),
        doc="BigGAN (Brock et al. 2019): ResNet G/D with spectral norm, conditional BN, projection D, self-attention",
    )
)

# ---------------------------------------------------------------------- r3gan (options and registration)


@dataclass
class R3GANOptions:
    """R3GAN (Huang et al., NeurIPS 2024): StyleGAN2 without its tricks, as a ResNet of ConvNeXt-style inverted
    bottlenecks (1x1, grouped 3x3, 1x1) with no normalisation and Fixup init (distgan/models/r3gan.py). The defaults
    are meant as the paper's CIFAR-10 networks: four stages of 768 channels, 2 blocks each, expansion 2, groups of
    16 (to be checked against the paper's appendix table, which could not be re-read when they were written)."""

    width: int = _f(768, "channels of the widest stages (every stage up to 32x32 by default); paper CIFAR-10: 768")
    width_base: int = _f(24576, "a stage at resolution r has min(width, width_base / r) channels: halving above 32x32")
    blocks_per_stage: int = _f(2, "residual blocks at each resolution (4x4 up to model.resolution)")
    expansion: int = _f(2, "inverted bottleneck: the grouped 3x3 conv has expansion x the stage's channels")
    group_size: int = _f(16, "channels per group of the 3x3 conv (groups = expansion x stage width / group_size)")
    embed_dim: int = _f(0, "conditional: size of G's class embedding joined to z (0 = z_dim)")

    def stage_widths(self, resolution: int) -> list[tuple[int, int]]:
        """(resolution, channels) of every stage, 4x4 first: [(4, w), (8, w), ..., (resolution, w')]."""
        out, r = [], 4
        while r <= resolution:
            out.append((r, min(self.width, self.width_base // r)))
            r *= 2
        return out

    def problems(self, model) -> list[str]:
        ints = ("width", "width_base", "blocks_per_stage", "expansion", "group_size")
        out = [f"{k}={getattr(self, k)} must be >= 1" for k in ints if getattr(self, k) < 1]
        out += [f"embed_dim={self.embed_dim} must be >= 0"] if self.embed_dim < 0 else []
        if out:
            return out
        for r, w in self.stage_widths(model.resolution):
            if w < 1 or (w * self.expansion) % self.group_size:
                out.append(
                    f"the {r}x{r} stage has {w} channels (min(width, width_base / {r})): expansion x channels = "
                    f"{w * self.expansion} must be a positive multiple of group_size={self.group_size}"
                )
        return out


register(
    Family(
        "r3gan",
        R3GANOptions,
        module="distgan.models.r3gan",
        resolutions=(32, 64, 128, 256),
        doc="R3GAN (Huang et al. 2024): a modern ResNet GAN, no normalisation, Fixup init; conditional by projection",
    )
)
