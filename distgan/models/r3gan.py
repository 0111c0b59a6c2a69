"""R3GAN (Huang, Gokaslan, Kuleshov, Tompkin, "The GAN is dead; long live the GAN! A Modern GAN Baseline",
NeurIPS 2024): StyleGAN2 stripped of its tricks and rebuilt as a plain modern ConvNet.

The paper's roadmap (its Section 3) removes from StyleGAN2 the mapping network, style modulation, noise inputs,
minibatch standard deviation, equalised learning rate and every normalisation layer, then rebuilds both networks
as a ResNet in ConvNeXt form. What is left, and what this file is:

    G: [z, embed(c)] -> Linear -> [N, W, 4, 4] -> stage 4x4 -> (transition up, stage) ... -> 1x1 conv -> image
    D: image -> 1x1 conv -> stage res -> (transition down, stage) ... -> stage 4x4
       -> 4x4 conv (basis) -> [N, W] -> leaky ReLU -> Linear -> logit (+ <embed(c), h>: the projection)

A stage is `blocks_per_stage` residual blocks at one resolution, and every block is the same inverted bottleneck,
with nothing but convolutions and leaky ReLU(0.2) (no normalisation, no modulation, no noise):

    x -> 1x1 conv (W -> expansion*W) -> lrelu -> 3x3 grouped conv (group_size channels a group) -> lrelu
      -> 1x1 conv (expansion*W -> W) -> + x

The trunk between blocks (basis, transitions, 1x1 convs to and from pixels) has no activation at all: as in a
transformer's residual stream, the non-linearity lives in the branches, and the skip path stays linear.

Transitions change resolution by a fixed low-pass, never by a learned strided or transposed convolution: up is
bilinear interpolation (zero-order hold, then the [1, 2, 1] blur: the [1, 3, 3, 1] filter of StyleGAN2), down is
its mirror (the [1, 2, 1] blur, then a 2x2 average with stride 2: [1, 3, 3, 1] / 8, i.e. antialiased bilinear);
borders replicate the edge pixel. When the width changes between stages a 1x1 conv does it, at the lower of the
two resolutions (before upsampling in G, after downsampling in D; the two orders differ only at the border, since
a 1x1 conv and a per-channel filter commute, and the low-resolution side is 4x cheaper).

Initialisation: Fixup (Zhang, Dauphin, Ma, ICLR 2019), which the paper uses in place of normalisation:
  - the last 1x1 conv of every residual branch starts at zero, so every block starts as the identity and the
    network starts as its linear trunk (the variance of the signal cannot grow with depth);
  - the other two convs of a branch get He initialisation for leaky ReLU(0.2) (std = sqrt(2 / (1 + 0.2^2)) /
    sqrt(fan_in), fan_in counting one group's channels), scaled by L^(-1/(2m-2)) with m = 3 layers per branch,
    i.e. L^(-1/4), L being the number of residual blocks in that network (8 for the 32x32 default);
  - every layer outside the branches gets variance-preserving init (std = gain / sqrt(fan_in), gain 1 before no
    activation, the leaky-ReLU gain before D's one activation), biases are zero, and there is no equalised lr:
    weights are stored at their true scale, so Adam's steps are the plain ones.
  Fixup's extra scalar multipliers and biases are left out (the paper keeps ordinary conv biases), and so is
  Fixup's zero init of the classifier: a D whose last layer is zero is constant, so at the first steps R1/R2
  would be zero and G would get no gradient at all.

Class-conditional (num_classes > 0): G joins a class embedding to z before its first layer, D keeps its trunk and
adds a projection (Miyato & Koyama 2018): logit = w.h + b + <embed(c), h>, h being D's vector after the basis.
With num_classes = 0 neither embedding exists.

G has no tanh (R3GAN's G has none): images are unbounded, trained toward the data's [-1, 1]; samples are clamped
where they are written. D returns logits; R1 (reals) and R2 (fakes) take dD/dx with create_graph=True, so nothing
on D's input path works in place.

Defaults (R3GANOptions) are meant to be the paper's CIFAR-10 networks (its appendix table of hyper-parameters):
four stages of 768 channels (4x4 to 32x32), two blocks per stage, expansion 2, groups of 16 channels (96 groups in
the 1536-channel 3x3 convs). The table could not be re-read when this was written: check the widths against it.
At larger resolutions the width halves per stage above 32x32 (width_base), a choice of ours that keeps the cost
per stage about flat. Where the paper leaves a layer's form open, the choice here is ours and said so: the two
basis layers (a full linear from z to 4x4 in G; a 4x4 valid conv to a vector, a leaky ReLU, then the logit in D),
the border handling of the resampling, and the order of resampling and 1x1 conv in a transition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.2  # leaky ReLU, everywhere
LRELU_GAIN = math.sqrt(2 / (1 + SLOPE**2))  # He et al. 2015, for leaky ReLU


def build_generator(cfg) -> nn.Module:
    o = cfg.options
    return Generator(cfg.z_dim, cfg.resolution, cfg.channels, o.stage_widths(cfg.resolution), o.blocks_per_stage,
                     o.expansion, o.group_size, cfg.num_classes, o.embed_dim)  # fmt: skip


def build_discriminator(cfg) -> nn.Module:
    o = cfg.options
    return Discriminator(cfg.resolution, cfg.channels, o.stage_widths(cfg.resolution), o.blocks_per_stage,
                         o.expansion, o.group_size, cfg.num_classes)  # fmt: skip


# ---------------------------------------------------------------------- layers


def init_(layer: nn.Conv2d | nn.Linear, gain: float) -> nn.Module:
    """Weights ~ N(0, (gain / sqrt(fan_in))^2), biases 0; fan_in = inputs one output sees (group channels x k x k)."""
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(layer.weight[0].numel()))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def upsample(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W], bilinear (the [1, 3, 3, 1] filter; edges clamp)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def downsample(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H/2, W/2]: the [1, 2, 1] blur as two 2-tap averages, then a 2x2 average of stride 2;
    [1, 3, 3, 1] / 8 in all, the low-pass that bilinear upsampling's adjoint applies (edges replicate)."""
    # Replicate padding as copies of the edge rows and columns: the same values as F.pad(mode="replicate"), whose
    # backward's shape function under torch.compile expects other strides than its kernel returns (torch 2.14).
    x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
    x = torch.cat([x[..., :1], x, x[..., -1:]], dim=3)  # [N, C, H+2, W+2]
    x = F.avg_pool2d(F.avg_pool2d(x, 2, stride=1), 2, stride=1)  # [1, 2, 1] / 4 per axis: [N, C, H, W]
    return F.avg_pool2d(x, 2)  # [1, 1] / 2 per axis, stride 2


class ResidualBlock(nn.Module):
    """x + 1x1(lrelu(3x3 grouped(lrelu(1x1(x))))): the inverted bottleneck, with Fixup init (see the module doc)."""

    def __init__(self, width: int, expansion: int, group_size: int, num_blocks: int):
        super().__init__()
        hidden = width * expansion
        if hidden % group_size:
            raise ValueError(f"R3GAN: expansion x width = {hidden} is not a multiple of group_size={group_size}")
        self.expand = nn.Conv2d(width, hidden, 1)
        self.spatial = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden // group_size)
        self.project = nn.Conv2d(hidden, width, 1)
        fixup = num_blocks ** (-1 / (2 * 3 - 2))  # L^(-1/(2m-2)), m = 3 layers in the branch
        init_(self.expand, LRELU_GAIN * fixup)
        init_(self.spatial, LRELU_GAIN * fixup)
        init_(self.project, 0.0)  # the branch starts at zero: the block is the identity

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.expand(x), SLOPE)  # [N, hidden, H, W]
        h = F.leaky_relu(self.spatial(h), SLOPE)
        return self.project(h)  # [N, width, H, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def _stage(width: int, n: int, expansion: int, group_size: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(width, expansion, group_size, num_blocks) for _ in range(n)))


def _check(resolution: int, widths: list[tuple[int, int]]) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"R3GAN makes square images of a power-of-two size >= 8, not {resolution}")
    assert [r for r, _ in widths] == [4 * 2**i for i in range(len(widths))] and widths[-1][0] == resolution, widths


# ---------------------------------------------------------------------- the networks


class Generator(nn.Module):
    def __init__(self, z_dim: int = 100, resolution: int = 32, channels: int = 3,
                 widths: list[tuple[int, int]] = ((4, 768), (8, 768), (16, 768), (32, 768)), blocks_per_stage: int = 2,
                 expansion: int = 2, group_size: int = 16, num_classes: int = 0, embed_dim: int = 0):  # fmt: skip
        super().__init__()
        widths = list(widths)
        _check(resolution, widths)
        self.z_dim, self.resolution, self.channels, self.num_classes = z_dim, resolution, channels, num_classes
        num_blocks = blocks_per_stage * len(widths)
        embed_dim = (embed_dim or z_dim) if num_classes else 0
        w0 = widths[0][1]
        self.basis = init_(nn.Linear(z_dim + embed_dim, w0 * 4 * 4), 1.0)  # -> [N, w0, 4, 4]
        self.stages = nn.ModuleList([_stage(w0, blocks_per_stage, expansion, group_size, num_blocks)])
        self.transitions = nn.ModuleList()  # transitions[i] leads from stages[i] up to stages[i + 1]
        for (_, w_in), (_, w_out) in zip(widths, widths[1:]):
            self.transitions.append(init_(nn.Conv2d(w_in, w_out, 1), 1.0) if w_in != w_out else nn.Identity())
            self.stages.append(_stage(w_out, blocks_per_stage, expansion, group_size, num_blocks))
        self.to_image = init_(nn.Conv2d(widths[-1][1], channels, 1), 1.0)
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        if self.embed is not None:
            # A class vector of norm ~1 beside z's ~sqrt(z_dim), as in distgan/models/dcgan.py (where an embedding
            # as large as z made G ignore z): G starts out using z and learns what the class adds.
            nn.init.normal_(self.embed.weight, 0.0, embed_dim**-0.5)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # z: [N, z_dim] (or [N, z_dim, 1, 1]), c: [N] class indices (conditional) -> [N, channels, res, res]
        z = z.reshape(z.shape[0], self.z_dim)
        if self.embed is not None:
            z = torch.cat([z, self.embed(c)], dim=1)  # [N, z_dim + embed_dim]
        x = self.basis(z).view(z.shape[0], -1, 4, 4)  # [N, w0, 4, 4]
        x = self.stages[0](x)
        for transition, stage in zip(self.transitions, self.stages[1:]):
            x = stage(upsample(transition(x)))  # width changed at the low resolution, then x2
        return self.to_image(x)


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 32, channels: int = 3,
                 widths: list[tuple[int, int]] = ((4, 768), (8, 768), (16, 768), (32, 768)), blocks_per_stage: int = 2,
                 expansion: int = 2, group_size: int = 16, num_classes: int = 0):  # fmt: skip
        super().__init__()
        widths = list(widths)[::-1]  # the stages in D's order: full resolution first, 4x4 last
        _check(resolution, widths[::-1])
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        num_blocks = blocks_per_stage * len(widths)
        self.from_image = init_(nn.Conv2d(channels, widths[0][1], 1), 1.0)
        self.stages = nn.ModuleList([_stage(widths[0][1], blocks_per_stage, expansion, group_size, num_blocks)])
        self.transitions = nn.ModuleList()  # transitions[i] leads from stages[i] down to stages[i + 1]
        for (_, w_in), (_, w_out) in zip(widths, widths[1:]):
            self.transitions.append(init_(nn.Conv2d(w_in, w_out, 1), 1.0) if w_in != w_out else nn.Identity())
            self.stages.append(_stage(w_out, blocks_per_stage, expansion, group_size, num_blocks))
        w4 = widths[-1][1]
        self.basis = init_(nn.Conv2d(w4, w4, 4), LRELU_GAIN)  # [N, w4, 4, 4] -> [N, w4, 1, 1]
        self.out = init_(nn.Linear(w4, 1), 1.0)
        self.embed = nn.Embedding(num_classes, w4) if num_classes else None  # the projection
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, w4**-0.5)  # like self.out's weight: both terms start alike

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, channels, res, res] -> h: [N, w4], the vector the logit and the projection read
        x = self.stages[0](self.from_image(x))
        for transition, stage in zip(self.transitions, self.stages[1:]):
            x = stage(transition(downsample(x)))  # /2, then the width changes at the low resolution
        return F.leaky_relu(self.basis(x).flatten(1), SLOPE)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, channels, res, res], c: [N] (conditional) -> logits [N]
        h = self.features(x)
        logits = self.out(h).flatten()
        if self.embed is not None:
            logits = logits + (self.embed(c) * h).sum(dim=1)
        return logits
