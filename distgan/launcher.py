"""What the launcher told this process, read from the environment (no torch: used during config validation).

`torchrun` and `accelerate launch` export WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` sets nothing and is a
world of one. distgan/distributed.py checks that the process group it starts agrees with this.
"""

from __future__ import annotations

import os

from distgan.errors import LaunchError


def world_size() -> int:
    """Processes the launcher started; 1 for a plain python."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise LaunchError(f"WORLD_SIZE={raw!r} is not an integer") from None


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def name() -> str:
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # `accelerate launch` always exports it
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "python"


def check_precision(precision: str) -> None:
    """Refuse `accelerate launch --mixed_precision X` when the config asks for another precision.

    The config decides precision (distgan runs autocast and loss scaling itself); a launcher that says otherwise
    would be silently ignored. `accelerate launch` always exports its value, "no" unless told.
    """
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", precision):  # "no" is Accelerate's name for fp32: the launcher did not ask
        raise LaunchError(
            f"the launcher asked for mixed precision {launched!r} but train.precision={precision!r}; "
            f"set train.precision={launched} or launch with --mixed_precision {precision}"
        )
