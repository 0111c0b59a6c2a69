"""DCGAN (Radford et al. 2015), parameterised by resolution, image channels, width and latent size.

The network doubles the feature size per layer. With `n = log2(resolution) - 2` upsampling layers:

    G: z [N, z_dim, 1, 1] -> ConvT 4/1/0 -> [N, width*2^(n-1), 4, 4]
       -> n-1 x (ConvT 4/2/1, halve channels) -> ConvT 4/2/1 -> [N, channels, res, res] -> Tanh
    D: x [N, channels, res, res] -> Conv 4/2/1 -> n-1 x (Conv 4/2/1, double channels)
       -> [N, width*2^(n-1), 4, 4] -> Conv 4/1/0 -> [N] logits

Hidden layers use BatchNorm (all of G's, all of D's but the first) followed by ReLU in G and LeakyReLU(0.2)
in D; convolutions carry no bias (the norm that follows has one). At resolution 32, 1 channel, z_dim 100 and
width 64 this is the classic MNIST DCGAN (G 100->256->128->64->1, D 1->64->128->256->1); at 64x64x3 it is
the network of pytorch/examples/dcgan. D returns logits, not probabilities: the sigmoid lives in the loss,
where it is computed in a numerically safe form (that is what keeps fp16/bf16 training from saturating).

`norm="none"` drops the BatchNorm layers (and gives the convolutions a bias instead): a batch-independent
network, for which a step on 2 ranks of batch B equals a step on one rank of batch 2B.

Class-conditional (num_classes > 0): G embeds the class and joins the embedding to z, [N, z_dim + embed_dim];
D keeps its trunk and adds a projection (Miyato & Koyama 2018): logit = w.h + b + <embed(c), sum_xy h>, with h
D's last feature map [N, ch, 4, 4], so the class enters as an inner product with D's features rather than as an
input channel. With num_classes = 0 neither embedding exists and the networks are exactly the unconditional ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _num_up(resolution: int) -> int:
    n = int(math.log2(resolution)) - 2
    if 2 ** (n + 2) != resolution or n < 1:
        raise ValueError(f"DCGAN makes square images of a power-of-two size >= 8, not {resolution}")
    return n


def _norm(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_generator(cfg) -> nn.Module:
    o = cfg.options
    return Generator(cfg.z_dim, cfg.resolution, cfg.channels, o.g_width, o.norm, cfg.num_classes, o.embed_dim)


def build_discriminator(cfg) -> nn.Module:
    o = cfg.options
    return Discriminator(cfg.resolution, cfg.channels, o.d_width, o.norm, cfg.num_classes)


class Generator(nn.Module):
    def __init__(self, z_dim: int = 100, resolution: int = 64, channels: int = 3, width: int = 64, norm: str = "batch",
                 num_classes: int = 0, embed_dim: int = 0):  # fmt: skip
        super().__init__()
        self.z_dim, self.resolution, self.channels, self.num_classes = z_dim, resolution, channels, num_classes
        n = _num_up(resolution)
        bias = norm == "none"
        ch = width * 2 ** (n - 1)
        embed_dim = (embed_dim or z_dim) if num_classes else 0
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim + embed_dim, ch, 4, 1, 0, bias=bias),  # [N, ch, 4, 4]
            _norm(norm, ch),
            nn.ReLU(inplace=True),
        ]
        for _ in range(n - 1):  # 4 -> res/2, halving channels
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=bias), _norm(norm, ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=bias), nn.Tanh()]  # [N, channels, res, res]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        if self.embed is not None:
            # A class vector of norm ~1 (like a one-hot label) beside z's ~sqrt(z_dim): G starts out using z, and
            # learns what the class adds. An embedding as large as z (N(0, 1)) made G ignore z (measured: one
            # image per class at 40 kimg on the shapes, every latent alike).
            nn.init.normal_(self.embed.weight, 0.0, embed_dim**-0.5)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # z: [N, z_dim], c: [N] class indices (conditional) -> images in [-1, 1]: [N, channels, res, res]
        z = z.reshape(z.shape[0], self.z_dim)
        if self.embed is not None:
            z = torch.cat([z, self.embed(c)], dim=1)  # [N, z_dim + embed_dim]
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 64, channels: int = 3, width: int = 64, norm: str = "batch",
                 num_classes: int = 0):  # fmt: skip
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        n = _num_up(resolution)
        bias = norm == "none"
        ch = width
        layers: list[nn.Module] = [nn.Conv2d(channels, ch, 4, 2, 1, bias=bias), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(n - 1):  # res/2 -> 4, doubling channels
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=bias), _norm(norm, ch * 2), nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=bias)]  # [N, 1, 1, 1]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)
        # The trunk up to the last feature map and the head after it, for the projection; plain tuples, so the
        # parameters keep their names in self.net (checkpoints of before conditioning still load).
        self._trunk, self._head = tuple(self.net)[:-1], self.net[-1]
        self.embed = nn.Embedding(num_classes, ch) if num_classes else None  # the projection
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, channels, res, res], c: [N] (conditional) -> logits [N]
        if self.embed is None:
            return self.net(x).flatten()
        h = x
        for layer in self._trunk:
            h = layer(h)  # -> [N, ch, 4, 4]
        logits = self._head(h).flatten()
        if self.embed is not None:
            logits = logits + (self.embed(c) * h.sum(dim=(2, 3))).sum(dim=1)
        return logits
