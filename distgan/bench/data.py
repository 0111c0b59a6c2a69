"""`distgan bench data`: the shard streamer against torchvision's ImageFolder + DataLoader, in the same run.

    distgan bench data                      # builds 64x64 JPEG shapes shards + the same images as loose files
    distgan bench data --shards DIR         # your shards (made by `distgan prepare`); loose copies are extracted

Both loaders read the same images, with the same number of worker processes, the same batch and the same work per
image (decode to uint8 [C, H, W], random horizontal flip, a batch tensor): the streamer from tar shards, ImageFolder
from one file per image. They alternate in rounds and each reports its median img/s. Target: ratio >= 2.

Optionally (`--train-config`), the img/s a training step of that config consumes, measured in the same run, so the
loader's figure can be read against what training needs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 2.0


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="shard streamer img/s vs torchvision ImageFolder + DataLoader")
    d.add_argument("--shards", help="a folder made by `distgan prepare` (default: build 64x64 JPEG shapes)")
    d.add_argument("--num", type=int, default=8000, help="images when building the default set")
    d.add_argument("--workers", type=int, default=2, help="loader worker processes, for both")
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--seconds", type=float, default=4.0, help="timed seconds per round")
    d.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    d.add_argument("--train-config", help="also measure the img/s one training step of this config consumes")
    d.add_argument("--check", action="store_true", help="exit 1 when the target is missed")


def run(args) -> int:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="distgan-bench-data-") as tmp:
        shards = Path(args.shards) if args.shards else build_shapes(Path(tmp) / "shards", args.num)
        from distgan.data.manifest import read_manifest

        manifest = read_manifest(shards)
        loose = extract_loose(manifest, Path(tmp) / "loose")
        res, fmt = manifest["resolution"], manifest["image_format"]
        print(
            f"bench data: {manifest['num_samples']} images {res}x{res} {fmt}, {len(manifest['shards'])} shards, "
            f"batch {args.batch}, {args.workers} worker(s) each, torch {torch.__version__}"
        )
        loaders = {
            "streamer": lambda: streamer(shards, manifest, args.batch, args.workers),
            "ImageFolder": lambda: image_folder(loose, args.batch, args.workers),
        }
        rates = {name: [] for name in loaders}
        iters = {name: make() for name, make in loaders.items()}
        for it in iters.values():
            for _ in range(3):  # start workers, fill prefetch queues
                next(it)
        for _ in range(args.repeats):
            for name, it in iters.items():
                rates[name].append(measure(it, args.seconds))
        del iters
        med = {name: statistics.median(r) for name, r in rates.items()}
        for name, r in rates.items():
            print(f"  {name:<12} {med[name]:8.0f} img/s   (rounds: {', '.join(f'{x:.0f}' for x in r)})")
        ratio = med["streamer"] / med["ImageFolder"]
        ok = ratio >= TARGET_RATIO
        print(f"  ratio streamer/ImageFolder: {ratio:.2f}   target >= {TARGET_RATIO}: {'met' if ok else 'MISSED'}")
        if args.train_config:
            need = training_rate(args.train_config)
            print(f"  training ({args.train_config}) consumes {need:.0f} img/s: the streamer gives "
                  f"{med['streamer'] / need:.1f}x that")  # fmt: skip
    return 1 if args.check and not ok else 0


def build_shapes(out: Path, num: int) -> Path:
    from distgan.data import prepare

    argv = ["shapes", "--out", str(out), "--size", "64", "--num", str(num), "--format", "jpg", "--quality", "90"]
    if prepare.main([*argv, "--shard-samples", "500", "--no-progress"]) != 0:
        raise SystemExit("could not build the benchmark shards")
    return out


def extract_loose(manifest: dict, out: Path) -> Path:
    """The shards' images as one file per image, in one folder per class (ImageFolder's layout)."""
    import tarfile

    from distgan.data.shards import IMAGE_EXTS

    for shard in manifest["shards"]:
        with tarfile.open(Path(manifest["root"]) / shard["name"]) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isreg()}
            for name, member in members.items():
                key, _, ext = name.partition(".")
                if ext not in IMAGE_EXTS or "/" in key or ".." in key:
                    continue
                cls = members.get(f"{key}.cls")
                label = tar.extractfile(cls).read().decode().strip() if cls else "0"
                folder = out / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{key}.{ext}").write_bytes(tar.extractfile(member).read())
    return out


def streamer(shards: Path, manifest: dict, batch: int, workers: int):
    from distgan.config import load_config
    from distgan.data.stream import ShardStream

    cfg = load_config(
        None, ["data.source=shards", f"data.shards={shards}", f"data.workers={workers}", "data.xflip=true"]
    )
    return ShardStream(cfg.data, manifest["resolution"], manifest["channels"], batch, 0, 1, 0)


def image_folder(root: Path, batch: int, workers: int):
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    ds = datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )

    def forever():
        while True:
            for images, _ in loader:
                yield images

    return forever()


def measure(it, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(it))
    return n / (time.perf_counter() - start)


def training_rate(config: str) -> float:
    from distgan import distributed
    from distgan.bench.common import make_steppers, timed
    from distgan.config import load_config

    cfg = load_config(config, ["data.source=shapes", "data.num_images=2000"]).validate()
    dist = distributed.setup(cfg.train.precision, threads=0)
    step = make_steppers(cfg, dist, names=("distgan",))["distgan"]
    for _ in range(3):
        step()
    return cfg.train.batch * cfg.loss.n_critic / timed(step, 20, dist.device)
