"""Cheap statistics from anywhere in the step, reduced across ranks once per log interval.

    stats.report("Loss/D/main", loss)   # a tensor or a float; no host sync, no collective
    values = stats.reduce(dist)          # once per interval: one all_reduce for everything, then reset

Values are accumulated as (sum, count) tensors on the device, so reporting costs a few tensor operations and
never stalls a GPU. The reduced value of a name is its mean over every finite report on every rank: a step
that overflowed under fp16 (and was skipped by its loss scaler, see the `*/skipped` stats) does not turn a
whole interval's mean into inf or nan.
"""

from __future__ import annotations

import torch


class Collector:
    def __init__(self, device: torch.device):
        self.device = device
        self._acc: dict[str, torch.Tensor] = {}  # name -> [sum, count]

    def report(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().to(self.device)
        else:
            value = torch.tensor(float(value), device=self.device)
        finite = torch.isfinite(value)
        entry = torch.stack([torch.where(finite, value, 0.0), finite.float()])
        if name in self._acc:
            self._acc[name] += entry
        else:
            self._acc[name] = entry

    def reduce(self, dist) -> dict[str, float]:
        """Means over all ranks of everything reported since the last call (a collective: call on every rank)."""
        # Ranks may in principle have reported different names (a phase that ran on one only): agree first.
        names = sorted(set().union(*dist.all_gather_object(sorted(self._acc))))
        packed = torch.zeros(len(names), 2, device=self.device)
        for i, name in enumerate(names):
            if name in self._acc:
                packed[i] = self._acc[name]
        dist.all_reduce_sum(packed)
        self._acc.clear()
        return {name: s / c for name, (s, c) in zip(names, packed.cpu().tolist()) if c > 0}
