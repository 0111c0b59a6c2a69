"""Helpers of the metrics tests (tests/unit/test_metrics.py, tests/integration/test_eval.py,
tests/distributed/test_metrics_dist.py) and of tests/unit/test_generate.py: a tiny TorchScript extractor, folders
of random images, random weights of the FID Inception's shape (the real ones cannot be downloaded here), and for
conditional generators: a tiny class-conditional G (optionally one whose image depends on the class alone), its
export inside a run dir, labelled shards whose manifest gives the class frequencies, and TorchScript classifiers
whose answers the test controls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


class TinyNet(nn.Module):
    """A TorchScript-able extractor: features [N, 8] and 4 class logits from images in [-1, 1] of any size."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return f, self.head(f)


def save_tinynet(path, channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return save_script(TinyNet(channels), path)


def save_script(module: nn.Module, path):
    import warnings

    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; distgan reads it because users have it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))
    return path


# ---------------------------------------------------------------------- conditional generators and classifiers


def conditional_config(num_classes: int = 4, *overrides: str):
    """configs/smoke.yaml's tiny DCGAN (32 px, z_dim 16), conditional on num_classes classes, without BatchNorm."""
    from distgan.config import load_config

    return load_config(SMOKE, [f"model.num_classes={num_classes}", "model.dcgan.norm=none", *overrides])


def conditional_generator(num_classes: int = 4, class_only: bool = False, seed: int = 0):
    """(G, cfg): a tiny conditional DCGAN G whose convolutions are 10x their initial weights, so that images differ
    visibly (at init they are flat grey). class_only: the first layer's weights from z are zeroed, so that
    G(z, c) depends on c alone (a classifier can then know every image's class exactly)."""
    from distgan.models import build_generator

    cfg = conditional_config(num_classes)
    torch.manual_seed(seed)
    G = build_generator(cfg.model).eval()
    with torch.no_grad():
        for p in G.net.parameters():
            p.mul_(10)
        if class_only:
            G.net[0].weight[: cfg.model.z_dim] = 0  # ConvTranspose2d weight: [in = z_dim + embed_dim, out, 4, 4]
    return G, cfg


def quantised(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as evaluation sees them: rounded to uint8 as a saved PNG, then back to [-1, 1]."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).float() / 127.5 - 1


def prototypes(G, num_classes: int) -> torch.Tensor:
    """A class-only G's image of each class, quantised: [K, C, H, W] (distinct, or a classifier could not tell)."""
    with torch.no_grad():
        protos = quantised(G(torch.zeros([num_classes, G.z_dim]), torch.arange(num_classes)))
    assert all(not torch.equal(protos[a], protos[b]) for a in range(num_classes) for b in range(a))
    return protos


class PrototypeClassifier(nn.Module):
    """Class logits: minus each image's distance to each class's prototype, rolled by `shift` (shift 1 answers
    class k + 1 for an image of class k: a classifier that is always wrong)."""

    def __init__(self, protos: torch.Tensor, shift: int = 0):
        super().__init__()
        self.register_buffer("protos", protos.flatten(1))
        self.shift = shift

    def forward(self, x):
        return torch.roll(-torch.cdist(x.flatten(1), self.protos), self.shift, 1)


class ConstantClassifier(nn.Module):
    """Class logits of K classes that always answer `answer`."""

    def __init__(self, num_classes: int, answer: int = 0):
        super().__init__()
        self.num_classes, self.answer = num_classes, answer

    def forward(self, x):
        out = torch.zeros([x.shape[0], self.num_classes], device=x.device)
        out[:, self.answer] = 1.0
        return out


def labelled_shards(folder, class_counts: list[int], resolution: int = 32):
    """One shard of sum(class_counts) samples, the first class_counts[0] of class 0 and so on, with a manifest
    listing the classes and their counts (what `distgan prepare` writes for class folders)."""
    from distgan.data.manifest import write_manifest
    from support import write_shards

    bounds = np.cumsum(class_counts)

    def label(i: int) -> int:
        return int(np.searchsorted(bounds, i, side="right"))

    write_shards(folder, 1, int(bounds[-1]), resolution=resolution, label=label, num_classes=len(class_counts))
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    write_manifest(folder, {**manifest, "class_counts": list(class_counts)})
    return Path(folder)


class OneProcess:
    """The few Dist methods CheckpointManager.save calls, for a world of one without a process group."""

    rank, world_size, is_main = 0, 1, True

    def broadcast_object(self, obj):
        return obj

    def all_gather_object(self, obj):
        return [obj]


def write_run(run_dir, cfg, G, nimg: int = 64):
    """A run dir as training leaves it, as far as eval and generate read it: config.yaml (cfg) and one committed
    checkpoint holding G as its generator.safetensors export. Returns the checkpoint folder."""
    from distgan.checkpoint import CheckpointManager
    from distgan.export import generator_bytes

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump(run_dir / "config.yaml")
    export = generator_bytes(G, cfg.to_dict()["model"], nimg)
    return CheckpointManager(run_dir).save(OneProcess(), nimg, {"generator.safetensors": export})


def write_folder(folder, n, seed, high=256, size=16):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, high, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def random_inception_weights(path):
    """A state dict of the FID Inception's shape with random values (the real one cannot be downloaded here)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    module = "torch_fidelity.feature_extractor_inceptionv3"
    with mock.patch(f"{module}.load_state_dict_from_url"), mock.patch.object(nn.Module, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path
