"""`distgan bench quality`: every model family against DCGAN on the built-in shapes, at equal CPU wall-clock.

Each family trains class-conditionally on in-memory shapes (32x32, 4 classes) for the same number of seconds,
with a CPU-sized network and its own loss and optimiser (PRESETS below, each from its paper's small-data
recipe), then G_ema is measured with the shape classifier of distgan/metrics/shapes_fd.py:

    FD      Fréchet distance between real and generated images in the classifier's features (lower is better;
            an untrained G scores ~2000, the learning test's DCGAN ~130-145 after 60 kimg)
    class   the share of generated images the classifier puts in the class they were asked for (0.25 = chance)

It answers "what does a few minutes of CPU buy with each family", which is what `make train`'s default has to
choose by. It does not rank the families at scale: their papers' results come from GPUs, days and large data.
"""

from __future__ import annotations

import sys
import time

# CPU-sized networks near DCGAN's channel plan at 32x32 (32 channels at full resolution, doubling per halving,
# capped at 128; R3GAN's blocks, 6 convolutions per stage with its 2x expansion, at half that), each family's own
# loss and optimiser.
PRESETS = {
    "dcgan": [  # configs/default.yaml's network and two time-scale rates
        "model.dcgan.g_width=32", "model.dcgan.d_width=32", "optim.lr_g=4e-4", "optim.lr_d=2e-4",
    ],
    "stylegan2": [  # StyleGAN2-ADA's small-data recipe (cifar): mapping 2, no mixing or path length, auto gamma
        "model.family=stylegan2", "model.stylegan2.channel_base=1024", "model.stylegan2.channel_max=128",
        "model.stylegan2.map_layers=2", "model.stylegan2.w_dim=128", "model.stylegan2.style_mixing=0",
        "model.stylegan2.fused_modconv=false", "loss.r1_gamma=auto", "loss.d_reg_interval=16", "optim.lr_g=0.0025",
        "optim.lr_d=0.0025", "optim.beta1=0", "optim.beta2=0.99",
    ],
    "biggan": [  # SNGAN/BigGAN CIFAR optimisation: hinge, Adam 2e-4 (0, 0.9), 2 D steps (5 in the paper)
        "model.family=biggan", "model.biggan.g_width=8", "model.biggan.d_width=8", "model.biggan.shared_dim=32",
        "loss.kind=hinge", "loss.n_critic=2", "optim.lr_g=2e-4", "optim.lr_d=2e-4", "optim.beta1=0",
        "optim.beta2=0.9",
    ],
    "r3gan": [  # R3GAN: pairing loss, R1 + R2 every step, beta1 0
        "model.family=r3gan", "model.r3gan.width=64", "model.r3gan.width_base=512", "model.r3gan.group_size=8",
        "loss.kind=rpgan", "loss.r1_gamma=0.05", "loss.r2_gamma=0.05", "loss.d_reg_interval=1",
        "optim.lr_g=2e-4", "optim.lr_d=2e-4", "optim.beta1=0", "optim.beta2=0.99",
    ],
}  # fmt: skip
COMMON = ["model.resolution=32", "model.z_dim=64", "data.source=shapes", "data.num_images=20000",
          "train.batch=64", "train.total_kimg=100000", "train.ema_kimg=5", "train.progress=none"]  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="every family vs DCGAN on the built-in shapes at equal CPU time")
    p.add_argument("--families", default=",".join(PRESETS), help="comma-separated (default: all)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time per family (default 3)")
    p.add_argument("--unconditional", action="store_true", help="train without labels (no class figure)")
    p.add_argument("--num", type=int, default=2000, help="generated images measured per family (default 2000)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import torch

    from distgan import distributed
    from distgan.bench.common import bench_stream
    from distgan.config import load_config
    from distgan.data import shapes
    from distgan.metrics.shapes_fd import class_match, features, frechet_distance, to_float, train_classifier
    from distgan.training import Trainer

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in PRESETS]
    if unknown:
        print(f"distgan: error: --families: unknown {', '.join(unknown)} (choose from {', '.join(PRESETS)})",
              file=sys.stderr)  # fmt: skip
        return 2
    net, acc = train_classifier()
    reals, _ = shapes.generate(args.num, seed=4321, resolution=32)
    real_feats = features(net, to_float(reals))
    print(
        f"shape classifier: {acc:.1%} held-out accuracy; {args.minutes:g} min of training per family, "
        f"{torch.get_num_threads()} threads, {'unconditional' if args.unconditional else 'conditional (4 classes)'}"
    )
    dist = distributed.setup("fp32", threads=0)
    rows = []
    for family in families:
        extra = [] if args.unconditional else ["model.num_classes=4"]
        cfg = load_config(None, [*COMMON, *PRESETS[family], *extra, f"train.seed={args.seed}"]).validate()
        tr = Trainer(cfg, dist.configured("fp32", "ddp"), bench_stream(cfg))
        n_g = sum(p.numel() for p in tr.G_module.parameters())
        n_d = sum(p.numel() for p in tr.D_module.parameters())
        start = time.perf_counter()
        while time.perf_counter() - start < args.minutes * 60:
            tr.train_step(*tr.draw())
        seconds = time.perf_counter() - start
        tr.sync_buffers()
        g = torch.Generator().manual_seed(123)
        z = torch.randn(args.num, cfg.model.z_dim, generator=g)
        c = None if args.unconditional else torch.arange(args.num) % 4
        fake = tr.sample(z, c).float().clamp(-1, 1)
        fd = frechet_distance(real_feats, features(net, fake))
        match = None if c is None else class_match(net, fake, c)[0]
        rows.append((family, n_g, n_d, tr.cur_nimg / 1000, tr.cur_nimg / seconds, fd, match))
        cls = f"  class {match:.2f}" if match is not None else ""
        print(f"  {family:<10} G {n_g / 1e6:5.2f}M  D {n_d / 1e6:5.2f}M  {tr.cur_nimg / 1000:6.1f} kimg  "
              f"{tr.cur_nimg / seconds:6.0f} img/s  FD {fd:7.1f}{cls}", flush=True)  # fmt: skip
        tr.stream.close()
    print("\n| family | G params | D params | kimg | img/s | FD | class match |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for family, n_g, n_d, kimg, ips, fd, match in rows:
        cm = f"{match:.2f}" if match is not None else "-"
        print(f"| {family} | {n_g / 1e6:.2f}M | {n_d / 1e6:.2f}M | {kimg:.1f} | {ips:.0f} | {fd:.1f} | {cm} |")
    best = min(rows, key=lambda r: r[5])
    print(f"\nlowest FD at equal time: {best[0]}")
    return 0
