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
    # "no" is Accelerate's name for fp32: the launcher did not ask. `auto` follows the launcher.
    if precision != "auto" and launched not in ("no", precision):
        raise LaunchError(
            f"the launcher asked for mixed precision {launched!r} but train.precision={precision!r}; "
            f"set train.precision={launched} or launch with --mixed_precision {precision}"
        )


def launched_strategy() -> str | None:
    """`zeroN` when `accelerate launch` was given a DeepSpeed config of ZeRO stage N, else None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"


def resolve_strategy(strategy: str, precision: str) -> str:
    """The strategy this launch runs: `dist.strategy`, with `auto` taken from the launcher (ddp unless an
    Accelerate DeepSpeed config says zeroN). A launcher that asks for another one, ZeRO-3, or fp16 under ZeRO is a
    one-line error; the config decides, as with precision."""
    from distgan.errors import ConfigError

    launched = launched_strategy()
    if strategy == "auto":
        strategy = launched or "ddp"
    elif launched is not None and launched != strategy:
        raise LaunchError(
            f"the launcher's DeepSpeed config asks for ZeRO stage {launched[4:]} but dist.strategy={strategy}; "
            f"set dist.strategy={launched} (or auto), or launch with a config of your strategy"
        )
    if strategy == "zero3":
        raise ConfigError(
            "dist.strategy=zero3 is not supported: ZeRO-3 partitions the parameters themselves, and the frozen "
            "network's forward, the penalties' double backward, G_ema and the sample grids all use whole "
            "parameters on every rank; use zero2 (gradients and optimizer state partitioned)"
        )
    if strategy.startswith("zero") and precision == "fp16":
        raise ConfigError(
            f"dist.strategy={strategy} runs fp32 or bf16 (train.precision=bf16 needs no loss scaling); "
            "fp16 with loss scalers runs under dist.strategy=ddp"
        )
    return strategy
