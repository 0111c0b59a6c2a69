"""Datasets held in memory (the built-in shapes, torchvision's MNIST/Fashion-MNIST/CIFAR-10) and their stream.

For tests and quick experiments: a dataset is loaded whole, with its labels (shapes' generate() makes them,
torchvision datasets have .targets), and ArrayStream hands out Batch(images, labels) slices of a seeded
shuffled order. Real datasets are prepared as shards and streamed (stream.py).
"""

from __future__ import annotations

import numpy as np
import torch

from distgan.data.batch import Batch
from distgan.data.catalog import TORCHVISION_DATASETS
from distgan.errors import DataError


def load_dataset(cfg) -> tuple[np.ndarray, np.ndarray]:
    """All images of `cfg.data` at `cfg.model.resolution` and their labels: uint8 [N, C, res, res], int64 [N]
    (class indices in the catalog's order). Built-in and torchvision datasets only: shards are streamed."""
    data, res = cfg.data, cfg.model.resolution
    if data.source not in ("shapes", *TORCHVISION_DATASETS):
        raise ValueError(f"data.source={data.source} is not an in-memory dataset; stream it with make_stream")
    if data.source == "shapes":
        from distgan.data import shapes

        return shapes.generate(data.num_images, seed=data.seed, resolution=res)
    return _load_torchvision(data.source, data.root, data.download, res)


def load_images(cfg) -> np.ndarray:
    """All images of `cfg.data` at `cfg.model.resolution`: uint8 [N, C, res, res] (load_dataset without labels)."""
    return load_dataset(cfg)[0]


def _load_torchvision(source: str, root: str, download: bool, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[source])
    try:
        ds = cls(root=root, train=True, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True to download it"
        hint = "" if download else " (data.download=false)"
        raise DataError(f"{source} not found under {root}{hint}: {' '.join(str(e).split())}") from None
    except OSError as e:  # no network, disk full, permissions
        raise DataError(f"could not download {source} into {root}: {e}") from None
    images = torch.as_tensor(np.asarray(ds.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # [N, C, H, W]
    if images.shape[-1] != resolution:
        images = resize(images, resolution)
    labels = np.asarray(ds.targets, dtype=np.int64)  # a tensor (MNIST) or a list (CIFAR-10)
    return images.contiguous().numpy(), labels


def resize(images: torch.Tensor, resolution: int, chunk: int = 4096) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 [N, C, H, W] to [N, C, res, res]."""
    out = []
    for part in images.split(chunk):
        x = torch.nn.functional.interpolate(
            part.float(), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


class ArrayStream:
    """Endless batches from images held in memory, in a seeded shuffled order, split across ranks.

    The global order is a fresh permutation per epoch, drawn from (seed, epoch). Global batch k is images
    [k*B, (k+1)*B) of that order (crossing into the next epoch when the dataset does not divide by B); rank r takes
    the r-th slice of B/world. The position (images consumed over all ranks) is the whole state: a stream
    created at position p yields exactly what the original yielded after p images, on any world size. Labels,
    when given, are gathered with the same indices as the images.
    """

    def __init__(self, images: np.ndarray, batch: int, rank: int, world_size: int, seed: int, xflip: bool = False,
                 pin_memory: bool = False, labels: np.ndarray | None = None):  # fmt: skip
        """pin_memory: gather each batch straight into pinned memory (for an asynchronous copy to a CUDA device;
        without CUDA it does nothing). Only the batch is pinned, never the whole dataset.
        labels: int64 [N], the class of each image; None for data without classes (batches then have none)."""
        if len(images) == 0:
            raise DataError("the dataset has no images")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None
        if labels is not None:
            if len(labels) != len(images):
                raise ValueError(f"{len(labels)} labels for {len(images)} images")
            self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        self.batch, self.rank, self.world_size = batch, rank, world_size
        self.seed, self.xflip = seed, xflip
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.position = 0
        self._epoch_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (permutation [N], flip mask [N]) of one epoch; the last two epochs are kept.
        if epoch not in self._epoch_cache:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            perm = torch.randperm(len(self.images), generator=g)
            flip = torch.rand(len(self.images), generator=g) < 0.5
            self._epoch_cache = {e: v for e, v in self._epoch_cache.items() if e >= epoch - 1}
            self._epoch_cache[epoch] = (perm, flip)
        return self._epoch_cache[epoch]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        per_rank = self.batch // self.world_size
        start = self.position + self.rank * per_rank
        pos = torch.arange(start, start + per_rank)  # global sample positions of this rank's slice
        n = len(self.images)
        index = torch.empty(per_rank, dtype=torch.long)
        flip = torch.empty(per_rank, dtype=torch.bool)
        for epoch in (pos // n).unique().tolist():  # one or two epochs per batch
            sel = pos // n == epoch
            perm, fl = self._epoch(epoch)
            index[sel], flip[sel] = perm[pos[sel] % n], fl[pos[sel] % n]
        # [B_local, C, H, W], a fresh tensor per batch (the consumer may still be copying the previous one)
        out = torch.empty((per_rank, *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=self.pin_memory)
        torch.index_select(self.images, 0, index, out=out)
        if self.xflip:
            out[flip] = out[flip].flip(-1)
        labels = None
        if self.labels is not None:
            labels = torch.empty(per_rank, dtype=torch.int64, pin_memory=self.pin_memory)
            torch.index_select(self.labels, 0, index, out=labels)
        self.position += self.batch
        return Batch(out, labels)

    def peek(self, n: int) -> torch.Tensor:
        """The dataset's first n images (for a grid of reals; no labels), without moving the stream."""
        return self.images[:n]

    def take_stats(self) -> dict[str, float]:
        return {}  # images in memory: nothing can fail to decode

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
