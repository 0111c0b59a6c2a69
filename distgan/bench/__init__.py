"""Benchmarks: each figure is printed next to a reference measured in the same run, on the same machine.

    distgan bench train --config configs/default.yaml [--steps 40] [--repeats 3] [--no-scaling]
    distgan bench data [--shards DIR] [--workers 2]
    distgan bench scale [--config CFG] [--model-only]
    distgan bench quality [--families dcgan,stylegan2,...] [--minutes 3]
    distgan bench gpu [--dry] [--json bench-gpu.json]           (one GPU, at most 8 minutes)
    distgan gpu-check [--dry]                                (its own verb: `make gpu-check`)

The package, one module per command; each has `add_parser(sub)` and `run(args)` (gpu_check: `main(argv)`):

    __init__.py    this map, and the `distgan bench` dispatch; it imports a bench only when asked to run one
    common.py      what several benches share: `timed`, current/peak memory, `bench_images` (in-memory shapes),
                   `make_steppers` / `plain_loop` (a Trainer step and the textbook PyTorch step), and
                   `child_world` for the child processes distgan.local_launch runs; it imports no sibling
    train.py       `bench train`: the framework cost (distgan's step vs the plain loop, img/s and memory) and
                   2 ranks vs 1 vs 2 processes apart (gloo on CPU, NCCL on GPUs)
    data.py        `bench data`: the shard streamer vs torchvision ImageFolder + DataLoader
    scale.py       `bench scale`: the communication model of docs/scaling.md, checked on 1 vs 2 measured
                   ranks, and its predictions for 8-512 GPUs
    quality.py     `bench quality`: every model family vs DCGAN on the built-in shapes at equal CPU time (the
                   shape classifier's Fréchet distance and class match)
    gpu.py         `bench gpu`: the fast path (bf16, channels_last, compile) of four families vs the plain fp32
                   loop, FLOPs utilisation, 1-rank DDP and ZeRO-2, the fp16 scalers (docs/performance.md)
    gpu_check.py   `distgan gpu-check`: what only a GPU can show, one table (docs/gpus.md); `--dry` on the CPU

Imports run one way only: __init__ -> train, data, scale, quality, gpu -> common, and gpu_check -> common. No
bench imports this __init__ (`from distgan.bench import timed` would) or a sibling other than common, and common
imports no sibling: tests/unit/test_bench_package.py checks the graph.

These are benchmarks, not tests: they print figures and whether each target was met; `--check` makes a missed
target exit with code 1.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    from distgan.bench import data, gpu, quality, scale, train

    benches = {"train": train, "data": data, "scale": scale, "quality": quality, "gpu": gpu}
    p = argparse.ArgumentParser(prog="distgan bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for bench in benches.values():
        bench.add_parser(sub)
    args = p.parse_args(argv)
    return benches[args.what].run(args)
