"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same random, differentiable transform is applied to every image D sees, real or fake, in D's phases and in
G's: D never sees an un-augmented image, and G's gradient flows back through the transform. Unlike ADA there is
no probability: every op in the policy is applied to every sample (with its own random parameters).

Policies, written from the paper's definitions for images in [-1, 1] (one draw per sample):

    color        brightness  x + (u - 0.5)                          u ~ U(0, 1)
                 saturation  (x - m) * 2u + m,  m the channel mean   (identity on grey images: x = m)
                 contrast    (x - m) * (u + 0.5) + m,  m the mean over C, H, W
    translation  shift by whole pixels (dx, dy) ~ U{-round(W/8) .. round(W/8)} x U{-round(H/8) .. round(H/8)};
                 pixels moved in from outside the image are 0
    cutout       zero a square of round(H/2) x round(W/2) pixels whose centre is uniform over the image, so the
                 square is clipped at the borders as often as not near them

Translation is a torch.gather over the flattened pixels (the gradient reaches every source pixel) and cutout a
multiplication by a 0/1 mask: no op detaches x. All randomness comes from the caller's generator; the math runs
in float32 with autocast off, and the result is cast back to x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distgan.augment.names import POLICIES, parse_policy

__all__ = ["POLICIES", "DiffAugment"]
TRANSLATION_RATIO = 1 / 8  # largest shift, as a fraction of the image size
CUTOUT_RATIO = 1 / 2  # side of the cut-out square, as a fraction of the image size


def _uniform(x: Tensor, gen: torch.Generator) -> Tensor:
    """One U(0, 1) number per sample, shaped to broadcast over x: [N, 1, 1, 1]."""
    return torch.rand([x.shape[0], 1, 1, 1], generator=gen, device=x.device)


def color(x: Tensor, gen: torch.Generator) -> Tensor:
    """Brightness, then saturation, then contrast."""
    x = x + (_uniform(x, gen) - 0.5)
    m = x.mean(dim=1, keepdim=True)  # [N, 1, H, W]
    x = (x - m) * (_uniform(x, gen) * 2) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # [N, 1, 1, 1]
    return (x - m) * (_uniform(x, gen) + 0.5) + m


def translation(x: Tensor, gen: torch.Generator) -> Tensor:
    """Shift each sample by whole pixels, zeros moving in: out[n, :, i, j] = x[n, :, i - dy, j - dx]."""
    n, c, h, w = x.shape
    sx, sy = int(w * TRANSLATION_RATIO + 0.5), int(h * TRANSLATION_RATIO + 0.5)
    dx = torch.randint(-sx, sx + 1, [n, 1, 1], generator=gen, device=x.device)  # [N, 1, 1]
    dy = torch.randint(-sy, sy + 1, [n, 1, 1], generator=gen, device=x.device)
    src_i = torch.arange(h, device=x.device).view(1, h, 1) - dy  # [N, H, 1]: source row of each output row
    src_j = torch.arange(w, device=x.device).view(1, 1, w) - dx  # [N, 1, W]
    inside = (src_i >= 0) & (src_i < h) & (src_j >= 0) & (src_j < w)  # [N, H, W]
    index = src_i.clamp(0, h - 1) * w + src_j.clamp(0, w - 1)  # [N, H, W], into the flattened pixels
    index = index.view(n, 1, h * w).expand(n, c, h * w)
    moved = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1), moved, torch.zeros((), dtype=x.dtype, device=x.device))


def cutout(x: Tensor, gen: torch.Generator) -> Tensor:
    """Zero a square of half the image's size per sample; its centre pixel (ci, cj) is uniform over
    {0 .. H - (size % 2)}: the square covers rows ci - size // 2 .. ci - size // 2 + size - 1, clipped to the
    image, so an even square can be half outside on either side, symmetrically."""
    n, _, h, w = x.shape
    sh, sw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    ci = torch.randint(0, h + 1 - sh % 2, [n, 1, 1], generator=gen, device=x.device)  # [N, 1, 1]
    cj = torch.randint(0, w + 1 - sw % 2, [n, 1, 1], generator=gen, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - (ci - sh // 2)  # [N, H, 1]: row within the square
    cols = torch.arange(w, device=x.device).view(1, 1, w) - (cj - sw // 2)  # [N, 1, W]
    inside = (rows >= 0) & (rows < sh) & (cols >= 0) & (cols < sw)  # [N, H, W]
    return x * (~inside).unsqueeze(1).to(x.dtype)


_FUNCTIONS = {"color": color, "translation": translation, "cutout": cutout}


class DiffAugment(nn.Module):
    """DiffAugment with a comma-separated `policy` of POLICIES, applied in the order written; "" or "none": none.

    forward(x [N, C, H, W] in [-1, 1], gen) -> the augmented batch, same shape and dtype (C = 1 or 3).
    """

    def __init__(self, policy: str = "color,translation,cutout"):
        super().__init__()
        self.policy = parse_policy(policy)

    def forward(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if not self.policy:
            return x
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = x.float()
            for name in self.policy:
                y = _FUNCTIONS[name](y, gen)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"policy={','.join(self.policy) or 'none'}"
