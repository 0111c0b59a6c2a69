"""Where the reduced stats go: nowhere, the console, or Weights & Biases (plus the console).

Only rank 0 has a real tracker; other ranks get `NullTracker`. wandb is imported inside `WandbTracker`, so a
run that does not ask for it never loads it. W&B runs online when an account is configured (WANDB_API_KEY, or
a `wandb login` entry in ~/.netrc) and offline otherwise; `wandb sync RUN_DIR/wandb/offline-run-*` uploads an
offline run later. The run id is kept in the checkpoint, so a resumed run continues the same W&B run. The API
key itself is never read into the config, the log or a checkpoint.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse


class Tracker:
    run_id: str | None = None
    location: str | None = None  # where a person finds the dashboard or its files

    def log(self, values: dict[str, float], kimg: float) -> None:
        pass

    def log_image(self, key: str, path: Path, kimg: float) -> None:
        pass

    def finish(self) -> None:
        pass


class NullTracker(Tracker):
    pass


def format_stats(values: dict[str, float], kimg: float) -> str:
    """One console line: progress and speed first, then every other stat by name."""
    parts = [f"kimg {kimg:.{1 if kimg >= 10 else 3}f}"]
    if "Timing/img_per_sec" in values:
        parts.append(f"img/s {values['Timing/img_per_sec']:.0f}")
    if "Timing/eta_min" in values:
        m = int(values["Timing/eta_min"] * 60 + 0.5)
        parts.append(f"ETA {m // 3600}h{m // 60 % 60:02d}m" if m >= 3600 else f"ETA {m // 60}m{m % 60:02d}s")
    if "Memory/peak_gb" in values:
        parts.append(f"mem {values['Memory/peak_gb']:.2f}GB")
    skip = ("Timing/", "Memory/", "Progress/", "Data/")
    quiet = ("/skipped",)  # shown only when something was skipped
    parts += [
        f"{name} {v:.4g}"
        for name, v in sorted(values.items())
        if not name.startswith(skip) and not (name.endswith(quiet) and not v)
    ]
    if values.get("Progress/rollbacks"):
        parts.append(f"rollbacks {values['Progress/rollbacks']:.0f}")
    if values.get("Data/bad") or values.get("Data/refused_members"):  # data faults: only when there are some
        parts += [f"{n} {values[n]:.4g}" for n in ("Data/bad", "Data/bad_fraction", "Data/refused_members")]
    return "  ".join(parts)


class ConsoleTracker(Tracker):
    def __init__(self, console):
        self.console = console

    def log(self, values: dict[str, float], kimg: float) -> None:
        self.console.print(format_stats(values, kimg))


def wandb_mode(setting: str) -> str:
    """`auto`: WANDB_MODE if the user set it, else online with credentials and offline without."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_credentials() else "offline"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(ConsoleTracker):
    """Console lines plus a W&B run whose x-axis is kimg."""

    def __init__(self, console, cfg, run_dir: Path, run_id: str | None):
        super().__init__(console)
        import wandb

        self._wandb = wandb
        mode = wandb_mode(cfg.log.wandb_mode)
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            entity=cfg.log.wandb_entity or None,
            name=f"{run_dir.name}",
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=cfg.to_dict(),
            mode=mode,
        )
        self.run.define_metric("Progress/kimg")
        self.run.define_metric("*", step_metric="Progress/kimg")
        self.run_id = self.run.id
        offline_dir = str(Path(self.run.dir).parent)
        self.location = self.run.url if mode == "online" else f"{offline_dir} (offline; upload with `wandb sync`)"

    def log(self, values: dict[str, float], kimg: float) -> None:
        super().log(values, kimg)
        self.run.log({**values, "Progress/kimg": kimg})

    def log_image(self, key: str, path: Path, kimg: float) -> None:
        self.run.log({key: self._wandb.Image(str(path)), "Progress/kimg": kimg})

    def finish(self) -> None:
        self.run.finish()
        self._wandb.teardown()  # flushes the offline run file completely before the process exits


def make_tracker(kind: str, console, cfg=None, run_dir: Path | None = None, run_id: str | None = None) -> Tracker:
    if kind == "none":
        return NullTracker()
    if kind == "console":
        return ConsoleTracker(console)
    if kind == "wandb":
        return WandbTracker(console, cfg, run_dir, run_id)
    raise ValueError(f"unknown tracker {kind!r}")
