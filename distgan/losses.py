"""Adversarial losses and penalties: pure functions of logits and gradients.

D returns logits l = D(x); the probability "x is real" is sigmoid(l). In that form the non-saturating
logistic loss is exact and safe in low precision, because -log(sigmoid(l)) = softplus(-l) and
-log(1 - sigmoid(l)) = softplus(l):

    L_D = -E[log D(x)] - E[log(1 - D(G(z)))] = E[softplus(-l_real)] + E[softplus(l_fake)]
    L_G = -E[log D(G(z))]                      = E[softplus(-l_fake)]

(Some texts print L_D with the signs reversed, which trains D to call fakes real.) Each loss below is a pair
(d_loss(real_logits, fake_logits), g_loss(fake_logits, real_logits)); both return a scalar mean over the batch.

The relativistic pairing loss (RpGAN; Jolicoeur-Martineau 2019, the loss of R3GAN, Huang et al. 2024) compares
each fake with a real, pair by pair, instead of each with a fixed boundary:

    L_D = E[f(D(G(z)) - D(x))]        L_G = E[f(D(x) - D(G(z)))]        f = softplus

so G's loss needs the reals' logits too (`relativistic`: the trainer then gives G's phase the reals, through D
frozen). The other losses' g_loss ignores `real`.

The penalties take input gradients computed by `input_gradients`, which is AMP-correct: under fp16 the
outputs are multiplied by the loss scale before autograd.grad (so small gradients do not flush to zero) and the
gradients divided by it afterwards. An overflow leaves inf in the gradients, the penalty becomes inf, and the
loss scaler skips that step like any other overflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class AdversarialLoss(NamedTuple):
    d_loss: Callable[[Tensor, Tensor], Tensor]  # (real_logits, fake_logits)
    g_loss: Callable[[Tensor, Tensor | None], Tensor]  # (fake_logits, real_logits or None)
    relativistic: bool = False  # g_loss needs the reals' logits


def ns_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def ns_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return F.softplus(-fake).mean()


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def wgan_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def wgan_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    # Hinge GANs train G with the same critic objective as WGAN.
    return -fake.mean()


def lsgan_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * (real - 1.0).square().mean() + 0.5 * fake.square().mean()


def lsgan_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return 0.5 * (fake - 1.0).square().mean()


def rp_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return F.softplus(fake - real).mean()


def rp_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    if real is None:
        raise ValueError("the relativistic loss pairs each fake with a real: G's loss needs the reals' logits")
    return F.softplus(real - fake).mean()


LOSSES: dict[str, AdversarialLoss] = {
    "nonsaturating": AdversarialLoss(ns_d_loss, ns_g_loss),
    "hinge": AdversarialLoss(hinge_d_loss, wgan_g_loss),
    "wgan": AdversarialLoss(wgan_d_loss, wgan_g_loss),
    "lsgan": AdversarialLoss(lsgan_d_loss, lsgan_g_loss),
    "rpgan": AdversarialLoss(rp_d_loss, rp_g_loss, relativistic=True),
}


def input_gradients(outputs: Tensor, inputs: Tensor, loss_scale: float | None = None) -> Tensor:
    """d(sum of outputs)/d(inputs), keeping the graph so a penalty on it can be back-propagated.

    With `loss_scale` (fp16): scale -> autograd.grad -> unscale, in fp32.
    """
    total = outputs.float().sum()
    if loss_scale is not None:
        total = total * loss_scale
    (grads,) = torch.autograd.grad(total, inputs, create_graph=True)
    grads = grads.float()
    return grads / loss_scale if loss_scale is not None else grads


def r1_penalty(real_grads: Tensor) -> Tensor:
    """Per-sample squared gradient norm on real images, ||dD(x)/dx||^2: [N] (Mescheder et al. 2018).

    The R1 loss is gamma/2 * mean of this.
    """
    return real_grads.square().flatten(1).sum(1)


def r2_penalty(fake_grads: Tensor) -> Tensor:
    """The same zero-centred penalty on generated images, ||dD(G(z))/dG(z)||^2: [N] (R2, Mescheder et al. 2018;
    with R1 it makes RpGAN converge locally, Huang et al. 2024). The R2 loss is gamma/2 * mean of this."""
    return fake_grads.square().flatten(1).sum(1)


def gradient_penalty(interp_grads: Tensor) -> Tensor:
    """Per-sample (||dD(x_hat)/dx_hat|| - 1)^2 on interpolates x_hat (Gulrajani et al. 2017): [N]."""
    return (interp_grads.flatten(1).norm(2, dim=1) - 1.0).square()


def path_lengths(latent_grads: Tensor) -> Tensor:
    """Per-sample ||J^T y|| for a random image-space direction y: [N].

    latent_grads [N, z_dim]: the Jacobian in z (families without styles). [N, num_ws, w_dim]: in StyleGAN2's
    styles w, one copy per layer; its length is sqrt(mean over the copies of the squared norm), so the value does
    not grow with the number of layers (Karras et al. 2020, eq. 4 and its implementation note)."""
    if latent_grads.ndim == 3:
        return latent_grads.square().sum(2).mean(1).sqrt()
    return latent_grads.flatten(1).square().sum(1).sqrt()
