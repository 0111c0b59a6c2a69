"""distgan.augment: DiffAugment and ADA's pipeline, op by op, on small images: values, gradients, RNG contract."""

import itertools

import pytest
import torch

from distgan.augment import ADA_GROUPS, OPS, POLICIES, build_pipe, parse_ops
from distgan.augment.ada import AugmentPipe
from distgan.augment.diffaug import DiffAugment


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image(n: int = 8, c: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand([n, c, size, size], generator=gen(seed)) * 2 - 1


def only(op: str, p: float = 1.0) -> AugmentPipe:
    return AugmentPipe({op: 1.0}, p=p)


def centred_square(n: int = 16, side: int = 8, size: int = 32) -> torch.Tensor:
    x = torch.zeros([n, 1, size, size])
    lo = (size - side) // 2
    x[:, :, lo : lo + side, lo : lo + side] = 1
    return x


def moments(y: torch.Tensor):
    """Per sample of [N, 1, H, W] >= 0: mass, centre (i, j) and variances along i and j, in pixels."""
    y = y[:, 0].clamp(min=0)
    h, w = y.shape[1:]
    i = torch.arange(h, dtype=y.dtype).view(1, h, 1)
    j = torch.arange(w, dtype=y.dtype).view(1, 1, w)
    mass = y.sum((1, 2))
    ci, cj = (y * i).sum((1, 2)) / mass, (y * j).sum((1, 2)) / mass
    vi = (y * (i - ci.view(-1, 1, 1)) ** 2).sum((1, 2)) / mass
    vj = (y * (j - cj.view(-1, 1, 1)) ** 2).sum((1, 2)) / mass
    return mass, ci, cj, vi, vj


# ---- identity and the RNG contract ----


@pytest.mark.parametrize("group", sorted(ADA_GROUPS))
@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (4, 1, 28, 28)], ids=["rgb32", "grey28"])
def test_ada_p0_is_identity_bit_for_bit_and_draws_like_any_p(group, shape):
    x = torch.randn(shape, generator=gen(1))
    pipe = AugmentPipe(ADA_GROUPS[group], p=0.0)
    global_state = torch.random.get_rng_state()
    g0 = gen(5)
    assert torch.equal(pipe(x, g0), x)
    g1 = gen(5)
    pipe.p.copy_(torch.tensor(0.7))
    assert not torch.equal(pipe(x, g1), x)
    assert torch.equal(g0.get_state(), g1.get_state())  # the same numbers drawn whatever p is
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the global RNG untouched


def test_diffaugment_empty_policy_is_identity():
    x = image()
    for policy in ("", "none"):
        assert torch.equal(DiffAugment(policy)(x, gen()), x)


def test_same_seed_same_output_other_seed_differs():
    x = image()
    for pipe in (AugmentPipe(ADA_GROUPS["bgcfnc"], p=0.5), DiffAugment("color,translation,cutout")):
        a, b, c = pipe(x, gen(3)), pipe(x, gen(3)), pipe(x, gen(4))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


# ---- ADA: pixel blitting ----


def test_xflip_flips_or_not_exactly():
    x = image(n=16)
    y = only("xflip")(x, gen())
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(16)]
    same = [torch.equal(y[i], x[i]) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same))
    assert any(flipped) and any(same)


def test_rotate90_gives_exact_quarter_turns():
    x = image(n=16)
    y = only("rotate90")(x, gen())
    ks = []
    for i in range(16):
        match = [k for k in range(4) if torch.allclose(y[i], torch.rot90(x[i], k, dims=(1, 2)), atol=1e-5)]
        assert len(match) == 1
        ks.append(match[0])
    assert len(set(ks)) >= 3


def test_xint_moves_a_pixel_by_whole_pixels_without_blur():
    x = torch.zeros([16, 3, 32, 32])
    x[:, :, 16, 16] = 1
    y = only("xint")(x, gen())
    shifts = []
    for i in range(16):
        assert y[i].max() == 1 and torch.equal(y[i].sum((1, 2)), torch.ones(3))  # one pixel, not spread out
        r, c = (y[i, 0] == 1).nonzero()[0].tolist()
        assert abs(r - 16) <= 4 and abs(c - 16) <= 4  # within 12.5% of 32
        assert torch.equal(y[i], torch.roll(x[i], (r - 16, c - 16), dims=(1, 2)))
        shifts.append((r - 16, c - 16))
    assert len(set(shifts)) > 4


# ---- ADA: general geometric ----


def test_scale_resizes_a_centred_square_about_the_centre():
    x = centred_square()
    y = only("scale")(x, gen())
    mass, ci, cj, vi, vj = moments(y)
    assert torch.allclose(ci, torch.full_like(ci, 15.5), atol=1e-3) and torch.allclose(cj, ci, atol=1e-3)
    assert torch.allclose(vi, vj, rtol=1e-3)  # isotropic: still a square
    side = (12 * vi).sqrt()  # a uniform square of side s has variance s^2 / 12 along each axis
    assert (side > 8.8).any() and (side < 7.2).any()  # grows in some samples, shrinks in others
    assert torch.allclose(mass / 64, (side / 8) ** 2, rtol=0.15)  # area follows the side


def test_rotate_keeps_a_centred_square_in_place_and_turns_it():
    x = centred_square()
    y = only("rotate")(x, gen())
    mass, ci, cj, vi, vj = moments(y)
    assert torch.allclose(ci, torch.full_like(ci, 15.5), atol=1e-3) and torch.allclose(cj, ci, atol=1e-3)
    assert torch.allclose(mass, torch.full_like(mass, 64.0), rtol=0.1)  # rotations keep the area
    assert (y - x).abs().amax((1, 2, 3)).gt(0.5).sum() >= 4  # turned in several samples


def test_aniso_stretches_one_axis_and_squeezes_the_other():
    x = centred_square()
    y = only("aniso")(x, gen())
    mass, ci, cj, vi, vj = moments(y)
    assert torch.allclose(mass, torch.full_like(mass, 64.0), rtol=0.1)  # diag(s, 1/s) keeps the area
    assert ((vj / vi - 1).abs() > 0.2).any()


def test_xfrac_moves_by_fractions_of_a_pixel():
    x = centred_square()
    y = only("xfrac")(x, gen())
    _, ci, cj, _, _ = moments(y)
    shift = torch.cat([ci, cj]) - 15.5
    assert (shift.abs() > 0.5).any()
    assert ((shift - shift.round()).abs() > 0.1).any()  # not whole pixels: interpolated


# ---- ADA: colour ----


def luma(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1, keepdim=True)


def test_brightness_adds_a_constant_per_sample():
    x = image()
    y = only("brightness")(x, gen())
    shift = (y - x).mean((1, 2, 3))
    assert torch.allclose(y - x, shift.view(-1, 1, 1, 1).expand_as(x), atol=1e-5)
    assert torch.allclose(y.std((1, 2, 3)), x.std((1, 2, 3)), atol=1e-5)
    assert (shift.abs() > 0.05).sum() >= 4


def test_contrast_scales_the_spread():
    x = image()
    y = only("contrast")(x, gen())
    ratio = y.std((1, 2, 3)) / x.std((1, 2, 3))
    y0, x0 = y - y.mean((1, 2, 3), keepdim=True), x - x.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(y0, ratio.view(-1, 1, 1, 1) * x0, atol=1e-5)
    assert ((ratio - 1).abs() > 0.1).sum() >= 4


def test_lumaflip_negates_luma_and_keeps_chroma():
    x = image(n=16)
    y = only("lumaflip")(x, gen())
    assert torch.allclose(y - luma(y), x - luma(x), atol=1e-5)
    flipped = torch.isclose(luma(y), -luma(x), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(luma(y), luma(x), atol=1e-5).flatten(1).all(1)
    assert (flipped | kept).all() and flipped.any() and kept.any()


def test_hue_rotates_chroma_around_the_luma_axis():
    x = image()
    y = only("hue")(x, gen())
    assert torch.allclose(luma(y), luma(x), atol=1e-4)
    cx, cy = x - luma(x), y - luma(y)
    assert torch.allclose(cy.norm(dim=1), cx.norm(dim=1), atol=1e-4)  # a rotation keeps the chroma's length
    assert ((cy - cx).abs().amax((1, 2, 3)) > 0.1).sum() >= 4


def test_saturation_scales_chroma_and_keeps_luma():
    x = image()
    y = only("saturation")(x, gen())
    assert torch.allclose(luma(y), luma(x), atol=1e-4)
    cx, cy = x - luma(x), y - luma(y)
    gain = cy.flatten(1).norm(dim=1) / cx.flatten(1).norm(dim=1)
    assert torch.allclose(cy, gain.view(-1, 1, 1, 1) * cx, atol=1e-4)
    assert ((gain - 1).abs() > 0.1).sum() >= 4


def test_grey_images_skip_hue_and_saturation_and_keep_the_rest():
    x = image(c=1)
    for op in ("hue", "saturation"):
        assert torch.equal(only(op)(x, gen()), x)
    y = only("lumaflip")(x, gen())
    flipped = torch.isclose(y, -x, atol=1e-6).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert (flipped | kept).all() and flipped.any() and kept.any()  # the grey value is its own luma
    assert not torch.equal(AugmentPipe(ADA_GROUPS["bgcfnc"], p=1.0)(x, gen()), x)


# ---- ADA: image-space ----


def test_imgfilter_leaves_flat_images_and_changes_textured_ones():
    flat = torch.full([4, 3, 32, 32], 0.3)
    assert torch.allclose(only("imgfilter")(flat, gen()), flat, atol=1e-5)
    x = image()
    y = only("imgfilter")(x, gen())
    assert ((y - x).abs().amax((1, 2, 3)) > 0.1).sum() >= 4


def test_noise_adds_zero_mean_noise_of_varying_strength():
    x = image()
    d = only("noise")(x, gen()) - x
    std = d.std((1, 2, 3))
    assert d.mean((1, 2, 3)).abs().max() < 0.05 + std.max() / 10
    assert std.max() > 0.05 and std.max() / std.min() > 1.5


def test_ada_cutout_zeroes_at_most_a_half_size_square():
    x = torch.rand([16, 3, 32, 32]) + 0.5  # no zeros of its own
    y = only("cutout")(x, gen())
    zero = (y == 0).all(1)  # [N, H, W]
    assert torch.equal(y, x * (~zero).unsqueeze(1))
    for z in zero:
        rows, cols = z.any(1).nonzero()[:, 0], z.any(0).nonzero()[:, 0]
        assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16
        assert z.sum() == len(rows) * len(cols)  # a rectangle: the square, clipped by the borders
    assert any(z.sum() == 256 for z in zero)


# ---- DiffAugment ----


def test_diffaugment_translation_shifts_by_whole_pixels_with_zeros_moved_in():
    x = torch.rand([16, 3, 32, 32]) + 0.5
    y = DiffAugment("translation")(x, gen())
    shifts = []
    for i in range(16):
        found = []
        for dy, dx in itertools.product(range(-4, 5), repeat=2):
            want = torch.zeros_like(x[i])
            want[:, max(dy, 0) : 32 + min(dy, 0), max(dx, 0) : 32 + min(dx, 0)] = x[
                i, :, max(-dy, 0) : 32 + min(-dy, 0), max(-dx, 0) : 32 + min(-dx, 0)
            ]
            if torch.equal(y[i], want):
                found.append((dy, dx))
        assert len(found) == 1
        shifts.append(found[0])
    assert len(set(shifts)) > 4


def test_diffaugment_cutout_zeroes_a_square():
    x = torch.rand([32, 3, 32, 32]) + 0.5
    y = DiffAugment("cutout")(x, gen())
    zero = (y == 0).all(1)
    assert torch.equal(y, x * (~zero).unsqueeze(1))
    for z in zero:
        rows, cols = z.any(1).nonzero()[:, 0], z.any(0).nonzero()[:, 0]
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16  # clipped to at most half
        assert z.sum() == len(rows) * len(cols)
    assert any(z.sum() == 256 for z in zero)


def test_diffaugment_color_changes_mean_and_spread():
    x = image()
    y = DiffAugment("color")(x, gen())
    assert ((y.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs() > 0.05).sum() >= 4
    assert ((y.std((1, 2, 3)) / x.std((1, 2, 3)) - 1).abs() > 0.05).sum() >= 4


# ---- gradients, precision, validation ----


@pytest.mark.parametrize(
    "make", [lambda op=op: only(op) for op in OPS] + [lambda p=p: DiffAugment(p) for p in POLICIES], ids=OPS + POLICIES
)
def test_gradients_reach_the_input(make):
    x = image(n=4).requires_grad_(True)
    w = torch.randn(x.shape, generator=gen(9))
    y = make()(x, gen())
    assert not torch.equal(y, x)  # the op ran
    (y * w).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradients_reach_the_input_through_the_whole_pipeline():
    x = image(n=4, c=1).requires_grad_(True)
    (AugmentPipe(ADA_GROUPS["bgcfnc"], p=1.0)(x, gen()) ** 2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: AugmentPipe(ADA_GROUPS["bgcfnc"], p=0.8), lambda: DiffAugment()])
def test_bfloat16_and_autocast(make):
    pipe, x = make(), image(n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pipe(x, gen())
    assert y.dtype == torch.float32 and torch.equal(y, pipe(x, gen()))
    xb = x.bfloat16()
    yb = pipe(xb, gen())
    assert yb.dtype == torch.bfloat16 and yb.shape == x.shape and torch.isfinite(yb.float()).all()
    assert torch.equal(yb, pipe(xb.float(), gen()).bfloat16())  # float32 inside, one cast at the end


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="translation"):
        DiffAugment("color,blur")
    with pytest.raises(ValueError, match="xflip"):
        AugmentPipe({"xflop": 1.0})
    with pytest.raises(ValueError, match="bgc"):
        parse_ops("bgx")
    with pytest.raises(ValueError, match="xflip"):
        build_pipe("ada", ops_spec="xflip=1,blur=1")
    with pytest.raises(ValueError, match="diffaug"):
        build_pipe("mixup")


def test_build_pipe():
    assert build_pipe("none") is None
    assert build_pipe("diffaug", policy="color,cutout").policy == ("color", "cutout")
    pipe = build_pipe("ada", ops_spec="bgc")
    assert float(pipe.p) == 0 and pipe.ops["hue"] == 1 and pipe.ops["noise"] == 0
    assert build_pipe("ada", ops_spec="bg,noise=0.5").ops == {
        **dict.fromkeys(OPS, 0.0),
        **ADA_GROUPS["bg"],
        "noise": 0.5,
    }
    assert "p" in pipe.state_dict()  # the controller's p is saved with a checkpoint
