"""`distgan bench train`: distgan's training step against a plain PyTorch loop, and 2 ranks against 1.

    distgan bench train --config configs/default.yaml [--steps 40] [--repeats 3] [--no-scaling]
    distgan bench train --compile [default|max-autotune] [--config C] [KEY=VALUE ...]

Part 1, framework cost: distgan's training step (Trainer.train_step with its data draw, phases, EMA and stats)
against a plain eager PyTorch loop of the same networks, batch and optimizer hyper-parameters, written the way
pytorch/examples/dcgan writes it. The two alternate in rounds (framework, plain, framework, plain, ...) and each
reports its median. Both train on the same in-memory images (common.bench_images: a step does not depend
on what the images show, so measuring needs neither the default config's shards nor MNIST). "Step memory" is
the peak during a segment above the memory in use when it started (activations and temporaries; the weights of
both live in the process throughout). Target: ratio >= 1.0.

Part 2, scaling: img/s of 2 processes with 1 thread each against 1 process with 1 thread (gloo on CPU, NCCL on
GPUs), each process keeping the per-process batch of part 1 (weak scaling: 2 processes train on twice the
images per step). Also measured: 2 processes training separately with no process group, the most two
processes get out of this machine (shared caches and memory bandwidth); the gap between that and the DDP
figure is what communication costs. Target on CPU: speed-up >= 1.8x.

--compile (instead of parts 1 and 2): eager against train.compile, for the config given or, without --config,
for every shipped config (configs/*.yaml), one after the other in one process. Each config builds two
Trainers on the same data: eager, and compiled. "compile" is the wall time TorchDynamo reported compiling
during the compiled trainer's warm-up steps (distgan/distributed/compiled.py's clock), kept out of its img/s;
then the two alternate in rounds, each reporting its median img/s, and "recompiles" counts compilations during
the timed rounds (0 expected). Overrides apply to every config (on a CPU: train.batch=8 keeps the GPU configs
to minutes). No target: on a CPU the C++ kernels inductor writes may win or lose against oneDNN's; the GPU
figures are `distgan bench gpu`'s.

These are benchmarks, not tests: they print figures and whether each target was met; `--check` makes a missed
target exit with code 1.
"""

from __future__ import annotations

import statistics
import sys

from distgan.bench.common import bench_stream, child_world, current_memory_mb, make_steppers, peak_memory_mb, timed
from distgan.local_launch import run_local

DEFAULT_CONFIG = "configs/default.yaml"
TARGET_RATIO = 1.0
TARGET_SPEEDUP = 1.8


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="training-step throughput and memory vs a plain PyTorch loop; 2-rank scaling")
    t.add_argument(
        "--config",
        default=None,
        help="the config (default: configs/default.yaml; with --compile: every shipped config)",
    )
    t.add_argument("--steps", type=int, default=30, help="timed steps per segment")
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--repeats", type=int, default=5, help="alternating rounds per measurement")
    t.add_argument("--threads", type=int, default=1, help="torch threads for part 1 (part 2 always uses 1)")
    t.add_argument("--no-scaling", action="store_true", help="skip part 2")
    t.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    t.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "max-autotune"],
        help="eager vs train.compile img/s and compile time (instead of parts 1 and 2)",
    )
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def run(args) -> int:
    from distgan.config import load_config
    from distgan.errors import UserError
    from distgan.train import resolve_classes

    if args.compile:
        return bench_compile(args)
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides).validate()
        if cfg.model.num_classes == "auto":  # the benchmark trains on stand-in images: only the count matters
            try:
                resolve_classes(cfg)
            except UserError as e:
                raise type(e)(f"{e}; or, to measure without the data, set model.num_classes=N") from None
    except UserError as e:
        print(f"distgan: error: {e}", file=sys.stderr)
        return e.exit_code
    ok = bench_framework(cfg, args.steps, args.warmup, args.repeats, args.threads)
    if not args.no_scaling:
        ok &= bench_scaling(cfg, args.steps, args.warmup, args.repeats)
    return 1 if args.check and not ok else 0


# ---------------------------------------------------------------------- part 1


def bench_framework(cfg, steps: int, warmup: int, repeats: int, threads: int) -> bool:
    import torch

    from distgan import distributed

    dist = distributed.setup(cfg.train.precision, threads=threads)
    steppers = make_steppers(cfg, dist)
    batch = cfg.train.batch * cfg.loss.n_critic
    results: dict[str, list[float]] = {name: [] for name in steppers}
    for fn in steppers.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in steppers.items():
            results[name].append(timed(fn, steps, dist.device))
    dist.close()
    # Memory in fresh processes, one per variant: a process's peak cannot be attributed within a shared one.
    memory = {name: run_local(1, _memory_child, cfg, name, threads, warmup + steps)[0] for name in steppers}

    ips = {name: batch / statistics.median(times) for name, times in results.items()}
    ratio = ips["distgan"] / ips["plain"]
    print(
        f"bench train: {cfg.name}, batch {cfg.train.batch}, {cfg.model.resolution}px, "
        f"precision {dist.precision.mode}, {threads} thread(s), device {dist.device}, torch {torch.__version__}"
    )
    for name in steppers:
        spread = ", ".join(f"{batch / t:.0f}" for t in results[name])
        peak, growth = memory[name]
        print(
            f"  {name:<8} {ips[name]:8.1f} img/s   peak memory {peak:7.1f} MB "
            f"({growth:+.1f} MB while training)   (rounds: {spread})"
        )
    met = ratio >= TARGET_RATIO
    print(f"  ratio distgan/plain: {ratio:.3f}   target >= {TARGET_RATIO}: {'met' if met else 'MISSED'}")
    return met


def _memory_child(rank, world, cfg, name: str, threads: int, steps: int) -> tuple[float, float]:
    """(peak, growth) in MB of a fresh process that builds one variant and trains it `steps` steps."""
    from distgan import distributed

    dist = distributed.setup(cfg.train.precision, threads=threads)
    [fn] = make_steppers(cfg, dist, [name]).values()
    base = current_memory_mb(dist.device)
    for _ in range(steps):
        fn()
    peak = peak_memory_mb(dist.device)
    return peak, peak - base


# ---------------------------------------------------------------------- part 2


def bench_scaling(cfg, steps: int, warmup: int, repeats: int) -> bool:
    """img/s of 1 process vs 2 processes training together, and vs 2 that do not talk (the machine's ceiling)."""
    per_rank = cfg.train.batch
    rounds: dict[str, list[float]] = {"1 process": [], "2 processes": [], "2 alone": []}
    for _ in range(repeats):  # alternate, so drifts in machine speed hit all three alike
        rounds["1 process"].append(run_local(1, _scaling_child, cfg, per_rank, steps, warmup, True)[0])
        rounds["2 processes"].append(run_local(2, _scaling_child, cfg, per_rank, steps, warmup, True)[0])
        rounds["2 alone"].append(sum(run_local(2, _scaling_child, cfg, per_rank, steps, warmup, False)))
    ips = {name: statistics.median(v) for name, v in rounds.items()}
    speedup, ceiling = ips["2 processes"] / ips["1 process"], ips["2 alone"] / ips["1 process"]
    print(f"bench scaling: {per_rank} images per process per step, 1 thread per process")
    labels = {
        "1 process": "1 process",
        "2 processes": "2 processes (DDP)",
        "2 alone": "2 processes alone (no process group: the machine's ceiling)",
    }
    for name, label in labels.items():
        print(f"  {ips[name]:8.1f} img/s  {label}   (rounds: " + ", ".join(f"{x:.0f}" for x in rounds[name]) + ")")
    met = speedup >= TARGET_SPEEDUP
    print(
        f"  speed-up 2 vs 1: {speedup:.2f}x   target >= {TARGET_SPEEDUP}x: {'met' if met else 'MISSED'}"
        f"   (ceiling {ceiling:.2f}x: DDP reaches {speedup / ceiling:.0%} of it)"
    )
    return met


def _scaling_child(rank, world, cfg, per_rank, steps, warmup, together: bool) -> float:
    """img/s of this process's group (together) or of this process alone, with `per_rank` images per process."""
    from distgan import distributed
    from distgan.training import Trainer

    rank, world = child_world(rank, world, together)
    cfg.train.batch = per_rank * world
    dist = distributed.setup(cfg.train.precision, threads=1)
    trainer = Trainer(cfg, dist, bench_stream(cfg, rank, world))
    for _ in range(warmup):
        trainer.train_step(*trainer.draw())
    dist.barrier()
    sec = timed(lambda: trainer.train_step(*trainer.draw()), steps, dist.device)
    dist.close()
    return cfg.train.batch * cfg.loss.n_critic / sec


# ---------------------------------------------------------------------- --compile


def bench_compile(args) -> int:
    """Eager vs compiled img/s and compile time, per config (see the module's docstring)."""
    from pathlib import Path

    from distgan.config import load_config
    from distgan.errors import UserError
    from distgan.train import resolve_classes

    if args.config:
        paths = [Path(args.config)]
    else:
        paths = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    cfgs = []
    try:
        for path in paths:
            cfg = load_config(path, args.overrides).validate()
            note = ""
            if cfg.model.num_classes == "auto":  # stand-in images: only the count of classes matters
                try:
                    resolve_classes(cfg)
                except UserError:
                    cfg.model.num_classes, note = 10, " (its data is not here: 10 classes assumed)"
            cfgs.append((path.stem, cfg, note))
    except UserError as e:
        print(f"distgan: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"bench train --compile {args.compile}: {len(cfgs)} config(s), {args.threads} thread(s), "
          f"{args.warmup} warm-up and {args.steps} timed steps x {args.repeats} rounds each")  # fmt: skip
    for name, cfg, note in cfgs:
        r = compile_figures(cfg, args.compile, args.steps, args.warmup, args.repeats, args.threads)
        print(f"  {name:<18} batch {cfg.train.batch:>3}, {r['precision']}: eager {r['eager']:8.1f} img/s   "
              f"compiled {r['compiled']:8.1f} img/s   x{r['compiled'] / r['eager']:.2f}   compile "
              f"{r['compile_s']:6.1f} s ({r['compilations']} compilations), recompiles {r['recompiles']}"
              f"{note}")  # fmt: skip
    return 0


def compile_figures(cfg, mode: str, steps: int, warmup: int, repeats: int, threads: int) -> dict:
    """{"eager", "compiled"} img/s (medians of alternating rounds), the compile time and compilations of the
    compiled trainer's warm-up, and the compilations during the timed rounds ("recompiles")."""
    import copy

    from distgan import distributed
    from distgan.distributed.compiled import CLOCK
    from distgan.training import Trainer

    dist = distributed.setup(cfg.train.precision, threads=threads)
    fast = copy.deepcopy(cfg)
    fast.train.compile = mode
    steppers = {}
    for name, c in (("eager", cfg), ("compiled", fast)):
        trainer = Trainer(c, dist, bench_stream(c))
        steppers[name] = lambda trainer=trainer: trainer.train_step(*trainer.draw())
    steppers["eager"]()
    count0, sec0 = CLOCK.read()
    for _ in range(max(1, warmup)):
        steppers["compiled"]()
    count1, sec1 = CLOCK.read()
    for _ in range(max(0, warmup - 1)):
        steppers["eager"]()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, fn in steppers.items():
            times[name].append(timed(fn, steps, dist.device))
    batch = cfg.train.batch * cfg.loss.n_critic
    out = {name: batch / statistics.median(t) for name, t in times.items()}
    out.update(compile_s=sec1 - sec0, compilations=count1 - count0, recompiles=CLOCK.read()[0] - count1,
               precision=dist.precision.mode)  # fmt: skip
    dist.close()
    return out
