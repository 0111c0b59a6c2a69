"""`distgan generate`: images, grids and animations from a trained generator (the EMA weights, G_ema).

    distgan generate --run runs/default --out grid.png                        64 images as one grid
    distgan generate --run runs/default --num 1000 --out fakes                fakes/000000.png ... 000999.png
    distgan generate --checkpoint runs/default/checkpoints/ckpt-000300032 --seed 7 --truncation 1.5 --out t.png
    distgan generate --run runs/default --interpolate 6 --out walk.gif        a looping latent walk (or .mp4)
    distgan generate --run runs/default --progress --out progress.mp4         the run's sample grids, by kimg
    distgan generate --run runs/cond --class 3 --out three.png                a conditional G: 64 images of class 3
    distgan generate --run runs/cond --class 0,1,2 --num 24 --out rows.png    one row of 8 per class, same latents

--run takes the run dir's newest checkpoint that verifies; --checkpoint a checkpoint folder (verified too) or
its generator.safetensors. Only that export is read: tensors and the model config, no pickle, no training state.

Latents are a function of --seed alone: image i's latent is row i % 256 of block i // 256, each block drawn from
its own generator seeded by (seed, block). The same seed gives the same latents for any --num (the first 16 of
--num 64 are --num 16), any --batch and any device. --truncation T is BigGAN's truncation trick (Brock et al.
2019) for a Gaussian latent: every entry with |z| > T is drawn again until it is inside, trading variety for
typical images (smaller T: more typical, less varied). No truncation by default.

--interpolate K walks through K latents and back to the first along great circles (spherical interpolation:
a Gaussian latent's norm stays typical, a straight line would pass through improbably short latents), with
--frames frames from one latent to the next: a seamless loop of K * frames frames. --num walks at once make
each frame a grid. An .mp4 needs PyAV (`pip install av`, or distgan's `video` extra); a .gif needs only Pillow.

A class-conditional generator (model.num_classes > 0) also takes a class per image. --class K draws every image
of class K; --class K1,K2,... (several, in that order): a grid has one row per class and --num // (number of
classes) columns (at least one), column j showing latent j in every row, as the training's sample grids do; a
folder's image i is latent i of class K[i % number of classes]; --interpolate walks stay within their class, a
frame holding one row per class (the same walks in each row). Without --class, image i's class is drawn like the
training data (the run's config: the data's class frequencies, as the training drew its generated labels; else
uniformly), entry i % 256 of a block drawn from (seed, labels, i // 256): a function of --seed and i, like the
latent; a walk keeps the class drawn for its index. --class on an unconditional generator, or a class it does
not have, is one error line (exit code 2).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from distgan.errors import CheckpointError, UserError

BLOCK = 256  # latents per seeded block (see above); a constant, or a seed's images would change
GRID_EXT = (".png", ".jpg", ".jpeg")
ANIM_EXT = (".gif", ".mp4")


class GenerateError(UserError):
    """Bad arguments to `distgan generate`, or an output it cannot write."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every distgan user error
        raise GenerateError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distgan generate", description="Images, grids and animations from a trained generator.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run dir: its newest verified checkpoint (and, for --progress, its samples)")
    src.add_argument("--checkpoint", help="a checkpoint folder, or a generator.safetensors file")
    p.add_argument("--out", required=True, help="a folder (one PNG per image), a .png/.jpg grid, or a .gif/.mp4")
    p.add_argument("--num", type=int, help="images (default 64), or walks side by side with --interpolate (16)")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default 0): the same seed, the same latents")
    p.add_argument("--truncation", type=float, help="redraw latent entries with |z| > T (T > 0; default: none)")
    p.add_argument("--class", dest="classes", metavar="K[,K...]",
                   help="a conditional generator's classes (indices): a grid of one class, or one row per class with "
                   "the same latents in each row; files and walks cycle through them (default: drawn like the "
                   "training data)")  # fmt: skip
    p.add_argument("--psi", type=float, help="StyleGAN2: truncation toward the average style w_avg (1 = none, 0 = "
                   "the average image; 0.5-0.7 trades variety for quality)")  # fmt: skip
    p.add_argument("--style-mix", type=int, metavar="L",
                   help="StyleGAN2: a style-mixing grid (a .png): the first L styles (coarse: pose, shape) from "
                   "the top row's latents, the rest from the left column's; --num latents each way "
                   "(default 6)")  # fmt: skip
    p.add_argument("--interpolate", type=int, metavar="K", help="a looping latent walk through K latents")
    p.add_argument("--frames", type=int, default=24, help="--interpolate: frames from one latent to the next")
    p.add_argument("--progress", action="store_true", help="animate the run's samples/fakes-*.png in kimg order")
    p.add_argument("--fps", type=float, help="frames per second (default 24; 4 with --progress)")
    p.add_argument("--batch", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        try:
            lines = run(args)
        except OSError as e:  # an output that cannot be written (a file where a folder should be, no space, ...)
            raise GenerateError(f"cannot write {e.filename or args.out}: {e.strerror or e}") from None
        for line in lines:
            print(line)
    except UserError as e:
        print(f"distgan generate: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run(args) -> list[str]:
    """Check the arguments, then write what they ask for; returns what was written, as lines to print."""
    out = Path(args.out)
    ext = out.suffix.lower()
    check_args(args, ext)
    if args.progress:
        return write_progress(Path(args.run), out, args.fps or 4.0)

    import torch

    from distgan.export import load_generator

    device = pick_device(args.device)
    source = generator_path(args)
    G = load_generator(source, device)
    k = int(getattr(G, "num_classes", 0) or 0)
    classes = check_classes(args, k)
    G = with_styles(G, args)
    probs = None
    lines = [f"generator: {source} (G_ema at {G.nimg / 1000:.3f} kimg, z_dim {G.z_dim}"
             f"{f', {k} classes' if k else ''}) on {device}"]  # fmt: skip
    if k and classes is None:
        from distgan.metrics.sources import data_class_probs

        probs, how = data_class_probs(run_config_of(args, source), k)
        lines.append(f"classes: drawn {how}")
    elif k:
        lines.append(f"classes: {', '.join(map(str, classes))} (--class)")
    with torch.no_grad():
        if args.interpolate:
            cells, c, cols = layout(args.num or 16, k, classes, probs, args.seed)
            walks, keys_n = len(cells), int(cells.max()) + 1
            keys = latents(args.seed, 0, args.interpolate * keys_n, G.z_dim, args.truncation).view(
                args.interpolate, keys_n, G.z_dim
            )  # [K, walks (of one row), z_dim]
            z = walk(keys, args.frames)[:, cells]  # [K * frames, walks, z_dim]
            per = max(1, args.batch // walks)

            def frames():  # a batch of frames at a time, kept as uint8 only
                for start in range(0, len(z), per):
                    part = z[start : start + per]
                    cs = c.repeat(len(part)) if c is not None else None
                    images = render(G, part.flatten(0, 1), args.batch, device, cs)
                    yield from (to_frame(f, cols) for f in images.unflatten(0, (-1, walks)))  # [walks, C, H, W]

            write_animation(frames(), out, args.fps or 24.0)
            return [*lines, f"wrote {out}: {len(z)} frames of {walks} walk(s) through {args.interpolate} latents"]
        if args.style_mix is not None:
            n = args.num or 6
            c = None
            if k:
                c = torch.full([n], classes[0], dtype=torch.long) if classes else labels(args.seed, 0, n, k, probs)
            save_png(to_frame(style_mix_grid(G, args.style_mix, n, args.seed, device, c), n + 1), out)
            return [*lines, f"wrote {out}: a style-mixing grid, styles 0-{args.style_mix - 1} from the top row and "
                            f"the rest from the left column, {n} latents each (seed {args.seed})"]  # fmt: skip
        n = args.num or 64
        if ext in GRID_EXT:
            cells, c, cols = layout(n, k, classes, probs, args.seed)
            z = latents(args.seed, 0, int(cells.max()) + 1, G.z_dim, args.truncation)[cells]
            save_png(to_frame(render(G, z, args.batch, device, c), cols), out)
            if cols is not None:  # several classes: one row each
                shape = f"{len(classes)} classes x {cols} images, one row per class"
                return [*lines, f"wrote {out}: a grid of {shape} (seed {args.seed})"]
            return [*lines, f"wrote {out}: a grid of {n} images (seed {args.seed})"]
        out.mkdir(parents=True, exist_ok=True)
        for start in range(0, n, args.batch):  # a batch at a time: any --num fits in memory
            count = min(args.batch, n - start)
            c = file_labels(start, count, k, classes, probs, args.seed)
            images = render(G, latents(args.seed, start, count, G.z_dim, args.truncation), args.batch, device, c)
            for i, image in enumerate(images):
                save_png(to_uint8(image), out / f"{start + i:06d}.png")
        return [*lines, f"wrote {n} images to {out}/ (000000.png ... {n - 1:06d}.png, seed {args.seed})"]


def check_args(args, ext: str) -> None:
    if args.num is not None and args.num < 1:
        raise GenerateError(f"--num {args.num}: must be at least 1")
    if args.truncation is not None and not args.truncation > 0:
        raise GenerateError(f"--truncation {args.truncation}: must be > 0 (entries with |z| > T are redrawn)")
    if args.batch < 1:
        raise GenerateError(f"--batch {args.batch}: must be at least 1")
    if args.fps is not None and not args.fps > 0:
        raise GenerateError(f"--fps {args.fps}: must be > 0")
    if args.interpolate is not None and args.progress:
        raise GenerateError("--interpolate and --progress make different animations: choose one")
    if args.interpolate is not None and args.interpolate < 2:
        raise GenerateError(f"--interpolate {args.interpolate}: a walk needs at least 2 latents")
    if args.frames < 1:
        raise GenerateError(f"--frames {args.frames}: must be at least 1")
    animated = args.interpolate is not None or args.progress
    if animated and ext not in ANIM_EXT:
        raise GenerateError(f"--out {args.out}: an animation is written as .gif or .mp4")
    if not animated and ext in ANIM_EXT:
        raise GenerateError(f"--out {args.out}: an animation needs --interpolate K or --progress")
    if args.progress and args.run is None:
        raise GenerateError("--progress animates a run's sample grids: give --run RUN_DIR")
    if args.style_mix is not None and (ext not in GRID_EXT or args.interpolate is not None or args.progress):
        raise GenerateError("--style-mix makes one grid: give --out a .png or .jpg file, without --interpolate")
    if args.classes is not None:
        parse_classes(args.classes)
        if args.progress:
            raise GenerateError("--class picks a conditional generator's classes; --progress shows the run's grids")


def parse_classes(spec: str) -> list[int]:
    """`3` or `0,2,5` -> [3] or [0, 2, 5] (the order kept)."""
    parts = [part.strip() for part in spec.split(",")]
    if not all(part.isdigit() for part in parts):
        raise GenerateError(f"--class {spec}: class indices (0, 1, ...), comma-separated: e.g. 3 or 0,2,5")
    return [int(part) for part in parts]


def check_classes(args, num_classes: int) -> list[int] | None:
    """--class checked against the generator (num_classes: 0 when it is unconditional); None when not given."""
    if args.classes is None:
        return None
    classes = parse_classes(args.classes)
    if not num_classes:
        raise GenerateError(f"--class {args.classes}: the generator is unconditional (model.num_classes=0)")
    if max(classes) >= num_classes:
        raise GenerateError(f"--class {args.classes}: the generator has {num_classes} classes (0..{num_classes - 1})")
    return classes


def run_config_of(args, export: Path):
    """The config of the run the generator comes from (RUN_DIR/config.yaml), or None: --run's, or that of a
    checkpoint inside RUN_DIR/checkpoints (its folder or its generator.safetensors)."""
    from distgan.evaluate import run_config

    run_dir = Path(args.run) if args.run is not None else None
    if run_dir is None and export.parent.parent.name == "checkpoints":
        run_dir = export.parent.parent.parent
    if run_dir is None:
        return None
    try:
        return run_config(run_dir)
    except Exception as e:  # noqa: BLE001 (an unreadable config only costs the data's class frequencies)
        _warn(f"cannot read {run_dir / 'config.yaml'} ({' '.join(str(e).split())[:160]}): classes drawn uniformly")
        return None


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: no CUDA GPU on this machine")
    return device


def generator_path(args) -> Path:
    """The generator export to load: from --run's newest verified checkpoint, or --checkpoint."""
    from distgan.checkpoint import CheckpointManager
    from distgan.export import checkpoint_export

    if args.run is not None:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise CheckpointError(f"--run {args.run}: no such run dir")
        ckpt = CheckpointManager(run_dir, warn=_warn).latest()
        if ckpt is None:
            raise CheckpointError(f"--run {args.run}: no checkpoint in {run_dir / 'checkpoints'} verifies")
        return ckpt / "generator.safetensors"
    return checkpoint_export(Path(args.checkpoint), "--checkpoint ")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------- latents


def latents(seed: int, start: int, count: int, z_dim: int, truncation: float | None = None):
    """Latents [count, z_dim] of images start .. start + count - 1 (see the module doc): on the CPU, float32."""
    from distgan import rng

    return rng.block_latents(range(start, start + count), z_dim, seed, block=BLOCK, truncation=truncation)


def labels(seed: int, start: int, count: int, num_classes: int, probs=None):
    """Classes [count] of images start .. start + count - 1 when none are asked for (see the module doc): from
    `probs` (the data's class frequencies) or uniformly; int64 on the CPU."""
    from distgan import rng

    return rng.block_labels(range(start, start + count), num_classes, seed, block=BLOCK, probs=probs)


def layout(n: int, num_classes: int, classes: list[int] | None, probs, seed: int):
    """A grid (or a walk's frame) of about n cells: (latent index of each cell [S], class of each cell [S] or None,
    columns or None for ceil(sqrt(S))). Several --class: one row per class, --num // classes columns, latent j in
    column j of every row; otherwise cell i is latent i, of the --class asked or of the class drawn for i."""
    import torch

    if not num_classes:
        return torch.arange(n), None, None
    if classes is None:
        return torch.arange(n), labels(seed, 0, n, num_classes, probs), None
    if len(classes) == 1:
        return torch.arange(n), torch.full([n], classes[0], dtype=torch.long), None
    cols = max(1, n // len(classes))
    return torch.arange(cols).repeat(len(classes)), torch.tensor(classes).repeat_interleave(cols), cols


def file_labels(start: int, count: int, num_classes: int, classes: list[int] | None, probs, seed: int):
    """Classes of files start .. start + count - 1: cycling through --class, else drawn; None: unconditional."""
    import torch

    if not num_classes:
        return None
    if classes is None:
        return labels(seed, start, count, num_classes, probs)
    return torch.tensor(classes)[torch.arange(start, start + count) % len(classes)]


def slerp(a, b, t: float):
    """Spherical interpolation between latents a and b ([..., z_dim]) at t in [0, 1]."""
    import torch

    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((an * bn).sum(-1, keepdim=True).clamp(-1, 1))  # [..., 1]
    so = torch.sin(omega)
    lerp = (1 - t) * a + t * b  # where a and b are (anti)parallel the great circle is not defined
    return torch.where(so > 1e-6, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so, lerp)


def walk(keys, frames: int):
    """[K, walks, z_dim] latents -> [K * frames, walks, z_dim]: from each to the next, the last back to the first."""
    import torch

    nxt = keys.roll(-1, dims=0)
    return torch.stack([slerp(keys[k], nxt[k], f / frames) for k in range(len(keys)) for f in range(frames)])


# ---------------------------------------------------------------------- images


def with_styles(G, args):
    """G with --psi (and, for a generator with styles, fixed noise: the same seed makes the same images), or a
    GenerateError naming why an option does not apply to this generator."""
    import functools

    styled = hasattr(G, "mapping") and hasattr(G, "synthesis")
    if not styled:
        for flag, value in (("--psi", args.psi), ("--style-mix", args.style_mix)):
            if value is not None:
                raise GenerateError(f"{flag} needs a generator with a style mapping (StyleGAN2); this one has none")
        return G
    if args.psi is not None and not 0 <= args.psi <= 1:
        raise GenerateError(f"--psi {args.psi}: must be in [0, 1] (1 = no truncation)")
    if args.style_mix is not None and not 1 <= args.style_mix < G.num_ws:
        raise GenerateError(f"--style-mix {args.style_mix}: must be in [1, {G.num_ws - 1}] (this G has {G.num_ws} "
                            f"styles)")  # fmt: skip
    G.forward = functools.partial(G.forward, psi=1.0 if args.psi is None else args.psi, noise_mode="const")
    G.psi = 1.0 if args.psi is None else args.psi
    return G


def style_mix_grid(G, cut: int, n: int, seed: int, device, c=None):
    """An (n+1) x (n+1) grid: a blank corner, n column sources on top, n row sources down the left, and at (i, j)
    the image whose first `cut` styles are column j's and the rest row i's (StyleGAN, Karras et al. 2019, fig. 3).
    Row sources are latents 0..n-1 of `seed`, column sources latents n..2n-1. `c`: the n rows' classes."""
    import torch

    z = latents(seed, 0, 2 * n, G.z_dim).to(device)
    cc = torch.cat([c, c]).to(device) if c is not None else None
    ws = G.mapping(z, cc, psi=G.psi)  # [2n, num_ws, w_dim]
    rows, cols = ws[:n], ws[n:]
    layer = torch.arange(G.num_ws, device=device)[None, :, None]
    mixed = torch.where(layer < cut, cols[None, :], rows[:, None]).flatten(0, 1)  # [n*n, num_ws, w_dim]
    images = G.synthesis(torch.cat([rows, cols, mixed]), noise_mode="const").float().cpu()  # [2n + n*n, ...]
    blank = torch.full_like(images[:1], -1.0)
    grid = [blank, images[n : 2 * n]]  # top row: the corner, then the column sources
    for i in range(n):
        grid += [images[i : i + 1], images[2 * n + i * n : 2 * n + (i + 1) * n]]
    return torch.cat(grid)


def render(G, z, batch: int, device, c=None):
    """G(z) (an unconditional G, c None) or G(z, c) in batches: [N, C, H, W] float in [-1, 1], on the CPU."""
    import torch

    if c is None:
        return torch.cat([G(part.to(device)).float().cpu() for part in z.split(batch)])
    return torch.cat([G(zp.to(device), cp.to(device)).float().cpu() for zp, cp in zip(z.split(batch), c.split(batch))])


def to_uint8(image):
    """One image [C, H, W] in [-1, 1] -> [H, W, C] uint8, rounded as torchvision's save_image rounds."""
    import torch

    x = (image.clamp(-1, 1) + 1) / 2
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def to_frame(images, cols: int | None = None):
    """[N, C, H, W] in [-1, 1] -> [H, W, C] uint8: the image itself when N is 1, else a grid like the trainer's
    sample grids (`cols` columns, default ceil(sqrt(N)); 2-pixel black padding)."""
    if len(images) == 1:
        return to_uint8(images[0])
    from torchvision.utils import make_grid

    cols = cols or max(1, math.ceil(math.sqrt(len(images))))
    return to_uint8(make_grid(images.clamp(-1, 1), nrow=cols, padding=2, pad_value=-1))


def save_png(array, path: Path) -> None:
    from PIL import Image

    arr = array.numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


# ---------------------------------------------------------------------- animations


def write_animation(frames, out: Path, fps: float) -> int:
    """Frames ([H, W, C] uint8 tensors or arrays, one size) -> out (.gif with Pillow, .mp4 with PyAV)."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = (np.asarray(f) for f in frames)
    arrays = (np.repeat(a, 3, axis=2) if a.shape[-1] == 1 else a for a in arrays)  # grey -> RGB
    if out.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(a) for a in arrays]
        duration = max(20, round(1000 / fps / 10) * 10)  # GIF counts in 1/100 s; browsers slow down below 20 ms
        images[0].save(out, save_all=True, append_images=images[1:], duration=duration, loop=0)
        return len(images)
    return _write_mp4(arrays, out, fps)


def _write_mp4(arrays, out: Path, fps: float) -> int:
    from fractions import Fraction

    import numpy as np

    try:
        import av
    except ImportError:
        raise GenerateError(f"--out {out}: an .mp4 needs PyAV: pip install av (or write a .gif)") from None
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    count = 0
    with av.open(str(out), mode="w") as container:
        stream = None
        for a in arrays:
            if stream is None:  # yuv420p needs even sizes: frames are padded with black to them
                h, w = a.shape[0] + a.shape[0] % 2, a.shape[1] + a.shape[1] % 2
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            padded = np.zeros((h, w, 3), np.uint8)
            padded[: a.shape[0], : a.shape[1]] = a
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():  # flush the encoder
                container.mux(packet)
    return count


def write_progress(run_dir: Path, out: Path, fps: float) -> list[str]:
    """The run's sample grids (G_ema on the fixed latents) in kimg order, each frame labelled with its kimg."""
    import numpy as np
    from PIL import Image, ImageDraw

    grids = sorted((run_dir / "samples").glob("fakes-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    if not grids:
        raise GenerateError(f"--run {run_dir}: no sample grids (samples/fakes-*.png) to animate")
    size = Image.open(grids[0]).size

    def frames():
        for path in grids:
            grid = Image.open(path).convert("RGB")
            grid = grid if grid.size == size else grid.resize(size)  # (sample_num changed on a resume)
            frame = Image.new("RGB", (size[0], size[1] + LABEL_H))
            frame.paste(grid, (0, LABEL_H))
            kimg = int(path.stem.split("-")[1]) / 1000
            ImageDraw.Draw(frame).text((3, 1), f"{kimg:.{1 if kimg >= 10 else 3}f} kimg", fill=(255, 255, 255))
            yield np.asarray(frame)

    count = write_animation(frames(), out, fps)
    return [f"wrote {out}: {count} sample grids from {grids[0].name} to {grids[-1].name}"]


LABEL_H = 14  # pixels of the kimg label above each --progress frame
