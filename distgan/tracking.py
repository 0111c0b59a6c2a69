"""Where the reduced stats go: nowhere, the console, or Weights & Biases (plus the console).

Only rank 0 has a real tracker; other ranks get `NullTracker`. wandb is imported inside `WandbTracker`, so a
run that does not ask for it never loads it. W&B runs online when an account is configured (WANDB_API_KEY, or
a `wandb login` entry in ~/.netrc) and offline otherwise; `wandb sync RUN_DIR/wandb/offline-run-*` uploads an
offline run later. The run id is kept in the checkpoint, so a resumed run continues the same W&B run. The API
key itself is never read into the config, the log or a checkpoint.

The W&B dashboard: every key starts with one of GROUPS, and W&B makes one panel section per first name part;
every key, sample grids included, is plotted against Progress/kimg. Each W&B history row is logged at an
explicit step, `nimg + step_offset`: images seen, plus the images a rollback threw away (the trainer keeps that
count, `step_offset`, in its checkpoint). The step only grows, through rollbacks and resumes, so W&B never drops
a row as out of order, and a resumed offline run's file continues the steps where the previous one stopped:
`wandb sync` (0.31) uploads the folders of one run in order of start time and appends each resumed one.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

# The dashboard's panel sections, one per first part of a key ("Loss/D/main" is in Loss). Each network's own
# health (its gradient norm, loss scale, skipped updates) stays in the network's section, D/ or G/: that is where
# you look when one of them misbehaves, and it mirrors the code (one optimizer and one scaler per network).
GROUPS = (
    "Loss/",
    "D/",
    "G/",
    "Schedule/",
    "Augment/",
    "Progress/",
    "Timing/",
    "Memory/",
    "Metrics/",
    "Data/",
    "Samples/",
)
STEP_METRIC = "Progress/kimg"
ALERT_WAIT_S = 600  # W&B sends an alert of the same title at most once per this many seconds (server side)


def ungrouped(keys) -> list[str]:
    """Keys that would land outside every panel section (a naming mistake in distgan)."""
    return sorted(k for k in keys if not k.startswith(GROUPS))


class Tracker:
    run_id: str | None = None
    location: str | None = None  # where a person finds the dashboard or its files
    step_offset: int = 0  # images thrown away by rollbacks, set by the trainer: W&B's step is nimg + step_offset

    def __init__(self):
        self.latest: dict[str, tuple[float, float]] = {}  # key -> (last value logged, its kimg): the end summary

    def log(self, values: dict[str, float], kimg: float) -> None:
        self.latest.update({k: (v, kimg) for k, v in values.items()})
        self.write(values, kimg)

    def write(self, values: dict[str, float], kimg: float) -> None:
        pass

    def log_image(self, key: str, path: Path, kimg: float) -> None:
        pass

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        """Something needs a person's attention (skipped steps, a rollback); the trainer prints it too."""

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
        super().__init__()
        self.console = console

    def write(self, values: dict[str, float], kimg: float) -> None:
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
    """Console lines plus a W&B run whose x-axis is kimg.

    secondary: another writer to a run the training writes (`distgan eval --watch` adding Metrics/ rows while
    the training runs). Online it joins in W&B's shared mode (several processes, one run: not the primary, no
    final state, its own label), where W&B ignores explicit steps and orders rows by the kimg x-axis; it leaves
    the run's config alone. Offline its rows go into an offline-run folder of its own, with the run's id, which
    `wandb sync` appends to the same run. (Shared mode is experimental in wandb 0.31 and was not tried online
    here: no network.)
    """

    def __init__(self, console, cfg, run_dir: Path, run_id: str | None, launch: dict | None = None,
                 secondary: bool = False):  # fmt: skip
        super().__init__(console)
        import wandb

        self._wandb = wandb
        mode = wandb_mode(cfg.log.wandb_mode)
        self._shared = secondary and mode == "online"
        # The resolved config (dist.strategy as it ran) plus what this launch resolved to (world size, device,
        # threads, W&B mode): a resumed run may run on other hardware, so `launch` is updated on each start.
        config = None if secondary else {**cfg.to_dict(), "launch": {**(launch or {}), "wandb_mode": mode}}
        settings = (
            wandb.Settings(x_primary=False, x_update_finish_state=False, x_label="distgan-eval")
            if self._shared
            else None
        )
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            entity=cfg.log.wandb_entity or None,
            name=f"{run_dir.name}",
            id=run_id,
            resume="allow",  # recorded in an offline run's file too: `wandb sync` then appends to the same run
            dir=str(run_dir),
            config=config,
            mode="shared" if self._shared else mode,
            settings=settings,
            allow_val_change=True,
        )
        # kimg is every panel's x-axis: each group by name (the sections a person sees), "*" for anything else.
        self.run.define_metric(STEP_METRIC)
        for group in GROUPS:
            self.run.define_metric(f"{group}*", step_metric=STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)
        self.run_id = self.run.id
        self._warned: set[str] = set()
        offline_dir = Path(self.run.dir).parent
        self.location = (
            self.run.url
            if mode == "online"
            else f"{offline_dir} (offline; upload with `wandb sync {offline_dir.parent}/offline-run-*`)"
        )

    def _step(self, kimg: float) -> int | None:
        return None if self._shared else round(kimg * 1000) + self.step_offset

    def write(self, values: dict[str, float], kimg: float) -> None:
        super().write(values, kimg)
        stray = [k for k in ungrouped(values) if k not in self._warned]
        if stray:  # a naming mistake: say so once, log anyway
            self._warned.update(stray)
            self.console.print(f"warning: W&B keys outside the dashboard's groups {GROUPS}: {', '.join(stray)}")
        self.run.log({**values, STEP_METRIC: kimg}, step=self._step(kimg))

    def log_image(self, key: str, path: Path, kimg: float) -> None:
        # The same step as the stats of the same kimg: one history row holds both.
        self.run.log({key: self._wandb.Image(str(path)), STEP_METRIC: kimg}, step=self._step(kimg))

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        self.run.alert(title=title, text=text, level=level, wait_duration=ALERT_WAIT_S)

    def finish(self) -> None:
        self.run.finish()
        self._wandb.teardown()  # flushes the offline run file completely before the process exits


def make_tracker(
    kind: str,
    console,
    cfg=None,
    run_dir: Path | None = None,
    run_id: str | None = None,
    launch: dict | None = None,
    secondary: bool = False,
) -> Tracker:
    if kind == "none":
        return NullTracker()
    if kind == "console":
        return ConsoleTracker(console)
    if kind == "wandb":
        return WandbTracker(console, cfg, run_dir, run_id, launch, secondary)
    raise ValueError(f"unknown tracker {kind!r}")
