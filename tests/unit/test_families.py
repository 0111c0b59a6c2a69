"""Every model family through the whole trainer on one process: conditional or not, every step's phases, fp32 and
bf16, the export that rebuilds it, and the family's own parts of the step (StyleGAN2's path length on w, R3GAN's
pairing loss with R1 and R2). The families' networks have their own tests (test_stylegan2.py, test_biggan.py,
test_r3gan.py); the distributed and resume tests run them on 2 ranks."""

import pytest
import torch

from distgan.models import FAMILIES
from support import TINY, make_trainer, outputs_after_two_steps

FAMILY_NAMES = sorted(TINY)


def test_every_registered_family_has_a_test_size():
    assert sorted(FAMILIES) == FAMILY_NAMES


# fp16 on a CPU is slow (no fp16 kernels: ~25 s for BigGAN's 8 steps): marked slow, left to `make test`.
@pytest.mark.parametrize("precision", ["fp32", "bf16", pytest.param("fp16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_trains_every_phase(family, conditional, precision):
    extra = ["model.num_classes=auto"] if conditional else []  # the shapes' 4 classes
    tr = make_trainer(*TINY[family], *extra, f"train.precision={precision}")
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("G", tr.G_module), ("D", tr.D_module))}
    names = []
    # Step 0 runs every phase (lazy ones included). fp16's loss scalers start at 2^16 and skip the first steps'
    # overflowing updates while they find their scale: a few more steps for those.
    for _ in range(8 if precision == "fp16" else 2):
        tr.train_step(*tr.draw())
        names += [k for k in tr.stats.names() if k.startswith("Loss/")]
    for n, m in (("G", tr.G_module), ("D", tr.D_module)):
        after = list(m.parameters())
        assert all(torch.isfinite(p).all() for p in after), n
        assert any(not torch.equal(a, b) for a, b in zip(before[n], after)), f"{n} did not train"
    lo = tr.cfg.loss
    want = {"Loss/D/main", "Loss/G/main"} | ({"Loss/D/r1"} if lo.r1_gamma else set())
    want |= ({"Loss/D/r2"} if lo.r2_gamma else set()) | ({"Loss/G/pl"} if lo.pl_weight else set())
    assert want <= set(names), (want, set(names))
    z = torch.randn(4, tr.cfg.model.z_dim)
    c = torch.tensor([0, 1, 2, 3]) if conditional else None
    images = tr.sample(z, c)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_export_rebuilds_every_family(tmp_path, family):
    from distgan.export import generator_bytes, load_generator

    tr = make_trainer(*TINY[family], "model.num_classes=auto")
    tr.train_step(*tr.draw())
    path = tmp_path / "generator.safetensors"
    path.write_bytes(generator_bytes(tr.G_ema.module, tr.cfg.to_dict()["model"], tr.cur_nimg))
    G = load_generator(path)
    assert type(G) is type(tr.G_ema.module) and G.num_classes == 4
    for (k, a), (k2, b) in zip(tr.G_ema.module.state_dict().items(), G.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k  # buffers too (StyleGAN2's w_avg, spectral norm's u and v)
    z, c = torch.randn(3, tr.cfg.model.z_dim), torch.tensor([0, 1, 3])
    torch.manual_seed(0)
    want = tr.G_ema.module(z, c)
    torch.manual_seed(0)
    torch.testing.assert_close(G(z, c), want)


def test_stylegan2_path_length_is_taken_on_w_and_other_families_on_z(monkeypatch):
    import distgan.training.step as step

    seen = []
    real = step.path_lengths
    monkeypatch.setattr(step, "path_lengths", lambda g: seen.append(tuple(g.shape)) or real(g))
    tr = make_trainer(*TINY["stylegan2"])
    tr.train_step(*tr.draw())  # step 0: G_reg runs
    G = tr.G_module
    assert seen == [(tr.micro, G.num_ws, G.w_dim)]
    assert float(tr.step.pl_mean) > 0
    seen.clear()
    dc = make_trainer("loss.pl_weight=2", "loss.g_reg_interval=2")
    dc.train_step(*dc.draw())
    assert seen == [(dc.micro, dc.cfg.model.z_dim)]


def test_the_pairing_loss_gives_g_the_reals_logits(monkeypatch):
    # RpGAN's G loss pairs each fake with a real (through D frozen); the other losses' G steps never see reals.
    from distgan import losses

    calls = []
    for kind in ("rpgan", "nonsaturating"):
        loss = losses.LOSSES[kind]
        spy = lambda fake, real=None, _g=loss.g_loss: calls.append(real is not None) or _g(fake, real)  # noqa: E731
        tr = make_trainer(*TINY["r3gan"], f"loss.kind={kind}")
        tr.loss = loss._replace(g_loss=spy)
        tr.train_step(*tr.draw())
    assert calls == [True, False]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_no_family_has_a_zero_dimensional_parameter(family):
    # DeepSpeed broadcasts rank 0's parameters at engine start as bytes (`p.data.view(torch.uint8)`), which a 0-dim
    # tensor cannot be viewed as: a scalar parameter (a noise strength, an attention gain) made every ZeRO run of
    # its family fail before the first step. Every option that adds parameters is on here (attention included).
    from distgan.config import load_config
    from distgan.models import build_discriminator, build_generator

    extra = ["model.biggan.attn_res=16"] if family == "biggan" else []
    cfg = load_config(None, [*TINY[family], *extra, "model.num_classes=4"]).model
    for net in (build_generator(cfg), build_discriminator(cfg)):
        assert [n for n, p in net.named_parameters() if p.dim() == 0] == []


# Augmentation on every family's D inputs (R1/R2 and path length through it where the family has them), under every
# precision: the steps stay finite, both networks train, and ADA's p is reported and moved by the controller.
@pytest.mark.parametrize("precision", ["fp32", "bf16", pytest.param("fp16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["diffaug", "ada"])
@pytest.mark.parametrize("family", ["stylegan2", "r3gan"])
def test_augmentation_trains_under_every_precision(family, kind, precision):
    extra = ["augment.p=0.5", "augment.ops=bgcfnc", "augment.ada_interval=1", "augment.ada_kimg=0.1"]
    tr = make_trainer(*TINY[family], f"augment.kind={kind}", *extra, f"train.precision={precision}")
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("G", tr.G_module), ("D", tr.D_module))}
    ps = []
    for _ in range(6 if precision == "fp16" else 3):
        tr.train_step(*tr.draw())
        ps.append(None if tr.augment.p is None else tr.augment.p.item())
    for n, m in (("G", tr.G_module), ("D", tr.D_module)):
        after = list(m.parameters())
        assert all(torch.isfinite(p).all() for p in after), n
        assert any(not torch.equal(a, b) for a, b in zip(before[n], after)), f"{n} did not train"
    if kind == "ada":
        assert len(set(ps)) > 1 and all(abs(b - a) == pytest.approx(0.16) or b in (0, 1) for a, b in zip(ps, ps[1:]))
        assert tr.stats.last("Augment/p") is not None
    else:
        assert ps == [None] * len(ps)


# channels_last (NHWC) reorders the convolutions' sums, and Adam's first steps turn a rounding difference in a
# near-zero gradient into a whole step (lr) of that weight (BigGAN's biases before BatchNorm have a zero gradient
# up to rounding). Measured after two steps: DCGAN and R3GAN differ by < 1e-6; BigGAN's images by 0.3% and
# StyleGAN2's by 0.2% of their largest value, D's logits by < 0.01%. LAYOUT_TOL is a share of the largest value.
LAYOUT_TOL = 0.02


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_channels_last_trains_what_the_default_layout_trains(family):
    want_images, want_logits = outputs_after_two_steps(family)[1:]
    tr, images, logits = outputs_after_two_steps(family, "train.channels_last=true")
    conv = next(p for p in tr.G_module.parameters() if p.dim() == 4 and p.shape[-1] > 1)  # (1x1: both layouts)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for got, want in ((images, want_images), (logits, want_logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=LAYOUT_TOL * want.abs().max().item())
    # Control: another training seed is far outside that tolerance (the comparison can fail).
    other = outputs_after_two_steps(family, "train.seed=1")[1]
    assert (other - want_images).abs().max() > 5 * LAYOUT_TOL * want_images.abs().max()
