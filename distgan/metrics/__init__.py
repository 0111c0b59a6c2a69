"""Sample-quality metrics: FID, KID, Inception Score, precision/recall, on one process or many.

    features.py   extractors: images -> features [N, F] (+ class logits [N, K]): `inception`, `torchscript:PATH`;
                  classifiers (`--classifier torchscript:PATH`): images -> class logits [N, K], for class_match
    sources.py    image sets: shards, an image folder, images in memory, a generator; each rank reads its share
    cache.py      real-data features cached on disk (safetensors), keyed by the data's hash and the extractor
    compute.py    the metrics from features, through torchmetrics and torch-fidelity (no copies of their maths)
    evaluator.py  Evaluator: extract on every rank, gather in one global order, compute on rank 0, share

How a multi-process evaluation gives one process's answer: the images to use are a fixed list of global indices
(a seeded subset of the reals, latents 0..N-1 of a seeded draw for a generator), rank r takes the r-th
contiguous slice of it, and the gathered features are concatenated in rank order, i.e. in the list's order.
Metrics then run once, on rank 0, on exactly the features one process would have computed. A conditional
generator's class of image i is a function of the seed and i too, so class_match (a classifier's predictions,
gathered the same way, against those classes) is one process's value as well.

This module imports no torch (the config validates `eval.*` keys with it before any heavy import).
"""

from __future__ import annotations

from distgan.errors import UserError

# What --metrics / eval.metrics may name, and the values each produces (what lands in metrics.jsonl and W&B).
METRICS = {
    "fid": ("fid",),
    "kid": ("kid", "kid_std"),
    "is": ("is", "is_std"),
    "pr": ("precision", "recall"),
}
REAL_FREE = ("is",)  # metrics of the fakes alone: no reference set needed
# Reported besides --metrics when a classifier is given (`distgan eval --classifier`; inline eval has none): the
# share of a conditional generator's images that the classifier assigns to the class they were generated for.
CLASS_MATCH = "class_match"


class MetricsError(UserError):
    """A metric cannot be computed as asked: bad extractor, missing weights, mismatched images (exit code 2)."""


def parse_metrics(spec: str) -> list[str]:
    """`fid,kid` -> ["fid", "kid"]; raises MetricsError naming what is unknown."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise MetricsError(f"metrics {spec!r}: choose from {', '.join(METRICS)} (comma-separated)")
    return list(dict.fromkeys(names))


def features_problem(spec: str) -> str | None:
    """What is wrong with an extractor spec (`inception` or `torchscript:PATH`), or None; the file is not opened."""
    if spec == "inception":
        return None
    if spec.startswith("torchscript:") and spec[len("torchscript:") :].strip():
        return None
    return f"features {spec!r} must be `inception` or `torchscript:PATH` (a TorchScript file you trust)"


def classifier_problem(spec: str) -> str | None:
    """What is wrong with a classifier spec (`torchscript:PATH`), or None; the file is not opened."""
    if spec.startswith("torchscript:") and spec[len("torchscript:") :].strip():
        return None
    return f"classifier {spec!r} must be `torchscript:PATH` (a TorchScript file you trust: images -> class logits)"
