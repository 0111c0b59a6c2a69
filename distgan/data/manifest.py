"""The manifest.json of a folder of WebDataset shards: what `distgan prepare` writes and every reader checks.

The manifest is written last and atomically, so its presence means the folder is complete. It lists each shard
with its sample count, size and sha256, the image geometry (resolution, channels, mode, encoding), the class
names and how many samples each class has ("class_counts", aligned with "classes"); a reader needs nothing else to
plan an epoch across ranks without opening a tar, nor to know the data's classes before training.

"class_counts" came after version 1 was fixed, and stays version 1: it is optional (a manifest without it reads
as "counts unknown"), and older distgan versions ignore keys they do not know, so they still read new manifests.
A version bump would have made them refuse manifests they can read perfectly well. Shard names are plain
file names relative to the manifest's folder, so the folder can be moved or copied as a whole.

This module imports neither torch nor PIL: a launcher can read a manifest before any heavy import.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distgan.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "distgan-shards"
VERSION = 1
IMAGE_EXTS = ("png", "jpg", "webp")
MODES = {"L": 1, "RGB": 3}  # mode -> channels


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON to `path` through a fsynced temporary file and a rename: readers see all or nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write `manifest` as DIR/manifest.json, atomically; returns its path. A "root" key is not stored."""
    path = Path(directory) / MANIFEST
    write_json_atomic(path, {k: v for k, v in manifest.items() if k != "root"})
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and validate a manifest (the file or its folder); returns it with "root": the folder, as a string.

    Any problem is a `DataError` with one line that names the file and the first thing wrong with it.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / MANIFEST
    if not path.is_file():
        raise DataError(f"no {path.name} in {path.parent}; create one with `distgan prepare ... --out {path.parent}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read as JSON: {' '.join(str(e).split())}") from None
    problem = _problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}; re-create it with `distgan prepare`")
    manifest["root"] = str(path.parent.resolve())
    return manifest


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _problem(m) -> str | None:
    # The first thing wrong with a manifest, or None.
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != FORMAT:
        return f"format is {m.get('format')!r}, not {FORMAT!r}"
    if not _is_int(m.get("version")) or m["version"] < 1:
        return f"version {m.get('version')!r} is not a positive integer"
    if m["version"] > VERSION:
        return f"version {m['version']} is newer than this distgan reads ({VERSION}); upgrade distgan"
    for key in ("num_samples", "resolution", "channels"):
        if not _is_int(m.get(key)) or m[key] < 1:
            return f"{key} {m.get(key)!r} is not a positive integer"
    if m.get("mode") not in MODES:
        return f"mode {m.get('mode')!r} is not one of {', '.join(MODES)}"
    if MODES[m["mode"]] != m["channels"]:
        return f"mode {m['mode']} does not have {m['channels']} channels"
    if m.get("image_format") not in IMAGE_EXTS:
        return f"image_format {m.get('image_format')!r} is not one of {', '.join(IMAGE_EXTS)}"
    classes = m.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes is not a list of names"
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        return "shards is not a non-empty list"
    names = set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            return f"shards[{i}] is not an object"
        name = s.get("name")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or ".." in name:
            return f"shards[{i}].name {name!r} is not a plain file name"
        if name in names:
            return f"shard {name} is listed twice"
        names.add(name)
        if not _is_int(s.get("samples")) or s["samples"] < 1:
            return f"shard {name}: samples {s.get('samples')!r} is not a positive integer"
        if not _is_int(s.get("bytes")) or s["bytes"] < 0:
            return f"shard {name}: bytes {s.get('bytes')!r} is not a non-negative integer"
        if not isinstance(s.get("sha256"), str) or len(s["sha256"]) != 64:
            return f"shard {name}: sha256 is not a 64-digit hex string"
    total = sum(s["samples"] for s in shards)
    if total != m["num_samples"]:
        return f"num_samples is {m['num_samples']} but the shards hold {total}"
    counts = m.get("class_counts")
    if counts is not None:  # optional: manifests written before distgan counted classes lack it
        if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
            return "class_counts is not a list of non-negative integers"
        if len(counts) != len(classes):
            return f"class_counts has {len(counts)} entries for {len(classes)} classes"
        if classes and sum(counts) != m["num_samples"]:
            return f"class_counts add up to {sum(counts)}, not num_samples {m['num_samples']}"
    if not isinstance(m.get("skipped", []), list):
        return "skipped is not a list"
    return None
