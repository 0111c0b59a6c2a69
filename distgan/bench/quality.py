"""`distgan bench quality`: every model family against DCGAN on the built-in shapes, at equal CPU wall-clock.

Each family trains class-conditionally on 2048 in-memory shapes (32x32, 4 classes) for the same number of seconds,
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
COMMON = ["model.resolution=32", "model.z_dim=64", "data.source=shapes", "data.num_images=2048",
          "train.batch=64", "train.total_kimg=100000", "train.ema_kimg=5", "train.progress=none"]  # fmt: skip


# --limited: augmentation on little data (distgan/augment), DCGAN's preset at equal kimg, in DCGAN's own recipe
# (no R1). With R1 (gamma 1 every 4 steps) D memorised neither 500 nor 100 shapes harmfully in our runs: without
# augmentation DCGAN on 100 shapes reached FD 63 and 58 at 150 kimg, better than on the full set at 60 kimg, so
# augmentation had nothing to fix (docs/augmentation.md has the figures). ADA's ada_kimg (500 in the paper, for
# runs of thousands of kimg) is scaled to a run of tens: p can cross [0, 1] within 10 kimg; its target is the one
# calibrated for DCGAN's D in tests/integration/test_augment_run.py (0.6 is StyleGAN2's).
LIMITED: list[str] = []
AUGMENTS = {
    "none": [],
    "diffaug": ["augment.kind=diffaug", "augment.policy=color,translation,cutout"],
    "ada": ["augment.kind=ada", "augment.ops=bgc", "augment.ada_kimg=10", "augment.ada_target=0.85"],
}


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="every family vs DCGAN on the built-in shapes at equal CPU time; "
                                       "or, with --limited N, augmentation on N images")  # fmt: skip
    p.add_argument("--families", default=",".join(PRESETS), help="comma-separated (default: all)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time per family (default 3)")
    p.add_argument("--unconditional", action="store_true", help="train without labels (no class figure)")
    p.add_argument("--num", type=int, default=2000, help="generated images measured per family (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--limited",
        type=int,
        default=0,
        metavar="N",
        help="instead: DCGAN on only N shapes, without augmentation, with DiffAugment and with ADA",
    )
    p.add_argument("--kimg", type=float, default=60.0, help="--limited: kimg per run (default 60)")
    p.add_argument("--seeds", type=int, default=2, help="--limited: training seeds per kind (default 2)")
    p.add_argument("--augments", default=",".join(AUGMENTS), help="--limited: comma-separated (default: all)")


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
    if args.limited:
        return run_limited(args)
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


def run_limited(args) -> int:
    """Augmentation on little data: DCGAN on `--limited` shapes for `--kimg` each, with each of AUGMENTS and
    `--seeds` training seeds; the FD is against shapes from the whole distribution (the N training images are a
    sample of it), so a D that memorises its N reals and a G that copies them both show."""
    import statistics

    import torch

    from distgan import distributed
    from distgan.bench.common import bench_stream
    from distgan.config import load_config
    from distgan.data import shapes
    from distgan.metrics.shapes_fd import features, frechet_distance, to_float, train_classifier
    from distgan.training import Trainer

    kinds = [k.strip() for k in args.augments.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in AUGMENTS]
    if unknown or args.limited < 1 or args.seeds < 1:
        what = f"--augments: unknown {', '.join(unknown)} (choose from {', '.join(AUGMENTS)})" if unknown else (
            "--limited and --seeds must be >= 1")  # fmt: skip
        print(f"distgan: error: {what}", file=sys.stderr)
        return 2
    net, acc = train_classifier()
    reals, _ = shapes.generate(args.num, seed=4321, resolution=32)
    real_feats = features(net, to_float(reals))
    print(f"shape classifier: {acc:.1%} held-out accuracy; DCGAN on {args.limited} shapes, {args.kimg:g} kimg per "
          f"run, {args.seeds} seed(s) per kind, {torch.get_num_threads()} threads")  # fmt: skip
    dist = distributed.setup("fp32", threads=0)
    fds: dict[str, list[float]] = {}
    for kind in kinds:
        for seed in range(args.seed, args.seed + args.seeds):
            over = [*COMMON, *PRESETS["dcgan"], *LIMITED, f"data.num_images={args.limited}", f"train.seed={seed}",
                    *AUGMENTS[kind]]  # fmt: skip
            cfg = load_config(None, over).validate()
            tr = Trainer(cfg, dist.configured("fp32", "ddp"), bench_stream(cfg, num=args.limited))
            start = time.perf_counter()
            while tr.cur_nimg < args.kimg * 1000:
                tr.train_step(*tr.draw())
            seconds = time.perf_counter() - start
            tr.sync_buffers()
            z = torch.randn(args.num, cfg.model.z_dim, generator=torch.Generator().manual_seed(123))
            fd = frechet_distance(real_feats, features(net, tr.sample(z, None).float().clamp(-1, 1)))
            fds.setdefault(kind, []).append(fd)
            p = f"  p {tr.augment.p.item():.2f}" if tr.augment.p is not None else ""
            print(f"  {kind:<8} seed {seed}  {tr.cur_nimg / 1000:5.1f} kimg  {tr.cur_nimg / seconds:5.0f} img/s  "
                  f"FD {fd:7.1f}{p}", flush=True)  # fmt: skip
            tr.stream.close()
    print("\n| augmentation | FD per seed | mean | spread (max - min) |")
    print("| --- | --- | --- | --- |")
    for kind, values in fds.items():
        per = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {kind} | {per} | {statistics.mean(values):.1f} | {max(values) - min(values):.1f} |")
    if "none" in fds and len(fds) > 1:
        spread = max(max(v) - min(v) for v in fds.values())
        best = min((k for k in fds if k != "none"), key=lambda k: statistics.mean(fds[k]))
        gain = statistics.mean(fds["none"]) - statistics.mean(fds[best])
        verdict = "more" if gain > spread else "not more"
        print(f"\nbest augmentation: {best}, FD {gain:.1f} below none: {verdict} than the largest spread between "
              f"seeds ({spread:.1f})")  # fmt: skip
    return 0
