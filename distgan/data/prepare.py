"""`distgan prepare`: convert a dataset into WebDataset tar shards plus a manifest.json.

    distgan prepare shapes --num 20000 --out data/shapes
    distgan prepare folder --src ~/photos --out data/photos --size 64 --format jpg --shard-bytes 64MB
    distgan prepare cifar10 --root data --out data/cifar10-shards

Design:
- The sample order is fixed before anything is written: the source listing (sorted files, or dataset indices),
  shuffled by a numpy Generator seeded with --seed. Sample j of that order has key f"{j:08d}" and lives in shard
  j // n. Every shard is a pure function of the plan and its index, so a process pool writes whole shards in any
  order, and tar members carry fixed metadata (mtime 0, uid 0, mode 0444): the bytes do not depend on --workers.
- Restartable: DIR/prepare.json records the plan before the first shard; a shard is written as .tmp, fsynced and
  renamed, so a shard under its final name is complete. Re-running the same command keeps those and writes the
  rest; a different plan is refused. manifest.json is written last: its presence means the folder is complete.
- Unreadable images are skipped, not fatal: each leaves a gap in the keys and an entry in the manifest's
  "skipped"; the sample counts in the manifest are what the shards hold.
- Classes: a source with classes (torchvision, shapes, a folder of class sub-folders) writes KEY.cls, the class
  index as text, next to each image; the manifest lists the names ("classes") and how many samples of each the
  shards hold ("class_counts"), so training knows the class frequencies without reading a shard.
- Resizing is antialiased Lanczos; a crop resamples the centred square box of the source directly (no second
  rounding), a pad scales the long side to R and centres the result on black.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from distgan.data.catalog import TORCHVISION_DATASETS
from distgan.data.manifest import FORMAT, MANIFEST, VERSION, sha256_file, write_json_atomic, write_manifest
from distgan.errors import DataError, UserError

PLAN = "prepare.json"
SOURCES = ("folder", "shapes", *TORCHVISION_DATASETS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
GREY_MODES = ("L", "LA", "1", "I", "F")  # and I;16, I;16B, ...: one channel of intensity
SHAPES_CHUNK = 256  # images rendered at once inside a worker
ESTIMATE_SAMPLES = 32  # samples encoded to turn --shard-bytes into samples per shard
TAR_BLOCK = 512


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distgan prepare",
        description="Convert a dataset into WebDataset tar shards (DIR/shard-000000.tar, ...) and DIR/manifest.json. "
        "Re-running the same command resumes: complete shards are kept, missing ones written.",
    )
    p.add_argument(
        "source", choices=SOURCES, metavar="SOURCE", help=f"one of {', '.join(SOURCES)}: an image folder (--src), "
        "the built-in procedural shapes, or a torchvision dataset (train split)"
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards and manifest.json")
    p.add_argument("--src", metavar="DIR", help="folder: the image folder (flat, or one sub-folder per class)")
    p.add_argument("--root", default="data", help="mnist/fashion_mnist/cifar10: torchvision's root (default: data)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="let torchvision download")
    p.add_argument("--num", type=_positive, metavar="N", help="number of samples (shapes: default 20000; others: all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seeds the shuffle and the shapes (default: 0)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the source order")
    p.add_argument("--size", type=_positive, metavar="R", help="output resolution R x R (default: the source's own)")
    p.add_argument("--fit", choices=("crop", "pad"), default="crop", help="crop: centre square (default); pad: black")
    p.add_argument("--mode", choices=("RGB", "L"), help="colour or greyscale (default: the source's)")
    p.add_argument("--format", choices=tuple(PIL_FORMATS), default="png", help="image encoding (default: png)")
    p.add_argument("--quality", type=_quality, default=95, metavar="Q", help="jpg/webp quality, 1-100 (default: 95)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-samples", type=_positive, metavar="N", help="samples per shard (default: 1000)")
    size.add_argument("--shard-bytes", type=parse_bytes, metavar="SIZE", help="target shard size, e.g. 64MB, 500KB")
    n = min(4, os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=n, metavar="N", help=f"processes (default: {n}; 0/1: none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default: on a terminal)")
    p.add_argument("--overwrite", action="store_true", help="delete the shards and manifest already in DIR first")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args)
    except UserError as e:
        print(f"distgan: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _positive(text: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _quality(text: str) -> int:
    if not re.fullmatch(r"\d+", text) or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 1 to 100")
    return int(text)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30})


def parse_bytes(text: str) -> int:
    """'64MB' -> 64_000_000, '500KB' -> 500_000, '1GiB' -> 2**30 (KB/MB/GB are decimal, KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).lower()] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64MB, 500KB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# ---------------------------------------------------------------------------------------------------------------
# Sources: what to read, in which order, with which labels


@dataclass
class Source:
    """A listing of n samples; `payload(indices)` describes some of them in a form a worker process can read."""

    kind: str
    n: int
    classes: list[str]
    identity: dict  # what, besides the options, defines the content: a listing hash, or the dataset and count
    info: dict  # for the manifest only (src or root)
    size: int | None = None  # every sample's side, when known without reading them
    mode: str | None = None
    src: Path | None = None  # folder: the root; files: relative paths; labels: class per file (-1: none)
    files: list[str] | None = None
    labels: np.ndarray | None = None
    arrays: np.ndarray | None = None  # torchvision: [N, H, W] or [N, H, W, C]
    seed: int = 0

    def payload(self, indices: np.ndarray) -> tuple:
        if self.kind == "folder":
            return ("files", str(self.src), [(self.files[i], int(self.labels[i])) for i in indices])
        if self.kind == "shapes":
            return ("shapes", self.seed, np.asarray(indices, dtype=np.int64))
        return ("arrays", self.kind, np.asarray(indices), self.arrays[indices], self.labels[indices])


def open_folder(src: str | None, num: int | None) -> Source:
    if src is None:
        raise DataError("SOURCE folder needs --src DIR, the image folder")
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"--src {src} is not a directory")
    files = _images_under(root)
    classes: list[str] = []
    if not any("/" not in f for f in files):  # no images in the root itself: sub-folders with images are classes
        classes = sorted({f.split("/", 1)[0] for f in files})
    if not files:
        raise DataError(f"no images in {root} (looked for {' '.join(IMAGE_SUFFIXES)} files, recursively)")
    files = files[:num] if num else files
    labels = np.array([classes.index(f.split("/", 1)[0]) if classes else -1 for f in files], dtype=np.int64)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}\t{(root / f).stat().st_size}\n".encode())
    identity = {"num": len(files), "listing_sha256": h.hexdigest()}
    return Source("folder", len(files), classes, identity, {"src": str(root)}, src=root, files=files, labels=labels)


def _images_under(root: Path) -> list[str]:
    # Relative posix paths of the image files under root, sorted; hidden files and folders are left out.
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append((rel / name).as_posix())
    return sorted(found)


def open_shapes(num: int | None, seed: int, size: int | None) -> Source:
    from distgan.data import shapes

    n = num or 20000
    return Source("shapes", n, list(shapes.CLASSES), {"num": n}, {}, size=size or 32, mode="RGB", seed=seed)


def open_torchvision(kind: str, root: str, download: bool, num: int | None) -> Source:
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[kind])
    try:
        ds = cls(root=root, train=True, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True to download it"
        hint = " (--no-download)" if not download else ""
        raise DataError(f"{kind} not found under {root}{hint}: {' '.join(str(e).split())}") from None
    except OSError as e:  # no network, disk full, permissions
        raise DataError(f"could not download {kind} into {root}: {' '.join(str(e).split())}") from None
    data = np.asarray(ds.data)  # uint8 [N, H, W] (MNIST) or [N, H, W, C] (CIFAR)
    labels = np.asarray(ds.targets, dtype=np.int64)
    if num:
        data, labels = data[:num], labels[:num]
    if len(data) == 0:
        raise DataError(f"{kind} under {root} has no images")
    mode = "L" if data.ndim == 3 else "RGB"
    info = {"root": str(Path(root).resolve())}
    return Source(
        kind, len(data), list(ds.classes), {"num": len(data)}, info, size=data.shape[1], mode=mode, arrays=data,
        labels=labels,
    )  # fmt: skip


def _scan_folder(source: Source, need_size: bool, need_mode: bool) -> tuple[int | None, str | None]:
    """The folder's common side and mode, from the image headers (cheap: nothing is decoded).

    A folder mixing greyscale and colour images, or images of different sizes, needs the choice made explicit.
    """
    from PIL import Image

    sizes: dict[tuple[int, int], str] = {}
    modes: dict[str, str] = {}  # "grey"/"colour" -> an example file
    first_error = None
    for rel in source.files:
        try:
            with Image.open(source.src / rel) as img:
                size, mode = img.size, img.mode
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: rotated by 90 degrees
                    size = size[::-1]
        except Exception as e:  # any decoder failure: the worker will skip and report it
            first_error = first_error or f"{rel}: {_one_line(e)}"
            continue
        sizes.setdefault(size, f"{rel} is {size[0]}x{size[1]}")
        modes.setdefault("grey" if _is_grey(mode) else "colour", f"{rel} is {mode}")
        if len(sizes) > 1 and len(modes) > 1:
            break
    if not modes:
        raise DataError(f"none of the {source.n} images in {source.src} could be read (e.g. {first_error})")
    size = mode = None
    if need_mode:
        if len(modes) > 1:
            raise DataError(
                f"{source.src} mixes greyscale and colour images ({modes['grey']}, {modes['colour']}); "
                "choose one with --mode L or --mode RGB"
            )
        mode = "L" if "grey" in modes else "RGB"
    if need_size:
        if len(sizes) > 1:
            raise DataError(f"the images in {source.src} differ in size ({', '.join(list(sizes.values())[:2])}); "
                            "choose the output side with --size R")  # fmt: skip
        (w, h), example = next(iter(sizes.items()))
        if w != h:
            raise DataError(f"the images in {source.src} are not square ({example}); choose the side with --size R")
        size = w
    return size, mode


def _is_grey(mode: str) -> bool:
    return mode in GREY_MODES or mode.startswith("I;16")


# ---------------------------------------------------------------------------------------------------------------
# One sample: read, convert, fit, encode (runs in the worker processes)


@dataclass(frozen=True)
class Spec:
    """How every sample is written: the output geometry and encoding."""

    size: int
    fit: str
    mode: str
    format: str
    quality: int
    has_classes: bool
    num_classes: int = 0


@dataclass(frozen=True)
class ShardTask:
    index: int
    first_key: int  # key of the shard's first sample: its position in the shuffled order
    count: int  # samples in the order that fall in this shard (the readable ones are written)
    payload: tuple
    spec: Spec
    out: str

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (f"{type(e).__name__}: {text}" if text else type(e).__name__)[:200]


def _samples(payload: tuple, spec: Spec):
    """(name, PIL image or None, label, error or None) for each sample of a payload, in order."""
    from PIL import Image

    kind = payload[0]
    if kind == "files":
        root, items = Path(payload[1]), payload[2]
        for rel, label in items:
            try:
                yield rel, _read_file(root / rel, spec.size), label, None
            except Exception as e:  # any decoder failure (truncated, not an image, bomb): skip and report
                yield rel, None, label, _one_line(e).replace(str(root / rel), rel)
    elif kind == "shapes":
        from distgan.data import shapes

        seed, indices = payload[1], payload[2]
        for start in range(0, len(indices), SHAPES_CHUNK):
            part = indices[start : start + SHAPES_CHUNK]
            images, labels = shapes.render(seed, part, spec.size)  # [n, 3, R, R]
            for i, img, label in zip(part, images, labels):
                yield f"shapes[{i}]", Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))), int(label), None
    else:
        name, indices, arrays, labels = payload[1:]
        for i, arr, label in zip(indices, arrays, labels):
            yield f"{name}[{i}]", Image.fromarray(arr), int(label), None


def _read_file(path: Path, size: int):
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(None, (2 * size, 2 * size))  # decode at a reduced scale, still at least twice the output
        img.load()
        return ImageOps.exif_transpose(img)  # a copy, upright as a viewer shows it


def encode(img, spec: Spec) -> bytes:
    """The image converted to the output mode, fitted to R x R, and encoded."""
    img = _fit(_convert(img, spec.mode), spec.size, spec.fit)
    img.info.clear()  # no ICC profile, EXIF or text chunks carried over: pixels only
    buf = io.BytesIO()
    if spec.format == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, PIL_FORMATS[spec.format], quality=spec.quality)
    return buf.getvalue()


def _convert(img, mode: str):
    from PIL import Image

    if img.mode == mode:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # Wide greyscale: 16-bit integers scale to 8 bits; floats in [0, 1] scale by 255, others clip.
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            a = a * 255 if a.size and a.min() >= 0 and a.max() <= 1 else a
        elif a.size and a.max() > 255:
            a = a / 257
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
        return img if mode == "L" else img.convert(mode)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # a palette with transparency converts cleanly only through RGBA
    return img.convert(mode)


def _fit(img, size: int, fit: str):
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    if fit == "crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new(img.mode, (size, size), 0)
    canvas.paste(img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(n: int) -> int:
    # Bytes a member of n bytes takes in a tar: a header block plus the data padded to whole blocks.
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


def write_shard(task: ShardTask, progress=None) -> dict:
    """Write one whole shard through a .tmp file, fsync and rename; returns its manifest entry (+ skipped, index)."""
    out = Path(task.out)
    final, tmp = out / task.name, out / (task.name + ".tmp")
    samples, skipped, class_counts = 0, [], {}
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (name, img, label, error) in enumerate(_samples(task.payload, task.spec)):
                if progress is not None:
                    progress(1)
                if error is not None:
                    skipped.append({"path": name, "error": error})
                    continue
                key = f"{task.first_key + offset:08d}"
                if task.spec.has_classes:
                    _tar_add(tar, f"{key}.cls", str(label).encode())
                    class_counts[label] = class_counts.get(label, 0) + 1
                _tar_add(tar, f"{key}.{task.spec.format}", encode(img, task.spec))
                samples += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return _entry(task, final, samples, skipped, class_counts)


def _entry(task: ShardTask, path: Path, samples: int, skipped: list, class_counts: dict[int, int]) -> dict:
    return {"index": task.index, "name": task.name, "samples": samples, "bytes": path.stat().st_size,
            "sha256": sha256_file(path), "skipped": skipped, "class_counts": class_counts}  # fmt: skip


def _existing_shard(task: ShardTask) -> dict | None:
    """The manifest entry of a shard an earlier run completed, or None if it cannot be read (then it is rewritten).

    Its skipped samples are the keys missing from it; their reasons are found by reading them again.
    """
    path = Path(task.out) / task.name
    labels: dict[str, int] = {}  # key -> class, from the .cls members (with classes)
    try:
        with tarfile.open(path, mode="r:") as tar:
            names = tar.getnames()
            if task.spec.has_classes:
                for member in tar.getmembers():
                    if member.name.endswith(".cls"):
                        labels[member.name[: -len(".cls")]] = int(tar.extractfile(member).read().decode("ascii"))
    except (OSError, tarfile.TarError, ValueError):  # (ValueError: a .cls that is not a number)
        return None
    image_keys = {n.rsplit(".", 1)[0] for n in names if n.endswith("." + task.spec.format)}
    offsets = [int(k) - task.first_key for k in image_keys if k.isdigit()]
    if len(offsets) != len(image_keys) or not all(0 <= o < task.count for o in offsets):
        return None
    class_counts: dict[int, int] = {}
    if task.spec.has_classes:
        if set(labels) != image_keys or not all(0 <= v < task.spec.num_classes for v in labels.values()):
            return None
        for label in labels.values():
            class_counts[label] = class_counts.get(label, 0) + 1
    skipped = []
    missing = sorted(set(range(task.count)) - set(offsets))
    if missing:
        _, root, items = task.payload  # only files can be unreadable
        for o in missing:
            rel = items[o][0]
            try:
                _read_file(Path(root) / rel, task.spec.size)
                error = "could not be read when this shard was written"
            except Exception as e:  # the same failure as when the shard was written
                error = _one_line(e).replace(str(Path(root) / rel), rel)
            skipped.append({"path": rel, "error": error})
    return _entry(task, path, len(offsets), skipped, class_counts)


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def prepare(args: argparse.Namespace) -> dict:
    """Write the shards and manifest.json that `args` describe; returns the manifest."""
    # Resolve the source and the options that depend on it.
    out = Path(args.out).expanduser().resolve()
    if args.source != "folder" and args.src is not None:
        raise DataError(f"--src is for SOURCE folder; {args.source} does not read a folder")
    if args.source == "folder":
        source = open_folder(args.src, args.num)
        if out == source.src or source.src in out.parents:
            raise DataError(f"--out {out} is inside --src {source.src}; write the shards somewhere else")
        if args.size is None or args.mode is None:
            source.size, source.mode = _scan_folder(source, args.size is None, args.mode is None)
    elif args.source == "shapes":
        source = open_shapes(args.num, args.seed, args.size)
    else:
        source = open_torchvision(args.source, args.root, args.download, args.num)
    spec = Spec(
        size=args.size or source.size,
        fit=args.fit,
        mode=args.mode or source.mode,
        format=args.format,
        quality=args.quality,
        has_classes=bool(source.classes),
        num_classes=len(source.classes),
    )

    # Fix the order and the shard size.
    order = np.random.default_rng(args.seed).permutation(source.n) if args.shuffle else np.arange(source.n)
    per_shard = args.shard_samples or 1000
    if args.shard_bytes is not None:
        per_shard = max(1, args.shard_bytes // _estimate_sample_bytes(source, order, spec))
    plan = {
        "prepare": VERSION,
        "kind": source.kind,
        **source.identity,
        "size": spec.size,
        "fit": spec.fit,
        "mode": spec.mode,
        "format": spec.format,
        "quality": spec.quality if spec.format != "png" else None,
        "shard_samples": per_shard,
        "shard_bytes": args.shard_bytes,
        "shuffle": args.shuffle,
        "seed": args.seed,
    }

    # Claim the output folder: record the plan before the first shard.
    _claim(out, plan, args.overwrite)

    # Write the shards that are missing; keep the complete ones.
    tasks = [
        ShardTask(i, start, len(part), source.payload(part), spec, str(out))
        for i, start in enumerate(range(0, source.n, per_shard))
        for part in [order[start : start + per_shard]]
    ]
    entries, todo = [], []
    for task in tasks:
        entry = _existing_shard(task) if (out / task.name).exists() else None
        if entry is None:
            todo.append(task)
        else:
            entries.append(entry)
    reused = len(entries)
    entries += _run(todo, args.workers, _show_progress(args.progress))
    entries.sort(key=lambda e: e["index"])

    # Report, and write the manifest last.
    skipped = sorted((s for e in entries for s in e.pop("skipped")), key=lambda s: s["path"])
    class_counts = [0] * len(source.classes)
    for e in entries:
        for label, n in e.pop("class_counts").items():
            class_counts[label] += n
    num_samples = sum(e["samples"] for e in entries)
    if num_samples == 0:
        example = f" (e.g. {skipped[0]['path']}: {skipped[0]['error']})" if skipped else ""
        raise DataError(f"none of the {source.n} images of {source.kind} could be read{example}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": num_samples,
        "resolution": spec.size,
        "channels": 1 if spec.mode == "L" else 3,
        "mode": spec.mode,
        "image_format": spec.format,
        "classes": source.classes,
        "class_counts": class_counts,  # samples per class in the shards, aligned with "classes"
        "shards": [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in entries if e["samples"]],
        "skipped": skipped,
        "source": {"kind": source.kind, **source.info, **{k: v for k, v in plan.items() if k not in _PLAN_ONLY}},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "distgan_version": _version(),
    }
    path = write_manifest(out, manifest)
    if skipped:
        listed = ", ".join(f"{s['path']} ({s['error']})" for s in skipped[:5])
        more = f", and {len(skipped) - 5} more (see {path})" if len(skipped) > 5 else ""
        print(f"skipped {len(skipped)} unreadable image{'s' * (len(skipped) > 1)}: {listed}{more}", file=sys.stderr)
    total_mb = sum(e["bytes"] for e in entries) / 1e6
    kept = f" ({reused} kept from an earlier run)" if reused else ""
    print(
        f"prepared {num_samples} samples ({spec.size}x{spec.size} {spec.mode} {spec.format}) in "
        f"{len(manifest['shards'])} shards{kept}, {total_mb:.1f} MB -> {path} (skipped {len(skipped)})"
    )
    return manifest


_PLAN_ONLY = ("prepare", "kind")


def _version() -> str:
    import distgan

    return distgan.__version__


def _estimate_sample_bytes(source: Source, order: np.ndarray, spec: Spec) -> int:
    # Mean tar bytes per sample over the first readable samples of the order (up to ESTIMATE_SAMPLES of them).
    sizes = []
    for start in range(0, source.n, ESTIMATE_SAMPLES):
        for _, img, _, error in _samples(source.payload(order[start : start + ESTIMATE_SAMPLES]), spec):
            if error is None:
                sizes.append(_tar_bytes(len(encode(img, spec))) + (2 * TAR_BLOCK if spec.has_classes else 0))
        if sizes:
            return max(1, sum(sizes) // len(sizes))
    raise DataError(f"none of the {source.n} images of {source.kind} could be read")


def _claim(out: Path, plan: dict, overwrite: bool) -> None:
    """Make `out` ready for this plan: refuse another plan's shards, clear old files on --overwrite, drop .tmp."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out {out}: {_one_line(e)}") from None
    ours = [*out.glob("shard-*.tar"), out / MANIFEST, out / PLAN]
    if overwrite:
        for p in ours:
            p.unlink(missing_ok=True)
    plan_path = out / PLAN
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{plan_path} cannot be read ({_one_line(e)}); use --overwrite") from None
        if old != plan:
            key = next(k for k in [*plan, *old] if old.get(k, "<none>") != plan.get(k, "<none>"))
            raise DataError(
                f"{out} holds shards from a different prepare ({key}: {old.get(key)!r} then, {plan.get(key)!r} now); "
                "use another --out or --overwrite"
            )
    elif any(p.exists() for p in ours):
        raise DataError(f"{out} holds shards or a manifest of an unknown prepare; use another --out or --overwrite")
    else:
        write_json_atomic(plan_path, plan)
    for tmp in out.glob("*.tmp"):  # left by an interrupted run: never complete
        if tmp.name.startswith("shard-") or tmp.name in (MANIFEST + ".tmp", PLAN + ".tmp"):
            tmp.unlink()


def _show_progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _run(tasks: list[ShardTask], workers: int, progress: bool) -> list[dict]:
    """Write the shards of `tasks`, in this process or in a pool of spawned ones; returns their entries."""
    from tqdm import tqdm

    if not tasks:
        return []
    total = sum(t.count for t in tasks)
    with tqdm(
        total=total, unit="img", desc="prepare", file=sys.stderr, disable=not progress, dynamic_ncols=True
    ) as bar:
        if workers <= 1 or len(tasks) == 1:
            return [write_shard(t, bar.update) for t in tasks]
        import multiprocessing

        # spawn: no fork of a process that may hold torch threads; the tasks carry all a worker needs.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            entries = []
            for entry in pool.imap_unordered(write_shard, tasks):
                bar.update(entry["samples"] + len(entry["skipped"]))
                entries.append(entry)
            return entries


if __name__ == "__main__":
    sys.exit(main())
