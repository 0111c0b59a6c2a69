"""Exponential moving average of the generator's weights (the network that samples are drawn from).

The averaging horizon is a half-life measured in images, not steps, so it means the same at any batch size
(StyleGAN2-ADA's convention): after `ema_kimg` thousand images a weight's old value counts half. Early in
training, when G changes fastest, the half-life is capped at `rampup` times the images seen so far.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch: int, cur_nimg: int, ema_kimg: float, rampup: float) -> float:
    """Per-step decay for a half-life of `ema_kimg` kimg, after `batch` more images at `cur_nimg` seen."""
    ema_nimg = ema_kimg * 1000
    if rampup > 0:
        ema_nimg = min(ema_nimg, cur_nimg * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


class EMA:
    """Holds `module`, a frozen copy of the generator whose parameters trail the live ones."""

    def __init__(self, source: nn.Module):
        self.module = copy.deepcopy(source).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module, beta: float) -> None:
        # ema = beta * ema + (1 - beta) * live; buffers (BatchNorm running stats) are copied as they are.
        for p_ema, p in zip(self.module.parameters(), source.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), source.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
