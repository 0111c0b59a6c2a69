"""The run configuration: a typed dataclass tree, YAML files of values, dotted command-line overrides.

    cfg = load_config("configs/smoke.yaml", ["train.total_kimg=50", "optim.lr_g=1e-4"])
    cfg.validate(world_size=2)  # raises ConfigError: one line naming every problem

Every field has a type and a one-line doc (`distgan train --help-config` lists them). YAML files under
configs/ hold only values that differ from the defaults below. Unknown keys are refused together, each with the
nearest valid name. This module imports no torch: a bad config fails in well under a second, before any
process group is started.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distgan.data.catalog import DATASET_CHANNELS
from distgan.errors import ConfigError
from distgan.models import FAMILIES
from distgan.schedule import ScheduleConfig
from distgan.schedule import problems as schedule_problems


def _f(default: Any, doc: str):
    """A dataclass field with a doc string (shown by `--help-config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """The networks: the fields every family shares, and the family's own section, model.<family>.* (its options
    dataclass in distgan/models/__init__.py). A key of another family's section is an error naming that family."""

    family: str = _f("dcgan", "model family (distgan/models/__init__.py lists them; each has a section model.<family>)")
    resolution: int = _f(32, "image size in pixels (square); each family lists the sizes it makes")
    channels: int = _f(3, "image channels (1 grey, 3 RGB); must match the dataset")
    z_dim: int = _f(100, "latent size")
    num_classes: int | Literal["auto"] = _f(
        0, "class-conditional on this many classes (0 = unconditional; auto = the data's class count)"
    )
    options: Any = field(default=None, metadata={"family_section": True})  # model.<family>.*

    def __post_init__(self):
        if self.options is None and self.family in FAMILIES:
            self.options = FAMILIES[self.family].options()

    @property
    def conditional(self) -> bool:
        return self.num_classes not in (0, "auto")


@dataclass
class LossConfig:
    kind: Literal["nonsaturating", "hinge", "wgan", "lsgan", "rpgan"] = _f(
        "nonsaturating", "adversarial loss (rpgan: relativistic pairing, R3GAN's; each fake paired with a real)"
    )
    r1_gamma: float | Literal["auto"] = _f(
        0.0,
        "R1 penalty weight on real images (0 = off; auto = 0.0002 x model.resolution^2 / train.batch, the heuristic "
        "of StyleGAN2-ADA's automatic config: the run's config records the number)",
    )
    r2_gamma: float = _f(0.0, "R2 penalty weight on generated images (0 = off; R3GAN: the same as r1_gamma)")
    gp_weight: float = _f(0.0, "WGAN-GP gradient penalty weight on interpolates (0 = off; 10 for WGAN-GP)")
    d_reg_interval: int = _f(16, "run D's penalties every N steps (lazy; lr/betas rescaled); 1 = in the main step")
    pl_weight: float = _f(0.0, "G path-length penalty weight (0 = off)")
    pl_decay: float = _f(0.01, "decay of the running mean path length")
    g_reg_interval: int = _f(4, "run G's penalty every N steps (lazy); 1 = in the main step")
    n_critic: int = _f(1, "D steps per G step")


@dataclass
class OptimConfig:
    lr_g: float = _f(2e-4, "Adam learning rate of G")
    lr_d: float = _f(2e-4, "Adam learning rate of D")
    beta1: float = _f(0.5, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")


@dataclass
class DataConfig:
    source: Literal["shards", "shapes", "mnist", "fashion_mnist", "cifar10"] = _f(
        "shapes",
        "shards: stream data.shards (made by `distgan prepare`); or hold in memory the built-in procedural shapes "
        "or a torchvision dataset",
    )
    shards: str = _f(
        "",
        "source=shards: a folder or manifest.json made by `distgan prepare`, or shard paths/URLs "
        "(brace notation, comma-separated; http(s), s3:// etc. through fsspec)",
    )
    workers: int = _f(2, "source=shards: loader processes per rank (0 = read in the training process)")
    shuffle_buffer: int = _f(1000, "source=shards: samples shuffled together (per loader worker)")
    max_bad_fraction: float = _f(0.01, "source=shards: stop when more than this fraction of samples is unreadable")
    allow_pipe: bool = _f(False, "source=shards: allow `pipe:` shard URLs (they run shell commands)")
    root: str = _f("data", "where torchvision datasets are found or downloaded to")
    download: bool = _f(True, "let torchvision download a missing dataset")
    num_images: int = _f(20000, "shapes: number of images to generate")
    seed: int = _f(0, "shapes: generation seed (the data, not the training run)")
    xflip: bool = _f(False, "augment with random horizontal flips")


@dataclass
class TrainConfig:
    batch: int = _f(64, "global batch: real images per D step, summed over all processes")
    batch_per_gpu: int = _f(
        0,
        "most images one process (GPU) runs per forward; when its share of train.batch is larger, gradients "
        "accumulate over micro-batches of this size (0 = the whole share at once)",
    )
    total_kimg: float = _f(300.0, "train until this many thousand real images have been shown to D")
    log_every_kimg: float = _f(4.0, "reduce and log stats every N kimg")
    sample_every_kimg: float = _f(20.0, "write a sample grid from fixed latents every N kimg")
    ckpt_every_kimg: float = _f(50.0, "write a checkpoint every N kimg (and at the end)")
    keep_ckpts: int = _f(3, "checkpoints kept in the run dir (older ones deleted after a new one is committed)")
    max_consecutive_skips: int = _f(
        20, "steps in a row skipped for non-finite losses/gradients before rolling back to the last checkpoint"
    )
    max_rollbacks: int = _f(3, "rollbacks allowed; one more need to roll back stops the run (exit code 4)")
    hang_timeout_s: float = _f(
        600.0, "a rank without progress for this long is named and the job stops (exit code 5); 0 = never"
    )
    seed: int = _f(0, "training seed: initial weights, latents and data order derive from it")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto",
        "auto: what `accelerate launch --mixed_precision` asked for, else bf16 on a GPU with bfloat16 arithmetic, "
        "else fp32 (CPUs); fp32; bf16 autocast; or fp16 autocast with one loss scaler per network",
    )
    channels_last: bool = _f(
        False,
        "G, D and the batches in channels-last memory (NHWC): the layout GPU tensor cores convolve fastest; "
        "the same results up to rounding (not applied under ZeRO)",
    )
    compile: Literal["none", "default", "max-autotune"] = _f(
        "none",
        "torch.compile G's and D's forwards of the main phases (default, or max-autotune: longer to compile, "
        "faster kernels); the penalties' forwards stay eager. Compile time is logged and kept out of img/s",
    )
    ema_kimg: float = _f(10.0, "half-life of G's exponential moving average, in kimg (0 = no averaging)")
    ema_rampup: float = _f(0.05, "early in training cap the half-life at this fraction of images seen (0 = off)")
    reuse_fake: bool = _f(True, "G step reuses the last D step's fakes (saves one G forward per step)")
    sample_num: int = _f(64, "images in a sample grid")
    threads: int = _f(0, "torch threads per process (0 = CPU cores / local processes)")
    deterministic: bool = _f(False, "use deterministic kernels (slower; for exact reproduction)")
    progress: Literal["auto", "bar", "log", "none"] = _f(
        "auto", "rank 0 console: progress bar, one line per log interval, or nothing (auto: bar on a terminal)"
    )


@dataclass
class DistConfig:
    strategy: Literal["auto", "ddp", "zero1", "zero2", "zero3"] = _f(
        "auto",
        "how G and D are spread over processes: ddp (each rank holds everything, gradients all-reduced), "
        "zero1/zero2 (DeepSpeed engines; optimizer state, and with zero2 gradients, partitioned over ranks); "
        "auto: zeroN under an `accelerate launch` DeepSpeed config of stage N, else ddp",
    )


@dataclass
class LogConfig:
    tracker: Literal["none", "console", "wandb"] = _f("console", "where stats go besides the run dir's stats.jsonl")
    wandb_project: str = _f("distgan", "W&B project")
    wandb_entity: str = _f("", "W&B entity (team or user); empty = your default")
    wandb_mode: Literal["auto", "online", "offline"] = _f(
        "auto", "auto: online when an API key is configured, else offline"
    )


@dataclass
class EvalConfig:
    """Metrics inside the training loop (every rank pauses for them); `distgan eval --watch` never pauses it.

    Rank 0 computes the metrics while the others wait without a heartbeat: that part must stay well within
    train.hang_timeout_s (seconds on a GPU; on a CPU keep eval.num to a few thousand).
    """

    every_kimg: float = _f(0.0, "evaluate G_ema every N kimg and at the end (0 = off)")
    metrics: str = _f("fid", "comma-separated: fid, kid, is, pr (precision/recall)")
    num: int = _f(10000, "generated images per evaluation (and real images, at most all)")
    features: str = _f("inception", "inception (FID Inception-v3) or torchscript:PATH (a TorchScript file you trust)")
    inception_weights: str = _f("", "a local copy of the FID Inception weights (empty: fetched once, hub cache)")
    real: str = _f("", "reference images: a shards folder/manifest or an image folder (empty: the training data)")
    batch: int = _f(64, "images per forward, per rank")
    seed: int = _f(0, "latents and real subset of the evaluations")
    cache: str = _f("", "real-features cache folder (empty: $DISTGAN_CACHE or ~/.cache/distgan/stats)")


@dataclass
class AugmentConfig:
    """Augmentation of every image D sees, reals and fakes, in every phase (distgan/augment): for small datasets,
    where D otherwise memorises the reals and training collapses. Never applied to samples, exports or metrics."""

    kind: Literal["none", "diffaug", "ada"] = _f(
        "none", "none, diffaug (DiffAugment: every image, fixed policy) or ada (adaptive: each op with probability p)"
    )
    policy: str = _f("color,translation,cutout", "diffaug: comma-separated: color, translation, cutout")
    ops: str = _f("bgc", "ada: an op group (bg, bgc, bgcfnc) or name=multiplier pairs, e.g. xflip=1,rotate90=1")
    p: float = _f(0.0, "ada: the starting probability (fixed when ada_target is 0; schedule.augment_p ramps it)")
    ada_target: float = _f(0.6, "ada: the overfitting heuristic E[sign(D(real))] aimed for (0 = p fixed or scheduled)")
    ada_interval: int = _f(4, "ada: adjust p every N steps (from the signs of D's real logits over all ranks)")
    ada_kimg: float = _f(500.0, "ada: p can move from 0 to 1 within this many kimg")


@dataclass
class Config:
    name: str = _f("", "run name (default: the config file's name)")
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    # ------------------------------------------------------------------ validation
    def problems(self, world_size: int = 1, resumed_world: int | None = None) -> list[str]:
        """Every invalid value, as short phrases (empty when the config is usable on `world_size` processes).
        resumed_world: the processes that made the checkpoint this start resumes, when known (a batch that does
        not divide over this launch then says that the resume changed the number)."""
        m, lo, o, d, t = self.model, self.loss, self.optim, self.data, self.train
        out: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                out.append(msg)

        fam = FAMILIES.get(m.family)
        need(fam is not None, f"model.family={m.family!r} is not one of {sorted(FAMILIES)}")
        if fam is not None:
            need(
                m.resolution in fam.resolutions,
                f"model.resolution={m.resolution} cannot be made by {m.family} (choose from {list(fam.resolutions)})",
            )
            need(
                fam.conditional or m.num_classes == 0,
                f"model.num_classes={m.num_classes} but family {m.family} is unconditional (num_classes=0)",
            )
            out += [f"model.{m.family}.{p}" for p in getattr(m.options, "problems", lambda model: [])(m)]
        need(m.num_classes == "auto" or m.num_classes >= 0, f"model.num_classes={m.num_classes} must be >= 0 or auto")
        need(m.channels in (1, 3), f"model.channels={m.channels} must be 1 or 3")
        if d.source in DATASET_CHANNELS:  # shards: checked against their manifest when the stream opens
            need(
                m.channels == DATASET_CHANNELS[d.source],
                f"model.channels={m.channels} but data.source={d.source} has {DATASET_CHANNELS[d.source]} channels",
            )
        if d.source == "shards":
            need(bool(d.shards.strip()), "data.source=shards needs data.shards (a folder made by `distgan prepare`)")
            need(
                d.allow_pipe or "pipe:" not in d.shards,
                "data.shards has a pipe: URL, which runs a shell command; set data.allow_pipe=true if you trust it",
            )
        need(d.workers >= 0, f"data.workers={d.workers} must be >= 0")
        need(d.shuffle_buffer >= 1, f"data.shuffle_buffer={d.shuffle_buffer} must be >= 1")
        need(0 <= d.max_bad_fraction <= 1, f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
        need(m.z_dim >= 1, f"model.z_dim={m.z_dim} must be >= 1")
        for key in ("r1_gamma", "r2_gamma", "gp_weight", "pl_weight"):
            need(getattr(lo, key) >= 0, f"loss.{key}={getattr(lo, key)} must be >= 0")
        for key in ("d_reg_interval", "g_reg_interval", "n_critic"):
            need(getattr(lo, key) >= 1, f"loss.{key}={getattr(lo, key)} must be >= 1")
        need(0 < lo.pl_decay <= 1, f"loss.pl_decay={lo.pl_decay} must be in (0, 1]")
        for key in ("lr_g", "lr_d", "eps"):
            need(getattr(o, key) > 0, f"optim.{key}={getattr(o, key)} must be > 0")
        for key in ("beta1", "beta2"):
            need(0 <= getattr(o, key) < 1, f"optim.{key}={getattr(o, key)} must be in [0, 1)")
        need(d.num_images >= 1, f"data.num_images={d.num_images} must be >= 1")
        need(t.batch >= 1, f"train.batch={t.batch} must be >= 1")
        need(t.batch_per_gpu >= 0, f"train.batch_per_gpu={t.batch_per_gpu} must be >= 0")
        if t.batch >= 1 and world_size >= 1:
            need(t.batch % world_size == 0, batch_problem(t.batch, world_size, resumed_world))
            share = t.batch // world_size
            if t.batch % world_size == 0 and t.batch_per_gpu > 0 and share % min(t.batch_per_gpu, share):
                fits = [d for d in range(1, share + 1) if share % d == 0]
                need(False, f"train.batch={t.batch} over {world_size} process(es) is {share} per process, which "
                            f"micro-batches of train.batch_per_gpu={t.batch_per_gpu} do not divide; choose one of "
                            f"{fits}")  # fmt: skip
        for key in ("total_kimg", "log_every_kimg", "sample_every_kimg", "ckpt_every_kimg"):
            need(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be > 0")
        for key in ("ema_kimg", "ema_rampup"):
            need(getattr(t, key) >= 0, f"train.{key}={getattr(t, key)} must be >= 0")
        need(t.keep_ckpts >= 1, f"train.keep_ckpts={t.keep_ckpts} must be >= 1")
        need(t.max_consecutive_skips >= 1, f"train.max_consecutive_skips={t.max_consecutive_skips} must be >= 1")
        need(t.max_rollbacks >= 0, f"train.max_rollbacks={t.max_rollbacks} must be >= 0")
        need(t.hang_timeout_s >= 0, f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0")
        need(t.sample_num >= 1, f"train.sample_num={t.sample_num} must be >= 1")
        need(t.threads >= 0, f"train.threads={t.threads} must be >= 0")
        out += _eval_problems(self.eval)
        out += _augment_problems(self.augment, self.schedule)
        out += schedule_problems(self)
        return out

    def validate(self, world_size: int = 1, resumed_world: int | None = None) -> Config:
        problems = self.problems(world_size, resumed_world)
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        tree["model"][self.model.family] = tree["model"].pop("options")  # the section's name: model.<family>
        return tree

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(to_yaml(self))

    def digest(self) -> str:
        """A short hash of the values (identifies a config in checkpoints and caches)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def world_sizes_for(batch: int, world_size: int, up_to: int = 64) -> list[int]:
    """Numbers of processes that train.batch divides: every one up to `up_to`, and beyond it the nearest ones
    below and above `world_size` (a launch of 96 processes wants to hear 64 or 128, not 1, 2, 4)."""
    fits = [n for n in range(1, min(batch, up_to) + 1) if batch % n == 0]
    if world_size > up_to:
        below = [n for n in range(world_size - 1, up_to, -1) if batch % n == 0][:1]
        above = [n for n in range(world_size + 1, batch + 1) if batch % n == 0][:1]
        fits = [n for n in fits if n < world_size] + below + above
    return fits


def batch_problem(batch: int, world_size: int, resumed_world: int | None = None) -> str:
    """train.batch (global) does not divide over `world_size` processes: which numbers would, and, on a resume on
    another number of processes, that this is why (the resumed run keeps the checkpoint's global batch)."""
    fits = [str(n) for n in world_sizes_for(batch, world_size)]
    counts = f"{', '.join(fits[:-1])} or {fits[-1]}" if len(fits) > 1 else fits[0]
    msg = (f"train.batch={batch} is not divisible by the {world_size} processes launched (train.batch is the global "
           f"batch, split over the processes: launch {counts}")  # fmt: skip
    if resumed_world is not None and resumed_world != world_size:
        s = "es" if resumed_world > 1 else ""
        return msg + (f"; this start resumes a checkpoint made by {resumed_world} process{s}, and a resume on another "
                      "number of processes keeps its global batch)")  # fmt: skip
    return msg + f", or make train.batch a multiple of {world_size})"


def micro_batches(batch: int, world_size: int, batch_per_gpu: int) -> tuple[int, int, int]:
    """(images per process per step, images per forward, micro-batches per step) of a validated config.

    train.batch is global: N processes each take batch / N images per step. train.batch_per_gpu caps one forward
    (a GPU's memory); a larger share runs as several micro-batches whose gradients accumulate into one step
    (StyleGAN's batch_gpu), so the same config trains the same global batch on 1 GPU or 64.
    """
    share = batch // world_size
    micro = min(batch_per_gpu, share) if batch_per_gpu > 0 else share
    return share, micro, share // micro


def describe_batch(cfg: Config, world_size: int) -> list[str]:
    """The start-of-run line about the batch (and a warning when BatchNorm would see too few images)."""
    t, m = cfg.train, cfg.model
    share, micro, accum = micro_batches(t.batch, world_size, t.batch_per_gpu)
    procs = f"{world_size} process{'es' if world_size > 1 else ''}"
    line = f"batch: {t.batch} per step = {share} per process x {procs}"
    line += f", in {accum} micro-batches of {micro} (train.batch_per_gpu)" if accum > 1 else ""
    lines = [line]
    if getattr(m.options, "norm", None) == "batch" and micro < 16:
        lines.append(
            f"warning: BatchNorm sees {micro} images per forward on each process; its statistics get noisy below "
            f"~16 (raise train.batch to {16 * world_size * accum}+ for {procs}, or use model.{m.family}.norm=none)"
        )
    return lines


def _augment_problems(a: AugmentConfig, sched) -> list[str]:
    from distgan.augment import check

    out = []
    try:
        check(a.kind, a.policy, a.ops)
    except ValueError as e:
        out.append(f"augment.{'policy' if a.kind == 'diffaug' else 'ops'}: {e}")
    if not 0 <= a.p <= 1:
        out.append(f"augment.p={a.p} must be in [0, 1]")
    if not 0 <= a.ada_target < 1:
        out.append(f"augment.ada_target={a.ada_target} must be in [0, 1) (0: p fixed or scheduled)")
    if a.ada_interval < 1:
        out.append(f"augment.ada_interval={a.ada_interval} must be >= 1")
    if a.ada_kimg <= 0:
        out.append(f"augment.ada_kimg={a.ada_kimg} must be > 0")
    if sched.augment_p.shape != "constant" and (a.kind != "ada" or a.ada_target > 0):
        out.append("schedule.augment_p ramps ada's p: it needs augment.kind=ada and augment.ada_target=0")
    return out


def _eval_problems(e: EvalConfig) -> list[str]:
    from distgan.metrics import features_problem, parse_metrics

    out = []
    try:
        parse_metrics(e.metrics)
    except ValueError as err:
        out.append(f"eval.{err}")
    problem = features_problem(e.features)
    if problem:
        out.append(f"eval.{problem}")
    for key, low in (("every_kimg", 0), ("num", 2), ("batch", 1)):
        if getattr(e, key) < low:
            out.append(f"eval.{key}={getattr(e, key)} must be >= {low}")
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file's values, then `key=value` overrides; raises ConfigError on any bad key or value."""
    values: dict[str, Any] = {}
    name = ""
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)  # safe_load: no python tags, nothing executes
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections, not a {type(loaded).__name__}")
        values = flatten(loaded or {})
        name = path.stem
    given: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        given[key.strip()] = _parse_scalar(raw)
    # Switching the family on the command line (`--config configs/default.yaml model.family=r3gan`) leaves the
    # file's section of its own family behind: those keys describe a network that is not built, so they go. A key
    # of another family's section written on the command line itself is still an error (from_flat).
    family = given.get("model.family")
    if family is not None and family != values.get("model.family", ModelConfig.family):
        values = {k: v for k, v in values.items() if not other_family_key(k, family)}
    return from_flat({**values, **given}, default_name=name)


def auto_gamma(resolution: int, batch: int) -> float:
    """StyleGAN2-ADA's R1 weight for a resolution and global batch (Karras et al. 2020b, app. D): 0.0002 R^2 / B."""
    return 0.0002 * resolution**2 / max(batch, 1)


def other_family_key(key: str, family: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 3 and parts[0] == "model" and parts[1] in FAMILIES and parts[1] != family


def from_dict(tree: dict[str, Any]) -> Config:
    """Build a Config from a nested dict such as `Config.to_dict()` produces (used to read back a run's config,
    also one written by an older distgan: see `upgrade`)."""
    return from_flat(flatten(upgrade(tree)))


# Keys of configs that older distgan versions wrote (in checkpoints, exports and run dirs), and where they live now.
# Only files are upgraded: a config you write uses today's keys (an old key is "unknown", with the new name
# suggested).
_MOVED = {"model.arch": "model.family", "model.g_width": "model.dcgan.g_width", "model.d_width": "model.dcgan.d_width",
          "model.norm": "model.dcgan.norm"}  # fmt: skip


def upgrade(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree as an older distgan wrote it, in today's keys (a tree of today's keys comes back as it is)."""
    flat = flatten(tree)
    if not any(k in flat for k in _MOVED):
        return tree
    moved = {_MOVED.get(k, k): v for k, v in flat.items()}
    out: dict[str, Any] = {}
    for key, value in moved.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def from_flat(values: dict[str, Any], default_name: str = "") -> Config:
    cfg = Config()
    fields = field_index()
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError("unknown config keys: " + "; ".join(_suggest(k, fields) for k in unknown))
    errors = []
    # The family first: it decides which section model.<family>.* holds options; another family's keys are refused.
    family = values.get("model.family", cfg.model.family)
    if isinstance(family, str) and family in FAMILIES:
        cfg.model.family, cfg.model.options = family, FAMILIES[family].options()
        other = [k for k in values if other_family_key(k, family)]
        for key in other:
            errors.append(f"{key} is an option of model family {key.split('.')[1]}, but model.family={family}")
    for key, raw in values.items():
        if errors and key in other:
            continue
        try:
            value = _coerce(raw, fields[key].type, key)
        except ConfigError as e:
            errors.append(str(e))
            continue
        section, _, leaf = key.rpartition(".")
        setattr(_section(cfg, section), leaf, value)
    if errors:
        raise ConfigError("invalid config values: " + "; ".join(errors))
    if cfg.loss.r1_gamma == "auto":
        cfg.loss.r1_gamma = auto_gamma(cfg.model.resolution, cfg.train.batch)
    if not cfg.name:
        cfg.name = default_name or "run"
    return cfg


def _section(cfg: Config, dotted: str) -> Any:
    """The object that holds the keys of section `dotted` ("train", "model", "model.dcgan")."""
    node: Any = cfg
    for part in filter(None, dotted.split(".")):
        node = node.options if node is cfg.model and part in FAMILIES else getattr(node, part)
    return node


class FieldInfo(typing.NamedTuple):
    type: Any
    default: Any
    doc: str


def field_index() -> dict[str, FieldInfo]:
    """Every leaf field by its dotted name ("train.total_kimg"): resolved type, default and doc."""
    out: dict[str, FieldInfo] = {}

    def walk(cls: type, instance: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if f.metadata.get("family_section"):  # every registered family's own section: model.<family>.*
                for name, fam in FAMILIES.items():
                    walk(fam.options, fam.options(), f"{prefix}{name}.")
            elif dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], value, prefix + f.name + ".")
            else:
                out[prefix + f.name] = FieldInfo(hints[f.name], value, f.metadata.get("doc", ""))

    walk(Config, Config(), "")
    return out


def help_text() -> str:
    """One line per key: name, type, default, doc."""
    return "\n".join(
        f"{key:<24} {_type_name(info.type):<30} {info.default!r:<16} {info.doc}" for key, info in field_index().items()
    )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _suggest(key: str, fields: dict[str, Any]) -> str:
    # The field with the same leaf name if there is exactly one ("model.g_width" -> "model.dcgan.g_width"), else the
    # nearest by full dotted name, else by the leaf name alone ("total_kimg" -> "train.total_kimg").
    leaf = key.rpartition(".")[2]
    same = [k for k in fields if k.rpartition(".")[2] == leaf]
    close = same if len(same) == 1 else difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if not close:
        by_leaf = {k.rpartition(".")[2]: k for k in fields}
        near = difflib.get_close_matches(leaf, by_leaf, n=1, cutoff=0.6)
        close = [by_leaf[near[0]]] if near else []
    return f"{key!r} (did you mean {close[0]!r}?)" if close else f"{key!r}"


def _parse_scalar(raw: str) -> Any:
    # YAML scalars ("true", "[1, 2]", "null"); anything YAML can't read stays a string.
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type that takes the value (int | Literal["auto"])
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        try:
            return _coerce(value, inner[-1], key)
        except ConfigError:
            if len(inner) == 1:
                raise
            names = " or ".join(_type_name(a) for a in inner)
            raise ConfigError(f"{key}={value!r} is not {names}") from None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = " (YAML reads yes/no/on/off as booleans)" if isinstance(value, bool) else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}={value!r} is not a boolean")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
        raise ConfigError(f"{key}={value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            return float(value)  # also "1e-4", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string")
        return "" if value is None else str(value)
    raise AssertionError(f"config field {key} has an unsupported type {tp!r}")
