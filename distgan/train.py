"""Train a GAN. The one entry point for every launcher, with the same arguments everywhere:

    distgan train --config configs/smoke.yaml train.total_kimg=1               # one process
    python -m distgan.train --config configs/smoke.yaml
    torchrun --nproc_per_node=2 -m distgan.train --config configs/smoke.yaml     # N processes (gloo on CPU)
    accelerate launch --multi_gpu --num_processes 2 distgan/train.py --config configs/smoke.yaml

Order of events: read and validate the config (no torch is imported yet, so a bad config exits with code 2 in
well under two seconds, before any process group exists); start the process group; pick the run dir; find the
checkpoint to resume from; load the data; train; print where everything is.
"""

from __future__ import annotations

import argparse
import faulthandler
import re
import signal
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch distgan/train.py`): Python put distgan/ itself first on sys.path.
    # Put the repository root there instead, so `import distgan` finds this checkout's package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from distgan import faults, launcher, schedule  # noqa: E402
from distgan.augment import describe as describe_augment  # noqa: E402
from distgan.config import (  # noqa: E402
    describe_batch,
    field_index,
    flatten,
    help_text,
    load_config,
    other_family_key,
    to_yaml,
    upgrade,
)
from distgan.errors import CheckpointError, DataError, Stop, UserError  # noqa: E402

# Config keys a resumed run may change; any other difference from the checkpoint's config is refused unless
# --allow-config-change is given (it would silently train a different model or on different data).
RESUMABLE_CHANGES = (
    "name",
    "train.total_kimg",
    "train.log_every_kimg",
    "train.sample_every_kimg",
    "train.ckpt_every_kimg",
    "train.keep_ckpts",
    "train.max_consecutive_skips",
    "train.max_rollbacks",
    "train.hang_timeout_s",
    "train.threads",
    "train.channels_last",  # a memory layout: the same model, the same results up to rounding
    "train.compile",  # the same model, the same results up to rounding
    "dist.strategy",  # DDP <-> ZeRO: the same weights and Adam moments (distributed/zero.py), reduced in another order
    "train.progress",
    "data.root",
    "data.workers",  # a shard stream's position re-splits over any ranks x workers (data/position.py)
    "data.download",
    "data.max_bad_fraction",
    "data.allow_pipe",
    "log.",
    "eval.",
)


def build_parser(prog: str = "distgan train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a GAN on one process or many (torchrun / accelerate launch). "
        "Overrides are dotted config keys, e.g. train.total_kimg=50 optim.lr_g=1e-4.",
    )
    p.add_argument("--config", help="YAML file of config values (default: the built-in defaults)")
    p.add_argument(
        "--run-dir",
        help="folder for this run's outputs (default: runs/NAME, NAME = the config file's name or `name=`); "
        "starting again with the same run dir continues it",
    )
    p.add_argument(
        "--resume",
        default="latest",
        help="latest (default): continue from the run dir's newest verified checkpoint if there is one; "
        "none: start fresh (refused if the run dir has checkpoints); or a checkpoint folder under the run root "
        "(the run dir's parent, e.g. another run's checkpoint)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if model, loss, optimizer or data settings differ from the checkpoint's",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    # A native crash (a segfault or abort in a library's C++ code) prints every thread's Python stack, so the
    # report names where each thread was rather than only "exit -6".
    faulthandler.enable()
    args = build_parser().parse_intermixed_args(argv)  # options may also follow the overrides
    if args.help_config:
        print(help_text())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        world = launcher.world_size()
        # A train.batch that does not divide over this launch: on a resume on another number of processes (an
        # elastic restart, a requeue with fewer tasks) the message says so.
        resumed = None
        if cfg.train.batch >= 1 and cfg.train.batch % world:
            resumed = resumed_world(cfg, args.run_dir, args.resume)
        cfg.validate(world_size=world, resumed_world=resumed)
        resolve_classes(cfg)  # model.num_classes: auto -> the data's count; a mismatch is an error here
        launcher.check_precision(cfg.train.precision)
        # `auto` becomes what the launcher set up (ddp, or zeroN under an Accelerate DeepSpeed config), so the
        # run dir's config and the checkpoint record the strategy that really ran.
        cfg.dist.strategy = launcher.resolve_strategy(cfg.dist.strategy, cfg.train.precision)
    except UserError as e:
        return _fail(e)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        run(cfg, run_dir=args.run_dir, resume=args.resume, allow_config_change=args.allow_config_change)
    except (UserError, Stop) as e:
        return _fail(e)
    return 0


# How long a rank other than 0 waits, after a user error, for rank 0 to report it (see _fail).
REPORT_WAIT_S = 10.0


def _fail(e: UserError | Stop) -> int:
    """One line for a user error or a stop, from rank 0, and the exit code.

    Every rank validates the same way, so rank 0's line is enough (and the only one: a user reads one line). But
    a launcher ends the others as soon as one rank exits (torchrun SIGTERMs them), so a rank other than 0 that met
    the same error a moment sooner would get rank 0 killed before it printed: the user would see an exit code and
    no reason. So after a user error the other ranks wait for rank 0 to exit first (under torchrun its exit ends
    them at once; ranks started one by one wait out REPORT_WAIT_S). A stop (a signal) does not wait: its exit is on
    a clock, and rank 0 keeps its signal handlers until it has printed (watchdog.py).
    """
    user_error = isinstance(e, UserError)
    if launcher.rank() != 0:
        if user_error and launcher.world_size() > 1:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends the wait
            time.sleep(REPORT_WAIT_S)
        return e.exit_code
    if faults.fires("report.slow"):  # the race above, on cue: rank 0 reaches its line last
        time.sleep(3)
    print(f"distgan: {'error: ' if user_error else ''}{e}", file=sys.stderr, flush=True)
    return e.exit_code


def run(cfg, run_dir: str | None = None, resume: str = "latest", allow_config_change: bool = False) -> dict:
    """Start the process group, train, and return the summary (on every rank)."""
    from distgan import distributed

    # Collectives time out after 30 min (or just after the watchdog would have named a hung rank).
    timeout = max(1800.0, cfg.train.hang_timeout_s + 60)
    dist = distributed.setup(cfg.train.precision, cfg.train.threads, cfg.train.deterministic, timeout_s=timeout,
                             strategy=cfg.dist.strategy)  # fmt: skip
    # train.precision=auto is decided by the device (setup): the run dir's config and the checkpoints record what
    # ran, and a resume compares that with what runs now.
    cfg.train.precision = dist.precision.mode
    try:
        return _run(cfg, dist, run_dir, resume, allow_config_change)
    finally:
        dist.close()


def _run(cfg, dist, run_dir_arg, resume, allow_config_change) -> dict:
    from distgan import __version__
    from distgan.checkpoint import CheckpointManager, load_file
    from distgan.console import Console
    from distgan.data import make_stream
    from distgan.data.prefetch import Prefetcher
    from distgan.tracking import NullTracker, make_tracker
    from distgan.training import Trainer
    from distgan.watchdog import StopSignals, Watchdog

    # Stop signals only set a flag from now on; the ranks act on it together at a step boundary (watchdog.py).
    stop = StopSignals(dist)
    run_dir = Path(run_dir_arg or Path("runs") / cfg.name)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    console = Console(dist.is_main, run_dir / "log.txt", cfg.train.progress)
    console.print(f"distgan {__version__}: {dist.describe()}")
    for line in describe_batch(cfg, dist.world_size):
        console.print(line)
    for line in (schedule.describe(cfg), describe_augment(cfg)):
        if line is not None:
            console.print(line)
    console.print(f"run dir: {run_dir}")

    # Find the checkpoint to resume from (rank 0 verifies, everyone loads it), check it belongs to this config.
    ckpts = CheckpointManager(run_dir, keep=cfg.train.keep_ckpts, warn=lambda msg: console.print(f"warning: {msg}"))
    ckpt_path = find_checkpoint(ckpts, resume, dist)
    state = load_file(ckpt_path, "state.pt") if ckpt_path is not None else None
    if state is not None:
        check_resumable(state["config"], cfg, allow_config_change)

    # Open the data: rank 0 first (it may download into a folder the nodes share), then the first process of each
    # other node, then the rest. Missing shards or a resolution mismatch are errors here, before the first step.
    # A rank that fails here must not leave the others waiting in a collective: all agree, all raise.
    error = None
    with dist.download_first():
        try:
            # Batches come pinned and are copied to the device one step ahead, while the current step trains.
            stream = Prefetcher(make_stream(cfg, dist.rank, dist.world_size, device=dist.device), dist.device)
        except UserError as e:
            error = e
    failed = [msg for msg in dist.all_gather_object(str(error) if error else None) if msg]
    if failed:
        raise error if error is not None else DataError(failed[0])
    if hasattr(stream, "describe"):
        console.print(stream.describe())

    # Construct the trainer, restore its state, and connect the tracker (continuing the checkpoint's W&B run).
    probs = resolve_classes(cfg)
    if cfg.model.num_classes:
        console.print(describe_classes(cfg, probs))
    trainer = Trainer(cfg, dist, stream, run_dir, console, class_probs=probs)
    if state is not None:
        trainer.load_checkpoint(ckpt_path, shared=state)
        console.print(f"resumed from {ckpt_path} at {trainer.cur_nimg / 1000:.3f} kimg")
        if getattr(stream, "resumed_from", None):  # a shard stream on another ranks x workers (elastic)
            console.print(stream.resumed_from)
    if dist.is_main:  # only once the checkpoint is known to fit it: the run dir's config describes its checkpoints
        cfg.dump(run_dir / "config.yaml")
    finished = trainer.cur_nimg >= cfg.train.total_kimg * 1000
    tracker = NullTracker()
    if dist.is_main and not finished:
        launch = {"launcher": dist.launcher_name, "world_size": dist.world_size, "device": str(dist.device),
                  "threads_per_rank": dist.threads, "distgan": __version__}  # fmt: skip
        tracker = make_tracker(cfg.log.tracker, console, cfg, run_dir, state and state.get("tracker_run_id"), launch)
    start = time.time()
    watchdog = Watchdog(dist, cfg.train.hang_timeout_s) if not finished else None
    try:
        summary = trainer.fit(tracker, stop=stop, watchdog=watchdog) if not finished else None
    finally:
        if watchdog is not None:
            watchdog.close()
        stop.close()
        tracker.finish()
        stream.close()

    # How it went, where everything is, and what to run next.
    if finished:
        console.print(
            f"already trained to {trainer.cur_nimg / 1000:.3f} kimg >= train.total_kimg; "
            "raise train.total_kimg to train further"
        )
        summary = {"kimg": trainer.cur_nimg / 1000, "wall_s": 0.0, "img_per_sec": 0.0}
    else:
        seconds = time.time() - start
        console.print(f"done: {summary['kimg']:.3f} kimg in {_hms(seconds)} ({summary['img_per_sec']:.0f} img/s)")
    for line in summary_lines(summary, tracker, trainer, run_dir, (ckpts.committed() or [None])[-1]):
        console.print(line)
    return summary


def summary_lines(summary: dict, tracker, trainer, run_dir: Path, latest: Path | None) -> list[str]:
    """The end of a run on the console: last losses and metrics, trouble if any, the outputs, the next commands."""

    def values(items) -> str:
        return "  ".join(f"{k} {v:.4g}" for k, v in sorted(items))

    lines = []
    losses = [(k, v) for k, v in summary.items() if k.startswith("Loss/")]
    if losses:
        lines.append(f"  losses:      {values(losses)}  (last log interval)")
    # Metrics (FID, ...) are computed every few kimg, not every interval: the latest of each, with its kimg.
    metrics = {k: (v, summary["kimg"]) for k, v in summary.items() if k.startswith("Metrics/")}
    metrics.update({k: vk for k, vk in tracker.latest.items() if k.startswith("Metrics/")})
    if metrics:
        shown = [f"{k} {v:.4g} @ {kimg:g} kimg" for k, (v, kimg) in sorted(metrics.items())]
        lines.append("  metrics:     " + "  ".join(shown))
    if trainer.skips_total or trainer.rollbacks:
        lines.append(
            f"  trouble:     {trainer.skips_total} step(s) skipped for non-finite values, "
            f"{trainer.rollbacks} rollback(s) (warnings in {run_dir / 'log.txt'})"
        )
    samples = sorted((run_dir / "samples").glob("fakes-*.png"))
    grids = f" (the last of {len(samples)} in {run_dir / 'samples'})" if len(samples) > 1 else ""
    lines.append(f"  samples:     {samples[-1] if samples else '(none)'}{grids}")
    lines.append(f"  checkpoint:  {latest if latest else '(none)'}")
    lines.append(f"  stats:       {run_dir / 'stats.jsonl'}")
    lines.append(f"  log:         {run_dir / 'log.txt'}")
    if tracker.location:
        lines.append(f"  W&B:         {tracker.location}")
    if latest:
        lines.append("next:")
        lines.append(f"  distgan generate --run {run_dir} --num 64 --out {run_dir / 'generated.png'}")
        if samples:
            lines.append(f"  distgan generate --run {run_dir} --progress --out {run_dir / 'progress.gif'}")
        lines.append(f"  distgan eval --run {run_dir}")
    return lines


def resumed_world(cfg, run_dir: str | None, resume: str) -> int | None:
    """The number of processes that made the checkpoint this start would resume (its manifest lists one rank file
    per process), or None: no checkpoint, or none that can be read. No torch, no verification (only a message
    uses it; `find_checkpoint` decides later)."""
    from distgan.checkpoint import CheckpointManager, read_manifest

    if resume == "none":
        return None
    if resume == "latest":
        committed = CheckpointManager(Path(run_dir or Path("runs") / cfg.name)).committed()
        path = committed[-1] if committed else None
    else:
        path = Path(resume).parent if Path(resume).is_file() else Path(resume)
    try:
        files = read_manifest(path)["files"] if path is not None else {}
    except (OSError, ValueError):
        return None
    ranks = sum(1 for name in files if re.fullmatch(r"rank-\d{5,}\.pt", name))
    return ranks or None


def find_checkpoint(ckpts, resume: str, dist) -> Path | None:
    """The checkpoint to start from: the newest verified one (`latest`), none, or a given folder."""
    from distgan.checkpoint import verify

    if resume == "latest":
        path = ckpts.latest_on_every_rank(dist)
        if path is None and ckpts.committed():  # never start a long run over silently because its checkpoints rot
            raise CheckpointError(
                f"none of the {len(ckpts.committed())} checkpoint(s) in {ckpts.dir} verifies (see the warnings); "
                "move them out of the way to start over, or --resume PATH a good copy"
            )
        return path
    if resume == "none":
        if ckpts.committed():
            raise CheckpointError(
                f"{ckpts.dir.parent} already has checkpoints; use --resume latest or another --run-dir"
            )
        return None
    path = Path(resume)
    path = path.parent if path.is_file() else path
    root = ckpts.dir.parent.resolve().parent
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(
            f"--resume {resume} is outside the run root {root}: checkpoints are loaded only from run dirs "
            "under it (copy the checkpoint folder there if you trust it)"
        )
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"--resume {resume}: not a usable checkpoint ({problem})")
    # Starting from an older point in a run dir with newer checkpoints would mix two histories in one folder
    # (and `--resume latest` after a crash would pick the abandoned one).
    newer = [p for p in ckpts.committed() if p.name > path.name and p.resolve() != path.resolve()]
    if newer:
        raise CheckpointError(
            f"--resume {resume}: the run dir {ckpts.dir.parent} already has newer checkpoints ({newer[-1].name}); "
            "resume it into another --run-dir"
        )
    return path


def check_resumable(saved: dict, cfg, allow_change: bool) -> None:
    """Refuse to resume a checkpoint made with a different model/loss/optimizer/data config."""
    old, new = flatten(upgrade(saved)), flatten(cfg.to_dict())
    # Keys newer than the checkpoint take their defaults; every checkpoint from before strategies existed is DDP.
    defaults = {key: info.default for key, info in field_index().items()}
    old = {**defaults, "dist.strategy": "ddp", **old}
    # Only the family that runs has a section (the defaults list every registered family's): a change of family
    # is the model.family line.
    family = cfg.model.family
    old = {k: v for k, v in old.items() if not other_family_key(k, family)}
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]
    if diffs and not allow_change:
        raise CheckpointError(
            "the checkpoint was made with a different config (" + "; ".join(diffs) + "); "
            "use another --run-dir, or --allow-config-change to resume anyway"
        )


def resolve_classes(cfg) -> list[float] | None:
    """Resolve `model.num_classes` against the data (auto -> the data's class count), before anything starts; return
    the class frequencies that generated labels are drawn from (None: uniform, or an unconditional model).

    A conditional model on data without labels, or a class count that disagrees with the data's, is one error line
    (exit code 2). Frequencies come from the data when it says them (a manifest's class_counts, the built-in
    datasets' labels); otherwise every class is drawn equally often.
    """
    from distgan.data.catalog import data_classes
    from distgan.errors import DataError

    m = cfg.model
    if m.num_classes == 0:
        return None
    info = data_classes(cfg.data)
    where = f"data.source={cfg.data.source}" + (f" ({cfg.data.shards})" if cfg.data.source == "shards" else "")
    if info is None:
        raise DataError(f"model.num_classes={m.num_classes} but {where} has no class labels; train unconditionally "
                        "(model.num_classes=0) or prepare the data from class folders")  # fmt: skip
    if info.num_classes is None:  # maybe labelled, but how many classes only the samples would tell
        if m.num_classes == "auto":
            raise DataError(f"model.num_classes=auto but {where} does not say how many classes it has (no manifest); "
                            "set model.num_classes")  # fmt: skip
        return None
    if m.num_classes == "auto":
        m.num_classes = info.num_classes
    elif m.num_classes != info.num_classes:
        raise DataError(f"model.num_classes={m.num_classes} but {where} has {info.num_classes} classes "
                        f"({', '.join(info.names[:6])}{', ...' if len(info.names) > 6 else ''}); "
                        "set model.num_classes=auto")  # fmt: skip
    return list(info.frequencies) if info.frequencies is not None else None


def describe_classes(cfg, probs) -> str:
    how = "by the data's class frequencies" if probs is not None else "uniformly"
    return f"classes: {cfg.model.num_classes} (labels of generated images drawn {how})"


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


if __name__ == "__main__":
    sys.exit(main())
