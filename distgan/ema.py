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
    """Holds `module`, a frozen copy of `source` (the live generator) whose parameters trail the live ones."""

    def __init__(self, source: nn.Module):
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self.source = source
        # Parameters keep their objects for the life of a module (`.to()` updates them in place): gathered once.
        # Buffers do not: `.to()` to another device object (even cpu -> cpu:0) replaces them, so they are looked up
        # at every copy (a list of BatchNorm statistics; once held here, G_ema kept copying a stale one).
        self._pairs_p = (list(self.module.parameters()), list(source.parameters()))

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """ema = beta * ema + (1 - beta) * live; buffers (BatchNorm running stats) are copied as they are."""
        ema_p, live_p = self._pairs_p
        torch._foreach_lerp_(ema_p, [p.detach() for p in live_p], 1.0 - beta)  # one fused call for all tensors
        self.copy_buffers()

    @torch.no_grad()
    def copy_buffers(self) -> None:
        for b_ema, b in zip(self.module.buffers(), self.source.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
