import math

import pytest
import torch

from distgan.losses import (
    LOSSES,
    gradient_penalty,
    input_gradients,
    path_lengths,
    r1_penalty,
    r2_penalty,
)

REAL = torch.tensor([2.0, -1.0, 0.5])
FAKE = torch.tensor([-3.0, 0.0, 1.0])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_nonsaturating_matches_textbook_with_correct_signs():
    # L_D = -E[log D(x)] - E[log(1 - D(G(z)))],  L_G = -E[log D(G(z))],  D = sigmoid(logit)
    d_ref = (
        -sum(math.log(sigmoid(r)) for r in REAL.tolist()) / 3 - sum(math.log(1 - sigmoid(f)) for f in FAKE.tolist()) / 3
    )
    g_ref = -sum(math.log(sigmoid(f)) for f in FAKE.tolist()) / 3
    loss = LOSSES["nonsaturating"]
    assert loss.d_loss(REAL, FAKE).item() == pytest.approx(d_ref, rel=1e-6)
    assert loss.g_loss(FAKE).item() == pytest.approx(g_ref, rel=1e-6)


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge", "wgan", "rpgan"])
def test_d_loss_rewards_telling_real_from_fake(kind):
    # Raising real logits and lowering fake logits must lower D's loss; raising fake logits must lower G's.
    loss = LOSSES[kind]
    assert loss.d_loss(REAL + 1, FAKE - 1) < loss.d_loss(REAL, FAKE)
    assert loss.g_loss(FAKE + 1, REAL) < loss.g_loss(FAKE, REAL)


def test_rpgan_matches_the_pairing_formula_with_plain_logs():
    # RpGAN (Huang et al. 2024, eq. 2): L_D = E[-log sigmoid(D(x) - D(G(z)))], L_G = E[-log sigmoid(D(G(z)) - D(x))],
    # pair i with pair i. Written with plain logs and sigmoids, one pair at a time.
    pairs = list(zip(REAL.tolist(), FAKE.tolist()))
    d_ref = sum(-math.log(sigmoid(r - f)) for r, f in pairs) / 3
    g_ref = sum(-math.log(sigmoid(f - r)) for r, f in pairs) / 3
    loss = LOSSES["rpgan"]
    assert loss.relativistic and not LOSSES["nonsaturating"].relativistic
    assert loss.d_loss(REAL, FAKE).item() == pytest.approx(d_ref, rel=1e-6)
    assert loss.g_loss(FAKE, REAL).item() == pytest.approx(g_ref, rel=1e-6)
    # Only differences count: shifting every logit by the same amount changes nothing (not so for the others).
    assert loss.d_loss(REAL + 5, FAKE + 5).item() == pytest.approx(d_ref, rel=1e-6)
    assert LOSSES["nonsaturating"].d_loss(REAL + 5, FAKE + 5).item() != pytest.approx(
        LOSSES["nonsaturating"].d_loss(REAL, FAKE).item(), rel=1e-3
    )
    # Pairing matters: the same logits paired otherwise give another loss.
    assert loss.d_loss(REAL, FAKE.flip(0)).item() != pytest.approx(d_ref, rel=1e-3)
    with pytest.raises(ValueError, match="reals' logits"):
        loss.g_loss(FAKE)


def test_hinge_values():
    # mean(relu(1 - real)) + mean(relu(1 + fake)); G: -mean(fake)
    d = (0 + 2 + 0.5) / 3 + (0 + 1 + 2) / 3
    assert LOSSES["hinge"].d_loss(REAL, FAKE).item() == pytest.approx(d)
    assert LOSSES["hinge"].g_loss(FAKE).item() == pytest.approx(2 / 3)


def test_wgan_values():
    assert LOSSES["wgan"].d_loss(REAL, FAKE).item() == pytest.approx(FAKE.mean() - REAL.mean())
    assert LOSSES["wgan"].g_loss(FAKE).item() == pytest.approx(-FAKE.mean().item())


def test_lsgan_optimum_is_at_targets():
    # Least squares pulls real logits to 1 and fake logits to 0 (D), fake logits to 1 (G).
    loss = LOSSES["lsgan"]
    assert loss.d_loss(torch.ones(3), torch.zeros(3)) == 0
    assert loss.g_loss(torch.ones(3)) == 0
    assert loss.d_loss(torch.ones(3) * 2, torch.zeros(3)) > 0


def test_lsgan_values():
    d = 0.5 * ((1) ** 2 + (-2) ** 2 + (-0.5) ** 2) / 3 + 0.5 * (9 + 0 + 1) / 3
    g = 0.5 * ((-4) ** 2 + 1 + 0) / 3
    assert LOSSES["lsgan"].d_loss(REAL, FAKE).item() == pytest.approx(d)
    assert LOSSES["lsgan"].g_loss(FAKE).item() == pytest.approx(g)


def test_nonsaturating_is_finite_for_extreme_logits():
    big = torch.tensor([1e4, -1e4])
    loss = LOSSES["nonsaturating"]
    assert torch.isfinite(loss.d_loss(big, -big)) and torch.isfinite(loss.g_loss(-big))
    assert loss.d_loss(big.half(), -big.half()).isfinite()


def _tiny_d():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 1)
    )


def test_r1_matches_plain_autograd_reference():
    d = _tiny_d()
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    logits = d(x).flatten()
    ours = r1_penalty(input_gradients(logits, x))
    # Reference: per-sample gradient norms, one sample at a time.
    ref = []
    for i in range(5):
        xi = x[i : i + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(d(xi).sum(), xi)
        ref.append(g.pow(2).sum())
    torch.testing.assert_close(ours, torch.stack(ref))
    # The penalty is differentiable w.r.t. D's weights (create_graph), so it can be minimised.
    ours.mean().backward()
    assert d[0].weight.grad is not None and d[0].weight.grad.abs().sum() > 0


def test_r2_matches_plain_autograd_reference_on_fakes():
    # R2 is R1's penalty taken at generated images: per-sample ||dD(x)/dx||^2, the gradient flowing to D's weights
    # and, through the fakes, nowhere else (they are detached leaves here, as in the trainer).
    d, g = _tiny_d(), torch.nn.Conv2d(3, 3, 1)
    fake = torch.tanh(g(torch.randn(4, 3, 8, 8))).detach().requires_grad_(True)
    ours = r2_penalty(input_gradients(d(fake).flatten(), fake))
    ref = []
    for i in range(4):
        xi = fake[i : i + 1].detach().requires_grad_(True)
        (gi,) = torch.autograd.grad(d(xi).sum(), xi)
        ref.append(gi.pow(2).sum())
    torch.testing.assert_close(ours, torch.stack(ref))
    ours.mean().backward()
    assert d[0].weight.grad.abs().sum() > 0 and g.weight.grad is None


def test_gradient_penalty_matches_reference():
    d = _tiny_d()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    ours = gradient_penalty(input_gradients(d(x).flatten(), x))
    (g,) = torch.autograd.grad(d(x).sum(), x)
    ref = (g.flatten(1).norm(dim=1) - 1) ** 2
    torch.testing.assert_close(ours, ref)


def test_input_gradients_scaled_equals_unscaled():
    # The AMP recipe: scale -> grad -> unscale gives the same gradients (here in fp32, so exactly up to rounding).
    d = _tiny_d()
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    plain = input_gradients(d(x).flatten(), x)
    scaled = input_gradients(d(x).flatten(), x, loss_scale=2.0**16)
    torch.testing.assert_close(plain, scaled)


def test_input_gradients_scaling_rescues_fp16_underflow():
    # A gradient of 1e-8 computed in fp16 flushes to zero (smallest fp16 subnormal ~6e-8); scaling first keeps it.
    x = torch.ones(2, 4, requires_grad=True)
    small = torch.tensor(1e-4, dtype=torch.half)
    y = x.half() * small * small  # d y / d x = 1e-8, carried through fp16 in the backward
    unscaled = input_gradients(y, x)
    scaled = input_gradients(y, x, loss_scale=2.0**12)
    assert unscaled.abs().sum() == 0
    torch.testing.assert_close(scaled, torch.full_like(x, 1e-8), rtol=2e-2, atol=0)


def test_path_lengths():
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    torch.testing.assert_close(path_lengths(g), torch.tensor([5.0, 1.0]))


def test_overflow_propagates_to_penalty():
    x = torch.ones(2, 3, requires_grad=True)
    y = (x * 60000).half()  # near fp16 max
    grads = input_gradients(y, x, loss_scale=2.0**16)  # 60000 * 65536 overflows to inf in the scaled graph
    assert not torch.isfinite(r1_penalty(grads)).all()


def test_path_length_on_styles_is_the_rms_over_layers_of_the_norms():
    # StyleGAN2's path length on w: ws [N, num_ws, w_dim] are num_ws copies of w; the length is
    # sqrt(mean_layers ||g_layer||^2). Written out per sample; the z form is the plain norm.
    g = torch.randn(3, 5, 7)
    ref = torch.stack([torch.sqrt(sum(g[i, k].pow(2).sum() for k in range(5)) / 5) for i in range(3)])
    torch.testing.assert_close(path_lengths(g), ref)
    torch.testing.assert_close(path_lengths(g[:, 0]), g[:, 0].norm(dim=1))
