"""Random numbers as a function of position: (seed, rank, images seen, purpose) -> a fresh generator.

No random state is carried from step to step, so nothing has to be saved for a resumed run to draw the same
latents as the uninterrupted one, and each rank draws different ones (EDM2's approach).
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes, so that two draws at the same position never share a stream.
STEP, SAMPLES, INIT = 0, 1, 2


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from any tuple of non-negative ints (hashed: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
