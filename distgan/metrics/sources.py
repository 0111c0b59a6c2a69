"""Image sets to evaluate; each yields uint8 batches [B, C, R, R] of its images at given global indices.

    ShardSource(spec)          a folder or manifest.json made by `distgan prepare` (local or remote), in manifest
                               order; a rank opens only the shards that hold its share
    FolderSource(dir)          the image files under a folder (png, jpg, jpeg, webp), sorted by path
    ArraySource(load, ...)     images in memory, loaded on first use (the built-in shapes, torchvision datasets)
    GeneratorSource(G, ...)    a generator: image i is G(z_i), z_i from a seeded draw that depends only on i

Each has `name`, `resolution`, `channels`, `count` (None: as many as asked), `identity` (what the data is, for the
real-features cache; None: never cached) and `images(indices, batch)`. `select` picks the global indices (all of
them, or a seeded subset, sorted) and `share` a rank's contiguous slice of them, so the images, and their
order once gathered, are the same on any number of ranks.

Images are uint8 everywhere: a generator's floats in [-1, 1] are quantised as a saved PNG would be, so
evaluating a generator and evaluating a folder of its saved samples agree. Shard members are read as
distgan/data/shards.py reads them for training: in memory, images decoded only, nothing unpickled.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from distgan import rng
from distgan.errors import DataError
from distgan.metrics import MetricsError

FOLDER_EXTS = (".png", ".jpg", ".jpeg", ".webp")
LATENT_BLOCK = 1024  # latents are drawn in seeded blocks of this many: z_i never depends on N or the world size
_EVAL = 0xE7A1  # rng purpose: eval latents never share a stream with training's draws


def select(count: int | None, n: int, seed: int) -> np.ndarray:
    """Global indices of the images to use: 0..n-1 (a generator), all of them, or a seeded subset in sorted order."""
    if count is None:
        return np.arange(n)
    if n >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, 0x5E1EC7]).choice(count, n, replace=False))


def share(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank r's contiguous slice: concatenating the slices in rank order gives `indices` back."""
    n = len(indices)
    return indices[rank * n // world : (rank + 1) * n // world]


def _batches(images: Iterator[np.ndarray], batch: int) -> Iterator[torch.Tensor]:
    buf: list[np.ndarray] = []
    for image in images:
        buf.append(image)
        if len(buf) == batch:
            yield torch.from_numpy(np.stack(buf))
            buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class ShardSource:
    def __init__(self, spec: str, allow_pipe: bool = False):
        from distgan.data import shards as sh

        listing = sh.resolve(spec, allow_pipe)
        if listing.manifest is None:
            raise MetricsError(
                f"{spec}: evaluation reads shards through their manifest.json (made by `distgan prepare`): "
                "name its folder or the manifest"
            )
        m = listing.manifest
        self.name, self.allow_pipe = spec, allow_pipe
        self.urls, self.counts = listing.urls, listing.counts
        self.resolution, self.channels, self.count = m["resolution"], m["channels"], m["num_samples"]
        # The manifest lists every shard's sha256: its hash names the data (wherever the folder is moved).
        self.identity = "shards:" + _digest({k: v for k, v in m.items() if k != "root"})
        self.bad = 0  # samples that did not decode (skipped)

    def images(self, indices: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
        return _batches(self._decoded(np.asarray(indices)), batch)

    def _decoded(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        from distgan.data import shards as sh

        starts = np.cumsum([0, *self.counts])
        for s, url in enumerate(self.urls):
            local = indices[(indices >= starts[s]) & (indices < starts[s + 1])] - starts[s]
            if not len(local):
                continue
            wanted, last = set(local.tolist()), int(local.max())
            try:
                with sh.open_shard(url, self.allow_pipe) as f:
                    for j, record in enumerate(sh.iter_records(f)):
                        if j in wanted:
                            try:
                                yield sh.decode_image(record, self.resolution, self.channels)
                            except Exception:  # noqa: BLE001 (an undecodable sample is skipped and counted)
                                self.bad += 1
                        if j >= last:
                            break
            except (OSError, tarfile.TarError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise DataError(f"cannot read shard {url}: {why}") from None


class FolderSource:
    def __init__(self, folder: str | Path):
        from PIL import Image

        root = Path(folder)
        if not root.is_dir():
            raise MetricsError(f"{folder}: no such folder")
        files = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in FOLDER_EXTS and not any(s.startswith(".") for s in p.relative_to(root).parts)
        )
        if not files:
            raise MetricsError(f"{folder}: no images ({', '.join(FOLDER_EXTS)}) in it")
        self.name, self.files, self.count = str(folder), files, len(files)
        # What the folder holds, without reading every image: names, sizes and modification times.
        listing = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        self.identity = "folder:" + _digest(listing)
        with Image.open(files[0]) as im:
            (w, h), mode = im.size, im.mode
        if w != h:
            raise MetricsError(
                f"{files[0]} is {w}x{h}: evaluation compares square images of one size; "
                "`distgan prepare` crops and resizes a folder into shards"
            )
        self.resolution, self.channels = w, 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3

    def images(self, indices: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
        return _batches(map(self._load, indices), batch)

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.files[int(i)]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from None
        if arr.shape[:2] != (self.resolution, self.resolution):
            raise MetricsError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]} but {self.files[0].name} is "
                f"{self.resolution}x{self.resolution}: all images of a folder must have one size"
            )
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # [C, R, R]


class ArraySource:
    """Images held in memory: `load()` -> uint8 [N, C, R, R], called only when the images are needed."""

    def __init__(self, load: Callable[[], np.ndarray], name: str, identity: str, resolution: int, channels: int):
        self._load, self.name, self.identity = load, name, identity
        self.resolution, self.channels = resolution, channels
        self._images: np.ndarray | None = None

    @property
    def count(self) -> int:
        if self._images is None:
            self._images = self._load()
        return len(self._images)

    def images(self, indices: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
        self.count  # noqa: B018 (loads)
        for start in range(0, len(indices), batch):
            yield torch.from_numpy(self._images[indices[start : start + batch]])


class GeneratorSource:
    """G(z_i, c_i) for i in the indices; z_i is row i % LATENT_BLOCK of a block drawn from (seed, i // LATENT_BLOCK),
    and for a conditional G the class c_i likewise (drawn like the data: `class_probs`, else uniformly), so image i
    is the same whatever the batch, the rank or how many are drawn."""

    identity = None
    count = None

    def __init__(self, G: torch.nn.Module, z_dim: int, seed: int = 0, name: str = "generator", num_classes: int = 0,
                 class_probs=None, classes: list[int] | None = None):  # fmt: skip
        self.G, self.z_dim, self.seed, self.name = G, z_dim, seed, name
        self.num_classes = int(num_classes or 0)
        self.class_probs = None if class_probs is None else torch.as_tensor(class_probs, dtype=torch.float64).cpu()
        self.classes = classes  # a conditional G's classes to draw from (None: all, like the data)
        self.device = next(G.parameters()).device
        with torch.no_grad():
            z = torch.zeros([1, z_dim], device=self.device)
            probe = G(z, torch.zeros([1], dtype=torch.long, device=self.device)) if self.num_classes else G(z)
        self.channels, self.resolution = probe.shape[1], probe.shape[-1]

    def latents(self, indices: np.ndarray) -> torch.Tensor:
        """z for the global indices: [len(indices), z_dim]."""
        return rng.block_latents(indices, self.z_dim, self.seed, _EVAL, block=LATENT_BLOCK)

    def labels(self, indices: np.ndarray) -> torch.Tensor | None:
        """The classes asked for at the global indices: [len(indices)] (None: an unconditional G)."""
        if not self.num_classes:
            return None
        probs = self.class_probs
        if self.classes is not None:
            probs = torch.zeros(self.num_classes, dtype=torch.float64)
            probs[list(self.classes)] = 1.0
        return rng.block_labels(indices, self.num_classes, self.seed, _EVAL, block=LATENT_BLOCK, probs=probs)

    @torch.no_grad()
    def images(self, indices: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(indices), batch):
            part = indices[start : start + batch]
            z = self.latents(part).to(self.device)
            c = self.labels(part)
            x = (self.G(z, c.to(self.device)) if c is not None else self.G(z)).float()  # [B, C, R, R] in [-1, 1]
            yield (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # as torchvision's save_image rounds


# ---------------------------------------------------------------------- choosing a source


def open_source(spec: str, allow_pipe: bool = False):
    """`--real` / `eval.real`: shards (a folder with manifest.json, a manifest, a URL) or a folder of images."""
    path = Path(spec)
    if spec.endswith(".json") or "://" in spec or (path / "manifest.json").is_file():
        return ShardSource(spec, allow_pipe)
    if path.is_dir():
        return FolderSource(path)
    raise MetricsError(f"{spec}: not a shards folder or manifest (distgan prepare) nor a folder of images")


def data_class_probs(cfg, num_classes: int) -> tuple[list[float] | None, str]:
    """How a conditional generator's classes are drawn when none are asked for: like the data of the run's config
    (`cfg`, or None without one), i.e. catalog.data_classes' frequencies, as the training drew its generated labels;
    else uniformly. Returns (class_probs for GeneratorSource / rng.block_labels, or None for uniform; a few words
    saying which, for the output). Reads at most the data's manifest; a manifest that cannot be read now (the data
    moved) means uniform, said in the note."""
    from distgan.data.catalog import data_classes
    from distgan.errors import UserError

    if cfg is None:
        return None, "uniformly (no run config to give the data's class frequencies)"
    try:
        info = data_classes(cfg.data)
    except (UserError, ValueError, OSError) as e:
        return None, f"uniformly (the data's class frequencies are unreadable: {' '.join(str(e).split())[:160]})"
    if info is None or info.frequencies is None:
        return None, "uniformly (the data does not say its class frequencies)"
    if len(info.frequencies) != num_classes:
        return None, f"uniformly (the data has {len(info.frequencies)} classes, the generator {num_classes})"
    return [float(f) for f in info.frequencies], "like the data (its class frequencies)"


def training_source(cfg):
    """A run's training data as a source: its shards, or the in-memory dataset its config names."""
    d, m = cfg.data, cfg.model
    if d.source == "shards":
        return ShardSource(d.shards, d.allow_pipe)
    from distgan.data import load_images

    # A built-in or torchvision dataset is fixed by these values; the images are made only on a cache miss.
    what = {"source": d.source, "resolution": m.resolution}
    if d.source == "shapes":
        what.update(num_images=d.num_images, seed=d.seed)
    name = f"data.source={d.source}"
    return ArraySource(lambda: load_images(cfg), name, "dataset:" + _digest(what), m.resolution, m.channels)
