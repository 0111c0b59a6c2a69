"""The inference export: G_ema's weights as safetensors, with the config that rebuilds G in the file's metadata.

    from distgan.export import load_generator
    G = load_generator("runs/default/checkpoints/ckpt-000300032/generator.safetensors")
    images = G(torch.randn(16, G.z_dim))          # [16, C, H, W] in [-1, 1]

Every checkpoint carries one (`generator.safetensors`, hashed in its manifest like the rest). It holds tensors
and strings only: loading it runs no code, needs no optimizer state, and is a fraction of the checkpoint's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMAT = "distgan-generator"
VERSION = "1"


def generator_bytes(module: torch.nn.Module, model_cfg: dict, nimg: int) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    metadata = {"format": FORMAT, "version": VERSION, "model": json.dumps(model_cfg, sort_keys=True), "nimg": str(nimg)}
    return save(tensors, metadata=metadata)


def checkpoint_export(path: Path, what: str = "") -> Path:
    """The export to load for `path`: a checkpoint folder's generator.safetensors (the folder verified first:
    marker, manifest, every hash), or `path` itself when it is an export file. `what` prefixes the errors."""
    from distgan.checkpoint import verify
    from distgan.errors import CheckpointError

    if path.is_dir():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{what}{path}: not a usable checkpoint ({problem})")
        return path / "generator.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{what}{path}: no such file or folder")
    return path


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the generator from an export; returned in eval mode, with `z_dim` and `nimg` attributes."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from distgan.config import from_dict
    from distgan.errors import CheckpointError
    from distgan.models import build_generator

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a distgan generator export")
        cfg = from_dict({"model": json.loads(meta["model"])}).model  # (also an older distgan's flat model config)
        tensors = load_file(str(path), device=str(device))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (any unreadable file: one line)
        raise CheckpointError(f"cannot read generator export {path}: {' '.join(str(e).split())[:200]}") from None
    G = build_generator(cfg).to(device)
    G.load_state_dict(tensors)
    G.z_dim, G.nimg, G.num_classes = cfg.z_dim, int(meta.get("nimg", 0)), int(cfg.num_classes)
    return G.eval().requires_grad_(False)
