"""Helpers shared by the tests: build a trainer from config overrides, run code on N gloo processes, read W&B
offline run files (`wandb_records`).

run_ranks(worker, N, *args) runs worker(rank, world_size, *args) in N real processes joined in a gloo process
group (distgan.local_launch: the environment torchrun would give them), so the code under test goes through
distgan.distributed.setup() exactly as in a real launch. A worker must be a module-level function.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from conftest import patience
from distgan.local_launch import run_local

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"

# Every model family at test size (on configs/smoke.yaml: 32x32, z_dim 16, batch 16), with its own loss and
# penalties switched on: a step takes well under a second on one CPU core. Switching the family on the command line
# drops smoke.yaml's dcgan section (config.load_config).
TINY = {
    "dcgan": (),
    "stylegan2": (
        "model.family=stylegan2", "model.stylegan2.channel_base=256", "model.stylegan2.channel_max=16",
        "model.stylegan2.map_layers=2", "model.stylegan2.w_dim=16", "loss.r1_gamma=0.5", "loss.d_reg_interval=2",
        "loss.pl_weight=2", "loss.g_reg_interval=2",
    ),
    "biggan": ("model.family=biggan", "model.biggan.g_width=8", "model.biggan.d_width=8",
               "model.biggan.shared_dim=8", "loss.kind=hinge", "optim.beta1=0"),
    "r3gan": (
        "model.family=r3gan", "model.r3gan.width=16", "model.r3gan.width_base=256", "model.r3gan.group_size=8",
        "loss.kind=rpgan", "loss.r1_gamma=0.1", "loss.r2_gamma=0.1", "loss.d_reg_interval=1", "optim.beta1=0",
        "schedule.lr_g.shape=cosine", "schedule.lr_g.end=5e-5", "schedule.lr_g.kimg=0.2",
        "schedule.r1_gamma.shape=cosine", "schedule.r1_gamma.end=0.01", "schedule.r1_gamma.kimg=0.2",
    ),
}  # fmt: skip


def make_trainer(*overrides: str, config: Path = SMOKE, run_dir=None, dist=None):
    """A Trainer on this process's world (1 unless launched by run_ranks), fed by the configured dataset."""
    from distgan import distributed
    from distgan.config import load_config
    from distgan.data import make_stream
    from distgan.train import resolve_classes
    from distgan.training import Trainer

    cfg = load_config(config, list(overrides))
    if dist is None:
        dist = distributed.setup(cfg.train.precision, threads=1, strategy=cfg.dist.strategy)
    cfg.validate(dist.world_size)
    probs = resolve_classes(cfg)
    dist = dist.configured(cfg.train.precision, cfg.dist.strategy)  # one group, several configs (tests)
    return Trainer(cfg, dist, make_stream(cfg, dist.rank, dist.world_size), run_dir, class_probs=probs)


def write_shards(folder, n_shards: int, per_shard, resolution: int = 8, channels: int = 3, manifest: bool = True,
                 extra=None, label=None, num_classes: int = 0) -> list[Path]:  # fmt: skip
    """Tar shards written by hand (independent of `distgan prepare`): sample key = its global id as 8 digits, the
    image a PNG whose pixels all equal id % 256; label(id), when given, written as KEY.cls (the class index as
    text). `per_shard` is an int or a list of counts; extra(i, key) may return more {name: bytes} members for a
    sample (replacing the sample's own of the same name; None drops it). The manifest, if asked, lists num_classes
    classes ("class-0", ...; none by default) and, like manifests before distgan counted classes, no class_counts.
    Returns the shard paths."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from distgan.data.manifest import FORMAT, VERSION, sha256_file, write_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * n_shards
    paths, sid = [], 0
    for i, count in enumerate(counts):
        path = folder / f"shard-{i:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                key = f"{sid:08d}"
                pixels = np.full((resolution, resolution, channels), sid % 256, np.uint8).squeeze()
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                members = {f"{key}.png": buf.getvalue()}
                if label is not None:
                    members[f"{key}.cls"] = str(label(sid)).encode()
                members.update((extra and extra(i, key)) or {})
                for name, data in {k: v for k, v in members.items() if v is not None}.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                sid += 1
        paths.append(path)
    if manifest:
        shards = [
            {"name": p.name, "samples": c, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p, c in zip(paths, counts)
        ]
        write_manifest(folder, {
            "format": FORMAT, "version": VERSION, "num_samples": sum(counts), "resolution": resolution,
            "channels": channels, "mode": "RGB" if channels == 3 else "L", "image_format": "png",
            "classes": [f"class-{c}" for c in range(num_classes)],
            "shards": shards, "skipped": [], "source": {"kind": "test"}, "created": "", "distgan_version": "",
        })  # fmt: skip
    return paths


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def run_ranks(fn, world: int, *args, timeout: float = 180):
    # (timeout: what the call takes at most on a quiet machine; scaled by conftest.patience for a busy one)
    """[fn(0, world, *args), ..., fn(world-1, world, *args)], each in its own fresh process of one gloo group."""
    try:
        # CPU ranks on gloo, also on a machine with one GPU (NCCL refuses two ranks on one GPU).
        return run_local(world, fn, *args, timeout=patience(timeout), env={"CUDA_VISIBLE_DEVICES": ""})
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


def outputs_after_two_steps(family: str, *extra: str):
    """(trainer, G_ema's images, D's logits) on fixed inputs after two training steps of a TINY `family`, every
    phase at step 0 (a class-conditional model on the shapes' 4 classes)."""
    import torch

    tr = make_trainer(*TINY[family], "model.num_classes=auto", *extra)
    for _ in range(2):
        tr.train_step(*tr.draw())
    z = torch.randn(16, tr.cfg.model.z_dim, generator=torch.Generator().manual_seed(1))
    c = torch.arange(16) % 4
    res = tr.cfg.model.resolution
    x = torch.rand(16, 3, res, res, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.manual_seed(0)  # StyleGAN2's noise inputs
    images = tr.sample(z, c).float()
    with torch.no_grad():
        logits = tr.D_module(x, c).float()
    return tr, images, logits


def side_by_side(fn, keys, timeout: float) -> dict:
    """{key: fn(0, 1, key)} for each key, each in its own fresh process (run_local, a world of one), all at once: the
    2 cores of a test machine run two learning runs in about the time of one. The first failure is raised."""
    import threading

    out = {}

    def run(key):
        try:
            out[key] = run_local(1, fn, key, timeout=timeout)[0]
        except Exception as e:  # noqa: BLE001 (raised below, in the caller's thread)
            out[key] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in keys:
        if isinstance(out[key], Exception):
            raise out[key]
    return out


def wandb_records(path: Path):
    """The records of a W&B offline run file (wandb ships no reader for them): a 7-byte file header, then 32 KiB
    blocks of chunks (LevelDB's log format: crc32 u32, length u16, type u8 = full/first/middle/last), each
    record a wandb_internal_pb2.Record. Read it after the writing process ended or called wandb.teardown():
    `run.finish()` returns before the file is complete."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def distgan_processes(marker: str) -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process whose command line holds both `marker` and
    distgan.train. Loader workers are forked, so they carry their rank's command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if marker.encode() not in cmdline or b"distgan.train" not in cmdline:
                continue
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue  # it ended while we looked
        if state != "Z":
            found[int(entry)] = int(ppid)
    return found
