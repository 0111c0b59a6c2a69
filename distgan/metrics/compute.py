"""The metrics, from features extracted once: torchmetrics' FID, KID and IS, torch-fidelity's precision/recall.

    fid(real, fake)                         Fréchet distance of Gaussians fitted to the two feature sets; lower
                                            is better, 0 for identical statistics (Heusel et al. 2017)
    kid(real, fake, subsets, size, seed)    squared MMD with the cubic polynomial kernel, unbiased, averaged over
                                            random subsets (Bińkowski et al. 2018): no Gaussian assumption, unbiased
                                            at small N; lower is better; (mean, std over subsets)
    inception_score(logits, splits, seed)   exp E[KL(p(y|x) || p(y))] over the fakes' class logits: confident and
                                            varied classes score high (Salimans et al. 2016); (mean, std over splits)
    precision_recall(real, fake, k)         the fraction of fakes inside the reals' k-NN manifold (fidelity) and of
                                            reals inside the fakes' (coverage) (Kynkäänniemi et al. 2019); k = 3
    class_match(predicted, labels)          the share of a conditional generator's images that a classifier
                                            assigns (argmax) to the class they were generated for; higher is better

torchmetrics' metric classes run a feature network inside `update`; here that network is `_Given`, the identity,
because the features were extracted already (one Inception pass serves every metric, and the cached real
features are fed without any network). Their own cross-process sync is off (`sync_on_compute=False`): the
Evaluator has already gathered every rank's features in one global order, so the result is one process's.
KID's subsets and IS's split shuffle draw from torch's global RNG: drawn here under a forked, seeded RNG, so a
metric is a function of its inputs and seed, and training's random state is left alone.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from distgan.metrics import METRICS, MetricsError

_CHUNK = 4096  # rows per update: FID's double-precision outer products stay ~100 MB at 2048 features


class _Given(nn.Module):
    """The 'feature extractor' torchmetrics calls in update(): features in, the same features out."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _metric(cls, dim: int, device, **kwargs):
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point
        warnings.simplefilter("ignore", UserWarning)
        return cls(feature=_Given(dim), sync_on_compute=False, **kwargs).to(device)


def fid(real: torch.Tensor, fake: torch.Tensor, device="cpu") -> float:
    """real: [N_r, F], fake: [N_f, F] -> FID (float64 throughout, on `device`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = _metric(FrechetInceptionDistance, real.shape[1], device)
    for part in real.split(_CHUNK):
        m.update(part.to(device, torch.float64), real=True)
    for part in fake.split(_CHUNK):
        m.update(part.to(device, torch.float64), real=False)
    return float(m.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, size: int = 1000, seed: int = 0, device="cpu"):
    """real: [N_r, F], fake: [N_f, F] -> (KID mean, std) over `subsets` random subsets of min(size, N) each."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(size, len(real), len(fake))
    m = _metric(KernelInceptionDistance, real.shape[1], device, subsets=subsets, subset_size=size)
    m.update(real.to(device, torch.float64), real=True)
    m.update(fake.to(device, torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0, device="cpu"):
    """logits: [N, K] class logits of the fakes -> (IS mean, std) over min(splits, N) splits."""
    from torchmetrics.image.inception import InceptionScore

    m = _metric(InceptionScore, logits.shape[1], device, splits=min(splits, len(logits)))
    m.update(logits.to(device, torch.float64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch: int = 1024, device="cpu"):
    """real: [N_r, F], fake: [N_f, F] -> (precision, recall) from k-NN radii (float32, on `device`)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    if min(len(real), len(fake)) <= k:
        raise MetricsError(f"precision/recall with k={k} needs more than {k} real and fake images")
    # torch-fidelity's argument order: generated first, real second.
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    return calculate_precision_recall_part(fake, real, neighborhood=k, batch_size=batch)


def class_match(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """predicted: a classifier's classes [N] (or its logits [N, K]), labels: the classes generated for [N] -> the
    share that agree."""
    if predicted.dim() == 2:
        predicted = predicted.argmax(dim=1)
    if predicted.shape != labels.shape:
        raise MetricsError(f"class_match: {len(predicted)} predictions for {len(labels)} generated images")
    return float((predicted.cpu() == labels.cpu()).double().mean())


def compute_metrics(
    names: list[str],
    real: torch.Tensor | None,
    fake: torch.Tensor,
    fake_logits: torch.Tensor | None = None,
    seed: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    is_splits: int = 10,
    device="cpu",
) -> dict[str, float]:
    """The named metrics (see METRICS) as {value name: float}, e.g. {"fid": 3.2, "kid": 0.001, "kid_std": ...}.

    real: [N_r, F] or None (IS only), fake: [N_f, F], fake_logits: [N_f, K] (IS; default: the features).
    device: where the maths runs (the extractor's: a GPU does the 2048-d products much faster than a CPU).
    """
    out: dict[str, float] = {}
    logits = fake if fake_logits is None else fake_logits
    for name in names:
        if name == "fid":
            out["fid"] = fid(real, fake, device)
        elif name == "kid":
            out["kid"], out["kid_std"] = kid(real, fake, kid_subsets, kid_subset_size, seed, device)
        elif name == "is":
            out["is"], out["is_std"] = inception_score(logits, is_splits, seed, device)
        elif name == "pr":
            out["precision"], out["recall"] = precision_recall(real, fake, pr_k, device=device)
        else:
            raise MetricsError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
    return out
