"""BigGAN (Brock et al. 2019): residual G and D with spectral norm, class-conditional BatchNorm in G, a projection
D (Miyato & Koyama 2018), hierarchical latents and one self-attention block (Zhang et al. 2019, SAGAN).

With `ch` the channel unit (model.biggan.g_width for G, d_width for D) the networks are, per resolution
(BigGAN's appendix B, Table 4 at 128x128; 64x64 and 32x32 are the same design on fewer blocks, and 32x32 is the
ResNet of SNGAN's CIFAR-10 experiments, Miyato et al. 2018's appendix, with G at ch = 64 and D at ch = 32):

    G: z -> linear -> [N, m0*ch, 4, 4] -> GBlock x n (each doubles H, W) -> BN, ReLU, conv3x3 -> tanh
       m = 4, 4, 4, 4 (32x32, n = 3)   16, 16, 8, 4, 2 (64x64, n = 4)   16, 16, 8, 4, 2, 1 (128x128, n = 5)
    D: x -> DBlock x k -> ReLU -> sum over H, W -> linear -> logit  (+ projection)
       m = 4, 4, 4, 4, the last two without downsampling (32x32); 1, 2, 4, 8, 16 (64x64) and 1, 2, 4, 8, 16, 16
       (128x128), each halving H, W but the last

    GBlock(x, y):  h = conv3x3(up(ReLU(CBN(x, y))));  h = conv3x3(ReLU(CBN(h, y)));  out = h + conv1x1(up(x))
    DBlock(x):     h = pool(conv3x3(ReLU(conv3x3(ReLU(x)))));  out = h + pool(conv1x1(x))
                   (up = nearest-neighbour x2, pool = 2x2 average; the first D block skips the leading ReLU, SNGAN's
                   "optimized" block, since a ReLU on the image would throw half of it away; a D block that keeps
                   its shape and width has an identity skip)

At 128x128 with ch = 96, 1000 classes, z_dim = 120 and attention at 64x64 this is the paper's ImageNet model:
G 70,433,988 and D 87,982,370 parameters (the counts google/compare_gan's independent BigGAN asserts in
compare_gan/architectures/resnet_biggan_test.py; tests/unit/test_biggan.py checks them).

Conditioning. G has one shared class embedding (shared_dim, 128 in the paper). z is split into one chunk for the
input linear layer and one per block ("hierarchical latents"); every G block gets y = [embed(c), its z chunk] and
each of its BatchNorms is BN without affine parameters followed by a per-sample gain and bias projected from y:
CBN(x, y) = BN(x) * (1 + W_g y) + W_b y (the 1 + makes a zero projection the identity, as BN's gain starts at 1).
Unconditional (num_classes = 0) y is the z chunk alone; with hier = false as well, there is no y and the BNs are
ordinary affine BatchNorms (SNGAN's unconditional G). D is conditioned by projection: the logit gets
<embed_D(c), h>, with h D's pooled features, in place of a class input.

Spectral norm (Miyato et al. 2018) is on every conv, linear and D's projection embedding, in G as well as D
(BigGAN, after SAGAN), through torch's own parametrisation (torch.nn.utils.parametrizations.spectral_norm): one
power iteration per forward in train mode, updating the buffers _u and _v of each weight, and none in eval mode.
It runs with autocast off (`SpectralNorm` below): torch's parametrisation computes in the weight's dtype, but
CUDA's autocast puts torch.mv on its low-precision list (CPU's does not), which would run the power iteration and
sigma in bf16/fp16 (and mix dtypes in sigma's torch.vdot, pytorch/pytorch#125544), while the estimate of sigma
and the u, v it leaves for the next step belong in fp32; the normalised weight then enters the conv in whatever
precision autocast picks. eps = 1e-6 floors the norm of W v in the iteration; it only acts on a (near-)zero
weight, so the value is immaterial for any weight in use. G's shared embedding is not spectrally normalised (it is
a table looked up by an integer, read only through spectrally normalised linears), as in BigGAN.

Self-attention (SAGAN's non-local block) sits after the G block, and after the first D block, whose output is
attn_res x attn_res: theta, phi: 1x1 convs to C/8 channels, g: 1x1 conv to C/2, phi and g max-pooled 2x2,
attention = softmax(theta^T phi) over the pooled positions, out = x + sigma * conv1x1(g attention^T), sigma a
learned scalar starting at 0, so the block starts as the identity. The softmax is in fp32 and the block is written
with bmm rather than scaled_dot_product_attention, whose fused kernels have no double backward (R1 needs one).

Initialisation: orthogonal (Saxe et al. 2014, BigGAN) for every conv, linear and embedding weight, biases 0;
N(0, 0.02) and Xavier-uniform are options.

Nothing in D is in-place, so input gradients with create_graph=True (R1) work. In train mode every forward updates
buffers: SN's _u/_v in G and D, BatchNorm's running statistics in G.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

SN_EPS = 1e-6
BN_EPS = 1e-5

# Channel multipliers of ch: G's first entry is the input linear's width, the rest each block's output.
G_WIDTHS = {32: (4, 4, 4, 4), 64: (16, 16, 8, 4, 2), 128: (16, 16, 8, 4, 2, 1)}
# D: each block's output width and whether it halves H and W.
D_BLOCKS = {
    32: ((4, True), (4, True), (4, False), (4, False)),
    64: ((1, True), (2, True), (4, True), (8, True), (16, False)),
    128: ((1, True), (2, True), (4, True), (8, True), (16, True), (16, False)),
}


def _check(resolution: int) -> None:
    if resolution not in G_WIDTHS:
        raise ValueError(f"BigGAN makes {sorted(G_WIDTHS)}-pixel images, not {resolution}")


def attention_resolution(attn_res: int | str, resolution: int) -> int:
    """The feature size that gets self-attention (0 = none): "auto" is BigGAN's 64 at 128x128, the same place
    (half the output size) at 64x64, and none at 32x32 (SNGAN's CIFAR ResNet has none)."""
    if attn_res == "auto":
        return resolution // 2 if resolution >= 64 else 0
    return int(attn_res)


class SpectralNorm(_SpectralNorm):
    """torch's spectral-norm parametrisation, run with autocast off (see the module docstring), and always eager.

    Under train.compile the weight's normalisation runs outside the compiled graphs (a graph break at each
    spectrally normalised layer; the activations between them are still compiled and fused). Compiled, the power
    iteration's in-place update of _u and _v becomes a mutation of a graph input that the backward keeps, and D
    runs on reals and on fakes before one backward: the second forward's update overwrote what the first one's
    backward needs ("modified by an inplace operation"). Eager, torch clones u and v for the backward."""

    @torch.compiler.disable
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not torch.amp.is_autocast_available(weight.device.type):  # e.g. "meta": nothing to turn off
            return super().forward(weight)
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight)


def spectral_norm(module: nn.Module) -> nn.Module:
    """module.weight <- weight / sigma(weight); the same parametrisation and state-dict keys as
    torch.nn.utils.parametrizations.spectral_norm (parametrizations.weight.original, ..._u, ..._v)."""
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight, 1, 0, SN_EPS))
    return module


INITS = {
    "ortho": nn.init.orthogonal_,
    "N02": lambda w: nn.init.normal_(w, 0.0, 0.02),
    "xavier": nn.init.xavier_uniform_,
}


def init_and_normalise(net: nn.Module, init: str, plain: tuple[nn.Module, ...] = ()) -> None:
    """Initialise every conv, linear and embedding weight (biases 0), then put spectral norm on all of them but
    `plain`. Initialisation comes first: the parametrisation starts its u, v with 15 power iterations on the
    weight it is given."""
    for m in list(net.modules()):  # a list: spectral_norm adds submodules while we walk
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            INITS[init](m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if not any(m is p for p in plain):
                spectral_norm(m)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def conv1x1(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias)


def up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


# ---------------------------------------------------------------------- building blocks


class ConditionalBatchNorm(nn.Module):
    """BN(x) * (1 + gain(y)) + bias(y), gain and bias linear in y (no bias terms of their own: the 1 + and the
    class embedding supply the offsets). y_dim = 0: an ordinary affine BatchNorm, and y is ignored."""

    def __init__(self, channels: int, y_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS, affine=y_dim == 0)
        self.to_gain = nn.Linear(y_dim, channels, bias=False) if y_dim else None
        self.to_bias = nn.Linear(y_dim, channels, bias=False) if y_dim else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.bn(x)  # [N, C, H, W]
        if self.to_gain is None:
            return h
        gain, bias = 1 + self.to_gain(y), self.to_bias(y)  # [N, C] each
        return h * gain[:, :, None, None] + bias[:, :, None, None]


class GBlock(nn.Module):
    """BigGAN's "ResBlock up": CBN-ReLU-up-conv3x3-CBN-ReLU-conv3x3, plus a 1x1 conv of the upsampled input."""

    def __init__(self, cin: int, cout: int, y_dim: int):
        super().__init__()
        self.bn1, self.conv1 = ConditionalBatchNorm(cin, y_dim), conv3x3(cin, cout)
        self.bn2, self.conv2 = ConditionalBatchNorm(cout, y_dim), conv3x3(cout, cout)
        self.skip = conv1x1(cin, cout)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        # x: [N, cin, H, W] -> [N, cout, 2H, 2W]
        h = self.conv1(up(F.relu(self.bn1(x, y))))
        h = self.conv2(F.relu(self.bn2(h, y)))
        return h + up(self.skip(x))  # a 1x1 conv and nearest upsampling commute; the conv on 4x fewer pixels


class DBlock(nn.Module):
    """BigGAN's "ResBlock down": ReLU-conv3x3-ReLU-conv3x3-avgpool, plus avgpool-conv1x1 of the input (identity
    when the block keeps shape and width). `first`: no ReLU on the image (SNGAN's optimized first block)."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool = False):
        super().__init__()
        self.down, self.first = down, first
        self.conv1, self.conv2 = conv3x3(cin, cout), conv3x3(cout, cout)
        self.skip = conv1x1(cin, cout) if down or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, cin, H, W] -> [N, cout, H/2, W/2] (or H, W); nothing in place (x may need input gradients)
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        s = x
        if self.down:  # average pooling and a 1x1 conv commute: pool first, the conv on 4x fewer pixels
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + (self.skip(s) if self.skip is not None else s)


class SelfAttention(nn.Module):
    """SAGAN's non-local block; the output is x + sigma * attention(x), sigma starting at 0 (the identity).
    (C/8 is raised to 1 channel for toy widths below 8.)"""

    def __init__(self, channels: int):
        super().__init__()
        ck, cv = max(channels // 8, 1), max(channels // 2, 1)
        self.theta, self.phi = conv1x1(channels, ck, bias=False), conv1x1(channels, ck, bias=False)
        self.g, self.o = conv1x1(channels, cv, bias=False), conv1x1(cv, channels, bias=False)
        self.sigma = nn.Parameter(torch.zeros([1]))  # [1], not a 0-dim scalar: see test_families

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, hgt, wid = x.shape
        theta = self.theta(x).flatten(2)  # queries [N, C/8, HW]
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # keys [N, C/8, HW/4]
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # values [N, C/2, HW/4]
        scores = torch.bmm(theta.transpose(1, 2), phi)  # [N, HW, HW/4]
        attn = torch.softmax(scores.float(), dim=-1).to(g.dtype)
        o = torch.bmm(g, attn.transpose(1, 2)).view(n, -1, hgt, wid)  # [N, C/2, H, W]
        return x + self.sigma * self.o(o)


# ---------------------------------------------------------------------- the networks


def build_generator(cfg) -> nn.Module:
    o = cfg.options
    return Generator(cfg.z_dim, cfg.resolution, cfg.channels, o.g_width, cfg.num_classes, o.shared_dim, o.hier,
                     attention_resolution(o.attn_res, cfg.resolution), o.init)  # fmt: skip


def build_discriminator(cfg) -> nn.Module:
    o = cfg.options
    return Discriminator(cfg.resolution, cfg.channels, o.d_width, cfg.num_classes,
                         attention_resolution(o.attn_res, cfg.resolution), o.init)  # fmt: skip


class Generator(nn.Module):
    def __init__(self, z_dim: int = 120, resolution: int = 128, channels: int = 3, width: int = 96,
                 num_classes: int = 0, shared_dim: int = 128, hier: bool = True, attn_res: int = 64,
                 init: str = "ortho"):  # fmt: skip
        super().__init__()
        _check(resolution)
        self.z_dim, self.resolution, self.channels, self.num_classes = z_dim, resolution, channels, num_classes
        widths = [m * width for m in G_WIDTHS[resolution]]
        n_blocks = len(widths) - 1
        if hier and z_dim % (n_blocks + 1):
            raise ValueError(f"hierarchical latents split z into {n_blocks + 1} equal chunks at {resolution}x"
                             f"{resolution}: z_dim={z_dim} is not a multiple of {n_blocks + 1}")  # fmt: skip
        self.hier = hier
        self.chunk = z_dim // (n_blocks + 1) if hier else z_dim  # the input layer's share of z
        y_dim = (shared_dim if num_classes else 0) + (self.chunk if hier else 0)  # what each block is told

        self.shared = nn.Embedding(num_classes, shared_dim) if num_classes else None
        self.linear = nn.Linear(self.chunk, widths[0] * 4 * 4)
        self.blocks = nn.ModuleList(GBlock(widths[i], widths[i + 1], y_dim) for i in range(n_blocks))
        # Attention after the block whose output is attn_res x attn_res (block i outputs 8 * 2^i).
        self.attn_after = next((i for i in range(n_blocks) if 8 * 2**i == attn_res), None)
        self.attn = SelfAttention(widths[self.attn_after + 1]) if self.attn_after is not None else None
        self.out_bn = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.out_conv = conv3x3(widths[-1], channels)
        init_and_normalise(self, init, plain=(self.shared,) if self.shared is not None else ())

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # z: [N, z_dim], c: [N] class indices (conditional) -> images in [-1, 1]: [N, channels, res, res]
        n = z.shape[0]
        z = z.reshape(n, self.z_dim)
        if self.shared is not None and c is None:
            raise ValueError("a class-conditional G needs class labels c")
        zs = z.split(self.chunk, dim=1) if self.hier else (z,)  # hierarchical: one chunk per block after the first
        e = self.shared(c) if self.shared is not None else None  # [N, shared_dim]
        h = self.linear(zs[0]).view(n, -1, 4, 4)  # [N, m0*ch, 4, 4]
        for i, block in enumerate(self.blocks):
            parts = [t for t in (e, zs[i + 1] if self.hier else None) if t is not None]
            y = torch.cat(parts, dim=1) if parts else None  # [N, shared_dim + chunk]: this block's conditioning
            h = block(h, y)
            if i == self.attn_after:
                h = self.attn(h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 128, channels: int = 3, width: int = 96, num_classes: int = 0,
                 attn_res: int = 64, init: str = "ortho"):  # fmt: skip
        super().__init__()
        _check(resolution)
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        layers: list[nn.Module] = []
        cin, size = channels, resolution
        for i, (m, down) in enumerate(D_BLOCKS[resolution]):
            layers.append(DBlock(cin, m * width, down, first=i == 0))
            cin, size = m * width, size // 2 if down else size
            if size == attn_res and not any(isinstance(layer, SelfAttention) for layer in layers):
                layers.append(SelfAttention(cin))
        self.blocks = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, 1)
        self.embed = nn.Embedding(num_classes, cin) if num_classes else None  # the projection
        init_and_normalise(self, init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """D's pooled features h: ReLU, then a sum (not a mean) over positions, as in SNGAN and BigGAN."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3))  # [N, C]

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, channels, res, res], c: [N] (conditional) -> logits [N]
        h = self.features(x)
        logits = self.linear(h).flatten()
        if self.embed is not None:
            logits = logits + (self.embed(c) * h).sum(dim=1)  # projection: <embed(c), h>
        return logits
