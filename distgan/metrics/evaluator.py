"""Evaluator: metrics of image sets against one reference set, on every rank of a launch.

    ev = Evaluator(["fid", "kid"], make_extractor("inception", dist.device), ShardSource("data/shapes-32"), dist)
    values = ev.evaluate(GeneratorSource(G, G.z_dim))   # {"fid": ..., "kid": ..., "kid_std": ...} on every rank

`evaluate` is a collective: every rank calls it. Each rank extracts features of its contiguous share of the
images (sources.share), the shares are gathered in rank order (the global order), rank 0 computes the metrics
(compute.py) and sends the values to all. The real features are extracted once per Evaluator, or read from
the cache (cache.py), where rank 0 decides for everyone. A user error on any rank (an unreadable shard, a bad
extractor output) is raised on every rank with the same line, instead of leaving the others waiting.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from distgan.errors import UserError
from distgan.metrics import REAL_FREE, MetricsError, cache
from distgan.metrics.compute import compute_metrics
from distgan.metrics.sources import select, share


class Evaluator:
    def __init__(
        self,
        metrics: list[str],
        extractor,
        real=None,
        dist=None,
        num: int = 10000,
        num_real: int | None = None,
        batch: int = 64,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        beat=None,
    ):
        """metrics: names from METRICS; extractor: features.Extractor; real: a source (None for IS alone);
        dist: distgan's Dist (None: one process); num / num_real: fakes / reals to use (reals: at most all);
        beat: called after every batch (the trainer's watchdog)."""
        if num < 2:
            raise MetricsError(f"--num {num}: the metrics need at least 2 images")
        missing = [m for m in ("torchmetrics", "torch_fidelity") if importlib.util.find_spec(m) is None]
        if missing:
            raise MetricsError(f"metrics need {' and '.join(missing)}: pip install torchmetrics torch-fidelity")
        self.needs_real = any(m not in REAL_FREE for m in metrics)
        if self.needs_real and real is None:
            raise MetricsError(f"{', '.join(m for m in metrics if m not in REAL_FREE)} compare with real images: "
                               "give them with --real (shards folder or image folder)")  # fmt: skip
        self.metrics, self.extractor, self.real, self.dist = metrics, extractor, real, dist
        self.num, self.num_real, self.batch, self.seed = num, num_real or num, batch, seed
        self.cache_dir = cache.cache_dir(str(cache_dir) if cache_dir else None) if use_cache else None
        self.kid_subsets, self.kid_subset_size, self.pr_k = kid_subsets, kid_subset_size, pr_k
        self.beat = beat or (lambda: None)
        self.rank = dist.rank if dist is not None else 0
        self.world = dist.world_size if dist is not None else 1
        self._real: torch.Tensor | None = None  # [N_r, F] on rank 0 once known
        self.real_note = ""  # how the real features were obtained, for the CLI's header line

    # ------------------------------------------------------------------ public
    def evaluate(self, fake) -> dict[str, float]:
        """The metrics of `fake` (a source) against the reals; the same dict on every rank (a collective)."""
        self.check_compatible(fake)
        real = self.real_features()
        feats, logits = self._extract(fake, select(fake.count, self.num, self.seed), logits="is" in self.metrics)
        values = None
        if self.rank == 0:
            device = self.extractor.device
            values = compute_metrics(self.metrics, real, feats, logits, self.seed, self.kid_subsets,
                                     self.kid_subset_size, self.pr_k, device=device)  # fmt: skip
            self.last_counts = (len(feats), 0 if real is None else len(real))
        return self._broadcast(values)

    def check_compatible(self, fake) -> None:
        if self.real is None or not self.needs_real:
            return
        r, f = self.real, fake
        if (r.resolution, r.channels) != (f.resolution, f.channels):
            raise MetricsError(
                f"the fakes ({f.name}) are {f.resolution}x{f.resolution}x{f.channels} but the reals ({r.name}) are "
                f"{r.resolution}x{r.resolution}x{r.channels}: compare images of one resolution and channel count"
            )

    def real_features(self) -> torch.Tensor | None:
        """The reals' features [N_r, F] on rank 0 (None on the others): from the cache, or extracted once."""
        if not self.needs_real or self._real is not None:
            self.real_note = "kept from the first evaluation" if self._real is not None else ""
            return self._real if self.rank == 0 else None
        r = self.real
        fields = {"data": r.identity, "extractor": self.extractor.identity, "resolution": r.resolution,
                  "channels": r.channels, "num": self.num_real, "seed": self.seed}  # fmt: skip
        key = cache.key_of(fields)
        cached = self.cache_dir is not None and r.identity is not None
        feats = cache.load(self.cache_dir, key) if cached and self.rank == 0 else None
        if self._broadcast(feats is not None):
            self.real_note = f"cache hit {self.cache_dir / key}.safetensors"
        else:
            start = time.time()
            feats, _ = self._extract(r, select(r.count, self.num_real, self.seed), logits=False)
            self.real_note = f"extracted in {time.time() - start:.1f} s"
            if cached and self.rank == 0:
                cache.save(self.cache_dir, key, feats, fields)
                self.real_note += f", cached as {self.cache_dir / key}.safetensors"
        self._real = feats if self.rank == 0 else torch.empty(0)
        return self._real if self.rank == 0 else None

    # ------------------------------------------------------------------ collectives
    def _extract(self, source, indices, logits: bool):
        """(features [N, F], logits [N, K] or None) of the images at `indices`, on rank 0; (None, None) elsewhere."""
        feats, lgts, error = [], [], None
        try:
            for images in source.images(share(indices, self.rank, self.world), self.batch):  # [B, C, R, R]
                f, lg = self.extractor(images)
                feats.append(f)
                if logits:
                    lgts.append(lg)
                self.beat()
        except UserError as e:
            error = e
        mine = (torch.cat(feats) if feats else None, torch.cat(lgts) if lgts else None, str(error) if error else None)
        parts = self.dist.all_gather_object(mine) if self.world > 1 else [mine]
        errors = [p[2] for p in parts if p[2]]
        if errors:
            raise error if error is not None else MetricsError(errors[0])
        if self.rank != 0:
            return None, None
        all_feats = [p[0] for p in parts if p[0] is not None]
        if not all_feats or sum(map(len, all_feats)) < 2:
            raise MetricsError(f"{source.name}: fewer than 2 readable images to evaluate")
        all_logits = [p[1] for p in parts if p[1] is not None]
        return torch.cat(all_feats), (torch.cat(all_logits) if logits else None)

    def _broadcast(self, obj):
        return self.dist.broadcast_object(obj) if self.world > 1 else obj
