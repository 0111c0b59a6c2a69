"""Checkpoints of the full training state, kept in the run dir.

    run_dir/checkpoints/ckpt-000012800/state.pt   # written by rank 0, loaded by every rank

A checkpoint is written into a hidden temporary folder and renamed into place only when complete, so a
crash during a save never leaves a half checkpoint under a real name; older checkpoints beyond `keep` are
deleted only after the new one is in place. Loading uses `torch.load(weights_only=True)`: tensors and plain
containers only, no pickled code runs.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from distgan.errors import CheckpointError

_NAME = re.compile(r"^ckpt-(\d{9,})$")
STATE_FILE = "state.pt"


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def list(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, state: dict, cur_nimg: int) -> Path:
        """Write `state` as checkpoint `cur_nimg` (call on rank 0 only) and prune old ones."""
        final = self.dir / f"ckpt-{cur_nimg:09d}"
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-save at the same position (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path) -> dict:
        path = Path(path)
        file = path / STATE_FILE if path.is_dir() else path
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {path}") from None
        except Exception as e:  # weights_only refuses pickled code: say so in one line, never fall back
            raise CheckpointError(f"cannot load checkpoint {file}: {' '.join(str(e).split())[:300]}") from None
