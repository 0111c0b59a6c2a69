"""Datasets and the per-rank batch streams that feed the trainer.

A stream yields Batch objects (batch.py) for one rank: images uint8 [B_local, C, H, W] and, when the data has
classes, their labels int64 [B_local] (else None), each label in the same row as its image from the moment the
sample is read; the trainer converts images to float in [-1, 1] on its device. A stream knows its position, so
a checkpoint can record where it stopped. Two kinds:

  ShardStream (stream.py)  WebDataset tar shards made by `distgan prepare`, streamed by loader workers from
                           disk, HTTP or object storage: the one for real datasets and for `make train`. Labels
                           come from each sample's KEY.cls member when the shards have classes.
  ArrayStream (memory.py)  a dataset held in memory (the built-in shapes, torchvision's MNIST/CIFAR-10), with
                           its labels: for tests and quick experiments.

Both offer: next() -> Batch, peek(n) -> images only (a grid of reals), take_stats(), state_dict()/
load_state_dict(), close().

On a CUDA device, make_stream(..., device) has the stream hand out pinned batches, and Prefetcher (prefetch.py)
wraps either stream to copy the next batch (images and labels) to the device while the current step runs.

What classes the configured data has, without loading it: catalog.data_classes(cfg.data).

This package's own import loads no torch (config.py imports the catalog, and a bad config must fail before torch
is imported): ArrayStream, load_dataset, load_images and resize are imported from memory.py on first use.
"""

from __future__ import annotations

_LAZY = {"ArrayStream", "load_dataset", "load_images", "resize"}  # (from distgan.data.memory)


def __getattr__(name: str):
    if name in _LAZY:
        from distgan.data import memory

        return getattr(memory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_stream(cfg, rank: int, world_size: int, device=None):
    """The batch stream `cfg.data` describes, for one rank: shards streamed from disk or network, or in memory.

    device: the training device. On CUDA the batches come in pinned memory, so that copying them to the GPU
    (non_blocking, see prefetch.py) does not stall the host.
    """
    import torch

    pin = device is not None and torch.device(device).type == "cuda"
    if cfg.data.source == "shards":
        from distgan.data.stream import ShardStream

        m, t = cfg.model, cfg.train
        # A conditional model's class count tells shards without a manifest that they are labelled (and checks
        # their labels against it); a manifest's own class list takes precedence.
        n = getattr(m, "num_classes", 0)
        num_classes = n if isinstance(n, int) and n > 0 else None
        return ShardStream(cfg.data, m.resolution, m.channels, t.batch, rank, world_size, t.seed, pin_memory=pin,
                           num_classes=num_classes)  # fmt: skip
    from distgan.data.memory import ArrayStream, load_dataset

    images, labels = load_dataset(cfg)
    return ArrayStream(
        images, cfg.train.batch, rank, world_size, cfg.train.seed, cfg.data.xflip, pin_memory=pin, labels=labels
    )
