"""Differentiable augmentations of D's inputs, for training on little data.

Two families, both `nn.Module`s with forward(x [N, C, H, W] in [-1, 1], gen: torch.Generator) -> same shape and
dtype, drawing every random number from `gen` (never the global RNG: a resumed run draws the same, and each rank
its own):

    DiffAugment(policy)    Zhao et al. 2020: "color,translation,cutout", every op on every sample
    AugmentPipe(ops, p)    Karras et al. 2020 (ADA): each op fires per sample with probability p * multiplier;
                           p is the buffer `pipe.p`, set by the trainer's controller

`build_pipe(kind, policy, ops_spec)` makes one from a config: kind "none" (-> None), "diffaug" (uses `policy`) or
"ada" (uses `ops_spec`: a group of ADA_GROUPS, "bg", "bgc" or "bgcfnc", or "name=mult,..."; starts at p = 0).
"""

from __future__ import annotations

from torch import nn

from distgan.augment.ada import ADA_GROUPS, OPS, AugmentPipe, parse_ops
from distgan.augment.diffaug import POLICIES, DiffAugment

KINDS = ("none", "diffaug", "ada")

__all__ = ["ADA_GROUPS", "KINDS", "OPS", "POLICIES", "AugmentPipe", "DiffAugment", "build_pipe", "parse_ops"]


def build_pipe(kind: str, policy: str = "color,translation,cutout", ops_spec: str = "bgc") -> nn.Module | None:
    """The augmentation module for `kind` (KINDS), or None for "none" (D's inputs are left as they are)."""
    if kind == "none":
        return None
    if kind == "diffaug":
        return DiffAugment(policy)
    if kind == "ada":
        return AugmentPipe(parse_ops(ops_spec), p=0.0)
    raise ValueError(f"unknown augmentation kind {kind!r}: allowed {', '.join(KINDS)}")
