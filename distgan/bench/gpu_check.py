"""`distgan gpu-check` (`make gpu-check`): the first thing to run on a machine with a GPU, in a few minutes.

distgan's tests run on CPUs (CI has no GPU); what only a GPU can show is checked here, in one command that ends
with one table and exits 1 if any row failed:

    fp32 / bf16 / fp16     a real training run each (`python -m distgan.train`, R1 and path length on), to a
                           verified checkpoint with finite losses; fp16: both networks' loss scalers logged
    stop + resume          a deterministic run stopped by SIGUSR1 mid-way (exit 3) and resumed ends bit for bit
                           where the uninterrupted run ends (networks, G_ema, optimizers), CUDA RNG state saved
    zero2 bf16             DeepSpeed ZeRO-2 on the GPU, stopped at half-way and resumed through DeepSpeed's files
    torchrun               `torchrun --nproc_per_node=1`: the launcher seen, the GPU used
    generate               `distgan generate` on the GPU: a grid from the trained generator
    host syncs / step      steps of fp32, bf16 and fp16 with penalties under CUDA's sync debug mode and
                           distgan.host_reads: 0 expected (a GPU step must not wait for the host)
    img/s                  fp32, bf16 and bf16 + channels_last at two batch sizes, after a warm-up (no target)

`--dry` runs the same on the CPU with tiny sizes (CUDA_VISIBLE_DEVICES hidden); the test suite does, so this
command cannot rot between the rare occasions a GPU is there. Results also go to `--json` (default
OUT/gpu-check.json). A 2-process GPU run needs two GPUs: `launch/torchrun.sh` on such a machine is the next step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PENALTIES = ["loss.r1_gamma=1", "loss.pl_weight=2"]


@dataclass
class Sizes:
    config: str
    run: list[str]  # overrides of every training run
    steps: int  # steps of a training run (its total_kimg)
    batch: int
    speed_batches: tuple[int, int]
    speed_steps: int
    warmup: int
    reg_interval: int  # of R1 and path length (lazy above 1)


GPU = Sizes("configs/smoke.yaml", ["model.resolution=64", "model.z_dim=100", "model.dcgan.g_width=64",
                                   "model.dcgan.d_width=64", "data.num_images=4096", "train.sample_num=64"],
            steps=240, batch=64, speed_batches=(64, 256),
            speed_steps=40, warmup=10, reg_interval=4)  # fmt: skip
# (fp16's scaler starts at 2^16 and halves at each overflow: R1 every step, so some of 16 steps run finite)
DRY = Sizes("configs/smoke.yaml", [], steps=16, batch=16, speed_batches=(8, 16), speed_steps=2, warmup=1,
            reg_interval=1)  # fmt: skip


@dataclass
class Row:
    check: str
    ok: bool
    figure: str
    seconds: float
    detail: list[str] = field(default_factory=list)


class Check:
    def __init__(self, out: Path, sizes: Sizes, dry: bool):
        self.out, self.sizes, self.dry = out, sizes, dry
        self.device = "cpu" if dry else "cuda"
        self.rows: list[Row] = []

    # ------------------------------------------------------------------ helpers
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DISTGAN_FAULTS"))}
        env.update(WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra)
        return env

    def overrides(self, steps: int, *more: str) -> list[str]:
        s = self.sizes
        nimg = steps * s.batch
        every = max(s.batch, nimg // 4) / 1000
        return [*s.run, f"train.batch={s.batch}", f"train.total_kimg={nimg / 1000}", f"train.log_every_kimg={every}",
                f"train.ckpt_every_kimg={every * 2}", f"train.sample_every_kimg={every * 2}", "log.tracker=console",
                "train.progress=log", *more]  # fmt: skip

    def penalties(self, interval: int | None = None) -> list[str]:
        n = interval or self.sizes.reg_interval
        return [*PENALTIES, f"loss.d_reg_interval={n}", f"loss.g_reg_interval={n}"]

    def train(self, run_dir: Path, steps: int, *more: str, launcher=(), env=None) -> subprocess.CompletedProcess:
        cmd = [*launcher] if launcher else [sys.executable]
        cmd += ["-m", "distgan.train", "--config", str(REPO / self.sizes.config), "--run-dir", str(run_dir)]
        cmd += self.overrides(steps, *more)
        return subprocess.run(cmd, cwd=self.out, env=env or self.env(), capture_output=True, text=True, timeout=600)

    def row(self, name: str, fn) -> None:
        start = time.time()
        try:
            ok, figure, detail = fn()
        except Exception as e:  # noqa: BLE001 (a check that crashes is a failed row, the others still run)
            ok, figure, detail = False, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}", []
        row = Row(name, ok, figure, time.time() - start, detail)
        self.rows.append(row)
        print(f"  {'ok  ' if ok else 'FAIL'}  {name:<22} {figure}  ({row.seconds:.1f} s)", flush=True)
        for line in detail if not ok else []:
            print(f"        {line}", flush=True)

    @staticmethod
    def failed(p: subprocess.CompletedProcess, what: str):
        tail = (p.stdout + p.stderr).strip().splitlines()[-12:]
        return False, f"{what}: exit code {p.returncode}", tail

    # ------------------------------------------------------------------ checks
    def precision_run(self, precision: str):
        from distgan.checkpoint import CheckpointManager, verify

        run_dir = self.out / f"train-{precision}"
        p = self.train(run_dir, self.sizes.steps, f"train.precision={precision}", *self.penalties())
        if p.returncode != 0:
            return self.failed(p, "training")
        if f"device={self.device}" not in p.stdout:
            return False, f"did not run on {self.device}", p.stdout.splitlines()[:3]
        latest = CheckpointManager(run_dir).latest()
        if latest is None or verify(latest) is not None:
            return False, "no verified checkpoint", []
        records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
        last = {k: v for record in records for k, v in record.items()}  # the latest of each (penalties are lazy)
        losses = {k: last.get(k) for k in ("Loss/D/main", "Loss/G/main", "Loss/D/r1", "Loss/G/pl")}
        if not all(v is not None and math.isfinite(v) for v in losses.values()):
            return False, f"losses missing or not finite: {losses}", []
        figure = (
            f"{last['nimg'] / 1000:.1f} kimg, {last['Timing/img_per_sec']:.0f} img/s, D {losses['Loss/D/main']:.3f}"
        )
        if precision == "fp16":
            scales = [last.get("D/loss_scale"), last.get("G/loss_scale")]
            if not all(s and math.isfinite(s) for s in scales):
                return False, f"fp16 loss scalers not logged: {scales}", []
            figure += f", scales D {scales[0]:.3g} G {scales[1]:.3g}"
        return True, figure, []

    def stop_and_resume(self):
        import torch

        from distgan.checkpoint import CheckpointManager, load_file

        steps, deterministic = self.sizes.steps, "train.deterministic=true"
        straight = self.train(self.out / "straight", steps, deterministic)
        if straight.returncode != 0:
            return self.failed(straight, "the uninterrupted run")
        run_dir = self.out / "stopped"
        stop_at = steps // 2 + 1
        stopped = self.train(run_dir, steps, deterministic, env=self.env(DISTGAN_FAULTS=f"usr1:step={stop_at}"))
        if stopped.returncode != 3:
            return self.failed(stopped, "the stop (SIGUSR1) should exit 3")
        resumed = self.train(run_dir, steps, deterministic)
        if resumed.returncode != 0 or "resumed from" not in resumed.stdout:
            return self.failed(resumed, "the resume")
        a, b = CheckpointManager(self.out / "straight").latest(), CheckpointManager(run_dir).latest()
        sa, sb = load_file(a, "state.pt"), load_file(b, "state.pt")
        differ = [k for k in ("G", "D", "G_ema") if not _equal(sa[k], sb[k])]  # (G, D: module, optimizer, scaler)
        rng = load_file(b, "rank-00000.pt")["rng"]
        if differ:
            return False, f"resumed run differs from the uninterrupted one in {differ}", []
        if not self.dry and not isinstance(rng.get("cuda"), torch.Tensor):
            return False, "the checkpoint holds no CUDA RNG state", []
        return True, f"stopped at step {stop_at} of {steps}, resumed: equal bit for bit", []

    def zero2(self):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return False, "deepspeed not installed (pip install -e '.[deepspeed]')", []
        run_dir, steps = self.out / "zero2", self.sizes.steps
        half = self.train(run_dir, steps // 2, "dist.strategy=zero2", "train.precision=bf16")
        if half.returncode != 0:
            return self.failed(half, "ZeRO-2 bf16")
        rest = self.train(run_dir, steps, "dist.strategy=zero2", "train.precision=bf16")
        if rest.returncode != 0 or "resumed from" not in rest.stdout:
            return self.failed(rest, "ZeRO-2 resume")
        return True, f"{steps} steps, resumed at {steps // 2} through DeepSpeed's files", []

    def torchrun(self):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        p = self.train(self.out / "torchrun", max(2, self.sizes.steps // 4), launcher=launcher)
        if p.returncode != 0:
            return self.failed(p, "torchrun")
        line = next((x for x in p.stdout.splitlines() if "launcher=" in x), "")
        want = f"device={self.device}"
        if "launcher=torchrun" not in line or want not in line:
            return False, f"expected launcher=torchrun and {want}: {line}", []
        return True, line.split(": ", 1)[-1], []

    def generate(self):
        grid = self.out / "grid.png"
        cmd = [sys.executable, "-m", "distgan.cli", "generate", "--run", str(self.out / "train-fp32"), "--num", "16",
               "--out", str(grid), "--device", self.device]  # fmt: skip
        p = subprocess.run(cmd, cwd=self.out, env=self.env(), capture_output=True, text=True, timeout=300)
        if p.returncode != 0 or not grid.is_file():
            return self.failed(p, "generate")
        return True, f"{grid} ({grid.stat().st_size} bytes)", []

    def host_syncs(self):
        import torch

        from distgan.host_reads import HostReads

        per_precision = {}
        detail = []
        for precision in ("fp32", "bf16", "fp16"):
            tr = self._trainer(self.sizes.batch, f"train.precision={precision}", *self.penalties(2))
            for _ in range(3):
                tr.train_step(*tr.draw())
            cuda_syncs, reads = 0, []
            for _ in range(4):
                inputs = tr.draw()
                with warnings.catch_warnings(record=True) as caught, HostReads() as r:
                    warnings.simplefilter("always")
                    if tr.device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        tr.train_step(*inputs)
                    finally:
                        if tr.device.type == "cuda":
                            torch.cuda.set_sync_debug_mode("default")
                synced = [w for w in caught if "synchroniz" in str(w.message)]
                cuda_syncs += len(synced)
                reads += r.where
                detail += [f"{precision}: {w.filename}:{w.lineno} {w.message}" for w in synced[:3]]
            detail += [f"{precision}: {w}" for w in reads[:3]]
            per_precision[precision] = (cuda_syncs + len(reads)) / 4
        figure = ", ".join(f"{k} {v:g}" for k, v in per_precision.items())
        return all(v == 0 for v in per_precision.values()), f"per step: {figure}", detail

    def speed(self):
        from distgan.bench.common import timed

        figures = []
        variants = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"],
                    "bf16+channels_last": ["train.precision=bf16", "train.channels_last=true"]}  # fmt: skip
        for name, overrides in variants.items():
            for batch in self.sizes.speed_batches:
                tr = self._trainer(batch, *overrides)
                for _ in range(self.sizes.warmup):
                    tr.train_step(*tr.draw())
                sec = timed(lambda tr=tr: tr.train_step(*tr.draw()), self.sizes.speed_steps, tr.device)
                figures.append(f"{name} b{batch} {batch / sec:.0f}")
        return True, "img/s: " + ", ".join(figures), []

    def _trainer(self, batch: int, *overrides: str):
        from distgan import distributed
        from distgan.config import load_config
        from distgan.data import make_stream
        from distgan.data.prefetch import Prefetcher
        from distgan.training import Trainer

        cfg = load_config(REPO / self.sizes.config, [*self.sizes.run, f"train.batch={batch}", *overrides])
        dist = distributed.setup(cfg.train.precision)
        cfg.validate(dist.world_size)
        # The data path of a real run: pinned batches, copied to the device a step ahead.
        return Trainer(cfg, dist, Prefetcher(make_stream(cfg, 0, 1, device=dist.device), dist.device))

    # ------------------------------------------------------------------ all
    def run(self) -> bool:
        for precision in ("fp32", "bf16", "fp16"):
            self.row(f"train {precision} +R1+PL", lambda p=precision: self.precision_run(p))
        self.row("stop + resume", self.stop_and_resume)
        self.row("zero2 bf16", self.zero2)
        self.row("torchrun 1 process", self.torchrun)
        self.row("generate", self.generate)
        self.row("host syncs / step", self.host_syncs)
        self.row("img/s", self.speed)
        return all(r.ok for r in self.rows)


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distgan gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="the same checks on the CPU with tiny sizes (for the tests)")
    p.add_argument("--out", default="runs/gpu-check", help="scratch folder (emptied first)")
    p.add_argument("--json", help="where to write the results (default OUT/gpu-check.json)")
    args = p.parse_args(argv)
    if args.dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the in-process checks too
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("distgan: error: no CUDA GPU visible (torch.cuda.is_available() is False); --dry runs the checks on "
              "the CPU", file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    device = "cpu (dry run)" if args.dry else torch.cuda.get_device_name(0)
    print(f"distgan gpu-check on {device}, torch {torch.__version__}; scratch folder {out}", flush=True)
    check = Check(out, DRY if args.dry else GPU, args.dry)
    start = time.time()
    ok = check.run()
    width = max(len(r.check) for r in check.rows)
    print(f"\n{'check':<{width}}  result  figure")
    for r in check.rows:
        print(f"{r.check:<{width}}  {'ok' if r.ok else 'FAIL':<6}  {r.figure}")
    failed = [r.check for r in check.rows if not r.ok]
    print(f"\n{len(check.rows) - len(failed)} of {len(check.rows)} ok in {time.time() - start:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    path = Path(args.json) if args.json else out / "gpu-check.json"
    record = {"device": device, "torch": torch.__version__, "dry": args.dry, "ok": ok,
              "rows": [r.__dict__ for r in check.rows]}  # fmt: skip
    path.write_text(json.dumps(record, indent=1))
    print(f"results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
