"""`distgan bench gpu`: the fast path measured on one GPU, in one command of at most 8 minutes, one table, JSON.

    distgan bench gpu [--json bench-gpu.json] [--check] [--peak-tflops T]
    distgan bench gpu --dry          # the same on the CPU with tiny sizes (the tests run it: it cannot rot)

For each of four networks at the size its family is used at:

    DCGAN-64        configs/smoke.yaml's DCGAN at 64x64, 64 channels (pytorch/examples' DCGAN), batch 128
    BigGAN-128      configs/biggan_cifar10.yaml at 128x128 (self-attention at 64x64), 5 D steps, batch 64
    R3GAN-32        configs/r3gan_cifar10.yaml (R1 and R2 every step), batch 64
    StyleGAN2-256   configs/stylegan2_ffhq256.yaml (lazy R1 and path length), batch 32

it times distgan's training step in five ways, after a warm-up, on in-memory images (common.bench_stream):

    plain fp32         the textbook eager PyTorch loop of the same networks (common.plain_loop): the reference
    fp32               distgan's step, fp32 (TF32 matmuls on GPUs that have them, as distgan sets)
    bf16               bf16 autocast
    bf16+cl            bf16 and train.channels_last
    bf16+cl+compile    bf16, channels_last and train.compile=default: distgan's fast path, all on

and reports img/s, its ratio to the plain loop, s/kimg, the peak memory of the cell (CUDA's allocator, reset per
cell; not measured on the CPU), the compile time (kept out of img/s) and the model FLOPs utilisation: FLOPs
per image (torch.utils.flop_counter over the steps of one regularisation period, penalties and their double
backwards included) x img/s, as a share of the GPU's dense bf16 peak (a table of known GPUs; --peak-tflops for
others).

Then for DCGAN-64: bf16 in a 1-rank NCCL process group, DDP-wrapped (DDP's own cost; training a world of one
skips DDP), and ZeRO-2 bf16 through DeepSpeed; and an fp16 run with R1 at every step from loss scale 2^16, which
shows each network's loss scaler skipping overflowing steps and lowering its scale, separately.

Targets (checked on a GPU only): StyleGAN2-256's fast path at least 2.5x the plain fp32 loop, and at most 6 s/kimg
on one H100-class GPU (NVlabs publish 12.5 s/kimg on an A100). `--check` exits 1 when one is missed. A cell
started after the time budget (--budget-s, 480) is skipped and says so.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distgan.bench.common import bench_data, bench_stream, plain_loop, timed

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Net:
    name: str
    config: str
    overrides: tuple[str, ...]


MODELS = (
    Net("DCGAN-64", "configs/smoke.yaml", ("model.resolution=64", "model.z_dim=100", "model.dcgan.g_width=64",
                                           "model.dcgan.d_width=64", "train.batch=128")),
    Net("BigGAN-128", "configs/biggan_cifar10.yaml", ("model.resolution=128", "model.num_classes=10",
                                                      "train.batch=64")),
    Net("R3GAN-32", "configs/r3gan_cifar10.yaml", ("model.num_classes=10", "train.batch=64", "train.batch_per_gpu=0")),
    Net("StyleGAN2-256", "configs/stylegan2_ffhq256.yaml", ("train.batch=32", "train.batch_per_gpu=0")),
)  # fmt: skip

# --dry: the same networks' code at CPU sizes (the cells' plumbing, not their speed). Compiling costs minutes per
# family on 2 cores, so --dry compiles DCGAN only (tests/unit/test_compile_families.py compiles every family).
DRY = {
    "DCGAN-64": ("model.resolution=32", "model.dcgan.g_width=8", "model.dcgan.d_width=8", "model.z_dim=16"),
    "BigGAN-128": ("model.resolution=32", "model.biggan.g_width=8", "model.biggan.d_width=8",
                   "model.biggan.shared_dim=8", "model.z_dim=16", "loss.n_critic=2"),
    "R3GAN-32": ("model.r3gan.width=16", "model.r3gan.width_base=256", "model.r3gan.group_size=8", "model.z_dim=16"),
    "StyleGAN2-256": ("model.resolution=32", "model.stylegan2.channel_base=256", "model.stylegan2.channel_max=16",
                      "model.stylegan2.map_layers=2", "model.stylegan2.w_dim=16", "model.z_dim=16",
                      "model.stylegan2.mbstd_group=4", "loss.d_reg_interval=2", "loss.g_reg_interval=2"),
}  # fmt: skip
DRY_COMMON = ("train.batch=4", "train.batch_per_gpu=0")

VARIANTS = {
    "fp32": ("fp32", False, "none"),
    "bf16": ("bf16", False, "none"),
    "bf16+cl": ("bf16", True, "none"),
    "bf16+cl+compile": ("bf16", True, "default"),
}
FAST = "bf16+cl+compile"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, by a part of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4),
                    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
                    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
                    ("RTX 3090", 71.0))  # fmt: skip

TARGET_FAST_RATIO = 2.5  # StyleGAN2-256 fast path / plain fp32 loop
TARGET_S_PER_KIMG = 6.0  # StyleGAN2-256 fast path, one H100-class GPU


def add_parser(sub) -> None:
    g = sub.add_parser("gpu", help="the fast path on one GPU: four families x precisions, layout, compile; one table")
    g.add_argument("--dry", action="store_true", help="run on the CPU at tiny sizes (what the tests do)")
    g.add_argument("--json", default="bench-gpu.json", help="where the figures go (default: ./bench-gpu.json)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 20; --dry 1)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps per cell (default 5; --dry 1)")
    g.add_argument("--budget-s", type=float, default=480.0, help="cells started after this many seconds are skipped")
    g.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (else looked up)")
    g.add_argument("--only", default=None, help="comma-separated model names (default: all four)")
    g.add_argument("--check", action="store_true", help="exit 1 when a target is missed (GPU only)")


def run(args) -> int:
    if args.dry:  # before torch is imported: it reads the variable once
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from distgan import distributed

    if not args.dry and not torch.cuda.is_available():
        print("distgan: error: bench gpu needs a GPU (torch sees none); --dry runs it on the CPU at tiny sizes",
              file=sys.stderr)  # fmt: skip
        return 2
    steps = args.steps or (1 if args.dry else 20)
    warmup = args.warmup or (1 if args.dry else 5)
    names = args.only.split(",") if args.only else [m.name for m in MODELS]
    unknown = sorted(set(names) - {m.name for m in MODELS})
    if unknown:
        print(f"distgan: error: --only: unknown model(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    start = time.monotonic()
    dist = distributed.setup("fp32", threads=0)
    device_name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (None if args.dry else _peak_tflops(device_name))
    print(f"bench gpu: {device_name}, torch {torch.__version__}, dense bf16 peak "
          f"{f'{peak:g} TFLOPS' if peak else 'unknown (--peak-tflops)'}, {warmup} warm-up + {steps} timed steps per "
          f"cell{' (--dry: CPU, tiny sizes)' if args.dry else ''}")  # fmt: skip

    def over_budget() -> bool:
        return time.monotonic() - start > args.budget_s

    report = {"device": device_name, "torch": torch.__version__, "peak_bf16_tflops": peak, "dry": args.dry,
              "steps": steps, "warmup": warmup, "models": {}, "distributed": {}, "fp16": None}  # fmt: skip
    header = (f"  {'model':<14} {'variant':<16} {'img/s':>9} {'x plain':>8} {'s/kimg':>8} {'peak GB':>8} "
              f"{'compile s':>9} {'MFU':>6}")  # fmt: skip
    print(header)
    for m in MODELS:
        if m.name not in names:
            continue
        cfg = _config(m, args.dry)
        rows = report["models"][m.name] = {"batch": cfg.train.batch, "resolution": cfg.model.resolution}
        flops = _flops_per_image(cfg, dist)
        rows["gflops_per_image"] = flops / 1e9
        for variant in ("plain fp32", *VARIANTS):
            if over_budget():
                rows[variant] = {"skipped": "over the time budget"}
            elif args.dry and variant == FAST and m.name != "DCGAN-64":
                rows[variant] = {"skipped": "--dry compiles DCGAN only"}
            else:
                rows[variant] = _cell(cfg, dist, variant, steps, warmup)
            _print_row(m.name, variant, rows[variant], rows.get("plain fp32"), flops, peak)

    if "DCGAN-64" in names:
        cfg = _config(MODELS[0], args.dry)
        group = "NCCL" if dist.device.type == "cuda" else "gloo"
        for label, strategy, alone in ((f"bf16 DDP, 1-rank {group}", "ddp", True), ("ZeRO-2 bf16", "zero2", False)):
            if over_budget():
                report["distributed"][label] = {"skipped": "over the time budget"}
                continue
            r = report["distributed"][label] = _cell(cfg, dist, "bf16", steps, warmup, strategy, alone)
            print(
                f"  DCGAN-64 {label:<22} {r['img_per_sec']:9.1f} img/s   peak {_gb(r['peak_gb'])} GB"
                f"   (bf16 without DDP: {report['models']['DCGAN-64']['bf16'].get('img_per_sec', float('nan')):.1f})"
            )
        if not over_budget():
            report["fp16"] = r16 = _fp16_scalers(cfg, dist, steps=16 if args.dry else 40)
            print(f"  fp16 (DCGAN-64, R1 every step, {r16['steps']} steps): " + "; ".join(
                f"{n} loss scale {s['first']:g} -> {s['last']:g}, {s['skipped']} step(s) skipped"
                for n, s in r16["nets"].items()))  # fmt: skip

    ok = _targets(report, args.dry)
    dist.close()
    Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    print(f"  figures: {args.json}   ({time.monotonic() - start:.0f} s)")
    return 1 if args.check and not ok else 0


# ---------------------------------------------------------------------- the cells


def _config(m: Net, dry: bool):
    from distgan.config import load_config

    overrides = [*m.overrides, *((*DRY[m.name], *DRY_COMMON) if dry else ())]
    cfg = load_config(REPO / m.config, overrides)
    cfg.train.progress = "none"
    return cfg.validate()


def _cell(cfg, dist, variant: str, steps: int, warmup: int, strategy: str = "ddp", alone: bool = False) -> dict:
    """img/s (median of 3 rounds of `steps`), peak memory and compile time of one way of training `cfg`."""
    import torch

    from distgan.distributed.compiled import CLOCK
    from distgan.training import Trainer

    cuda = dist.device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dist.device)
    if variant == "plain fp32":
        images, labels = bench_data(cfg)
        fn = plain_loop(cfg, images, dist.device, labels)
    else:
        precision, channels_last, mode = VARIANTS[variant]
        c = copy.deepcopy(cfg)
        c.train.precision, c.train.channels_last, c.train.compile, c.dist.strategy = (precision, channels_last,
                                                                                      mode, strategy)  # fmt: skip
        d = dataclasses.replace(dist.configured(precision, strategy), ddp_alone=alone)
        trainer = Trainer(c, d, bench_stream(c))

        def fn():
            trainer.train_step(*trainer.draw())

    count0, sec0 = CLOCK.read()
    for _ in range(warmup):
        fn()
    compile_s = CLOCK.read()[1] - sec0
    rounds = [timed(fn, steps, dist.device) for _ in range(3)]
    out = {"img_per_sec": cfg.train.batch * cfg.loss.n_critic / statistics.median(rounds),
           "peak_gb": torch.cuda.max_memory_allocated(dist.device) / 2**30 if cuda else None,
           "compile_s": compile_s, "compilations": CLOCK.read()[0] - count0}  # fmt: skip
    del fn
    return out


def _flops_per_image(cfg, dist) -> float:
    """Model FLOPs per real image of distgan's fp32 step, averaged over one regularisation period (every phase,
    the lazy penalties at their intervals): torch.utils.flop_counter's formulas, summed over every aten op the
    steps dispatch. (Its FlopCounterMode also tracks modules with backward hooks, which autograd.grad on a leaf
    input, R1's, refuses; the dispatch-level sum is the same count.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    from distgan.training import Trainer

    class Count(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
            return out

    c = copy.deepcopy(cfg)
    c.train.precision, c.train.compile = "fp32", "none"
    lo = c.loss
    period = max(lo.d_reg_interval if lo.r1_gamma > 0 or lo.r2_gamma > 0 else 1,
                 lo.g_reg_interval if lo.pl_weight > 0 else 1)  # fmt: skip
    trainer = Trainer(c, dist.configured("fp32", "ddp"), bench_stream(c))
    with Count() as counter:
        for _ in range(period):
            trainer.train_step(*trainer.draw())
    return counter.flops / (period * c.train.batch * lo.n_critic)


def _fp16_scalers(cfg, dist, steps: int) -> dict:
    """fp16 with R1 at every step: each network's loss scale and skipped steps, per step."""
    from distgan.training import Trainer

    c = copy.deepcopy(cfg)
    c.train.precision, c.loss.r1_gamma, c.loss.d_reg_interval = "fp16", 1.0, 1
    trainer = Trainer(c, dist.configured("fp16", "ddp"), bench_stream(c))
    nets = {name: {"scales": [float(net.scaler.get_scale())], "skipped": 0} for name, net in trainer.nets.items()}
    for _ in range(steps):
        trainer.train_step(*trainer.draw())
        for name, net in trainer.nets.items():
            nets[name]["scales"].append(float(net.scaler.get_scale()))
            nets[name]["skipped"] += int(trainer.stats.last(f"{name}/skipped").item())
    for s in nets.values():
        s["first"], s["last"] = s["scales"][0], s["scales"][-1]
    return {"steps": steps, "nets": nets}


# ---------------------------------------------------------------------- the table


def _peak_tflops(device_name: str) -> float | None:
    return next((t for part, t in PEAK_BF16_TFLOPS if part in device_name), None)


def _gb(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _print_row(model: str, variant: str, r: dict, plain: dict | None, flops: float, peak) -> None:
    if "skipped" in r:
        print(f"  {model:<14} {variant:<16} skipped: {r['skipped']}")
        return
    ips = r["img_per_sec"]
    ratio = ips / plain["img_per_sec"] if plain and "img_per_sec" in plain else float("nan")
    r["x_plain"], r["s_per_kimg"] = ratio, 1000 / ips
    r["mfu"] = flops * ips / (peak * 1e12) if peak else None
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"  {model:<14} {variant:<16} {ips:9.1f} {ratio:7.2f}x {1000 / ips:8.2f} {_gb(r['peak_gb']):>8} "
          f"{r['compile_s']:9.1f} {mfu:>6}")  # fmt: skip


def _targets(report: dict, dry: bool) -> bool:
    sg = report["models"].get("StyleGAN2-256", {})
    fast = sg.get(FAST, {})
    if dry or "img_per_sec" not in fast:
        why = "--dry (a CPU)" if dry else "StyleGAN2-256's fast path was not measured"
        print(f"  targets: not checked ({why})")
        report["targets"] = None
        return True
    ratio, s_kimg = fast["x_plain"], fast["s_per_kimg"]
    met = {"fast_vs_plain": ratio >= TARGET_FAST_RATIO, "s_per_kimg": s_kimg <= TARGET_S_PER_KIMG}
    report["targets"] = {"fast_vs_plain": ratio, "s_per_kimg": s_kimg, "met": met}
    print(f"  target: StyleGAN2-256 {FAST} / plain fp32 = {ratio:.2f}x (>= {TARGET_FAST_RATIO}x: "
          f"{'met' if met['fast_vs_plain'] else 'MISSED'}); {s_kimg:.2f} s/kimg (<= {TARGET_S_PER_KIMG}: "
          f"{'met' if met['s_per_kimg'] else 'MISSED'})")  # fmt: skip
    return all(met.values())
