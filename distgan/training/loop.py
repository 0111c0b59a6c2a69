"""The training loop as an outline: step, then whatever is due (logs, samples, checkpoints, metrics), until done.

    fit(trainer):
        # Fixed latents, first grids.
        while images seen < train.total_kimg:
            # Where this rank is (watchdog), faults on cue (tests), the step.
            # A stop signal any rank received: agreed at a step boundary (watchdog.StopSignals).
            # Skipped steps: read at log intervals, checkpoints, stops, the end; too many in a row -> roll back.
            # Log (a collective), sync BatchNorm statistics, sample grid, checkpoint (a collective), metrics.
            # A stop: save, then leave with exit code 3.

Every decision that changes what the ranks do next (a rollback, a checkpoint waiting for a good step, a stop) is
taken from values every rank has identically (reduced stats, agreed flags, the device's skip counts after the
gradients were reduced), so all ranks take it at the same step.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from pathlib import Path

import torch

from distgan import faults
from distgan.checkpoint import CheckpointManager
from distgan.distributed.compiled import CLOCK
from distgan.errors import DataError, Diverged, Interrupted
from distgan.tracking import NullTracker


def fit(tr, tracker=None, stop=None, watchdog=None, on_step=None) -> dict[str, float]:
    """Train `tr` (a Trainer) until train.total_kimg; returns the summary.

    stop:     a watchdog.StopSignals: ranks agree on a stop signal at a step boundary, save, raise Interrupted
    watchdog: a watchdog.Watchdog, told where this rank is (a rank that stops beating is named)
    on_step:  called after every step (tests record losses and hashes with it)
    """
    t, g = tr.cfg.train, tr.guard
    tr.tracker = tracker or NullTracker()
    tr.tracker.step_offset = tr.nimg_discarded
    g.alerted = g.skips_total  # (a resumed run's earlier skips were reported by its first part)
    total_nimg = round(t.total_kimg * 1000)
    every = {
        "log": max(1, round(t.log_every_kimg * 1000)),
        "sample": max(1, round(t.sample_every_kimg * 1000)),
        "ckpt": max(1, round(t.ckpt_every_kimg * 1000)),
    }
    ckpts = CheckpointManager(tr.run_dir, t.keep_ckpts, warn=lambda msg: _warn(tr, msg)) if tr.run_dir else None
    tr._beat = watchdog.beat if watchdog is not None else None
    # Inline metrics (eval.every_kimg > 0): built now, so a missing extractor fails before the first step.
    evaluator = _make_evaluator(tr) if tr.cfg.eval.every_kimg > 0 else None
    if evaluator is not None:
        every["eval"] = max(1, round(tr.cfg.eval.every_kimg * 1000))

    # First grids: the reals, and G_ema before any step.
    if tr.run_dir is not None and tr.dist.is_main and tr.cur_nimg == 0:
        tr.snapshots.write_reals(tr.stream)
        tr.snapshots.write_samples(tr.cur_nimg, tr.tracker)

    start_nimg, start_time = tr.cur_nimg, time.time()
    compile0 = tr._compile0 = CLOCK.read()[1]  # (the process may have compiled before this run)
    tr._tick = (tr.cur_nimg, time.time(), compile0)
    last_stats: dict[str, float] = {}
    ckpt_pending = False
    if tr.console is not None:
        tr.console.start_bar(total_nimg, tr.cur_nimg)
    while tr.cur_nimg < total_nimg:
        # Where this rank is, faults on cue (the reliability tests), the step.
        tr._phase_no = 0
        tr._mark("step start")
        faults.kill_if("kill", step=tr.step_idx)
        if faults.fires("usr1", step=tr.step_idx):  # a stop signal at an exact step (gpu-check, tests)
            os.kill(os.getpid(), signal.SIGUSR1)
        if faults.fires("hang", step=tr.step_idx):
            while True:  # a rank stuck for good (a dead file system, a deadlocked loader)
                time.sleep(1)
        prev = tr.cur_nimg
        batch = tr.draw()
        tr._mark("data ready")
        tr.train_step(*batch)
        if tr._compiles_first is None:  # compilations after this one are recompilations (compiled.py)
            tr._compiles_first = CLOCK.read()[0]
        signum = stop.end_step() if stop is not None else 0
        if on_step is not None:
            on_step(tr)
        done = tr.cur_nimg >= total_nimg
        # An interval is due when this step crossed one of its multiples (and everything at the end).
        due = {name: done or prev // n != tr.cur_nimg // n for name, n in every.items()}

        # Skipped steps are counted on the device; the host looks at log intervals, while a checkpoint is due or
        # waiting, at a stop and at the end (no other step waits for the GPU). A run of
        # train.max_consecutive_skips skipped steps seen there rolls back (and what was due is due again when
        # the steps after the checkpoint are trained again).
        if due["log"] or due["ckpt"] or ckpt_pending or signum or done:
            worst = g.read()
            if worst >= t.max_consecutive_skips:
                _rollback(tr, ckpts, f"{worst} steps in a row had non-finite losses or gradients")
                ckpt_pending = False
                continue
        # A checkpoint due during a streak of skipped steps waits for the first good step: a rollback must go
        # back to before the trouble, and the good checkpoints must not be purged by ones made during it.
        ckpt_pending = ckpt_pending or due["ckpt"]
        save_now = ckpts is not None and (signum or (ckpt_pending and (g.skips_in_a_row == 0 or done)))

        # Log, snapshots, checkpoint, metrics.
        if due["log"]:
            last_stats = _log_tick(tr, total_nimg)
        if due["sample"] or due["ckpt"] or save_now or due.get("eval"):
            tr.sync_buffers()
        if tr.run_dir is not None and due["sample"] and tr.dist.is_main:
            tr._mark("writing a sample grid")
            tr.snapshots.write_samples(tr.cur_nimg, tr.tracker)
        saved = None
        if save_now:
            ckpt_pending = False
            tr._mark("saving a checkpoint")
            saved = tr.save_checkpoint(ckpts)
            if saved is None:
                _rollback(tr, ckpts, "the training state has non-finite values (not saved)")
                continue
        if due.get("eval") and not signum:  # a stop is served first: an evaluation can take minutes
            _evaluate(tr, evaluator)
        if tr.console is not None:
            tr.console.advance(tr.cur_nimg, _short(last_stats) if due["log"] else None)
        if signum and not done:  # (a signal at the very last step: the run is complete anyway)
            _stopped(tr, signum, saved, stop)
    if tr.console is not None:
        tr.console.close_bar()

    wall = time.time() - start_time
    compile_s = CLOCK.read()[1] - compile0  # (0 without train.compile)
    return {"kimg": tr.cur_nimg / 1000, "wall_s": wall, "compile_s": compile_s,
            "img_per_sec": (tr.cur_nimg - start_nimg) / max(wall - compile_s, 1e-9), **last_stats}  # fmt: skip


# ---------------------------------------------------------------------- logs


def _log_tick(tr, total_nimg: int) -> dict[str, float]:
    """Reduce the interval's stats over ranks (a collective), check the data's health, write and log them."""
    for name, count in tr.stream.take_stats().items():  # data faults: summed over ranks, not averaged
        tr.stats.report_sum(name, count)
    values = tr.stats.reduce(tr.dist)  # collective: every rank
    _check_data(tr, values)
    now, (compiles, compile_s) = time.time(), CLOCK.read()
    nimg0, t0, compile_s0 = tr._tick
    tr._tick = (tr.cur_nimg, now, compile_s)
    img_s = (tr.cur_nimg - nimg0) / max(now - t0 - (compile_s - compile_s0), 1e-9)  # compiling is not training
    values.update(
        {
            "Progress/step": tr.step_idx,
            "Timing/img_per_sec": img_s,
            "Timing/sec_per_kimg": 1000 / max(img_s, 1e-9),
            "Timing/eta_min": max(total_nimg - tr.cur_nimg, 0) / max(img_s, 1e-9) / 60,
            "Memory/peak_gb": _peak_memory_gb(tr.device),
            "Progress/skipped_steps": tr.guard.skips_total,
            "Progress/rollbacks": tr.guard.rollbacks,
        }
    )
    if tr.cfg.train.compile != "none":  # this run's compilations in this process (rank 0's on the dashboard)
        values["Compile/seconds"] = compile_s - tr._compile0
        values["Compile/recompiles"] = recompiles = compiles - (tr._compiles_first or compiles)
        if recompiles > tr._recompiles_seen:  # a steady run compiles once; say so when it does not
            tr._recompiles_seen = recompiles
            _warn(tr, f"torch.compile recompiled {recompiles} time(s) since the first step (a new input shape, "
                      "dtype or grad mode); TORCH_LOGS=recompiles names the reason")  # fmt: skip
    if tr.dist.is_main:
        kimg = tr.cur_nimg / 1000
        if tr.run_dir is not None:
            _append_jsonl(tr.run_dir / "stats.jsonl", {"kimg": kimg, "nimg": tr.cur_nimg, **values})
        tr.tracker.log(values, kimg)
    # One alert per log interval that had skipped steps, however many: a person needs to know, not a count.
    g = tr.guard
    new_skips, g.alerted = g.skips_total - g.alerted, g.skips_total
    if new_skips:
        tr.tracker.alert(
            "Steps skipped: non-finite values",
            f"{new_skips} step(s) skipped for non-finite losses or gradients up to {tr.cur_nimg / 1000:.3f} "
            f"kimg ({g.skips_total} in this run)",
        )
    return values


def _check_data(tr, values: dict[str, float]) -> None:
    """Stop the run (same decision on every rank) once too many samples were unreadable."""
    for key in ("samples", "bad"):
        tr.data_totals[key] += int(values.get(f"Data/{key}", 0))
    seen, bad = tr.data_totals["samples"], tr.data_totals["bad"]
    if seen:
        values["Data/bad_fraction"] = bad / seen
    limit = tr.cfg.data.max_bad_fraction
    if bad and bad > limit * seen:
        shards = sorted(set().union(*tr.dist.all_gather_object(getattr(tr.stream, "bad_shards", []))))
        more = f" and {len(shards) - 8} more" if len(shards) > 8 else ""
        raise DataError(
            f"{bad} of {seen} samples unreadable ({bad / seen:.1%} > data.max_bad_fraction={limit}): "
            f"{', '.join(shards[:8])}{more}"
        )


# ---------------------------------------------------------------------- trouble: rollbacks, stops


def _rollback(tr, ckpts: CheckpointManager | None, why: str) -> None:
    """Go back to the newest good checkpoint (every rank reaches this at the same step), or give up."""
    g, limit = tr.guard, tr.cfg.train.max_rollbacks
    if g.rollbacks >= limit:
        msg = f"{why} at {tr.cur_nimg / 1000:.3f} kimg, after {g.rollbacks} rollback(s) (train.max_rollbacks={limit})"
        _give_up(tr, msg + "; lower the learning rates or try train.precision=fp32")
    path = ckpts.latest_on_every_rank(tr.dist) if ckpts is not None else None
    if path is None:
        _give_up(tr, f"{why} at {tr.cur_nimg / 1000:.3f} kimg, and there is no checkpoint to roll back to")
    rollbacks, skips, nimg, discarded = g.rollbacks + 1, g.skips_total, tr.cur_nimg, tr.nimg_discarded
    tr.load_checkpoint(path)
    g.rollbacks, g.skips_total = max(g.rollbacks, rollbacks), max(g.skips_total, skips)
    g.reset()
    # The images since the checkpoint are trained again; W&B's step (tracking.py) must keep growing.
    tr.nimg_discarded = discarded + nimg - tr.cur_nimg
    tr.tracker.step_offset = tr.nimg_discarded
    tr.stats.reset()
    tr._tick = (tr.cur_nimg, time.time(), CLOCK.read()[1])
    _warn(tr, f"{why}; rolled back to {path.name} ({g.rollbacks} of train.max_rollbacks={limit})")
    tr.tracker.alert(
        f"Rolled back ({g.rollbacks} of {limit})",
        f"{why} at {nimg / 1000:.3f} kimg; rolled back to {path.name} ({tr.cur_nimg / 1000:.3f} kimg)",
    )


def _give_up(tr, msg: str) -> None:
    tr.tracker.alert("Diverged: training stopped", msg, "ERROR")
    raise Diverged(msg)


def _stopped(tr, signum: int, saved: Path | None, stop) -> None:
    from distgan.watchdog import signal_name

    if tr.console is not None:
        tr.console.close_bar()
    took = f" {time.time() - stop.received_at:.1f} s after the signal" if stop.received_at else ""
    where = f"checkpoint {saved} committed{took}" if saved else "no run dir: nothing saved"
    raise Interrupted(
        f"stopped by {signal_name(signum)} at {tr.cur_nimg / 1000:.3f} kimg; {where}; run the same command to resume"
    )


def _warn(tr, msg: str) -> None:
    if tr.console is not None and tr.dist.is_main:
        tr.console.print(f"warning: {msg}")


# ---------------------------------------------------------------------- metrics


def _make_evaluator(tr):
    """The `eval.*` evaluator (every rank): its extractor loaded, the real features extracted or cached."""
    from distgan.metrics import parse_metrics
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_extractor
    from distgan.metrics.sources import open_source, training_source

    e = tr.cfg.eval
    real = open_source(e.real) if e.real else training_source(tr.cfg)
    with tr.dist.download_first():  # rank 0 fetches the Inception weights first if it must (shared caches)
        extractor = make_extractor(e.features, tr.device, e.inception_weights or None)
    beat = lambda: tr._mark("evaluating metrics")  # noqa: E731 (the watchdog hears from every batch)
    evaluator = Evaluator(parse_metrics(e.metrics), extractor, real, tr.dist, num=e.num, batch=e.batch, seed=e.seed,
                          cache_dir=e.cache or None, beat=beat)  # fmt: skip
    evaluator.real_features()
    return evaluator


def _evaluate(tr, evaluator) -> dict[str, float]:
    """Metrics of G_ema now (a collective); rank 0 logs them as Metrics/* to the tracker and stats.jsonl."""
    from distgan.metrics.sources import GeneratorSource

    tr._mark("evaluating metrics")
    fake = GeneratorSource(tr.G_ema.module, tr.cfg.model.z_dim, tr.cfg.eval.seed, name="G_ema",
                           num_classes=tr.cfg.model.num_classes, class_probs=tr.step.class_probs)  # fmt: skip
    values = {f"Metrics/{k}": v for k, v in evaluator.evaluate(fake).items()}
    if tr.dist.is_main:
        kimg = tr.cur_nimg / 1000
        if tr.run_dir is not None:
            _append_jsonl(tr.run_dir / "stats.jsonl", {"kimg": kimg, "nimg": tr.cur_nimg, **values})
        tr.tracker.log(values, kimg)
    return values


# ---------------------------------------------------------------------- small things


def _short(values: dict[str, float]) -> dict[str, str]:
    """The few numbers the progress bar shows."""
    keys = {"Timing/img_per_sec": "img/s", "Loss/D/main": "D", "Loss/G/main": "G", "Augment/p": "p"}
    return {label: f"{values[k]:.3g}" for k, label in keys.items() if k in values}


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
