"""Cheap statistics from anywhere in the step, reduced across ranks once per log interval.

    stats.report("Loss/D/main", loss)   # a tensor or a float; no host sync, no collective
    stats.report_sum("Data/bad", 3)      # a count: reduced to its sum over ranks and reports, not its mean
    values = stats.reduce(dist)          # once per interval: one all_reduce for everything, then reset

A report only keeps a detached reference to the value (a tensor's mean); the arithmetic waits for `reduce`,
so reporting never stalls a GPU and costs next to nothing per step. The reduced value of a name is its mean
over every finite report on every rank: a step that overflowed under fp16 (and was skipped by its loss
scaler, see the `*/skipped` stats) does not turn a whole interval's mean into inf or nan.
"""

from __future__ import annotations

import torch


class Collector:
    def __init__(self, device: torch.device):
        self.device = device
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._sums: set[str] = set()  # names reduced to their sum

    def report(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            value = value if value.ndim == 0 else value.float().mean()
        else:
            value = torch.tensor(float(value))
        self._pending.setdefault(name, []).append(value)

    def report_sum(self, name: str, value) -> None:
        self._sums.add(name)
        self.report(name, value)

    def reset(self) -> None:
        """Forget everything reported since the last reduce (after a rollback)."""
        self._pending.clear()

    def last(self, name: str) -> torch.Tensor | None:
        """The latest value reported under `name` since the last reduce (tests read a step's losses)."""
        values = self._pending.get(name)
        return values[-1] if values else None

    def names(self) -> list[str]:
        """What has been reported since the last reduce."""
        return sorted(self._pending)

    def reduce(self, dist) -> dict[str, float]:
        """Means (or sums) over all ranks of everything reported since the last call (a collective: every rank)."""
        # Ranks may in principle have reported different names (a phase that ran on one only): agree first.
        mine = sorted((name, name in self._sums) for name in self._pending)
        pairs = sorted({tuple(pair) for rank_pairs in dist.all_gather_object(mine) for pair in rank_pairs})
        names = [name for name, _ in pairs]
        sums = {name for name, is_sum in pairs if is_sum}
        packed = torch.zeros(len(names), 2, device=self.device)  # [name, (sum of finite values, their count)]
        for i, name in enumerate(names):
            if name in self._pending:
                values = torch.stack([v.to(self.device, torch.float32) for v in self._pending[name]])
                finite = torch.isfinite(values)
                packed[i, 0] = torch.where(finite, values, 0.0).sum()
                packed[i, 1] = finite.sum()
        dist.all_reduce_sum(packed)
        self._pending.clear()
        return {name: s if name in sums else s / c for name, (s, c) in zip(names, packed.cpu().tolist()) if c > 0}
