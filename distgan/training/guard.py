"""The non-finite guard: a NaN or Inf skips an update on every rank at once, without the host ever waiting for it.

Policy:
- A non-finite loss on any rank becomes a skipped update on every rank: `poison()` adds `where(isfinite(loss), 0,
  nan) * w[0]` to the loss, so that weight's gradient is NaN on this rank and, after the gradients are reduced,
  on all; the network's step then sees a non-finite gradient norm and skips its update on the device (nets.py).
  No extra collective, no host sync.
- Skipped steps are counted on the device ([in a row, longest run since the host last looked, total]). The host
  reads the counts only at sync points the loop already has (log intervals, a checkpoint due or waiting, a stop,
  the end): `read()`.
- A run of `train.max_consecutive_skips` skipped steps seen at such a point rolls back to the newest verified
  checkpoint (the loop does it), with the next latents salted by the rollback count so a deterministic blow-up
  does not simply repeat; after `train.max_rollbacks` rollbacks the run stops (exit code 4).
- A checkpoint due during a streak waits for the first good step, so a rollback goes back to before the trouble.
The counts of skipped steps and rollbacks are part of the checkpoint (they survive rollbacks and resumes).
"""

from __future__ import annotations

import torch


class NonFiniteGuard:
    version = 1

    def __init__(self, device: torch.device):
        self.device = device
        self.skips_in_a_row = 0  # host copies, as of the last read
        self.skips_total = 0
        self.rollbacks = 0
        self.alerted = 0  # skips_total when the last alert about skipped steps went out
        self._counts = torch.zeros(3, dtype=torch.int64, device=device)  # [in a row, longest run, total]
        self._step = torch.zeros((), device=device)  # > 0 when a phase of the current step skipped

    @staticmethod
    def poison(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`loss`, unchanged when finite; otherwise made into a NaN gradient of `weight` (see the module doc)."""
        poison = torch.where(torch.isfinite(loss.detach()), 0.0, float("nan"))
        return loss + poison * weight[(0,) * weight.dim()]  # its first element, in any memory layout

    def begin_step(self) -> None:
        self._step = torch.zeros((), device=self.device)

    def record(self, skipped: torch.Tensor) -> None:
        """A phase's update was skipped (1) or not (0): a 0-dim device tensor."""
        self._step = torch.maximum(self._step, skipped)

    def end_step(self) -> None:
        c, skipped = self._counts, (self._step > 0).long()
        c[0] = (c[0] + 1) * skipped
        c[1] = torch.maximum(c[1], c[0])
        c[2] += skipped

    def read(self) -> int:
        """Read the counts into the host (a host sync); returns the longest run of skips since the last read."""
        in_a_row, worst, total = self._counts.tolist()
        self._counts[1] = in_a_row  # a run still going on counts towards the next read's longest
        self.skips_in_a_row, self.skips_total = in_a_row, total
        return worst

    def reset(self) -> None:
        """After a checkpoint was loaded: no run of skips yet, the total as restored."""
        self.skips_in_a_row = 0
        self._counts.copy_(torch.tensor([0, 0, self.skips_total]))

    def state_dict(self) -> dict:
        return {"skips_total": self.skips_total, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.skips_total, self.rollbacks = int(state["skips_total"]), int(state["rollbacks"])
        self.reset()
