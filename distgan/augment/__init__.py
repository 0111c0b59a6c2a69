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

from distgan.augment.names import ADA_GROUPS, KINDS, OPS, POLICIES, check, describe, parse_ops, parse_policy

__all__ = ["ADA_GROUPS", "KINDS", "OPS", "POLICIES", "build_pipe", "check", "describe", "parse_ops", "parse_policy"]


def build_pipe(kind: str, policy: str = "color,translation,cutout", ops_spec: str = "bgc"):
    """The augmentation module for `kind` (KINDS), or None for "none" (D's inputs are left as they are). The
    modules import torch, so this package imports them only here: config validation (names.py) stays torch-free."""
    check(kind, policy, ops_spec)
    if kind == "none":
        return None
    if kind == "diffaug":
        from distgan.augment.diffaug import DiffAugment

        return DiffAugment(policy)
    from distgan.augment.ada import AugmentPipe

    return AugmentPipe(parse_ops(ops_spec), p=0.0)
