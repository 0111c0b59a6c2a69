"""R3GAN (distgan/models/r3gan.py): shapes at every size, Fixup init, no normalisation, grouped convs, batch
independence, R1/R2-style double backward (fp32 and bf16 autocast), conditioning, and the size of the default
(CIFAR-10) networks. Small widths everywhere but the count of the defaults, so the file runs in seconds."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distgan.config import ModelConfig
from distgan.models import R3GANOptions, build_discriminator, build_generator, family
from distgan.models.r3gan import LRELU_GAIN, Discriminator, Generator, ResidualBlock, downsample, upsample

# 16 channels up to 64x64, then 8 at 128 and 4 at 256; groups of 4 channels in the (2x wider) 3x3 convs.
SMALL = dict(width=16, width_base=1024, blocks_per_stage=1, expansion=2, group_size=4)


def nets(res=32, num_classes=0, z_dim=8, **opts):
    cfg = ModelConfig(family="r3gan", resolution=res, channels=3, z_dim=z_dim, num_classes=num_classes,
                      options=R3GANOptions(**{**SMALL, **opts}))  # fmt: skip
    torch.manual_seed(0)
    return build_generator(cfg), build_discriminator(cfg)


@functools.cache
def default_nets(res: int) -> tuple[nn.Module, nn.Module]:
    """G and D with the default options (z_dim 64): 50M parameters, so built once (under a second on one core)."""
    cfg = ModelConfig(family="r3gan", resolution=res, channels=3, z_dim=64, options=R3GANOptions())
    return build_generator(cfg), build_discriminator(cfg)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def blocks(m: nn.Module) -> list[ResidualBlock]:
    return [b for b in m.modules() if isinstance(b, ResidualBlock)]


# ---------------------------------------------------------------------- shapes, registry, options


@pytest.mark.parametrize("res", [32, 64, 128, 256])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_shapes(res, num_classes):
    G, D = nets(res, num_classes)
    z = torch.randn(2, 8)
    c = torch.tensor([0, 4]) if num_classes else None
    with torch.no_grad():
        x = G(z, c)
        assert x.shape == (2, 3, res, res)
        assert G(z.view(2, 8, 1, 1), c).shape == x.shape  # both latent layouts
        assert D(x, c).shape == (2,)
    stages = int(math.log2(res)) - 1  # 4x4 .. res
    assert len(G.stages) == len(D.stages) == stages and len(blocks(G)) == len(blocks(D)) == stages


def test_registered_with_its_sizes_and_checked_options():
    assert family("r3gan").resolutions == (32, 64, 128, 256) and family("r3gan").conditional
    o = R3GANOptions()
    assert o.stage_widths(32) == [(4, 768), (8, 768), (16, 768), (32, 768)]
    assert o.stage_widths(256)[-3:] == [(64, 384), (128, 192), (256, 96)]
    for res in (32, 64, 128, 256):
        assert o.problems(ModelConfig(family="r3gan", resolution=res)) == []
    bad = R3GANOptions(width=16, width_base=512, group_size=16)  # 128x128: 4 channels, 8 in the 3x3: not 16s
    assert any("128x128 stage has 4 channels" in p for p in bad.problems(ModelConfig(family="r3gan", resolution=128)))
    assert R3GANOptions(expansion=0).problems(ModelConfig(family="r3gan")) == ["expansion=0 must be >= 1"]
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        ResidualBlock(6, 2, 8, 1)
    with pytest.raises(ValueError, match="power-of-two"):
        Generator(resolution=48)


def test_the_config_selects_it():
    from distgan.config import load_config

    cfg = load_config(None, ["model.family=r3gan", "model.r3gan.width=32", "model.r3gan.blocks_per_stage=1"])
    cfg.validate()
    assert cfg.model.options == R3GANOptions(width=32, blocks_per_stage=1)


# ---------------------------------------------------------------------- the architecture


def test_blocks_are_inverted_bottlenecks_with_grouped_3x3_convs():
    G, D = nets(res=256)
    for b in blocks(G) + blocks(D):
        w = b.expand.in_channels
        assert (b.expand.kernel_size, b.spatial.kernel_size, b.project.kernel_size) == ((1, 1), (3, 3), (1, 1))
        assert (
            b.expand.out_channels == b.spatial.in_channels == b.spatial.out_channels == 2 * w == b.project.in_channels
        )
        assert b.spatial.groups == 2 * w // 4  # group count = channels // group_size
        assert b.spatial.weight.shape[1] == 4  # each output sees one group: group_size input channels
    # The default (the paper's CIFAR-10 networks): 1536 channels in the 3x3 convs, 96 groups of 16.
    G, _ = default_nets(32)
    assert {(b.spatial.in_channels, b.spatial.groups) for b in blocks(G)} == {(1536, 96)} and len(blocks(G)) == 8


def test_no_normalisation_anywhere():
    G, D = nets(res=64, num_classes=3)
    for m in [*G.modules(), *D.modules()]:
        assert "Norm" not in type(m).__name__, m  # BatchNorm, GroupNorm, LayerNorm, InstanceNorm, ...
        assert not hasattr(m, "parametrizations"), m  # no spectral / weight norm either
    assert not any("norm" in name.lower() for name, _ in [*G.named_modules(), *D.named_modules()])


def test_resampling_is_bilinear():
    x = torch.randn(2, 3, 8, 8)
    # Up: bilinear = hold each pixel (nearest x2), then blur with [1, 2, 1] / 4 (edges replicated).
    held = F.pad(x.repeat_interleave(2, 2).repeat_interleave(2, 3), (1, 1, 1, 1), mode="replicate")
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    torch.testing.assert_close(upsample(x), F.conv2d(held, k, groups=3))
    # Down: [1, 3, 3, 1] / 8 at stride 2, the antialiased bilinear filter; equal to torch's away from the border.
    ref = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
    torch.testing.assert_close(downsample(x)[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])
    assert downsample(x).shape == (2, 3, 4, 4)
    flat = torch.full((1, 2, 8, 8), 0.7)  # a constant stays that constant, borders included
    torch.testing.assert_close(downsample(flat), torch.full((1, 2, 4, 4), 0.7))
    torch.testing.assert_close(upsample(flat), torch.full((1, 2, 16, 16), 0.7))


# ---------------------------------------------------------------------- Fixup initialisation


def test_fixup_every_branch_starts_at_zero_and_the_networks_start_as_their_linear_trunk():
    G, D = nets(res=64, num_classes=3)
    for b in blocks(G) + blocks(D):
        assert b.project.weight.abs().sum() == 0 and b.project.bias.abs().sum() == 0
        h = torch.randn(2, b.expand.in_channels, 8, 8)
        assert torch.equal(b.branch(h), torch.zeros_like(h)) and torch.equal(b(h), h)  # the identity
    # So G at init is basis -> (1x1 conv, up)... -> to_image: linear in [z, embed(c)] (a sum of inputs maps to the
    # sum of outputs, up to the biases, all zero).
    z1, z2, c = torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():
        G.embed.weight.zero_()
        torch.testing.assert_close(G(z1 + z2, c), G(z1, c) + G(z2, c), atol=1e-5, rtol=1e-4)


def test_fixup_gradients_reach_the_zero_initialised_layers():
    G, D = nets(res=32)
    x = G(torch.randn(4, 8))
    (D(x).sum() + x.square().mean()).backward()
    for b in blocks(G) + blocks(D):
        assert b.project.weight.grad.abs().sum() > 0  # the zero layer learns at once ...
        # ... while the layers before it see no gradient until it is non-zero (Fixup's first step).
        assert b.expand.weight.grad.abs().sum() == 0
    # And after one step of the zero layers, all of a branch learns.
    with torch.no_grad():
        for b in blocks(G) + blocks(D):
            b.project.weight.sub_(0.01 * b.project.weight.grad)
    for p in [*G.parameters(), *D.parameters()]:
        p.grad = None
    x = G(torch.randn(4, 8))
    D(x).sum().backward()
    assert all(b.expand.weight.grad.abs().sum() > 0 for b in blocks(D))


def test_fixup_scales_the_he_init_of_the_other_branch_layers_by_L_to_the_minus_quarter():
    torch.manual_seed(0)
    L = 8  # the 32x32 default: 4 stages x 2 blocks
    b = ResidualBlock(768, 2, 16, L)
    for conv, fan_in in ((b.expand, 768), (b.spatial, 16 * 9)):
        want = LRELU_GAIN / math.sqrt(fan_in) * L**-0.25
        assert abs(conv.weight.std().item() / want - 1) < 0.02
        assert conv.bias.abs().sum() == 0


# ---------------------------------------------------------------------- what the trainer relies on


def test_batch_independence():
    G, D = nets(res=32, num_classes=4)
    z, c = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        x = G(z, c)
        each = torch.cat([G(z[i : i + 1], c[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(x, each, atol=1e-5, rtol=1e-4)
        logits = D(x, c)
        torch.testing.assert_close(logits, torch.cat([D(x[i : i + 1], c[i : i + 1]) for i in range(6)]),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_r1_input_gradient_with_create_graph(precision):
    G, D = nets(res=32, num_classes=3)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    c = torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = D(x, c)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # what R1 (reals) / R2 (fakes) take
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    penalty = grad.float().square().sum(dim=(1, 2, 3)).mean()
    penalty.backward()  # the double backward, into D's weights
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert D.from_image.weight.grad.abs().sum() > 0


def test_bf16_autocast_runs_both_networks_close_to_fp32():
    G, D = nets(res=64, num_classes=3)
    z, c = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        x32, l32 = G(z, c), D(G(z, c), c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x16 = G(z, c)
            l16 = D(x16, c)
    assert x16.dtype == torch.bfloat16 and torch.isfinite(x16).all() and torch.isfinite(l16).all()
    assert (x16.float() - x32).abs().max() < 0.05 * x32.abs().max()
    assert (l16.float() - l32).abs().max() < 0.05 * l32.abs().max() + 0.02


# ---------------------------------------------------------------------- conditioning


def test_the_class_changes_g_and_d():
    G, D = nets(res=32, num_classes=4)
    z = torch.randn(3, 8).repeat(4, 1)  # the same latents for each class
    c = torch.arange(4).repeat_interleave(3)
    with torch.no_grad():
        x = G(z, c).view(4, 3, -1)
        assert all(not torch.allclose(x[0], x[k]) for k in range(1, 4))
        img = G(z, c)
        assert not torch.allclose(D(img, c), D(img, (c + 1) % 4))
        # The projection, by hand: w.h + b + <embed(c), h>.
        h = D.features(img)
        torch.testing.assert_close(D(img, c), D.out(h).flatten() + (D.embed(c) * h).sum(1))


def test_unconditional_has_no_embedding():
    G, D = nets(res=32, num_classes=0)
    assert G.embed is None and D.embed is None
    assert not any("embed" in n for n, _ in [*G.named_parameters(), *D.named_parameters()])
    Gc, Dc = nets(res=32, num_classes=4)
    # 4 classes add G's embedding (4 x z_dim) with the wider basis input (z_dim more inputs to 16 x 4 x 4 outputs),
    # and D's projection (4 x D's 4x4 width).
    assert n_params(Gc) - n_params(G) == 4 * 8 + 8 * 16 * 16 and n_params(Dc) - n_params(D) == 4 * 16


# ---------------------------------------------------------------------- size of the default networks


def r3gan_params(z_dim: int, channels: int, widths: list[int], blocks: int, expansion: int, group_size: int):
    """Parameters of G and D counted by hand: convs with biases; stage widths 4x4 first."""

    def block(w):
        h = w * expansion
        return (w * h + h) + (h * group_size * 9 + h) + (h * w + w)

    stages = sum(blocks * block(w) for w in widths)
    pairs = [(a, b) for a, b in zip(widths, widths[1:]) if a != b]  # 1x1 convs where the width changes
    g = (z_dim * widths[0] * 16 + widths[0] * 16) + stages + sum(a * b + b for a, b in pairs)  # G: wide -> narrow
    g += widths[-1] * channels + channels
    d = (channels * widths[-1] + widths[-1]) + stages + sum(a * b + a for a, b in pairs)  # D: narrow -> wide
    d += (widths[0] * widths[0] * 16 + widths[0]) + (widths[0] + 1)
    return g, d


@pytest.mark.parametrize("res", [32, 256])
def test_parameter_count_of_the_defaults(res):
    """The defaults at 32x32, R3GAN's CIFAR-10 shape (4 stages of 768, 2 blocks, expansion 2, groups of 16): G has
    21.5M parameters at z_dim = 64 and D 30.1M, 9.4M of them in D's 4x4 basis conv. Not asserted against the
    paper: its parameter column could not be re-read when this was written, and our basis layers (a full linear
    from z in G, a full 4x4 conv in D) are our reading of its text, not a copy of its code. What is asserted is
    that the networks are what the module doc says, to the parameter."""
    G, D = default_nets(res)
    widths = [w for _, w in R3GANOptions().stage_widths(res)]
    assert (n_params(G), n_params(D)) == r3gan_params(64, 3, widths, 2, 2, 16)
    if res == 32:
        assert (n_params(G), n_params(D)) == (21_475_587, 30_116_353)


def test_direct_construction_and_width_changes():
    widths = [(4, 16), (8, 16), (16, 8), (32, 8)]  # 16 channels at 4x4 and 8x8, 8 at 16x16 and 32x32
    G, D = Generator(8, 32, 3, widths, 1, 2, 4), Discriminator(32, 3, widths, 1, 2, 4)
    assert [type(t).__name__ for t in G.transitions] == ["Identity", "Conv2d", "Identity"]  # G: 8x8 -> 16x16
    assert [type(t).__name__ for t in D.transitions] == ["Identity", "Conv2d", "Identity"]  # D: 16x16 -> 8x8
    assert (G.transitions[1].in_channels, G.transitions[1].out_channels) == (16, 8)
    assert (D.transitions[1].in_channels, D.transitions[1].out_channels) == (8, 16)
    assert G(torch.randn(2, 8)).shape == (2, 3, 32, 32) and D(torch.randn(2, 3, 32, 32)).shape == (2,)


def test_it_trains_through_the_trainer_with_r1_under_bf16():
    from support import make_trainer

    tr = make_trainer(
        "model.family=r3gan",
        "model.z_dim=16",
        *(f"model.r3gan.{k}={v}" for k, v in SMALL.items()),
        "data.source=shapes",
        "data.num_images=64",
        "train.batch=8",
        "loss.r1_gamma=1",
        "loss.d_reg_interval=1",
        "train.precision=bf16",
        config=None,
    )
    before = [p.detach().clone() for p in tr.D_module.parameters()]
    for _ in range(2):
        tr.train_step(*tr.draw())
    assert tr.step_idx == 2 and isinstance(tr.D_module, Discriminator)
    after = list(tr.D_module.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
