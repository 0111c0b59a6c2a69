"""The augmentations' names, groups and parsing, without torch: config validation uses them, and a bad config must
fail in a tenth of a second, before torch is imported (distgan/train.py)."""

from __future__ import annotations

KINDS = ("none", "diffaug", "ada")
POLICIES = ("color", "translation", "cutout")  # DiffAugment's

BLIT_OPS = ("xflip", "rotate90", "xint")  # ADA's, in the paper's order
GEOMETRIC_OPS = ("scale", "rotate", "aniso", "xfrac")
COLOR_OPS = ("brightness", "contrast", "lumaflip", "hue", "saturation")
OTHER_OPS = ("imgfilter", "noise", "cutout")
OPS = BLIT_OPS + GEOMETRIC_OPS + COLOR_OPS + OTHER_OPS

_BG = dict.fromkeys(BLIT_OPS + GEOMETRIC_OPS, 1.0)
ADA_GROUPS = {
    "bg": _BG,
    "bgc": {**_BG, **dict.fromkeys(COLOR_OPS, 1.0)},
    "bgcfnc": {**_BG, **dict.fromkeys(COLOR_OPS + OTHER_OPS, 1.0)},
}


def parse_policy(policy: str) -> tuple[str, ...]:
    """DiffAugment's "color,translation,cutout" as a tuple; "" or "none": ()."""
    names = [name.strip() for name in policy.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown} in {policy!r}: allowed {', '.join(POLICIES)}")
    return tuple(names)


def parse_ops(spec: str) -> dict[str, float]:
    """ "bgc" (a group of ADA_GROUPS), or "name=mult,name=mult" (ops of OPS; groups may be listed among them)."""
    ops: dict[str, float] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            if item not in ADA_GROUPS:
                raise ValueError(f"unknown ADA group {item!r} in {spec!r}: groups {', '.join(ADA_GROUPS)}")
            ops.update(ADA_GROUPS[item])
            continue
        name, _, value = item.partition("=")
        try:
            ops[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"ADA op {name.strip()!r}: multiplier {value!r} is not a number") from None
    check_ops(ops)
    return ops


def check_ops(ops: dict[str, float]) -> None:
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ADA ops {unknown}: valid ops {', '.join(OPS)}")
    negative = [name for name, mult in ops.items() if not float(mult) >= 0]
    if negative:
        raise ValueError(f"ADA op multipliers must be >= 0: {negative}")


def check(kind: str, policy: str, ops: str) -> None:
    """Raise ValueError naming what is wrong with this augmentation's settings."""
    if kind not in KINDS:
        raise ValueError(f"unknown augmentation kind {kind!r}: allowed {', '.join(KINDS)}")
    if kind == "diffaug":
        parse_policy(policy)
    elif kind == "ada":
        parse_ops(ops)


def describe(cfg) -> str | None:
    """One line for the start of a run, or None without augmentation."""
    a = cfg.augment
    if a.kind == "none":
        return None
    if a.kind == "diffaug":
        return f"augment: DiffAugment ({a.policy}) on every image D sees"
    if a.ada_target > 0:
        how = f"adaptive from {a.p:g}, aiming at E[sign(D(real))] = {a.ada_target:g}, 0 -> 1 in {a.ada_kimg:g} kimg"
    elif cfg.schedule.augment_p.shape != "constant":
        how = "ramped by schedule.augment_p"
    else:
        how = "fixed"
    return f"augment: ADA ({a.ops}), p {how}"
