"""Real-data features, cached on disk: extracting them is most of an evaluation's cost, and they never change.

    DIR/<key>.safetensors      features float32 [N, F] + metadata (what the key was made of, as JSON)

DIR is `--cache DIR`, `eval.cache`, $DISTGAN_CACHE, or ~/.cache/distgan/stats ($XDG_CACHE_HOME respected).
The key is the sha256 of: the data's identity (for shards the hash of their manifest, which lists every shard's
sha256; for an image folder the hash of its file names, sizes and modification times; for a built-in dataset
its config), the extractor's identity (name + the sha256 of its weights or TorchScript file), the resolution and
channels, the number of images asked for and the subset seed. Any change to one of them is a miss; a hit
reads no image at all.

Files are safetensors (tensors and strings: reading one runs no code, whoever wrote it) and are written to a
temporary name, then renamed, so a reader never sees half a file. An unreadable entry is a miss, rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

VERSION = 1


def cache_dir(given: str | None = None) -> Path:
    if given:
        return Path(given).expanduser()
    if os.environ.get("DISTGAN_CACHE"):
        return Path(os.environ["DISTGAN_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "distgan" / "stats"


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps({"version": VERSION, **fields}, sort_keys=True).encode()).hexdigest()[:32]


def load(folder: Path, key: str) -> torch.Tensor | None:
    """The cached features [N, F], or None (missing or unreadable)."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["features"]
    except Exception:  # noqa: BLE001 (a damaged entry is a miss; the caller recomputes and rewrites it)
        return None


def save(folder: Path, key: str, features: torch.Tensor, fields: dict) -> Path:
    """Store features [N, F] under `key`, atomically; `fields` (what the key hashes) go into the metadata."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    meta = {"format": "distgan-real-features", "fields": json.dumps(fields, sort_keys=True)}
    save_file({"features": features.float().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
