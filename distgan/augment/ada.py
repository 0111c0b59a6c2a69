"""ADA's augmentation pipeline (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data",
appendix B), written from the paper's description.

Every op fires per sample with probability p * multiplier (a uniform u is drawn per sample and the op applies
where u < p * mult; elsewhere it is the identity). p is the buffer `self.p`, which the trainer's controller sets
(`pipe.p.copy_(value)`); the multipliers are fixed at construction (`ops`, e.g. ADA_GROUPS["bgc"]). Stages, in
the paper's order, with its default parameters:

    pixel blitting  xflip       mirror x, with probability 1/2 when the op fires
                    rotate90    rotate by k * 90 degrees, k ~ U{0, 1, 2, 3}
                    xint        translate by round(U(-0.125, 0.125) * size) whole pixels, per axis
    geometric       scale       isotropic, 2^N(0, 0.2^2)
                    rotate      U(-180, 180) degrees, twice (before and after aniso), each with probability
                                1 - sqrt(1 - p * mult), so that at least one fires with probability p * mult
                    aniso       2^N(0, 0.2^2) on x and its inverse on y (between the rotations: any axis)
                    xfrac       translate by N(0, 0.125^2) * size, per axis
    colour          brightness  add N(0, 0.2^2)
                    contrast    multiply by 2^N(0, 0.5^2)
                    lumaflip    Householder reflection I - 2 v v^T on the luma axis v = (1, 1, 1) / sqrt(3),
                                with probability 1/2 when the op fires
                    hue         rotate around v by U(-180, 180) degrees
                    saturation  scale the component orthogonal to v by 2^N(0, 1)
    image-space     imgfilter   amplify 4 frequency bands by 2^N(0, 1) each (approximated, below)
                    noise       add Gaussian noise of std |N(0, 0.1^2)|
                    cutout      zero a square of half the image's size at a uniform random centre

Geometric ops (blits included) compose into one 3x3 matrix per sample, mapping an output pixel to the input point
it samples (so each op contributes its inverse; every distribution is symmetric, so the inverse's parameter is
drawn directly). It acts on pixel coordinates centred on the image, so rotations are true rotations on non-square
images too, and is converted to affine_grid's normalised coordinates once. The image is resampled once, with
bilinear grid_sample, reflection padding and align_corners=False: plain PyTorch, differentiable with respect to
the pixels. The paper instead upsamples with wavelet filters before a bicubic warp to limit aliasing; distgan
does not, so a general warp blurs slightly. A flip, a 90-degree rotation or a whole-pixel shift lands exactly on
pixel centres, where bilinear sampling copies pixels exactly (up to float rounding of the grid when the size is
not a power of 2; 90-degree rotations of non-square images are cropped or reflected).

Colour ops compose into one 4x4 matrix per sample acting on (r, g, b, 1). A grey image (C = 1) is treated as
r = g = b: hue and saturation leave the luma axis fixed, so they are the identity there and are switched off
(their numbers are still drawn); brightness, contrast and lumaflip act on the value itself (its luma).

imgfilter approximation: the paper splits the spectrum with wavelet filters. Here the bands are differences of
Gaussian blurs of the image, sigma 0.5, 1, 2 and 4 pixels (replicate padding): band k = blur(sigma_{k-1}) -
blur(sigma_k), sigma_{-1} = 0 being the image itself; the residual blur(4) (DC, lowest frequencies) keeps its
gain, and the paper's renormalisation of the total gain is left out.

Contracts. All randomness comes from the caller's generator, and the same numbers are drawn whatever p is, so
the stream never depends on p (ops whose multiplier is 0 draw nothing: that is fixed by the config). A sample no
op changes is returned bit for bit (`torch.where` per sample: p = 0 is the identity bit for bit), and a stage whose
ops all have multiplier 0 is never computed. Whether a stage runs is fixed by the config, never read from the
device: the pipe adds no host sync to a training step (tests/unit/test_host_syncs.py counts them). Math is
float32 with autocast off; the result is cast back to x's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgan.augment.names import ADA_GROUPS, BLIT_OPS, COLOR_OPS, GEOMETRIC_OPS, OPS, OTHER_OPS, check_ops, parse_ops

__all__ = ["ADA_GROUPS", "OPS", "AugmentPipe", "parse_ops"]

XINT_MAX, SCALE_STD, ANISO_STD, XFRAC_STD = 0.125, 0.2, 0.2, 0.125
BRIGHTNESS_STD, CONTRAST_STD, SATURATION_STD = 0.2, 0.5, 1.0
FILTER_SIGMAS, FILTER_STD = (0.5, 1.0, 2.0, 4.0), 1.0
NOISE_STD, CUTOUT_SIZE = 0.1, 0.5


def _matrix(rows: list[list], like: Tensor) -> Tensor:
    """A batch of matrices [N, R, C] from `rows` of numbers or [N] tensors (numbers are broadcast over N)."""

    def entry(v) -> Tensor:
        return torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(like.shape)

    return torch.stack([torch.stack([entry(v) for v in row], -1) for row in rows], -2)


def _translate(tx: Tensor, ty: Tensor) -> Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)  # [N, 3, 3]


def _scale(sx: Tensor, sy: Tensor) -> Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)  # [N, 3, 3]


def _rotate(cos: Tensor, sin: Tensor) -> Tensor:
    return _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], cos)  # [N, 3, 3]


def _colour4(m3: Tensor) -> Tensor:
    """[N, 3, 3] linear colour map -> [N, 4, 4] acting on (r, g, b, 1)."""
    return F.pad(m3, (0, 1, 0, 1)) + F.pad(m3.new_ones(1, 1, 1), (3, 0, 3, 0))


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of each channel, replicate padding: [N, C, H, W] -> [N, C, H, W]."""
    n, c, h, w = x.shape
    r = math.ceil(3 * sigma)
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    k = k / k.sum()  # [2r + 1]
    z = x.reshape(n * c, 1, h, w)
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    z = F.conv2d(F.pad(z, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return z.view(n, c, h, w)


class AugmentPipe(nn.Module):
    """ADA's pipeline: `ops` maps names of OPS to probability multipliers (missing ones are 0), `p` the initial
    strength. forward(x [N, C, H, W] in [-1, 1], gen) -> the augmented batch, same shape and dtype (C = 1 or 3).
    """

    def __init__(self, ops: dict[str, float], p: float = 0.0):
        super().__init__()
        check_ops(ops)
        self.ops = {name: float(ops.get(name, 0.0)) for name in OPS}
        self.register_buffer("p", torch.tensor(float(p), dtype=torch.float32))

    def extra_repr(self) -> str:
        on = ", ".join(f"{k}={v:g}" for k, v in self.ops.items() if v)
        return f"p={float(self.p):.4f}, ops=({on})"

    def _fires(self, name: str, n: int, gen: torch.Generator, dev, split: bool = False) -> Tensor:
        """Draw u ~ U(0, 1) per sample: [N] bool, u < p * mult (split: the rotations' 1 - sqrt(1 - p * mult))."""
        prob = (self.p.to(dev) * self.ops[name]).clamp(0, 1)
        if split:
            prob = 1 - torch.sqrt(1 - prob)
        return torch.rand([n], generator=gen, device=dev) < prob

    def geometric_matrix(self, n: int, h: int, w: int, gen: torch.Generator, dev) -> Tensor:
        """[N, 3, 3]: output pixel -> sampled input point, in pixel coordinates centred on the image."""
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        g = eye
        on = self.ops

        def then(fires: Tensor, m: Tensor) -> None:  # apply op m after those composed so far (inverses: right)
            nonlocal g
            g = g @ torch.where(fires.view(n, 1, 1), m, eye)

        def rand(*shape) -> Tensor:
            return torch.rand([n, *shape], generator=gen, device=dev)

        def randn(*shape) -> Tensor:
            return torch.randn([n, *shape], generator=gen, device=dev)

        def rotation() -> None:
            fires, theta = self._fires("rotate", n, gen, dev, split=True), (rand() * 2 - 1) * math.pi
            then(fires, _rotate(torch.cos(theta), torch.sin(theta)))

        if on["xflip"]:
            fires, flip = self._fires("xflip", n, gen, dev), torch.randint(2, [n], generator=gen, device=dev)
            then(fires, _scale(1 - 2 * flip.float(), torch.ones(n, device=dev)))
        if on["rotate90"]:
            fires, k = self._fires("rotate90", n, gen, dev), torch.randint(4, [n], generator=gen, device=dev)
            cos, sin = torch.tensor([1.0, 0, -1, 0], device=dev)[k], torch.tensor([0.0, 1, 0, -1], device=dev)[k]
            then(fires, _rotate(cos, sin))  # exact entries: cos(pi / 2) in float is not 0
        if on["xint"]:
            fires, t = self._fires("xint", n, gen, dev), (rand(2) * 2 - 1) * XINT_MAX
            then(fires, _translate(torch.round(t[:, 0] * w), torch.round(t[:, 1] * h)))
        if on["scale"]:
            fires, s = self._fires("scale", n, gen, dev), torch.exp2(randn() * SCALE_STD)
            then(fires, _scale(s, s))
        if on["rotate"]:
            rotation()
        if on["aniso"]:
            fires, s = self._fires("aniso", n, gen, dev), torch.exp2(randn() * ANISO_STD)
            then(fires, _scale(s, 1 / s))
        if on["rotate"]:
            rotation()
        if on["xfrac"]:
            fires, t = self._fires("xfrac", n, gen, dev), randn(2) * XFRAC_STD
            then(fires, _translate(t[:, 0] * w, t[:, 1] * h))
        return g

    def colour_matrix(self, n: int, grey: bool, gen: torch.Generator, dev) -> Tensor:
        """[N, 4, 4] acting on (r, g, b, 1); grey: hue and saturation off (their numbers still drawn)."""
        eye4, eye3 = torch.eye(4, device=dev).expand(n, 4, 4), torch.eye(3, device=dev)
        v = torch.full([3], 3**-0.5, device=dev)
        vv = torch.outer(v, v)  # [3, 3]: projection on the luma axis
        m = eye4
        on = self.ops

        def then(fires: Tensor, op: Tensor) -> None:  # colour maps act on the left: later ops multiply there
            nonlocal m
            m = torch.where(fires.view(n, 1, 1), op, eye4) @ m

        def randn() -> Tensor:
            return torch.randn([n, 1, 1], generator=gen, device=dev)

        if on["brightness"]:
            fires, b = self._fires("brightness", n, gen, dev), randn() * BRIGHTNESS_STD
            then(fires, eye4 + F.pad(b.expand(n, 3, 1), (3, 0, 0, 1)))
        if on["contrast"]:
            fires, c = self._fires("contrast", n, gen, dev), torch.exp2(randn() * CONTRAST_STD)
            then(fires, _colour4(c * eye3))
        if on["lumaflip"]:
            fires, i = self._fires("lumaflip", n, gen, dev), torch.randint(2, [n, 1, 1], generator=gen, device=dev)
            then(fires, _colour4(eye3 - 2 * vv * i))
        if on["hue"]:
            fires = self._fires("hue", n, gen, dev) & (not grey)
            theta = (torch.rand([n, 1, 1], generator=gen, device=dev) * 2 - 1) * math.pi
            a = 3**-0.5
            cross = torch.tensor([[0, -a, a], [a, 0, -a], [-a, a, 0]], device=dev)  # [v]_x: u -> v x u
            then(fires, _colour4(torch.cos(theta) * eye3 + torch.sin(theta) * cross + (1 - torch.cos(theta)) * vv))
        if on["saturation"]:
            fires = self._fires("saturation", n, gen, dev) & (not grey)
            s = torch.exp2(randn() * SATURATION_STD)
            then(fires, _colour4(vv + s * (eye3 - vv)))
        return m

    def forward(self, x: Tensor, gen: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        if c not in (1, 3):
            raise ValueError(f"AugmentPipe takes 1 or 3 channels, got {c}")
        dev, on = x.device, self.ops
        with torch.autocast(device_type=dev.type, enabled=False):
            y = x.float()
            # Draw everything first, in a fixed order (the stream never depends on p).
            g = self.geometric_matrix(n, h, w, gen, dev)  # [N, 3, 3]
            m = self.colour_matrix(n, c == 1, gen, dev)  # [N, 4, 4]
            gains = noise = keep = None
            if on["imgfilter"]:
                fires = self._fires("imgfilter", n, gen, dev).view(n, 1)
                gains = torch.where(fires, torch.exp2(torch.randn([n, 4], generator=gen, device=dev) * FILTER_STD), 1)
            if on["noise"]:
                fires = self._fires("noise", n, gen, dev)
                std = torch.where(fires, torch.randn([n], generator=gen, device=dev).abs() * NOISE_STD, 0)
                noise = std.view(n, 1, 1, 1) * torch.randn(y.shape, generator=gen, device=dev)  # [N, C, H, W]
            if on["cutout"]:
                fires, centre = self._fires("cutout", n, gen, dev), torch.rand([n, 2, 1, 1], generator=gen, device=dev)
                px = ((torch.arange(w, device=dev) + 0.5) / w).view(1, 1, w)  # pixel centres in [0, 1]
                py = ((torch.arange(h, device=dev) + 0.5) / h).view(1, h, 1)
                inside = ((px - centre[:, 0]).abs() < CUTOUT_SIZE / 2) & ((py - centre[:, 1]).abs() < CUTOUT_SIZE / 2)
                keep = ~(inside & fires.view(n, 1, 1))  # [N, H, W]

            changed = {  # [N] bool per stage: does it alter this sample?
                "geometric": (g != torch.eye(3, device=dev)).flatten(1).any(1),
                "colour": (m != torch.eye(4, device=dev)).flatten(1).any(1),
            }
            if gains is not None:
                changed["imgfilter"] = (gains != 1).any(1)
            if noise is not None:
                changed["noise"] = std != 0
            if keep is not None:
                changed["cutout"] = ~keep.flatten(1).all(1)
            # Which stages run: fixed by the multipliers (no host sync); unchanged samples pass through `stage`.
            active = {
                "geometric": any(on[k] for k in BLIT_OPS + GEOMETRIC_OPS),
                "colour": any(on[k] for k in COLOR_OPS),
                **{k: True for k in OTHER_OPS},
            }

            def stage(name: str, out: Tensor) -> Tensor:  # changed samples from `out`, the others untouched
                return torch.where(changed[name].view(n, 1, 1, 1), out, y)

            if active["geometric"]:
                d = torch.tensor([w / 2, h / 2, 1.0], device=dev)  # normalised -> centred pixel coordinates
                theta = g * d.view(1, 1, 3) / d.view(1, 3, 1)  # [N, 3, 3]: D^-1 G D
                grid = F.affine_grid(theta[:, :2], [n, c, h, w], align_corners=False)  # [N, H, W, 2]
                y = stage("geometric", F.grid_sample(y, grid, "bilinear", "reflection", align_corners=False))
            if active["colour"]:
                if c == 3:
                    out = torch.einsum("nij,njhw->nihw", m[:, :3, :3], y) + m[:, :3, 3].view(n, 3, 1, 1)
                else:  # r = g = b = y: the mean output channel, a * y + b
                    a, b = m[:, :3, :3].sum((1, 2)) / 3, m[:, :3, 3].mean(1)
                    out = a.view(n, 1, 1, 1) * y + b.view(n, 1, 1, 1)
                y = stage("colour", out)
            if gains is not None and active["imgfilter"]:
                blurred = [y] + [_gaussian_blur(y, sigma) for sigma in FILTER_SIGMAS]  # finest to coarsest
                out = y
                for k in range(len(FILTER_SIGMAS)):  # band k: blurred[k] - blurred[k + 1]; gain 1 adds 0
                    out = out + (gains[:, k] - 1).view(n, 1, 1, 1) * (blurred[k] - blurred[k + 1])
                y = stage("imgfilter", out)
            if noise is not None and active["noise"]:
                y = stage("noise", y + noise)
            if keep is not None and active["cutout"]:
                y = stage("cutout", y * keep.unsqueeze(1).to(y.dtype))
        return y.to(x.dtype)
