"""The `distgan` command: `distgan train ...`, `distgan bench train ...`.

Each subcommand is a module with its own `main(argv)`; this file only dispatches, so `distgan --help` is fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("distgan.data.prepare", "convert a dataset into WebDataset tar shards + manifest.json"),
    "train": ("distgan.train", "train a GAN (same arguments as python -m distgan.train)"),
    "generate": ("distgan.generate", "images, grids, latent walks and progress animations from a trained G"),
    "eval": ("distgan.evaluate", "FID/KID/IS/precision-recall of a run, checkpoint or image folder; --watch a run"),
    "bench": ("distgan.bench", "benchmarks: `distgan bench train|data|scale ...`"),
    "gpu-check": ("distgan.bench.gpu_check", "what only a GPU can show, in minutes, one table (--dry: on the CPU)"),
    "config-reference": ("distgan.config_reference", "docs/config-reference.md, from the config dataclasses"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: distgan COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ndistgan: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
