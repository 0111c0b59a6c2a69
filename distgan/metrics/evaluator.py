"""Evaluator: metrics of image sets against one reference set, on every rank of a launch.

    ev = Evaluator(["fid", "kid"], make_extractor("inception", dist.device), ShardSource("data/shapes-32"), dist)
    values = ev.evaluate(GeneratorSource(G, G.z_dim))   # {"fid": ..., "kid": ..., "kid_std": ...} on every rank

`evaluate` is a collective: every rank calls it. Each rank extracts features of its contiguous share of the
images (sources.share), the shares are gathered in rank order (the global order), rank 0 computes the metrics
(compute.py) and sends the values to all. The real features are extracted once per Evaluator, or read from
the cache (cache.py), where rank 0 decides for everyone. A user error on any rank (an unreadable shard, a bad
extractor output) is raised on every rank with the same line, instead of leaving the others waiting.

With a `classifier` (features.Classifier) and a conditional generator's source, `evaluate` also returns
`class_match`: each rank classifies its share of the images in the same pass that extracts their features, the
predictions are gathered in the global order, and rank 0 compares them with the classes the images were generated
for (the source's `labels(indices)`, a function of the seed and the index). Inline evaluation during training
passes no classifier.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from distgan.errors import UserError
from distgan.metrics import CLASS_MATCH, REAL_FREE, MetricsError, cache
from distgan.metrics.compute import class_match, compute_metrics
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
        classifier=None,
    ):
        """metrics: names from METRICS; extractor: features.Extractor; real: a source (None for IS alone);
        dist: distgan's Dist (None: one process); num / num_real: fakes / reals to use (reals: at most all);
        beat: called after every batch (the trainer's watchdog); classifier: features.Classifier, for class_match
        (of conditional generators' sources only)."""
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
        self.classifier = classifier
        self.rank = dist.rank if dist is not None else 0
        self.world = dist.world_size if dist is not None else 1
        self._real: torch.Tensor | None = None  # [N_r, F] on rank 0 once known
        self.real_note = ""  # how the real features were obtained, for the CLI's header line

    # ------------------------------------------------------------------ public
    def evaluate(self, fake) -> dict[str, float]:
        """The metrics of `fake` (a source) against the reals; the same dict on every rank (a collective)."""
        self.check_compatible(fake)
        real = self.real_features()
        indices = select(fake.count, self.num, self.seed)
        classify = self.classifier is not None
        feats, logits, preds = self._extract(fake, indices, logits="is" in self.metrics, classify=classify)
        values = None
        if self.rank == 0:
            device = self.extractor.device
            values = compute_metrics(self.metrics, real, feats, logits, self.seed, self.kid_subsets,
                                     self.kid_subset_size, self.pr_k, device=device)  # fmt: skip
            if classify:
                values[CLASS_MATCH] = class_match(preds, fake.labels(indices))
            self.last_counts = (len(feats), 0 if real is None else len(real))
        return self._broadcast(values)

    def check_compatible(self, fake) -> None:
        if self.classifier is not None:
            self.check_classifier(fake)
        if self.real is None or not self.needs_real:
            return
        r, f = self.real, fake
        if (r.resolution, r.channels) != (f.resolution, f.channels):
            raise MetricsError(
                f"the fakes ({f.name}) are {f.resolution}x{f.resolution}x{f.channels} but the reals ({r.name}) are "
                f"{r.resolution}x{r.resolution}x{r.channels}: compare images of one resolution and channel count"
            )

    def check_classifier(self, fake) -> None:
        """The classifier fits `fake`: a conditional generator's source whose class count is the classifier's K.
        The same answer on every rank (the same inputs), so a refusal leaves no rank waiting."""
        name, k = self.classifier.name, int(getattr(fake, "num_classes", 0) or 0)
        if not hasattr(fake, "labels"):
            raise MetricsError(f"{name}: class_match needs a conditional generator; the images of {fake.name} "
                               "were not generated for known classes")  # fmt: skip
        if not k:
            raise MetricsError(f"{name}: class_match needs a conditional generator; {fake.name} is unconditional "
                               "(model.num_classes=0)")  # fmt: skip
        K = self.classifier.num_classes(fake.channels, fake.resolution)
        if K != k:
            raise MetricsError(
                f"{name} returns {K} class logits but the generator ({fake.name}) has {k} classes: "
                "class_match needs a classifier of the generator's classes, in its label order"
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
            feats, _, _ = self._extract(r, select(r.count, self.num_real, self.seed), logits=False)
            self.real_note = f"extracted in {time.time() - start:.1f} s"
            if cached and self.rank == 0:
                cache.save(self.cache_dir, key, feats, fields)
                self.real_note += f", cached as {self.cache_dir / key}.safetensors"
        self._real = feats if self.rank == 0 else torch.empty(0)
        return self._real if self.rank == 0 else None

    # ------------------------------------------------------------------ collectives
    def _extract(self, source, indices, logits: bool, classify: bool = False):
        """(features [N, F], logits [N, K] or None, the classifier's classes [N] or None) of the images at
        `indices`, on rank 0, in the order of `indices`; (None, None, None) elsewhere."""
        feats, lgts, preds, error = [], [], [], None
        try:
            for images in source.images(share(indices, self.rank, self.world), self.batch):  # [B, C, R, R]
                f, lg = self.extractor(images)
                feats.append(f)
                if logits:
                    lgts.append(lg)
                if classify:
                    preds.append(self.classifier(images).argmax(dim=1))
                self.beat()
        except UserError as e:
            error = e
        mine = (torch.cat(feats) if feats else None, torch.cat(lgts) if lgts else None,
                torch.cat(preds) if preds else None, str(error) if error else None)  # fmt: skip
        parts = self.dist.all_gather_object(mine) if self.world > 1 else [mine]
        errors = [p[3] for p in parts if p[3]]
        if errors:
            raise error if error is not None else MetricsError(errors[0])
        if self.rank != 0:
            return None, None, None
        all_feats = [p[0] for p in parts if p[0] is not None]
        if not all_feats or sum(map(len, all_feats)) < 2:
            raise MetricsError(f"{source.name}: fewer than 2 readable images to evaluate")
        all_logits = [p[1] for p in parts if p[1] is not None]
        all_preds = [p[2] for p in parts if p[2] is not None]
        return (torch.cat(all_feats), torch.cat(all_logits) if logits else None,
                torch.cat(all_preds) if classify else None)  # fmt: skip

    def _broadcast(self, obj):
        return self.dist.broadcast_object(obj) if self.world > 1 else obj
