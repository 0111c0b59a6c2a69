"""StyleGAN2 (distgan/models/stylegan2.py): shapes at every size, config F's parameter counts, the modulated
convolution and the FIR resampling against direct references, minibatch stddev, w_avg and truncation, style mixing
from the global RNG, equalised learning rate, the penalties' double backward, bf16 autocast, and the family's
config section. Small widths throughout (channel_base 256..2048) so the file runs in seconds on a CPU."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distgan.config import ModelConfig
from distgan.host_reads import HostReads
from distgan.models import StyleGAN2Options, build_discriminator, build_generator
from distgan.models.stylegan2 import (
    Discriminator,
    FullyConnected,
    Generator,
    MinibatchStd,
    fir_filter,
    modulated_conv2d,
    upfirdn2d,
    upsample2d,
)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def small(res=32, num_classes=0, z_dim=8, **options):
    opts = dict(channel_base=256, channel_max=16, map_layers=2, w_dim=16) | options
    cfg = ModelConfig(family="stylegan2", resolution=res, channels=3, z_dim=z_dim, num_classes=num_classes,
                      options=StyleGAN2Options(**opts))  # fmt: skip
    torch.manual_seed(0)
    return build_generator(cfg), build_discriminator(cfg)


# ---------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("res", [32, 64, 128, 256, 512, 1024])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_shapes_at_every_resolution(res, num_classes):
    G, D = small(res, num_classes, channel_base=2048, channel_max=8)  # 1 or 2 feature maps at 1024x1024
    assert G.num_ws == 2 * int(math.log2(res)) - 2 and G.w_dim == 16 and G.z_dim == 8
    assert G.num_classes == num_classes and G.resolution == res and G.channels == 3
    c = torch.tensor([1, 4]) if num_classes else None
    with torch.no_grad():
        x = G(torch.randn(2, 8), c)
        assert x.shape == (2, 3, res, res) and torch.isfinite(x).all()
        ws = G.mapping(torch.randn(2, 8), c)
        assert ws.shape == (2, G.num_ws, 16) and G.synthesis(ws).shape == x.shape
        assert D(x, c).shape == (2,)


def test_widths_follow_channel_base_and_max():
    G, D = small(64, channel_base=1024, channel_max=32)  # min(1024 // r, 32): 32 up to 32x32, then 16 at 64x64
    assert G.synthesis.blocks["b4"].const.shape == (32, 4, 4)
    assert G.synthesis.blocks["b64"].conv1.weight.shape == (16, 16, 3, 3)
    assert G.synthesis.blocks["b64"].conv0.weight.shape == (16, 32, 3, 3)
    assert D.from_rgb.weight.shape == (16, 3, 1, 1) and D.blocks["b64"].conv1.weight.shape == (32, 16, 3, 3)
    assert list(D.blocks) == ["b64", "b32", "b16", "b8"] and D.conv.weight.shape == (32, 33, 3, 3)


def test_config_f_parameter_counts():
    """Config F at 1024x1024 (channel_base 32768, channel_max 512, 8 mapping layers, z = w = 512, RGB).

    Published: ~30.0M parameters in G and ~29.0M in D (the rounded figures quoted for StyleGAN2 config F at
    1024x1024 in the StyleGAN2 papers' tables; the figures this family was specified against). The exact counts are
    derived here by hand from the paper's architecture (layer by layer, below, independent of the module), and the
    built networks must match them exactly and the published rounded figures within 1.5%. Parameters only: the
    noise_const buffers (and the filters) are not counted."""
    ch = lambda r: min(32768 // r, 512)  # noqa: E731
    fc = lambda i, o: i * o + o  # noqa: E731  weight + bias
    mod = lambda i, o, k: fc(512, i) + o * i * k * k + o  # noqa: E731  affine (w -> in styles) + weight + bias
    g = fc(512, 512) * 8 + ch(4) * 16  # mapping, const input
    for r in [2**k for k in range(2, 11)]:
        if r > 4:
            g += mod(ch(r // 2), ch(r), 3) + 1  # upsampling conv0 + its noise strength
        g += mod(ch(r), ch(r), 3) + 1 + mod(ch(r), 3, 1)  # conv1 + noise strength, toRGB
    d = fc(3, ch(1024))  # fromRGB (1x1)
    for r in [2**k for k in range(10, 2, -1)]:
        d += 9 * ch(r) ** 2 + ch(r) + 9 * ch(r) * ch(r // 2) + ch(r // 2) + ch(r) * ch(r // 2)  # conv0, conv1, skip
    d += 9 * 513 * 512 + 512 + fc(512 * 16, 512) + fc(512, 1)  # mbstd conv (+1 channel), fc, output
    assert (g, d) == (30_370_060, 29_012_513)
    with torch.device("meta"):  # shapes only: no memory, no time
        G = Generator(512, 1024, 3, 0, w_dim=512, map_layers=8, channel_base=32768, channel_max=512)
        D = Discriminator(1024, 3, 0, channel_base=32768, channel_max=512)
    assert (n_params(G), n_params(D)) == (g, d)
    assert G.num_ws == 18
    assert abs(n_params(G) / 30.0e6 - 1) < 0.015 and abs(n_params(D) / 29.0e6 - 1) < 0.015


# ---------------------------------------------------------------------- FIR resampling


def upfirdn_reference(x: np.ndarray, f: np.ndarray, up: int, down: int, pad: tuple[int, int], gain: float):
    """The definition, with loops: zero-insert, zero-pad, true 2-D convolution with gain * outer(f, f), subsample."""
    h, w = x.shape
    u = np.zeros((h * up, w * up))
    u[::up, ::up] = x
    u = np.pad(u, [pad, pad])
    k = len(f)
    kern = gain * np.outer(f, f)
    out = np.zeros(((u.shape[0] - k) // down + 1, (u.shape[1] - k) // down + 1))
    for oy in range(out.shape[0]):
        for ox in range(out.shape[1]):
            y0, x0 = oy * down, ox * down
            out[oy, ox] = sum(
                kern[i, j] * u[y0 + k - 1 - i, x0 + k - 1 - j]  # convolution: the kernel flipped
                for i in range(k)
                for j in range(k)
            )
    return out


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 2, 3, 4)])  # symmetric, and one that shows a missing flip
@pytest.mark.parametrize("up,down,pad,gain", [(2, 1, (2, 1), 4.0), (1, 2, (1, 1), 1.0), (1, 1, (2, 2), 1.0)])
def test_upfirdn2d_is_the_definition(taps, up, down, pad, gain):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    f = fir_filter(taps).double()
    got = upfirdn2d(x, f, up=up, down=down, pad=pad, gain=gain)
    for n in range(2):
        for c in range(3):
            want = upfirdn_reference(x[n, c].numpy(), f.numpy(), up, down, pad, gain)
            np.testing.assert_allclose(got[n, c].numpy(), want, rtol=1e-12, atol=1e-12)


def test_fir_up_is_bilinear_and_down_is_the_centred_average():
    """With [1, 3, 3, 1]: the up-sampled pixels sit at half-pixel offsets, the down-sampled one at the pair's centre."""
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    f = fir_filter().double()
    up = upsample2d(x, f)
    assert up.shape == (1, 1, 16, 16)
    r = x[0, 0]
    # Bilinear in each axis: out[2i] = x[i-1]/4 + 3x[i]/4, out[2i+1] = 3x[i]/4 + x[i+1]/4.
    even, odd = torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.75, 0.25]).double()
    i, j = 3, 5
    torch.testing.assert_close(up[0, 0, 2 * i, 2 * j], even @ r[i - 1 : i + 2, j - 1 : j + 2] @ even)
    torch.testing.assert_close(up[0, 0, 2 * i + 1, 2 * j], odd @ r[i - 1 : i + 2, j - 1 : j + 2] @ even)
    torch.testing.assert_close(up[0, 0, 2 * i + 1, 2 * j + 1], odd @ r[i - 1 : i + 2, j - 1 : j + 2] @ odd)
    down = upfirdn2d(x, f, down=2, pad=(1, 1))
    assert down.shape == (1, 1, 4, 4)
    w1 = torch.tensor([1, 3, 3, 1], dtype=torch.float64) / 8
    i, j = 2, 1
    torch.testing.assert_close(down[0, 0, i, j], w1 @ r[2 * i - 1 : 2 * i + 3, 2 * j - 1 : 2 * j + 3] @ w1)
    # A constant stays constant away from the zero padding (the filters are normalised; up has gain 4).
    const = torch.ones(1, 1, 8, 8)
    assert torch.allclose(upsample2d(const, fir_filter())[..., 2:-2, 2:-2], torch.ones(1))
    assert torch.allclose(upfirdn2d(const, fir_filter(), down=2, pad=(1, 1))[..., 1:-1, 1:-1], torch.ones(1))


# ---------------------------------------------------------------------- modulated convolution


def modconv_reference(x, weight, styles, demodulate, up):
    """One sample at a time, with its own weight: the definition of eqs. 1 and 3 of the paper."""
    out = []
    for n in range(x.shape[0]):
        w = weight * styles[n][None, :, None, None]  # [O, I, k, k]
        if demodulate:
            w = w / torch.sqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if up == 1:
            out.append(F.conv2d(x[n : n + 1], w, padding=w.shape[-1] // 2))
        else:  # transposed conv (weight flipped: the adjoint of a correlation) then the FIR filter
            y = F.conv_transpose2d(x[n : n + 1], w.transpose(0, 1).flip(2, 3), stride=2)
            out.append(upfirdn2d(y, fir_filter().double(), pad=(1, 1), gain=4))
    return torch.cat(out)


@pytest.mark.parametrize("fused", [True, False], ids=["grouped", "scaled-activations"])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("up,k", [(1, 3), (1, 1), (2, 3)])
def test_modulated_conv_equals_a_per_sample_loop(fused, demodulate, up, k):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    weight = torch.randn(7, 5, k, k, dtype=torch.float64)
    styles = torch.randn(3, 5, dtype=torch.float64) + 1
    got = modulated_conv2d(x, weight, styles, demodulate, up, fir_filter().double(), fused)
    assert got.shape == (3, 7, 6 * up, 6 * up)
    torch.testing.assert_close(got, modconv_reference(x, weight, styles, demodulate, up))
    if demodulate:  # demodulation undoes any scale of a sample's styles (and of the weight)
        again = modulated_conv2d(x, weight * 5, styles * torch.tensor([[3.0], [0.5], [2.0]]).double(), True, up,
                                 fir_filter().double(), fused)  # fmt: skip
        torch.testing.assert_close(got, again)


def test_the_grouped_conv_is_one_call_and_both_forms_give_the_same_generator(monkeypatch):
    G, _ = small(num_classes=3)
    G.eval()
    ws = G.mapping(torch.randn(4, 8), torch.tensor([0, 1, 2, 1]))
    layer = G.synthesis.blocks["b8"].conv1
    x = torch.randn(4, layer.weight.shape[1], 8, 8)
    groups = []
    conv2d = F.conv2d
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(F, "conv2d", lambda *a, **k: groups.append(k.get("groups", 1)) or conv2d(*a, **k))
        layer(x, ws[:, 0], "const", True)
        assert groups == [4]  # one convolution for the whole batch of 4, as 4 groups
        groups.clear()
        layer(x, ws[:, 0], "const", False)
        assert groups == [1]  # one batched convolution with the shared weight
    with torch.no_grad():
        fused = G.synthesis(ws, noise_mode="const")
        torch.testing.assert_close(G.synthesis(ws, noise_mode="const", fused_modconv=False), fused)
        G.synthesis.fused_modconv = False
        torch.testing.assert_close(G.synthesis(ws, noise_mode="const"), fused)


def test_upsampling_conv_is_upsample_then_conv_away_from_the_borders():
    """Transposed conv + FIR (the paper's fused form) == FIR-upsample, then a 3x3 conv: the same linear map."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    styles = torch.randn(2, 4, dtype=torch.float64)
    fused = modulated_conv2d(x, weight, styles, True, 2, fir_filter().double())
    plain = modulated_conv2d(upsample2d(x, fir_filter().double()), weight, styles, True)
    torch.testing.assert_close(fused[..., 2:-2, 2:-2], plain[..., 2:-2, 2:-2])


def test_downsampling_conv_is_conv_then_downsample_away_from_the_borders():
    D = Discriminator(8, 3, 0, channel_base=64, channel_max=4).double()
    conv = D.blocks["b8"].conv1  # 3x3, down 2, lrelu, gain 1/sqrt(2)
    x = torch.randn(2, conv.weight.shape[1], 8, 8, dtype=torch.float64)
    got = conv(x)
    lin = upfirdn2d(F.conv2d(x, conv.weight * conv.weight_gain, padding=1), fir_filter().double(), down=2, pad=(1, 1))
    want = F.leaky_relu(lin + conv.bias[None, :, None, None], 0.2) * math.sqrt(2) * math.sqrt(0.5)
    assert got.shape == (2, conv.weight.shape[0], 4, 4)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1])


# ---------------------------------------------------------------------- minibatch standard deviation


@pytest.mark.parametrize("n,group", [(8, 4), (6, 4), (2, 4), (1, 4), (12, 32)])
def test_minibatch_std_by_hand(n, group):
    torch.manual_seed(0)
    x = torch.randn(n, 3, 4, 4, dtype=torch.float64)
    out = MinibatchStd(group)(x)
    assert out.shape == (n, 4, 4, 4) and torch.equal(out[:, :3], x)
    g = math.gcd(group, n)  # 4 | 8; gcd(4, 6) = 2; 2; 1; gcd(32, 12) = 4
    m = n // g
    for i in range(n):
        members = x[[j for j in range(n) if j % m == i % m]]  # sample i is in group i mod (n / g)
        assert len(members) == g
        std = ((members - members.mean(0)).square().mean(0) + 1e-8).sqrt()  # per feature and pixel
        torch.testing.assert_close(out[i, 3], std.mean().expand(4, 4))


# ---------------------------------------------------------------------- mapping: w_avg, truncation


def test_w_avg_follows_the_batch_mean_in_training_only_and_psi_0_gives_its_image():
    G, _ = small(style_mixing=0.0)
    z = torch.randn(6, 8)
    with torch.no_grad():
        G.eval()
        w = G.mapping(z)[:, 0]  # [N, w_dim]; eval: no update
        assert torch.equal(G.mapping.w_avg, torch.zeros(16))
        G(z)
        assert torch.equal(G.mapping.w_avg, torch.zeros(16))
        G.train()
        G(z)
        torch.testing.assert_close(G.mapping.w_avg, 0.005 * w.mean(0))  # lerp(mean, 0, 0.995)
        G.mapping(z)  # a direct mapping pass in train mode updates it too ...
        torch.testing.assert_close(G.mapping.w_avg, (0.005 + 0.995 * 0.005) * w.mean(0))
        before = G.mapping.w_avg.clone()
        G.mapping(z, update_w_avg=False)  # ... unless told not to
        assert torch.equal(G.mapping.w_avg, before)
        G.eval()
        imgs = G(torch.randn(4, 8), psi=0.0, noise_mode="const")
        ref = G.synthesis(before.expand(1, G.num_ws, -1), noise_mode="const")
        torch.testing.assert_close(imgs, ref.expand(4, -1, -1, -1))
        # Truncation moves the first trunc_cutoff ws towards w_avg, the rest not.
        ws = G.mapping(z, psi=0.5, trunc_cutoff=3)
        plain = G.mapping(z)
        torch.testing.assert_close(ws[:, :3], before + 0.5 * (plain[:, :3] - before))
        torch.testing.assert_close(ws[:, 3:], plain[:, 3:])


def test_noise_modes():
    G, _ = small()
    G.eval()
    for layer in [m for m in G.modules() if hasattr(m, "noise_strength")]:
        layer.noise_strength.data.fill_(0.5)
    z = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(G(z, noise_mode="const"), G(z, noise_mode="const"))
        assert not torch.equal(G(z, noise_mode="random"), G(z, noise_mode="random"))
        assert not torch.equal(G(z, noise_mode="const"), G(z, noise_mode="none"))
        with pytest.raises(ValueError, match="noise_mode"):
            G(z, noise_mode="fresh")


# ---------------------------------------------------------------------- style mixing


def test_style_mixing_draws_from_the_global_rng_and_mixes_from_a_random_layer():
    G, _ = small(style_mixing=1.0)
    G.train()
    z = torch.randn(3, 8)

    def run(seed):
        torch.manual_seed(seed)
        return G(z, noise_mode="const")

    with torch.no_grad():
        torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)  # the same RNG state: the same images
        assert not torch.equal(run(1), run(2))  # another: another crossover and second latent
        # What a training forward did, replayed by hand from the same RNG state (mapping w_avg aside).
        torch.manual_seed(3)
        got = G(z, noise_mode="const")
        torch.manual_seed(3)
        torch.rand(())  # mixing or not (p = 1: mixing)
        cutoff = int(torch.randint(1, G.num_ws, ()))
        z2 = torch.randn_like(z)
        ws = torch.cat([G.mapping(z)[:, :cutoff], G.mapping(z2)[:, cutoff:]], dim=1)
        torch.testing.assert_close(got, G.synthesis(ws, noise_mode="const"))
        G.eval()  # no mixing (and no draws) in eval mode
        state = torch.get_rng_state()
        torch.testing.assert_close(G(z, noise_mode="const"), G.synthesis(G.mapping(z), noise_mode="const"))
        assert torch.equal(torch.get_rng_state(), state)


def test_style_mixing_off_in_training():
    G, _ = small(style_mixing=0.0)
    G.train()
    z = torch.randn(3, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        a = G(z, noise_mode="const")
        torch.manual_seed(2)
        torch.testing.assert_close(a, G(z, noise_mode="const"))


# ---------------------------------------------------------------------- equalised learning rate


def test_equalised_learning_rate():
    torch.manual_seed(0)
    G = Generator(z_dim=64, resolution=32, w_dim=256, map_layers=2, channel_base=1024, channel_max=64)
    fc = G.mapping.layers[1]  # lr_mul 0.01: stored N(0, 1) / 0.01, scaled by 0.01 / sqrt(fan_in) at run time
    assert 95 < fc.weight.std().item() < 105 and fc.weight_gain == pytest.approx(0.01 / math.sqrt(256))
    assert fc.bias_gain == 0.01
    conv = G.synthesis.blocks["b32"].conv1
    assert 0.95 < conv.weight.std().item() < 1.05 and conv.weight_gain == pytest.approx(1 / math.sqrt(32 * 9))
    aff = conv.affine  # the style's affine layer starts at bias 1 (styles ~ 1 + small)
    assert torch.equal(aff.bias * aff.bias_gain, torch.ones(32))
    x = torch.randn(5, 256)
    want = F.leaky_relu(x @ (fc.weight * 0.01 / 16).T + fc.bias * 0.01, 0.2) * math.sqrt(2)
    torch.testing.assert_close(fc(x), want)
    lin = FullyConnected(10, 3, lr_mul=0.1, bias_init=2)
    torch.testing.assert_close(lin.bias * lin.bias_gain, torch.full([3], 2.0))
    # D's convolutions are equalised too: stored N(0, 1), effective std 1 / sqrt(fan_in).
    D = Discriminator(32, 3, 0, channel_base=1024, channel_max=64)
    w = D.blocks["b32"].conv0.weight
    assert 0.95 < w.std().item() < 1.05 and D.blocks["b32"].conv0.weight_gain == pytest.approx(1 / math.sqrt(32 * 9))


# ---------------------------------------------------------------------- penalties, precision, host reads


def test_r1_and_path_length_double_backward():
    G, D = small(num_classes=3)
    c = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    (g,) = torch.autograd.grad(D(x, c).sum(), x, create_graph=True)  # R1
    g.square().sum().backward()
    assert [n for n, p in D.named_parameters() if p.grad is None] == ["out.bias"]  # the logit's offset: not in dD/dx
    assert x.grad is not None  # the input path was not modified in place
    # Path length: the gradient of <img, y> w.r.t. ws, and its backward into G.
    ws = G.mapping(torch.randn(4, 8), c)
    img = G.synthesis(ws)
    (gw,) = torch.autograd.grad((img * torch.randn_like(img)).sum(), ws, create_graph=True)
    assert gw.shape == ws.shape
    gw.square().sum(2).mean(1).sqrt().mean().backward()
    assert G.synthesis.blocks["b32"].conv1.weight.grad is not None and G.mapping.layers[0].weight.grad is not None


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast(fused):
    G, D = small(num_classes=3, fused_modconv=fused)
    z, c = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    G.eval()
    with torch.no_grad():
        ref = G(z, c, noise_mode="const")
        ref_d = D(ref, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img = G(z, c, noise_mode="const")
            logits = D(img, c)
    assert img.dtype == torch.bfloat16 and torch.isfinite(img).all() and torch.isfinite(logits).all()
    assert (img.float() - ref).abs().mean() < 0.05 * ref.abs().mean() + 0.01
    assert (logits.float() - ref_d).abs().max() < 0.1 * ref_d.abs().max() + 0.05
    G.train()  # and the training paths: style mixing, w_avg update, R1 under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = G(z, c).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(D(x, c).float().sum(), x, create_graph=True)
    g.float().square().sum().backward()
    assert torch.isfinite(g).all() and G.mapping.w_avg.dtype == torch.float32


def test_conv_clamp_bounds_activations():
    G, _ = small(conv_clamp=0.5)
    with torch.no_grad():
        assert G(torch.randn(2, 8) * 10).abs().max() <= 0.5 * 6  # toRGB clamped, summed over 4 resolutions (<= 6)
    G2, _ = small(conv_clamp=None)
    assert G2.synthesis.blocks["b8"].conv1.conv_clamp is None


def test_a_training_step_reads_nothing_on_the_host():
    """No .item() or bool(tensor): style mixing is a mask, the mbstd group size a Python int."""
    G, D = small(num_classes=3)
    G.train()
    z, c = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    with HostReads() as reads:
        x = G(z, c)
        D(x, c).mean().backward()
        xr = torch.randn(4, 3, 32, 32, requires_grad=True)
        (g,) = torch.autograd.grad(D(xr, c).sum(), xr, create_graph=True)
        g.square().sum().backward()
    assert reads.where == []


# ---------------------------------------------------------------------- conditioning


def test_conditional_g_uses_the_class_and_d_is_a_projection():
    G, D = small(num_classes=4)
    G.eval()
    z = torch.randn(3, 8).repeat(4, 1)
    c = torch.arange(4).repeat_interleave(3)
    with torch.no_grad():
        x = G(z, c, noise_mode="const").view(4, 3, -1)
        assert all(not torch.allclose(x[0], x[k]) for k in range(1, 4))
        img = torch.randn(5, 3, 32, 32)
        cc = torch.tensor([0, 1, 2, 3, 0])
        logits = D(img, cc)
        h = D.from_rgb(img)
        for block in D.blocks.values():
            h = block(h)
        out = D.out(D.fc(D.conv(D.mbstd(h)).flatten(1)))  # [N, cmap_dim]
        cmap = D.mapping(None, cc)
        torch.testing.assert_close(logits, (out * cmap).sum(1) / math.sqrt(D.cmap_dim))
        assert not torch.allclose(logits, D(img, (cc + 1) % 4))
    with pytest.raises(ValueError, match="conditional"):
        G(torch.randn(2, 8))
    G0, D0 = small()
    assert G0.mapping.embed is None and D0.mapping is None and D0.out.weight.shape[0] == 1


# ---------------------------------------------------------------------- the family's config section


def test_config_section_and_problems():
    from distgan.config import field_index, load_config
    from distgan.errors import ConfigError

    assert field_index()["model.stylegan2.channel_base"].default == 16384
    cfg = load_config(
        None, ["model.family=stylegan2", "model.stylegan2.map_layers=2", "model.stylegan2.conv_clamp=null"]
    )
    cfg.validate()
    assert cfg.model.options == StyleGAN2Options(map_layers=2, conv_clamp=None)
    with pytest.raises(ConfigError, match=r"model.stylegan2.style_mixing=1.5 must be in \[0, 1\]"):
        load_config(None, ["model.family=stylegan2", "model.stylegan2.style_mixing=1.5"]).validate()
    with pytest.raises(ConfigError, match="channel_base=16 gives no feature maps at 32x32"):
        load_config(None, ["model.family=stylegan2", "model.stylegan2.channel_base=16"]).validate()
    with pytest.raises(ConfigError, match="cannot be made by stylegan2"):
        load_config(None, ["model.family=stylegan2", "model.resolution=16"]).validate()
    with pytest.raises(ValueError, match="power-of-two"):
        Generator(resolution=48)


def test_two_training_steps_through_the_trainer():
    """The family through the whole trainer: lazy R1 and path length, conditional, w_avg tracked."""
    from support import make_trainer

    tr = make_trainer(
        "model.family=stylegan2",
        "model.num_classes=auto",
        "model.stylegan2.channel_base=256",
        "model.stylegan2.channel_max=16",
        "model.stylegan2.w_dim=16",
        "model.stylegan2.map_layers=2",
        "loss.r1_gamma=1",
        "loss.pl_weight=2",
        "loss.d_reg_interval=2",
        "loss.g_reg_interval=2",
        "data.num_images=64",
        "train.batch=8",
        config=None,
    )
    before = [p.detach().clone() for p in tr.G_module.parameters()]
    for _ in range(2):
        tr.train_step(*tr.draw())
    assert tr.step_idx == 2 and isinstance(tr.G_module, Generator) and tr.G_module.num_classes > 0
    assert tr.G_module.mapping.w_avg.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.G_module.parameters()))
