"""Hyper-parameters that change with training progress: lr, Adam's beta2, the R1/R2 weights, G_ema's half-life,
the augmentation probability.

Each is a ramp from its usual config value (optim.lr_g, loss.r1_gamma, train.ema_kimg, ...) to `end`, over the
first `kimg` thousand images (0 = the whole run, train.total_kimg), and flat at `end` afterwards:

    constant   v(t) = start                                   (the default: nothing changes)
    linear     v(t) = start + (end - start) * t
    cosine     v(t) = end + (start - end) * (1 + cos(pi * t)) / 2        t = min(kimg seen / ramp kimg, 1)

R3GAN (Huang et al. 2024) anneals lr, beta2, gamma and the EMA half-life this way. A value is a pure function of
the images seen (`cur_nimg`), which a checkpoint records, so a resumed run takes the same values at the same step
as an uninterrupted one: there is no scheduler state to save. This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

RAMPED = {  # schedule.<name>: the config value it starts from
    "lr_g": "optim.lr_g",
    "lr_d": "optim.lr_d",
    "beta2": "optim.beta2",
    "r1_gamma": "loss.r1_gamma",
    "r2_gamma": "loss.r2_gamma",
    "ema_kimg": "train.ema_kimg",
    "augment_p": "augment.p",
}


def _f(default: Any, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Ramp:
    shape: Literal["constant", "linear", "cosine"] = _f("constant", "constant (no ramp), linear or cosine")
    end: float = _f(0.0, "the value at the end of the ramp (linear, cosine)")
    kimg: float = _f(0.0, "the ramp's length in kimg, from the start of training (0 = train.total_kimg)")


def _ramp(doc: str):
    return field(default_factory=Ramp, metadata={"doc": doc})


@dataclass
class ScheduleConfig:
    """Ramps of hyper-parameters over training (distgan/schedule.py); each starts from its usual config value."""

    lr_g: Ramp = _ramp("G's learning rate, from optim.lr_g")
    lr_d: Ramp = _ramp("D's learning rate, from optim.lr_d")
    beta2: Ramp = _ramp("Adam's beta2 of both networks, from optim.beta2")
    r1_gamma: Ramp = _ramp("the R1 weight, from loss.r1_gamma")
    r2_gamma: Ramp = _ramp("the R2 weight, from loss.r2_gamma")
    ema_kimg: Ramp = _ramp("G_ema's half-life, from train.ema_kimg")
    augment_p: Ramp = _ramp("ada's augmentation probability, from augment.p (with augment.ada_target=0)")


def ramp_value(start: float, ramp: Ramp, kimg: float, total_kimg: float) -> float:
    """The ramp's value after `kimg` thousand images (see the module doc)."""
    if ramp.shape == "constant":
        return start
    length = ramp.kimg or total_kimg
    t = min(max(kimg / length, 0.0), 1.0) if length > 0 else 1.0
    if ramp.shape == "linear":
        return start + (ramp.end - start) * t
    return ramp.end + (start - ramp.end) * (1 + math.cos(math.pi * t)) / 2


def values(cfg, cur_nimg: int) -> dict[str, float]:
    """Every ramped hyper-parameter at `cur_nimg` images: {lr_g, lr_d, beta2, r1_gamma, r2_gamma, ema_kimg,
    augment_p}."""
    out = {}
    for name, source in RAMPED.items():
        section, _, key = source.partition(".")
        start = getattr(getattr(cfg, section), key)
        out[name] = ramp_value(start, getattr(cfg.schedule, name), cur_nimg / 1000, cfg.train.total_kimg)
    return out


def problems(cfg) -> list[str]:
    """Ramps that would leave a value's valid range, or have a negative length."""
    out = []
    for name in RAMPED:
        r = getattr(cfg.schedule, name)
        if r.kimg < 0:
            out.append(f"schedule.{name}.kimg={r.kimg} must be >= 0")
        if r.shape == "constant":
            continue
        section, _, key = RAMPED[name].partition(".")
        if name.endswith("gamma") and getattr(getattr(cfg, section), key) <= 0:
            out.append(f"schedule.{name} ramps a penalty that is off ({RAMPED[name]}=0): set {RAMPED[name]} > 0")
        elif name == "beta2" and not 0 <= r.end < 1:
            out.append(f"schedule.beta2.end={r.end} must be in [0, 1)")
        elif name == "augment_p" and not 0 <= r.end <= 1:
            out.append(f"schedule.augment_p.end={r.end} must be in [0, 1]")
        elif name.startswith("lr") and r.end <= 0:
            out.append(f"schedule.{name}.end={r.end} must be > 0")
        elif r.end < 0:
            out.append(f"schedule.{name}.end={r.end} must be >= 0")
    return out


def describe(cfg) -> str | None:
    """One line for the start of a run naming the ramps in use, or None when every value is constant."""
    parts = []
    for name, source in RAMPED.items():
        r = getattr(cfg.schedule, name)
        if r.shape != "constant":
            section, _, key = source.partition(".")
            start = getattr(getattr(cfg, section), key)
            parts.append(f"{name} {start:g} -> {r.end:g} ({r.shape}, {r.kimg or cfg.train.total_kimg:g} kimg)")
    return "schedules: " + "; ".join(parts) if parts else None
