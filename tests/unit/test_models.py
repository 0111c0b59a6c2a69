import subprocess
import sys

import pytest
import torch
from torch import nn

from distgan.config import ModelConfig
from distgan.models import build_discriminator, build_generator
from distgan.models.dcgan import Discriminator, Generator


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("res", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(res, channels):
    cfg = ModelConfig(resolution=res, channels=channels, z_dim=20, g_width=8, d_width=8)
    G, D = build_generator(cfg), build_discriminator(cfg)
    z = torch.randn(5, 20)
    x = G(z)
    assert x.shape == (5, channels, res, res)
    assert x.min() >= -1 and x.max() <= 1  # Tanh
    assert D(x).shape == (5,)
    assert G(z.view(5, 20, 1, 1)).shape == x.shape  # both latent layouts are accepted


def test_classic_mnist_dcgan_is_exact():
    # 32x32x1, nz=100: G 100->256 (4/1/0) ->128->64->1 (4/2/1), D 1->64->128->256 (4/2/1) ->1 (4/1/0).
    G, D = Generator(z_dim=100, resolution=32, channels=1, width=64), Discriminator(resolution=32, channels=1)
    convs_g = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs_g] == [
        (100, 256, (4, 4), (1, 1), (0, 0)),
        (256, 128, (4, 4), (2, 2), (1, 1)),
        (128, 64, (4, 4), (2, 2), (1, 1)),
        (64, 1, (4, 4), (2, 2), (1, 1)),
    ]
    convs_d = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs_d] == [
        (1, 64, (4, 4), (2, 2), (1, 1)),
        (64, 128, (4, 4), (2, 2), (1, 1)),
        (128, 256, (4, 4), (2, 2), (1, 1)),
        (256, 1, (4, 4), (1, 1), (0, 0)),
    ]
    # Counted by hand: G = 100*256*16 + 256*128*16 + 128*64*16 + 64*1*16 + BN 2*(256+128+64)
    assert n_params(G) == 409600 + 524288 + 131072 + 1024 + 2 * (256 + 128 + 64) == 1066880
    # D = 1*64*16 + 64*128*16 + 128*256*16 + 256*1*16 + BN 2*(128+256); no BN after the first conv
    assert n_params(D) == 1024 + 131072 + 524288 + 4096 + 2 * (128 + 256) == 661248
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 3
    assert isinstance(D.net[1], nn.LeakyReLU) and D.net[1].negative_slope == 0.2
    assert isinstance(G.net[-1], nn.Tanh)


def test_pytorch_examples_dcgan_64x64x3_param_counts():
    # The network of pytorch/examples/dcgan (ngf = ndf = 64, nz = 100): 3,576,704 and 2,765,568 parameters.
    assert n_params(Generator(100, 64, 3, 64)) == 3576704
    assert n_params(Discriminator(64, 3, 64)) == 2765568


def test_init_is_dcgan():
    torch.manual_seed(0)
    G = Generator(100, 64, 3, 64)
    w = G.net[0].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = G.net[1]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and bn.bias.abs().sum() == 0


def test_discriminator_returns_unbounded_logits():
    D = Discriminator(32, 3, 8)
    with torch.no_grad():
        for p in D.parameters():
            p.mul_(50)
    out = D(torch.randn(16, 3, 32, 32))
    assert out.abs().max() > 1  # not squashed by a sigmoid


def test_norm_none_has_no_batchnorm_and_is_batch_independent():
    cfg = ModelConfig(resolution=32, channels=3, z_dim=8, g_width=4, d_width=4, norm="none")
    G, D = build_generator(cfg), build_discriminator(cfg)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*G.modules(), *D.modules()])
    z = torch.randn(6, 8)
    torch.testing.assert_close(G(z)[:3], G(z[:3]))


def test_bad_resolution():
    with pytest.raises(ValueError, match="power-of-two"):
        Generator(resolution=48)


def test_importing_distgan_models_losses_loads_no_heavy_frameworks():
    code = (
        "import sys, distgan, distgan.models, distgan.models.dcgan, distgan.losses, distgan.config, distgan.trainer\n"
        "bad = [m for m in ('accelerate', 'deepspeed', 'wandb') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
