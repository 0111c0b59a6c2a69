import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from distgan.config import ModelConfig
from distgan.models import DCGANOptions, build_discriminator, build_generator
from distgan.models.dcgan import Discriminator, Generator


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("res", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(res, channels):
    cfg = ModelConfig(resolution=res, channels=channels, z_dim=20, options=DCGANOptions(g_width=8, d_width=8))
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
    cfg = ModelConfig(resolution=32, channels=3, z_dim=8, options=DCGANOptions(g_width=4, d_width=4, norm="none"))
    G, D = build_generator(cfg), build_discriminator(cfg)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*G.modules(), *D.modules()])
    z = torch.randn(6, 8)
    torch.testing.assert_close(G(z)[:3], G(z[:3]))


def test_bad_resolution():
    with pytest.raises(ValueError, match="power-of-two"):
        Generator(resolution=48)


def test_importing_distgan_models_losses_loads_no_heavy_frameworks():
    code = (
        "import sys, distgan, distgan.models, distgan.models.dcgan, distgan.losses, distgan.config, distgan.training\n"
        "bad = [m for m in ('accelerate', 'deepspeed', 'wandb') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------- conditional DCGAN


def test_conditional_dcgan_embeds_the_class_in_g_and_projects_it_in_d():
    cfg = ModelConfig(resolution=32, channels=3, z_dim=8, num_classes=4, options=DCGANOptions(g_width=4, d_width=4))
    G, D = build_generator(cfg), build_discriminator(cfg)
    z = torch.randn(6, 8).repeat(4, 1)  # the same 6 latents for each of the 4 classes
    c = torch.arange(4).repeat_interleave(6)
    with torch.no_grad():
        x = G(z, c)
        assert x.shape == (24, 3, 32, 32)
        per_class = x.view(4, 6, -1)
        assert all(not torch.allclose(per_class[0], per_class[k]) for k in range(1, 4))  # the class changes the image
        logits = D(x, c)
        assert logits.shape == (24,)
        # The projection: D's logit moves with the class it is told, for the same image.
        assert not torch.allclose(D(x, c), D(x, (c + 1) % 4))
        h = x
        for layer in D._trunk:
            h = layer(h)
        by_hand = D._head(h).flatten() + (D.embed(c) * h.sum(dim=(2, 3))).sum(1)
        torch.testing.assert_close(logits, by_hand)
    # 4 classes add G's embedding (4 x z_dim) and D's projection (4 x D's last width, 4 * 2^2 = 16 at 32x32).
    plain = ModelConfig(resolution=32, channels=3, z_dim=8, options=DCGANOptions(g_width=4, d_width=4))
    g0, d0 = build_generator(plain), build_discriminator(plain)
    assert n_params(G) - n_params(g0) == 4 * 8 + 8 * 16 * 4 * 4  # embedding + the wider first ConvT (z+embed in)
    assert n_params(D) - n_params(d0) == 4 * 16
    assert set(d0.state_dict()) == {k for k in D.state_dict() if not k.startswith("embed")}  # old names kept


def test_an_unconditional_dcgan_is_unchanged_by_the_conditional_code():
    """The same seed gives the same weights and the same images as before conditioning existed (no embedding is
    made, nothing else draws from the RNG): today's configs keep their behaviour."""
    torch.manual_seed(0)
    G = Generator(16, 32, 3, 8)
    torch.manual_seed(0)
    again = Generator(16, 32, 3, 8, num_classes=0, embed_dim=7)
    assert G.embed is None and all(torch.equal(a, b) for a, b in zip(G.parameters(), again.parameters()))


# ---------------------------------------------------------------------- the family registry


@dataclass
class ToyOptions:
    """A toy family: one linear layer each way (registered by this test only)."""

    width: int = 4


def build_generator_toy(cfg):
    return _ToyG(cfg)


class _ToyG(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.res, self.ch = cfg.resolution, cfg.channels
        self.lin = nn.Linear(cfg.z_dim, self.ch * self.res * self.res)

    def forward(self, z, c=None):
        return torch.tanh(self.lin(z)).view(-1, self.ch, self.res, self.res)


class _ToyD(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.lin = nn.Linear(cfg.channels * cfg.resolution**2, cfg.options.width)
        self.out = nn.Linear(cfg.options.width, 1)

    def forward(self, x, c=None):
        return self.out(torch.relu(self.lin(x.flatten(1)))).flatten()


def build_discriminator(cfg):  # noqa: F811 (this module is the toy family's module)
    import distgan.models as models

    if cfg.family == "toy":
        return _ToyD(cfg)
    return models.build_discriminator(cfg)


def build_generator(cfg):  # noqa: F811
    import distgan.models as models

    if cfg.family == "toy":
        return build_generator_toy(cfg)
    return models.build_generator(cfg)


@pytest.fixture
def toy_family():
    from distgan.models import FAMILIES, Family, register

    register(Family("toy", ToyOptions, module=__name__, resolutions=(8, 16), conditional=False, doc="a toy"))
    yield
    FAMILIES.pop("toy")


def test_a_family_is_one_module_one_registry_entry_and_one_config_dataclass(toy_family):
    from distgan.config import field_index, load_config
    from distgan.errors import ConfigError
    from support import make_trainer

    assert field_index()["model.toy.width"].default == 4  # its section is in the config, with its default
    cfg = load_config(None, ["model.family=toy", "model.resolution=16", "model.toy.width=6"]).validate()
    assert cfg.model.options == ToyOptions(width=6) and cfg.to_dict()["model"]["toy"] == {"width": 6}
    # A key of another family's section names that family; a size the family does not make is refused.
    with pytest.raises(ConfigError, match=r"model.dcgan.g_width is an option of model family dcgan, but model.fam"):
        load_config(None, ["model.family=toy", "model.dcgan.g_width=8"])
    with pytest.raises(ConfigError, match=r"model.resolution=32 cannot be made by toy \(choose from \[8, 16\]\)"):
        load_config(None, ["model.family=toy"]).validate()
    with pytest.raises(ConfigError, match=r"model.num_classes=3 but family toy is unconditional"):
        load_config(None, ["model.family=toy", "model.resolution=16", "model.num_classes=3"]).validate()
    # It trains: two steps through the whole trainer, and its export rebuilds it.
    tr = make_trainer(
        "model.family=toy",
        "model.resolution=16",
        "model.toy.width=6",
        "data.num_images=64",
        "train.batch=8",
        config=None,
    )
    before = [p.detach().clone() for p in tr.D_module.parameters()]
    for _ in range(2):
        tr.train_step(*tr.draw())
    assert tr.step_idx == 2 and isinstance(tr.D_module, _ToyD) and tr.D_module.lin.out_features == 6
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.D_module.parameters()))
