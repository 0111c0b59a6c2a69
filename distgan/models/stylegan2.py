"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"), in plain PyTorch ops.

Written from the papers' equations (StyleGAN2; StyleGAN2-ADA for the cifar-sized configs): no compiled extensions,
no custom kernels. The generator is the paper's config F "skip" generator, the discriminator its "resnet" one.

    G: z [N, z_dim] (+ class c) -> mapping -> w [N, w_dim] -> ws [N, num_ws, w_dim] -> synthesis -> img [N, C, R, R]
    D: img [N, C, R, R] -> fromRGB -> residual blocks R..8 -> minibatch stddev -> conv, fc -> logit [N]

Equalised learning rate (ProGAN). Every weight is stored as N(0, 1) / lr_mul and multiplied at run time by
lr_mul / sqrt(fan_in); biases are stored divided by lr_mul and multiplied by it. Adam's step is then the same
size for every layer, relative to that layer's effective weight. The mapping network uses lr_mul = 0.01.

Mapping network. z is normalised to unit second moment, z * rsqrt(mean(z^2) + 1e-8). A conditional G embeds the
class (an equalised FC layer on the one-hot label), normalises that too, and joins it to z. `map_layers` FC layers
with leaky ReLU make w, which is copied to the `num_ws` = 2 log2(R) - 2 style inputs. In training (when the
module is in train mode) the buffer `w_avg` follows the batch mean of w: w_avg <- lerp(mean(w), w_avg, 0.995).
Truncation moves the first `trunc_cutoff` ws towards it: w' = w_avg + psi (w - w_avg).

Style mixing (regularisation, StyleGAN Sec. 3.1). With probability `style_mixing` per batch, ws from a second
latent replace those from a random layer index on: ws[:, i:] = ws2[:, i:], i uniform in [1, num_ws - 1]. The draws
use torch's global RNG on the latent's device, so a trainer that saves and restores the RNG state replays them.
The choice is made with a mask (torch.where), not in Python: the host never reads a device value, and the second
mapping pass always runs (the mapping is cheap next to the synthesis).

Synthesis. A learned constant 4x4 input; per resolution two 3x3 modulated convolutions (the first one upsamples,
except at 4x4) and a 1x1 toRGB whose outputs are summed over resolutions, each upsampled to the next ("skip"
generator). A modulated convolution scales the weight's input channels by the layer's style s = A(w) (an
equalised FC with bias 1) and, in the 3x3 layers, demodulates every output channel:

    w'_{oik} = s_i w_{oik},    w''_{oik} = w'_{oik} / sqrt(sum_{ik} w'_{oik}^2 + 1e-8)          (paper eq. 1, 3)

It runs as ONE grouped convolution: the batch becomes the group dimension, [1, N*I, H, W] * [N*O, I, k, k]
(fused_modconv=True, the default). fused_modconv=False computes the same numbers by scaling the activations
instead of the weights (the paper's Sec. 2.2 notes the equivalence): one batched convolution with the shared
weight, which skips building N copies of every weight and is faster for wide low-resolution layers.
Every 3x3 layer then adds per-pixel noise times a learned strength (init 0), a bias and leaky ReLU(0.2) times
sqrt(2). Noise modes: "random" (fresh N(0, 1) from the global RNG), "const" (a fixed buffer per layer: the same
image for the same w), "none".

Resampling is FIR filtering with the normalised separable [1, 3, 3, 1] filter, as in the paper (`upfirdn2d`:
zero-insertion up, pad, filter, keep every down-th sample). The upsampling 3x3 layer is a stride-2 transposed
convolution followed by the filter, as in the paper; the downsampling 3x3 layer of D is the filter followed by a
stride-2 convolution. Both are the same linear maps as "upsample then conv" / "conv then downsample" away from
the borders (a test checks that) and cost a quarter of the multiply-adds.

Discriminator. fromRGB (1x1) at the input only; per resolution a residual block, two 3x3 convolutions (the second
one downsamples) beside a 1x1 downsampling skip without bias, summed and scaled by 1/sqrt(2). At 4x4: minibatch
standard deviation (ProGAN; groups of `mbstd_group` samples, one extra channel; a group size that does not
divide the batch is reduced to gcd(group, batch), so batches of 2 or 6 work), a 3x3 conv, an FC layer and the
output FC. A conditional D is a projection discriminator (Miyato & Koyama 2018): the class goes through its own
mapping network (embedding, normalisation, `map_layers` FC layers) to a vector cmap of D's last width, and
logit = sum(out * cmap) / sqrt(cmap_dim), where out is the output layer's cmap_dim-vector.

Widths: channels(r) = min(channel_base // r, channel_max). Config F is channel_base 32768, channel_max 512
(512 up to 64x64, then halving); StyleGAN2-ADA's cifar config is channel_base 16384 (512 everywhere at 32x32).

Precision. Written for autocast (tested here: bf16 on a CPU; fp16 on a GPU untested): the modulated weights and
their demodulation are computed in the parameters' dtype (fp32) before the convolution casts them; noise and
biases are cast to the activations' dtype so they do not promote them; the minibatch statistics are taken in
fp32. `conv_clamp` clamps every convolution layer's output (after bias, activation and gain) to +-conv_clamp; the
paper clamps its fp16 layers to +-2^8 = 256 to keep them finite. Here it applies always when set (a healthy
network's activations stay well below 256 (at init they are O(1)), so then it changes nothing); None turns it off.

What a trainer must know: `w_avg` is a buffer updated by every mapping pass in train mode (G(z, c) and
G.mapping(z, c) alike; pass update_w_avg=False to prevent it), so DDP's buffer broadcast (rank 0's copy) and an
EMA's buffer copy both apply to it. A training forward of G draws style mixing from the global RNG (rand(),
randint(), randn_like(z), in that order, whether or not it mixes; G.mix_styles(ws, z, c) is the same step for a
phase that calls mapping and synthesis itself), and noise_mode "random" draws one randn per 3x3 layer. The
path-length penalty can take ws = G.mapping(z, c), img = G.synthesis(ws): synthesis is differentiable in ws
(twice, through every op). Nothing here reads a tensor value on the host (psi is a Python float).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def build_generator(cfg) -> Generator:
    o = cfg.options
    return Generator(
        z_dim=cfg.z_dim,
        resolution=cfg.resolution,
        channels=cfg.channels,
        num_classes=cfg.num_classes,
        w_dim=o.w_dim,
        map_layers=o.map_layers,
        embed_dim=o.embed_dim,
        channel_base=o.channel_base,
        channel_max=o.channel_max,
        style_mixing=o.style_mixing,
        conv_clamp=o.conv_clamp,
        fused_modconv=o.fused_modconv,
    )


def build_discriminator(cfg) -> Discriminator:
    o = cfg.options
    return Discriminator(
        resolution=cfg.resolution,
        channels=cfg.channels,
        num_classes=cfg.num_classes,
        channel_base=o.channel_base,
        channel_max=o.channel_max,
        mbstd_group=o.mbstd_group,
        map_layers=o.map_layers,
        embed_dim=o.embed_dim,
        conv_clamp=o.conv_clamp,
    )


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at a resolution: min(channel_base // resolution, channel_max)."""
    return min(channel_base // resolution, channel_max)


def _widths(resolution: int, channel_base: int, channel_max: int) -> list[int]:
    """Feature maps at 2^k for k = 0..log2(resolution) (index k); checks the resolution and the narrowest width."""
    n = int(math.log2(resolution))
    if 2**n != resolution or n < 2:
        raise ValueError(f"StyleGAN2 makes square images of a power-of-two size >= 4, not {resolution}")
    if channels_at(resolution, channel_base, channel_max) < 1:
        raise ValueError(f"channel_base={channel_base} leaves no feature maps at {resolution}x{resolution}")
    return [channels_at(2**k, channel_base, channel_max) for k in range(n + 1)]


# ---------------------------------------------------------------------- resampling (FIR filters)


def fir_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """The 1-D resampling filter, normalised to sum 1 (its 2-D version is the outer product with itself)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0), gain: float = 1.0):
    """Upsample by zero-insertion, pad, convolve with the separable filter f (x) f, keep every down-th sample.

    x: [N, C, H, W]; f: 1-D filter [k]; pad = (before, after), the same on both axes (negative crops); gain
    multiplies the 2-D filter (up**2 keeps the mean of an upsampled image). Output side: (H*up + before + after - k)
    // down + 1. The filter is flipped (a true convolution), which matters only for asymmetric filters.
    The up-sampled signal puts sample i at up*i, zeros between (and after the last sample).
    """
    n, c, h, w = x.shape
    if up > 1:  # [N, C, H, 1, W, 1] -> pad the singleton axes to `up` -> [N, C, H*up, W*up]
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    # The separable filter as one depthwise 2-D convolution, outer(f, f) per channel (measured on a CPU: 2-3x faster
    # than two 1-D passes; on a GPU cuDNN has depthwise kernels), strided for the downsampling.
    f2 = (torch.outer(f, f) * gain).flip(0, 1).to(x.dtype)
    return F.conv2d(x, f2[None, None].repeat(c, 1, 1, 1), stride=down, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W]; with [1, 3, 3, 1] this is bilinear: out[2i] = x[i-1]/4 + 3x[i]/4."""
    return upfirdn2d(x, f, up=2, pad=(2, 1), gain=4)


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H/2, W/2]; with [1, 3, 3, 1]: out[i] = (x[2i-1] + 3x[2i] + 3x[2i+1] + x[2i+2]) / 8."""
    return upfirdn2d(x, f, down=2, pad=(1, 1))


# ---------------------------------------------------------------------- equalised-lr layers


def _activate(x: torch.Tensor, activation: str, gain: float, clamp: float | None) -> torch.Tensor:
    """Activation (leaky ReLU 0.2 times sqrt(2), which keeps the second moment), extra gain, clamp."""
    if activation == "lrelu":
        x = F.leaky_relu(x, 0.2) * (SQRT2 * gain)
    elif gain != 1:
        x = x * gain
    return x.clamp(-clamp, clamp) if clamp is not None else x


class FullyConnected(nn.Module):
    """y = act(x W^T lr_mul / sqrt(in) + b lr_mul), with W stored N(0, 1) / lr_mul and b stored bias_init / lr_mul."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_mul: float = 1.0, bias_init: float = 0.0):  # fmt: skip
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias * self.bias_gain if self.bias is not None else None
        return _activate(F.linear(x, self.weight * self.weight_gain, b), self.activation, 1.0, None)


class Conv2dLayer(nn.Module):
    """D's equalised convolution, optionally downsampling by 2 (FIR filter, then a stride-2 convolution)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, activation: str = "linear",
                 down: int = 1, gain: float = 1.0, conv_clamp: float | None = None):  # fmt: skip
        super().__init__()
        assert kernel in (1, 3) and down in (1, 2)
        self.kernel, self.down, self.activation, self.gain, self.conv_clamp = kernel, down, activation, gain, conv_clamp
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if self.down == 1:
            x = F.conv2d(x, w, padding=self.kernel // 2)
        elif self.kernel == 1:  # a 1x1 conv commutes with the filter: downsample first, on fewer pixels
            x = F.conv2d(downsample2d(x, self.resample_filter), w)
        else:  # 3x3: pad 2 then filter ([N, C, H+1, W+1]), a stride-2 valid conv -> [N, O, H/2, W/2]
            x = F.conv2d(upfirdn2d(x, self.resample_filter, pad=(2, 2)), w, stride=2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[None, :, None, None]
        return _activate(x, self.activation, self.gain, self.conv_clamp)


# ---------------------------------------------------------------------- the modulated convolution


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     up: int = 1, resample_filter: torch.Tensor | None = None, fused: bool = True):  # fmt: skip
    """Convolve each sample with its own modulated (and demodulated) weight.

    x: [N, I, H, W]; weight: [O, I, k, k] (already times its equalised-lr gain); styles: [N, I].
    up=2: a stride-2 transposed convolution (with the weight flipped, so it is the same linear map as conv2d's
    correlation on the zero-inserted input), then the FIR filter with gain 4 -> [N, O, 2H, 2W] (k = 3).

    fused=True: ONE grouped convolution, the batch as the group dimension, [1, N*I, H, W] * [N*O, I, k, k].
    fused=False: the same numbers by linearity, sum_i (s_i w_oi) x_i = sum_i w_oi (s_i x_i): scale the input
    channels by the styles, convolve the whole batch with the shared weight, scale the output channels by the
    demodulation d_o = rsqrt(sum_i s_i^2 sum_k w_oik^2 + 1e-8). It never builds the [N, O, I, k, k] weights, which
    dominate the cost of wide low-resolution layers (measured on a CPU at 512 channels, 8x8, batch 16: 4x faster).
    """
    n, i, h, w_ = x.shape
    o, _, kh, kw = weight.shape
    if up != 1:
        assert up == 2 and kh == kw == 3 and resample_filter is not None
    if not fused:
        x = x * styles.to(x.dtype)[:, :, None, None]
        if up == 1:
            out = F.conv2d(x, weight, padding=kh // 2)
        else:
            out = F.conv_transpose2d(x, weight.transpose(0, 1).flip(2, 3), stride=2)  # [N, O, 2H+1, 2W+1]
            out = upfirdn2d(out, resample_filter, pad=(1, 1), gain=4)
        if demodulate:
            d = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)  # [N, O]
            out = out * d.to(out.dtype)[:, :, None, None]
        return out
    w = weight[None] * styles[:, None, :, None, None]  # [N, O, I, k, k]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    x = x.reshape(1, n * i, h, w_)  # the batch is the group dimension
    if up == 1:
        out = F.conv2d(x, w.reshape(n * o, i, kh, kw), padding=kh // 2, groups=n)
    else:
        wt = w.transpose(1, 2).reshape(n * i, o, kh, kw).flip(2, 3)  # conv_transpose2d wants [in, out/groups, k, k]
        out = F.conv_transpose2d(x, wt, stride=2, groups=n)  # [1, N*O, 2H+1, 2W+1]
        out = upfirdn2d(out, resample_filter, pad=(1, 1), gain=4)  # [1, N*O, 2H, 2W]
    return out.reshape(n, o, out.shape[2], out.shape[3])


# ---------------------------------------------------------------------- generator


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


class MappingNetwork(nn.Module):
    """z (and/or class) -> w [N, w_dim], broadcast to ws [N, num_ws, w_dim] (num_ws=None: just w, for D's cmap).

    Tracks w_avg (for truncation) when num_ws is set.
    """

    def __init__(self, z_dim: int, num_classes: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_dim: int = 0, lr_mul: float = 0.01, w_avg_beta: float = 0.995):  # fmt: skip
        super().__init__()
        self.z_dim, self.num_classes, self.w_dim, self.num_ws = z_dim, num_classes, w_dim, num_ws
        self.w_avg_beta = w_avg_beta
        embed_dim = (embed_dim or w_dim) if num_classes else 0
        self.embed = FullyConnected(num_classes, embed_dim) if num_classes else None
        features = [z_dim + embed_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            FullyConnected(a, b, activation="lrelu", lr_mul=lr_mul) for a, b in zip(features[:-1], features[1:])
        )
        if num_ws is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None = None, psi: float = 1.0,
                trunc_cutoff: int | None = None, update_w_avg: bool | None = None) -> torch.Tensor:  # fmt: skip
        parts = []
        if self.z_dim:
            parts.append(normalize_2nd_moment(z.reshape(z.shape[0], self.z_dim)))
        if self.embed is not None:
            if c is None:
                raise ValueError(f"this network is conditional ({self.num_classes} classes): pass class indices c")
            # The FC layer on a one-hot label, as a lookup of its weight's columns (F.one_hot reads c's maximum
            # on the host; a lookup reads nothing and does the same arithmetic).
            e = self.embed
            y = F.embedding(c.reshape(-1).long(), (e.weight * e.weight_gain).t()) + e.bias * e.bias_gain
            parts.append(normalize_2nd_moment(y))  # [N, embed_dim]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)  # [N, w_dim]
        if self.num_ws is None:
            return x
        if self.training if update_w_avg is None else update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = x[:, None, :].repeat(1, self.num_ws, 1)  # [N, num_ws, w_dim]
        if psi != 1:
            avg = self.w_avg.to(ws.dtype)
            truncated = avg + psi * (ws - avg)
            if trunc_cutoff is None:
                ws = truncated
            else:
                layer = torch.arange(self.num_ws, device=ws.device)[None, :, None]
                ws = torch.where(layer < trunc_cutoff, truncated, ws)
        return ws


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling), noise, bias, leaky ReLU; its style is an affine map of w."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1,
                 conv_clamp: float | None = None):  # fmt: skip
        super().__init__()
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros([1]))  # [1], not a 0-dim scalar: see test_families
        self.weight_gain = 1 / math.sqrt(in_channels * 9)
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", fused: bool = True):
        styles = self.affine(w)  # [N, in]
        x = modulated_conv2d(x, self.weight * self.weight_gain, styles, True, self.up, self.resample_filter, fused)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        elif noise_mode != "none":
            raise ValueError(f"noise_mode={noise_mode!r} is not one of 'random', 'const', 'none'")
        x = x + self.bias.to(x.dtype)[None, :, None, None]
        return _activate(x, "lrelu", 1.0, self.conv_clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, without demodulation (the image keeps the style's scale)."""

    def __init__(self, in_channels: int, channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.weight_gain, demodulate=False, fused=fused)
        return _activate(x + self.bias.to(x.dtype)[None, :, None, None], "linear", 1.0, self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: (const input at 4x4 | upsampling conv0), conv1, toRGB added to the upsampled image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, channels: int,
                 conv_clamp: float | None = None):  # fmt: skip
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(out_channels, channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if resolution == 4 else 2
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str = "random", fused: bool = True):
        # ws: [N, num_conv + 1, w_dim] (the last one, toRGB's, is also the next block's first)
        if self.conv0 is None:
            x = self.const[None].expand(ws.shape[0], -1, -1, -1)  # [N, C, 4, 4]
            x = self.conv1(x, ws[:, 0], noise_mode, fused)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode, fused)  # [N, C, R, R]
            x = self.conv1(x, ws[:, 1], noise_mode, fused)
        y = self.torgb(x, ws[:, self.num_conv], fused)
        img = y if img is None else upsample2d(img, self.resample_filter).to(y.dtype) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, channels, R, R] (skip generator)."""

    def __init__(self, w_dim: int, resolution: int, channels: int, channel_base: int = 16384,
                 channel_max: int = 512, conv_clamp: float | None = None, fused_modconv: bool = True):  # fmt: skip
        super().__init__()
        self.fused_modconv = fused_modconv
        ch = _widths(resolution, channel_base, channel_max)
        n = len(ch) - 1
        self.blocks = nn.ModuleDict(
            {f"b{2**k}": SynthesisBlock(ch[k - 1], ch[k], w_dim, 2**k, channels, conv_clamp) for k in range(2, n + 1)}
        )
        self.num_ws = sum(b.num_conv for b in self.blocks.values()) + 1  # = 2 log2(R) - 2

    def forward(self, ws: torch.Tensor, noise_mode: str = "random", fused_modconv: bool | None = None):
        # ws: [N, num_ws, w_dim] -> image [N, channels, R, R]; fused_modconv None: the network's setting
        assert ws.shape[1] == self.num_ws, f"ws has {ws.shape[1]} style inputs, synthesis takes {self.num_ws}"
        fused = self.fused_modconv if fused_modconv is None else fused_modconv
        x = img = None
        i = 0
        for block in self.blocks.values():
            x, img = block(x, img, ws[:, i : i + block.num_conv + 1], noise_mode, fused)
            i += block.num_conv
        return img


class Generator(nn.Module):
    """G(z, c) = synthesis(mapping(z, c)), with style mixing in train mode. Attributes: z_dim, w_dim, num_ws,
    num_classes, resolution, channels, style_mixing; submodules `mapping` (z, c -> ws [N, num_ws, w_dim]) and
    `synthesis` (ws -> image; synthesis.fused_modconv picks the modulated convolution's form)."""

    def __init__(self, z_dim: int = 512, resolution: int = 32, channels: int = 3, num_classes: int = 0,
                 w_dim: int = 512, map_layers: int = 8, embed_dim: int = 0, channel_base: int = 16384,
                 channel_max: int = 512, style_mixing: float = 0.9, conv_clamp: float | None = 256,
                 fused_modconv: bool = True):  # fmt: skip
        super().__init__()
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, num_classes
        self.resolution, self.channels, self.style_mixing = resolution, channels, style_mixing
        self.synthesis = SynthesisNetwork(w_dim, resolution, channels, channel_base, channel_max, conv_clamp,
                                          fused_modconv)  # fmt: skip
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, num_classes, w_dim, self.num_ws, map_layers, embed_dim)

    def mix_styles(self, ws: torch.Tensor, z: torch.Tensor, c: torch.Tensor | None = None, psi: float = 1.0,
                   trunc_cutoff: int | None = None) -> torch.Tensor:  # fmt: skip
        """With probability style_mixing, ws[:, i:] from a fresh latent, i uniform in [1, num_ws - 1].

        Draws (always, in this order, on z's device): rand(), randint(), randn_like(z). Decided by a mask: no host read.
        """
        dev = ws.device
        mix = torch.rand((), device=dev) < self.style_mixing
        cutoff = torch.randint(1, self.num_ws, (), device=dev)
        cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, self.num_ws))
        z2 = torch.randn_like(z.reshape(z.shape[0], self.z_dim))
        ws2 = self.mapping(z2, c, psi, trunc_cutoff, update_w_avg=False)
        layer = torch.arange(self.num_ws, device=dev)[None, :, None]
        return torch.where(layer < cutoff, ws, ws2)

    # The trainer takes the path-length penalty on w rather than z (StyleGAN2, sec. 3.2): it asks for ws too.
    path_length_on_w = True

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, psi: float = 1.0,
                trunc_cutoff: int | None = None, noise_mode: str = "random", return_ws: bool = False):  # fmt: skip
        # z: [N, z_dim] (or [N, z_dim, 1, 1]), c: [N] class indices (conditional) -> image [N, channels, R, R];
        # return_ws: (image, ws [N, num_ws, w_dim]), the styles it was made from (for the path-length penalty)
        ws = self.mapping(z, c, psi, trunc_cutoff)  # updates w_avg in train mode
        if self.training and self.style_mixing > 0:
            ws = self.mix_styles(ws, z, c, psi, trunc_cutoff)
        img = self.synthesis(ws, noise_mode)
        return (img, ws) if return_ws else img


# ---------------------------------------------------------------------- discriminator


class DiscriminatorBlock(nn.Module):
    """Residual: (conv3x3 -> conv3x3 down 2) + (1x1 down 2, no bias), both branches times 1/sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, conv_clamp: float | None = None):
        super().__init__()
        g, clamp = math.sqrt(0.5), conv_clamp
        self.conv0 = Conv2dLayer(in_channels, in_channels, 3, activation="lrelu", conv_clamp=clamp)
        self.conv1 = Conv2dLayer(in_channels, out_channels, 3, activation="lrelu", down=2, gain=g, conv_clamp=clamp)
        self.skip = Conv2dLayer(in_channels, out_channels, 1, bias=False, down=2, gain=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv1(self.conv0(x))  # [N, out, H/2, W/2]


class MinibatchStd(nn.Module):
    """Append one channel: the std of each feature over a group of samples, averaged over features and pixels.

    Sample n belongs to group n % (N // G) (groups are strided through the batch); G = gcd(group_size, N).
    """

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = math.gcd(self.group_size, n)
        y = x.float().reshape(g, n // g, c, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over the group: [N/G, C, H, W]
        y = (y + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [N/G]
        y = y.reshape(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, y.to(x.dtype)], dim=1)  # [N, C+1, H, W]


class Discriminator(nn.Module):
    """D(x, c) -> logits [N]: fromRGB, residual blocks down to 4x4, minibatch stddev, conv, fc, output (projection)."""

    def __init__(self, resolution: int = 32, channels: int = 3, num_classes: int = 0, channel_base: int = 16384,
                 channel_max: int = 512, mbstd_group: int = 4, map_layers: int = 8, embed_dim: int = 0,
                 conv_clamp: float | None = 256):  # fmt: skip
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        ch = _widths(resolution, channel_base, channel_max)
        n = len(ch) - 1
        self.from_rgb = Conv2dLayer(channels, ch[n], 1, activation="lrelu", conv_clamp=conv_clamp)
        self.blocks = nn.ModuleDict(
            {f"b{2**k}": DiscriminatorBlock(ch[k], ch[k - 1], conv_clamp) for k in range(n, 2, -1)}
        )
        c4 = ch[2]
        self.mbstd = MinibatchStd(mbstd_group)
        self.conv = Conv2dLayer(c4 + 1, c4, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnected(c4 * 16, c4, activation="lrelu")
        self.cmap_dim = c4 if num_classes else 0
        self.out = FullyConnected(c4, self.cmap_dim or 1)
        self.mapping = MappingNetwork(0, num_classes, c4, None, map_layers, embed_dim) if num_classes else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, channels, R, R], c: [N] (conditional) -> logits [N]
        x = self.from_rgb(x)
        for block in self.blocks.values():
            x = block(x)  # -> [N, ch(4), 4, 4]
        x = self.conv(self.mbstd(x))
        x = self.out(self.fc(x.flatten(1)))  # [N, cmap_dim or 1]
        if self.mapping is None:
            return x.flatten()
        cmap = self.mapping(None, c).to(x.dtype)  # [N, cmap_dim]
        return (x * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)
