"""The BigGAN family (distgan/models/biggan.py): shapes, spectral norm, conditional BN, projection D, hierarchical
latents, self-attention, the paper's parameter counts, bf16 autocast and R1's double backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import distgan.models.biggan as biggan
from distgan.config import ModelConfig, load_config
from distgan.errors import ConfigError
from distgan.models import BigGANOptions, build_discriminator, build_generator
from distgan.models.biggan import Discriminator, GBlock, Generator, SelfAttention


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def small(res=32, num_classes=0, z_dim=None, **options):
    """G and D of a toy-width BigGAN through the registry (z_dim: 5 per chunk unless given)."""
    z_dim = z_dim or 5 * (res.bit_length() - 2)
    opts = BigGANOptions(**{"g_width": 2, "d_width": 2, "shared_dim": 6, **options})
    cfg = ModelConfig(family="biggan", resolution=res, z_dim=z_dim, num_classes=num_classes, options=opts)
    assert opts.problems(cfg) == []
    return build_generator(cfg), build_discriminator(cfg)


def sn_modules(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if parametrize.is_parametrized(m, "weight")]


def sigma(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().flatten(1), ord=2).item()


@pytest.mark.parametrize("res", [32, 64, 128])
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("attn_res", [0, 16])
def test_shapes(res, num_classes, attn_res):
    G, D = small(res, num_classes, attn_res=attn_res)
    assert (G.attn is not None) == bool(attn_res)
    assert sum(isinstance(m, SelfAttention) for m in D.modules()) == bool(attn_res)
    z = torch.randn(3, G.z_dim)
    c = torch.tensor([0, 1, 2]) if num_classes else None
    x = G(z, c)
    assert x.shape == (3, 3, res, res)
    assert x.min() >= -1 and x.max() <= 1  # tanh
    assert D(x, c).shape == (3,)
    assert G(z.view(3, -1, 1, 1), c).shape == x.shape  # both latent layouts, as DCGAN


def test_auto_attention_is_biggans_placement():
    assert [biggan.attention_resolution("auto", r) for r in (32, 64, 128)] == [0, 32, 64]
    assert small(32)[0].attn is None  # 32x32: SNGAN's CIFAR ResNet has none
    G, D = small(64)  # at half the output size in G (after block 2 of 4: 8, 16, 32) and in D (its first block)
    assert G.attn_after == 2 and isinstance(D.blocks[1], SelfAttention)


def test_config_problems():
    def problems(**kw):
        res = kw.pop("resolution", 32)
        z_dim = kw.pop("z_dim", 100)
        return BigGANOptions(**kw).problems(ModelConfig(family="biggan", resolution=res, z_dim=z_dim))

    assert problems() == []  # 100 = 4 chunks of 25 at 32x32
    (msg,) = problems(resolution=128)
    assert "z_dim=100 is not a multiple of 6: use 96 or 102 (BigGAN: 120 at 128x128), or hier=false" in msg
    assert problems(resolution=128, z_dim=120) == [] and problems(resolution=128, hier=False) == []
    (msg,) = problems(attn_res=32)  # 32x32 features exist only in G's last block, not in D
    assert "attn_res=32 is not a feature size of both networks at 32x32: choose 0 (none), auto or one of [8, 16]" in msg
    assert problems(g_width=0) == ["g_width=0 must be >= 1"]
    # Through the config: the family is registered, its section parsed, its problems reported.
    cfg = load_config(None, ["model.family=biggan", "model.biggan.attn_res=16", "model.biggan.init=N02"]).validate()
    assert cfg.model.options == BigGANOptions(attn_res=16, init="N02")
    with pytest.raises(ConfigError, match=r"model.biggan.hier=true splits z into 6 equal chunks"):
        load_config(None, ["model.family=biggan", "model.resolution=128"]).validate()


# ---------------------------------------------------------------------- spectral norm


def test_spectral_norm_holds_every_weight_at_sigma_one():
    torch.manual_seed(0)
    G, D = small(32, num_classes=3, attn_res=16, init="N02")  # N(0, 0.02): raw sigmas far from 1
    # Every conv, linear and embedding is normalised, but G's shared class embedding (read through SN'd linears).
    for net in (G, D):
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
        assert {id(m) for m in sn_modules(net)} == {id(m) for m in layers if m is not getattr(net, "shared", None)}
    assert not parametrize.is_parametrized(G.shared) and parametrize.is_parametrized(D.embed)
    c = torch.tensor([0, 1, 2, 0])
    for _ in range(5):  # train mode: one power iteration per forward (after 15 at construction)
        D(G(torch.randn(4, G.z_dim), c), c)
    checked = 0
    for net in (G, D):
        for m in sn_modules(net):
            raw = sigma(m.parametrizations.weight.original)
            assert abs(sigma(m.weight) - 1) < 0.05, (m, sigma(m.weight))
            assert abs(raw - 1) > 0.5, (m, raw)  # the control: the same weight without SN is nowhere near 1
            checked += 1
    assert checked > 30


def test_spectral_norm_runs_in_fp32_under_autocast(monkeypatch):
    """The power iteration runs with autocast off (on CUDA autocast would put its torch.mv in bf16), and the
    normalised weight comes out fp32, the same as without autocast."""
    seen = []
    original = torch.nn.utils.parametrizations._SpectralNorm.forward

    def spy(self, weight):
        seen.append((torch.is_autocast_enabled("cpu"), weight.dtype))
        return original(self, weight)

    monkeypatch.setattr(torch.nn.utils.parametrizations._SpectralNorm, "forward", spy)
    torch.manual_seed(0)
    _, D = small(32, num_classes=3, attn_res=16)
    D2 = copy.deepcopy(D)
    x, c = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D(x, c)
    assert seen and all(s == (False, torch.float32) for s in seen)
    D2(x, c)
    for m, m2 in zip(sn_modules(D), sn_modules(D2)):
        sn, sn2 = m.parametrizations.weight[0], m2.parametrizations.weight[0]
        assert sn._u.dtype == torch.float32 and torch.equal(sn._u, sn2._u) and torch.equal(sn._v, sn2._v)
        assert torch.equal(m.weight, m2.weight)


def test_state_dict_keys_are_torchs_and_a_copy_loads():
    torch.manual_seed(0)
    G, D = small(32, num_classes=3, attn_res=16)
    keys = set(D.state_dict())
    assert {"embed.parametrizations.weight.original", "embed.parametrizations.weight.0._u",
            "embed.parametrizations.weight.0._v"} <= keys  # fmt: skip
    torch.manual_seed(1)
    G2, D2 = small(32, num_classes=3, attn_res=16)
    G2.load_state_dict(G.state_dict())
    D2.load_state_dict(D.state_dict())
    z, c = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 0])
    G.eval(), G2.eval(), D.eval(), D2.eval()
    with torch.no_grad():
        torch.testing.assert_close(G2(z, c), G(z, c), rtol=0, atol=0)
        torch.testing.assert_close(D2(G(z, c), c), D(G(z, c), c), rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(G)(z, c), G(z, c), rtol=0, atol=0)  # G_ema is a deepcopy


def test_orthogonal_init():
    torch.manual_seed(0)
    G, D = small(32, num_classes=3)
    for m in sn_modules(G) + sn_modules(D):
        w = m.parametrizations.weight.original.detach().flatten(1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # orthonormal rows, or columns
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
        assert getattr(m, "bias", None) is None or not m.bias.any()


# ---------------------------------------------------------------------- conditioning and latents


def test_conditional_batchnorm_takes_the_class():
    torch.manual_seed(0)
    G, _ = small(32, num_classes=3)
    z = torch.randn(4, G.z_dim)
    c = torch.tensor([0, 1, 2, 0])
    G(z, c)  # one train-mode step, so the running statistics are not the initial ones
    G.eval()
    with torch.no_grad():
        x = G(z, c)
        torch.testing.assert_close(G(z, c), x, rtol=0, atol=0)  # eval: no batch statistics, no power iteration
        assert not torch.allclose(G(z, (c + 1) % 3), x)  # the class changes the image
        # Each image depends on its own class only: BN uses running statistics in eval mode.
        torch.testing.assert_close(G(z[:1], c[:1]), x[:1])
    block = G.blocks[0]
    assert block.bn1.to_gain.in_features == 6 + G.chunk and not block.bn1.bn.affine
    # Unconditional: no embedding anywhere; hierarchical: the BNs still take their z chunk.
    G0, D0 = small(32, num_classes=0)
    assert G0.shared is None and D0.embed is None
    assert not any(isinstance(m, nn.Embedding) for m in [*G0.modules(), *D0.modules()])
    assert G0.blocks[0].bn1.to_gain.in_features == G0.chunk
    # Unconditional and not hierarchical: SNGAN's G, with ordinary affine BatchNorms and all of z to the linear.
    G1, _ = small(32, num_classes=0, hier=False)
    assert G1.blocks[0].bn1.to_gain is None and G1.blocks[0].bn1.bn.affine and G1.linear.in_features == G1.z_dim


def test_hierarchical_latents_give_each_block_its_chunk():
    torch.manual_seed(0)
    G, _ = small(64, num_classes=3, z_dim=25)  # 5 chunks of 5: the linear, then 4 blocks
    G.eval()
    z, c = torch.randn(2, 25), torch.tensor([2, 0])
    seen = {}
    G.linear.register_forward_hook(lambda m, args, out: seen.__setitem__("linear", args[0]))
    for i, block in enumerate(G.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[1]))
    with torch.no_grad():
        x = G(z, c)
        chunks = z.split(5, dim=1)
        torch.testing.assert_close(seen["linear"], chunks[0], rtol=0, atol=0)
        for i in range(4):
            torch.testing.assert_close(seen[i], torch.cat([G.shared(c), chunks[i + 1]], dim=1), rtol=0, atol=0)
        for k in range(5):  # changing only chunk k changes the image
            z2 = z.clone()
            z2[:, 5 * k : 5 * (k + 1)] += 1
            assert not torch.allclose(G(z2, c), x)


def test_projection_discriminator():
    torch.manual_seed(0)
    _, D = small(32, num_classes=3, attn_res=16)
    x = torch.randn(6, 3, 32, 32)
    c = torch.tensor([0, 1, 2, 0, 1, 2])
    D.eval()
    with torch.no_grad():
        logits = D(x, c)
        assert not torch.allclose(D(x, (c + 1) % 3), logits)  # the class it is told moves the logit
        h = F.relu(D.blocks(x)).sum(dim=(2, 3))  # global sum pooling of D's last features, by hand
        by_hand = D.linear(h).flatten() + (D.embed(c) * h).sum(dim=1)  # unconditional part + <embed(c), h>
        torch.testing.assert_close(logits, by_hand)
        # The unconditional part alone is what the projection is added to.
        torch.testing.assert_close(logits - (D.embed(c) * h).sum(dim=1), D.linear(h).flatten())


# ---------------------------------------------------------------------- self-attention


def test_self_attention_starts_as_the_identity_and_learns():
    torch.manual_seed(0)
    attn = SelfAttention(16)
    assert attn.sigma.item() == 0
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    out = attn(x)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    out.square().sum().backward()
    assert attn.sigma.grad.abs() > 0  # sigma learns from the start
    torch.testing.assert_close(x.grad, 2 * x.detach())  # and the input's gradient passes straight through
    with torch.no_grad():
        attn.sigma.fill_(1.0)
    attn.zero_grad()
    out = attn(x)
    assert not torch.allclose(out, x)
    out.square().sum().backward()
    for conv in (attn.theta, attn.phi, attn.g, attn.o):
        assert conv.weight.grad.abs().sum() > 0  # (a bare block: the networks add spectral norm)


# ---------------------------------------------------------------------- the paper's model


def test_parameter_counts_of_biggan_128(monkeypatch):
    """ImageNet 128x128 BigGAN: ch = 96, 1000 classes, z_dim = 120 (6 chunks of 20), shared embedding 128, attention
    at 64x64. The paper (Brock et al. 2019, Table 1, row "+Hier.") gives 158.3M parameters for G and D together;
    google/compare_gan's BigGAN (compare_gan/architectures/resnet_biggan_test.py) asserts G = 70,433,988 and
    D = 87,982,370 for this configuration, and we match both exactly."""
    # Built on the meta device and without initialisation or spectral norm (it adds no parameters, see below):
    # the counts, in a second instead of building 158M real weights.
    monkeypatch.setattr(biggan, "init_and_normalise", lambda *args, **kwargs: None)
    with torch.device("meta"):
        G = Generator(z_dim=120, resolution=128, channels=3, width=96, num_classes=1000, shared_dim=128, attn_res=64)
        D = Discriminator(resolution=128, channels=3, width=96, num_classes=1000, attn_res=64)
    assert n_params(G) == 70_433_988
    assert n_params(D) == 87_982_370
    assert abs((n_params(G) + n_params(D)) / 158.3e6 - 1) < 0.001  # 158.42M, the paper's 158.3M to 0.1%
    # The layout of Table 4: linear from z's first 20 values to 4x4x16ch; attention on 2ch in G and ch in D.
    assert G.linear.in_features == 20 and G.linear.out_features == 4 * 4 * 16 * 96
    assert G.attn.theta.in_channels == 192 and G.attn_after == 3  # after the block that makes 64x64
    assert isinstance(D.blocks[1], SelfAttention) and D.blocks[1].theta.in_channels == 96
    assert D.blocks[-1].skip is None and not D.blocks[-1].down  # ResBlock 16ch -> 16ch at 4x4, identity skip


def test_spectral_norm_and_init_add_no_parameters(monkeypatch):
    G, D = small(64, num_classes=3)
    monkeypatch.setattr(biggan, "init_and_normalise", lambda *args, **kwargs: None)
    G0, D0 = small(64, num_classes=3)
    assert n_params(G) == n_params(G0) and n_params(D) == n_params(D0)
    assert not sn_modules(G0) and sn_modules(G)


# ---------------------------------------------------------------------- precision and penalties


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_autocast_and_r1_double_backward(autocast):
    torch.manual_seed(0)
    G, D = small(32, num_classes=3, attn_res=16)
    z, c = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x = G(z, c)
        fake_logits = D(x, c)
    assert x.dtype == (torch.bfloat16 if autocast else torch.float32)
    fake_logits.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in G.parameters() if p.grad is not None)
    # R1: the gradient of D's logits with respect to its input, differentiated again (no in-place ops on that path).
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    real.requires_grad_(True)
    D.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = D(real, c)
    (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    grad.square().sum().backward()
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_gblock_up_and_dblock_down():
    blk = GBlock(4, 6, y_dim=3)
    assert blk(torch.randn(2, 4, 5, 5), torch.randn(2, 3)).shape == (2, 6, 10, 10)
    _, D = small(32)
    assert [b.down for b in D.blocks] == [True, True, False, False] and D.blocks[0].first
    assert D.blocks[2].skip is None and D.blocks[1].skip is not None  # identity only where shape and width are kept


def test_biggan_trains_through_the_trainer():
    """Two steps of the whole trainer: conditional (the shapes' 4 classes), hinge loss, R1, bf16 autocast."""
    from support import make_trainer

    tr = make_trainer(
        "model.family=biggan",
        "model.resolution=32",
        "model.z_dim=8",
        "model.num_classes=auto",
        "model.biggan.g_width=2",
        "model.biggan.d_width=2",
        "model.biggan.shared_dim=4",
        "model.biggan.attn_res=16",
        "loss.kind=hinge",
        "loss.r1_gamma=1",
        "loss.d_reg_interval=1",
        "train.precision=bf16",
        "data.num_images=32",
        "train.batch=8",
        config=None,
    )
    before = [p.detach().clone() for p in tr.D_module.parameters()]
    for _ in range(2):
        tr.train_step(*tr.draw())
    assert tr.step_idx == 2 and isinstance(tr.D_module, Discriminator) and tr.D_module.embed.num_embeddings == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.D_module.parameters()))
