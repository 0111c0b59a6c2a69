"""Random numbers as a function of position: (seed, rank, images seen, purpose) -> a fresh generator.

No random state is carried from step to step, so nothing has to be saved for a resumed run to draw the same
latents as the uninterrupted one, and each rank draws different ones (EDM2's approach).
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes, so that two draws at the same position never share a stream.
STEP, SAMPLES, INIT, FORWARD = 0, 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from any tuple of non-negative ints (hashed: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def block_latents(indices, z_dim: int, *seed: int, block: int, truncation: float | None = None) -> torch.Tensor:
    """Latents of global image indices, [len(indices), z_dim] float32 on the CPU: latent i is row i % block of a
    block drawn from (*seed, i // block), so it depends on i alone, never on how many are drawn, in what batches
    or on which rank (`distgan generate`, evaluation). `block` is part of the definition: changing it changes
    every latent. truncation: BigGAN's trick, entries with |z| > T drawn again from the same block's generator.
    """
    idx = np.asarray(indices, dtype=np.int64)
    z = torch.empty([len(idx), z_dim])
    for b in np.unique(idx // block).tolist():
        gen = generator(*seed, b)
        rows = torch.randn([block, z_dim], generator=gen)
        if truncation is not None:
            outside = rows.abs() > truncation
            while outside.any():
                rows[outside] = torch.randn([int(outside.sum())], generator=gen)
                outside = rows.abs() > truncation
        mine = np.nonzero(idx // block == b)[0]
        z[torch.from_numpy(mine)] = rows[torch.from_numpy(idx[mine] % block)]
    return z


def block_labels(indices, num_classes: int, *seed: int, block: int, probs=None) -> torch.Tensor:
    """Class labels of global image indices, int64 [len(indices)] on the CPU: label i is entry i % block of a block
    drawn from (*seed, "labels", i // block), from `probs` (a class distribution) or uniformly: like
    `block_latents`, it depends on i alone."""
    idx = np.asarray(indices, dtype=np.int64)
    out = torch.empty([len(idx)], dtype=torch.long)
    for b in np.unique(idx // block).tolist():
        gen = generator(*seed, _LABELS, b)
        if probs is None:
            rows = torch.randint(num_classes, [block], generator=gen)
        else:
            weights = torch.as_tensor(probs, dtype=torch.float64)
            rows = torch.multinomial(weights, block, replacement=True, generator=gen)
        mine = np.nonzero(idx // block == b)[0]
        out[torch.from_numpy(mine)] = rows[torch.from_numpy(idx[mine] % block)]
    return out


_LABELS = 0x1AB  # keeps the labels' stream apart from the latents' at the same (seed, block)


def get_state(device: torch.device | None = None) -> dict:
    """This process's global RNG states (torch CPU and CUDA, Python, NumPy), as checkpoint-safe plain values.

    distgan's own draws do not use them (see above), but user code, augmentations and libraries might.
    """
    import random

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "gauss": [has_gauss, cached]},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_state(state: dict, device: torch.device | None = None) -> None:
    import random

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["gauss"][0], n["gauss"][1]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
