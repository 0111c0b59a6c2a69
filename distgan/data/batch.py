"""What every stream yields: a batch of images and, when the data has classes, their labels.

    batch.images   uint8 [B, C, H, W] (as stored; the trainer converts to float in [-1, 1] on its device)
    batch.labels   int64 [B] class indices in [0, num_classes), or None for data without classes

A batch travels as one object from the loader worker to the device (it has `pin_memory()` and `to()`, which the
DataLoader's pinning thread and the prefetcher call), so a label can never be separated from its image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W]
    labels: torch.Tensor | None = None  # int64 [B]

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device, non_blocking: bool = False) -> Batch:
        labels = self.labels.to(device, non_blocking=non_blocking) if self.labels is not None else None
        return Batch(self.images.to(device, non_blocking=non_blocking), labels)

    def pin_memory(self, device=None) -> Batch:
        labels = self.labels.pin_memory() if self.labels is not None else None
        return Batch(self.images.pin_memory(), labels)

    def record_stream(self, stream) -> None:
        """Tell the CUDA caching allocator that `stream` uses these tensors (see data/prefetch.py)."""
        self.images.record_stream(stream)
        if self.labels is not None:
            self.labels.record_stream(stream)
