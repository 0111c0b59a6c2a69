"""`distgan generate`, run in this process (distgan.generate.main) on a run dir that a 2-step training made.

The images must be G_ema's (the checkpoint's weights) on the documented latents, pixel for pixel, whatever the
batch; a grid must be what the trainer's own save_image writes; the animations must have the frames asked for,
in order; every bad input is one line and exit code 2. A class-conditional generator (a tiny one, exported into a
run dir by hand, its data's manifest giving skewed class frequencies) must draw G(z, c) for the documented latents
and classes: the --class rows, cycles and walks, or classes drawn like the data without --class.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from metrics_support import conditional_config, conditional_generator, labelled_shards, write_run
from PIL import Image

from conftest import BIN, patience
from distgan import generate, rng
from distgan.export import load_generator
from support import make_trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    tr = make_trainer("train.total_kimg=0.032", "model.dcgan.norm=none", run_dir=run)  # grids at 0, 32; ckpt at 32
    with torch.no_grad():  # a G of 2 steps draws flat grey; 10x its initial weights draw images that differ
        for module in (tr.G_module, tr.G_ema.module):
            for p in module.parameters():
                p.mul_(10)
    tr.fit()
    return run


def ckpt(run_dir):
    return run_dir / "checkpoints" / "ckpt-000000032"


def gen(*argv, capsys=None) -> tuple[int, str, str]:
    code = generate.main([str(a) for a in argv])
    out = capsys.readouterr() if capsys is not None else None
    return code, out.out if out else "", out.err if out else ""


def expected_images(run_dir, n, seed=0, truncation=None):
    """G_ema of the checkpoint on the documented latents: uint8 [N, H, W, C]."""
    G = load_generator(ckpt(run_dir) / "generator.safetensors")
    with torch.no_grad():
        x = G(generate.latents(seed, 0, n, G.z_dim, truncation))  # [N, C, H, W] in [-1, 1]
    return ((x.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_the_export_is_the_trainers_g_ema(run_dir):
    from distgan.checkpoint import load_file

    state = load_file(ckpt(run_dir), "state.pt")
    G = load_generator(ckpt(run_dir) / "generator.safetensors")
    assert G.nimg == 32 and G.z_dim == 16
    assert state["G_ema"].keys() == G.state_dict().keys()
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in state["G_ema"].items())


def test_latents_are_a_function_of_the_seed_alone():
    # The documented rule: image i is row i % 256 of block i // 256, drawn by rng.generator(seed, block).
    block0 = torch.randn([256, 16], generator=rng.generator(5, 0))
    block1 = torch.randn([256, 16], generator=rng.generator(5, 1))
    z = generate.latents(5, 0, 300, 16)
    assert torch.equal(z, torch.cat([block0, block1[:44]]))
    assert torch.equal(generate.latents(5, 250, 10, 16), z[250:260])  # any window, any batch
    assert torch.equal(generate.latents(5, 0, 16, 16), z[:16])  # --num 16 is the start of --num 300
    assert not torch.equal(generate.latents(6, 0, 16, 16), z[:16])  # control: another seed


def test_truncation_redraws_only_the_entries_outside():
    z = generate.latents(0, 0, 512, 16)
    t = generate.latents(0, 0, 512, 16, truncation=0.5)
    inside = z.abs() <= 0.5
    assert (t.abs() <= 0.5).all()
    assert torch.equal(t[inside], z[inside])  # entries already inside are kept
    assert (t[~inside] != z[~inside]).all() and (~inside).sum() > 1000  # the others are drawn again


def test_slerp_keeps_the_norm_and_the_walk_passes_through_each_latent():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    mid = generate.slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([3 / 2**0.5, 3 / 2**0.5])) and mid.norm().item() == pytest.approx(3)
    assert (0.5 * a + 0.5 * b).norm().item() == pytest.approx(2.1213, abs=1e-4)  # a straight line shrinks it
    keys = generate.latents(0, 0, 6, 16).view(3, 2, 16)  # [K=3, walks=2, z]
    path = generate.walk(keys, 4)  # [12, 2, 16]
    assert path.shape == (12, 2, 16)
    for k in range(3):
        assert torch.allclose(path[4 * k], keys[k])
    assert torch.allclose(generate.slerp(keys[2], keys[0], 1.0), keys[0], atol=1e-5)  # the loop closes


def test_files_are_g_ema_of_the_seeded_latents_in_any_batch(run_dir, tmp_path, capsys):
    code, out, err = gen("--run", run_dir, "--num", 5, "--out", tmp_path / "a", "--batch", 2, capsys=capsys)
    assert code == 0, err
    assert f"generator: {ckpt(run_dir) / 'generator.safetensors'} (G_ema at 0.032 kimg, z_dim 16) on " in out
    want = expected_images(run_dir, 5)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / f"{i:06d}.png")), want[i]), i
    # Control: another seed gives other images.
    assert gen("--run", run_dir, "--num", 1, "--seed", 1, "--out", tmp_path / "b")[0] == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "b" / "000000.png")), want[0])


def test_grid_is_what_the_trainers_save_image_writes(run_dir, tmp_path):
    from torchvision.utils import save_image

    assert gen("--checkpoint", ckpt(run_dir), "--num", 5, "--truncation", 1.5, "--out", tmp_path / "g.png")[0] == 0
    G = load_generator(ckpt(run_dir) / "generator.safetensors")
    with torch.no_grad():
        images = G(generate.latents(0, 0, 5, 16, truncation=1.5))
    save_image(images, tmp_path / "ref.png", nrow=3, normalize=True, value_range=(-1, 1))  # as the trainer does
    grid, ref = np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "ref.png"))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 3 columns, 2 rows of 32 px, 2 px padding
    assert np.array_equal(grid, ref)
    tile = grid[2 + 34 : 2 + 34 + 32, 2 + 34 : 2 + 34 + 32]  # row 1, column 1: image 4
    assert np.array_equal(tile, expected_images(run_dir, 5, truncation=1.5)[4])
    # The generator file itself works as --checkpoint too.
    code = gen("--checkpoint", ckpt(run_dir) / "generator.safetensors", "--num", 5, "--truncation", 1.5,
               "--out", tmp_path / "g2.png")[0]  # fmt: skip
    assert code == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "g2.png")), grid)


def test_latent_walk_gif_and_mp4(run_dir, tmp_path):
    import av

    assert gen("--run", run_dir, "--interpolate", 3, "--frames", 4, "--num", 4, "--out", tmp_path / "w.gif")[0] == 0
    gif = Image.open(tmp_path / "w.gif")
    assert (gif.n_frames, gif.size, gif.info["duration"], gif.info["loop"]) == (12, (70, 70), 40, 0)  # 24 fps
    frames = []
    for i in range(12):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")).astype(int))
    assert all(np.abs(frames[i] - frames[i + 1]).sum() > 0 for i in range(11))  # it moves
    # Rendered a frame (or less) at a time, the same animation.
    argv = ("--run", run_dir, "--interpolate", 3, "--frames", 4, "--num", 4, "--batch", 3, "--out", tmp_path / "w3.gif")
    assert gen(*argv)[0] == 0
    assert (tmp_path / "w3.gif").read_bytes() == (tmp_path / "w.gif").read_bytes()

    code = gen("--run", run_dir, "--interpolate", 2, "--frames", 3, "--num", 1, "--fps", 12,
               "--out", tmp_path / "w.mp4")[0]  # fmt: skip
    assert code == 0
    with av.open(str(tmp_path / "w.mp4")) as video:
        stream = video.streams.video[0]
        assert (stream.width, stream.height, stream.average_rate) == (32, 32, 12)
        decoded = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(decoded) == 6

    # Frames 0 and 3 are the two latents' images. H.264 in yuv420p loses these noisy 32 px images' fine detail:
    # compare 8x8-pixel means, nearer to the image than to the other latent's.
    def coarse(x):
        return x.astype(float).reshape(4, 8, 4, 8, 3).mean(axis=(1, 3))

    keys = expected_images(run_dir, 2)
    for frame, k in ((decoded[0], 0), (decoded[3], 1)):
        near, other = (np.abs(coarse(frame) - coarse(keys[i])).mean() for i in (k, 1 - k))
        assert near < 6 and near < other / 2, (k, near, other)


def test_mp4_frames_are_padded_to_even_sizes(tmp_path):
    import av

    frames = [np.full((33, 35, 3), 40 * i, np.uint8) for i in range(3)]
    assert generate.write_animation(frames, tmp_path / "odd.mp4", 10) == 3
    with av.open(str(tmp_path / "odd.mp4")) as video:
        stream = video.streams.video[0]
        assert (stream.width, stream.height) == (36, 34)
        assert len(list(video.decode(video=0))) == 3


def test_progress_animates_the_grids_in_kimg_order_with_labels(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    colours = {1000: (200, 30, 30), 64: (30, 200, 30), 0: (30, 30, 200), 20000: (200, 200, 30)}
    for nimg, colour in colours.items():  # written out of order
        Image.new("RGB", (70, 70), colour).save(run / "samples" / f"fakes-{nimg:09d}.png")
    Image.new("RGB", (70, 70)).save(run / "samples" / "reals.png")  # not a progress frame
    code, out, err = gen("--run", run, "--progress", "--out", tmp_path / "p.gif", capsys=capsys)
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'p.gif'}: 4 sample grids from fakes-000000000.png to fakes-000020000.png"
    gif = Image.open(tmp_path / "p.gif")
    assert (gif.n_frames, gif.size, gif.info["duration"]) == (4, (70, 70 + generate.LABEL_H), 250)  # 4 fps
    labels = []
    for i, nimg in enumerate(sorted(colours)):
        gif.seek(i)
        frame = np.asarray(gif.convert("RGB"))
        assert tuple(frame[generate.LABEL_H + 35, 35]) == colours[nimg], (i, nimg)
        strip = frame[: generate.LABEL_H]
        assert (strip.max(axis=2) > 128).sum() > 20  # text is drawn
        labels.append(strip)
    assert all(not np.array_equal(labels[i], labels[i + 1]) for i in range(3))  # each frame its own kimg


def test_missing_pyav_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    code, _, err = gen("--run", run_dir, "--interpolate", 2, "--frames", 1, "--out", tmp_path / "w.mp4", capsys=capsys)
    assert code == 2
    assert err.splitlines() == [f"distgan generate: error: --out {tmp_path / 'w.mp4'}: an .mp4 needs PyAV: pip install "
                                "av (or write a .gif)"]  # fmt: skip


def _bad(tmp_path, run_dir):
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    broken = tmp_path / "broken"
    if not broken.exists():
        import shutil

        shutil.copytree(ckpt(run_dir), broken)
        (broken / "state.pt").write_bytes(b"not the file")
    (tmp_path / "a_file").write_text("x")
    g = ["--run", str(run_dir)]
    return [
        (["--out", "x.png"], "one of the arguments --run --checkpoint is required"),
        ([*g, "--checkpoint", str(ckpt(run_dir)), "--out", "x.png"], "not allowed with argument"),
        ([*g, "--out", "x.png", "--num", "0"], "--num 0: must be at least 1"),
        ([*g, "--out", "x.png", "--truncation", "0"], "--truncation 0.0: must be > 0"),
        ([*g, "--out", "x.png", "--truncation", "-1"], "--truncation -1.0: must be > 0"),
        ([*g, "--out", "x.png", "--batch", "0"], "--batch 0: must be at least 1"),
        ([*g, "--out", "x.gif", "--interpolate", "1"], "--interpolate 1: a walk needs at least 2 latents"),
        ([*g, "--out", "x.gif", "--interpolate", "3", "--frames", "0"], "--frames 0: must be at least 1"),
        ([*g, "--out", "x.gif", "--interpolate", "3", "--fps", "0"], "--fps 0.0: must be > 0"),
        ([*g, "--out", "x.gif", "--interpolate", "3", "--progress"], "choose one"),
        ([*g, "--out", "x.png", "--interpolate", "3"], "--out x.png: an animation is written as .gif or .mp4"),
        ([*g, "--out", "x.gif"], "--out x.gif: an animation needs --interpolate K or --progress"),
        (["--checkpoint", str(ckpt(run_dir)), "--progress", "--out", "p.gif"], "give --run RUN_DIR"),
        (["--run", str(empty), "--progress", "--out", "p.gif"], "no sample grids (samples/fakes-*.png)"),
        (["--run", str(tmp_path / "nope"), "--out", "x.png"], "no such run dir"),
        ([*g, "--out", "x.png", "--class", "0"], "--class 0: the generator is unconditional (model.num_classes=0)"),
        ([*g, "--out", "x.png", "--class", "1,b"], "--class 1,b: class indices (0, 1, ...), comma-separated"),
        ([*g, "--out", "x.png", "--class=-1"], "--class -1: class indices"),
        ([*g, "--out", "p.gif", "--progress", "--class", "1"], "--class picks a conditional generator's classes"),
        (["--run", str(empty), "--out", "x.png"], f"no checkpoint in {empty / 'checkpoints'} verifies"),
        (["--checkpoint", str(tmp_path / "nope"), "--out", "x.png"], "no such file or folder"),
        (["--checkpoint", str(broken), "--out", "x.png"], "not a usable checkpoint"),
        (["--checkpoint", str(tmp_path / "a_file"), "--out", "x.png"], "cannot read generator export"),
        ([*g, "--num", "2", "--out", str(tmp_path / "a_file")], f"cannot write {tmp_path / 'a_file'}"),
        ([*g, "--out", "x.png", "--device", "nonsense"], "--device nonsense: not a device"),
        ([*g, "--out", "x.png", "--nmu", "3"], "unrecognized arguments: --nmu 3"),
    ]


def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, message in _bad(tmp_path, run_dir):
        code, out, err = gen(*argv, capsys=capsys)
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("distgan generate: error: "), (argv, err)
        assert message in lines[0], (argv, lines[0])
    if not torch.cuda.is_available():
        code, _, err = gen("--run", run_dir, "--out", "x.png", "--device", "cuda", capsys=capsys)
        assert code == 2 and err.strip() == "distgan generate: error: --device cuda: no CUDA GPU on this machine"
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.gif").exists()


def test_the_console_script_has_the_command():
    p = subprocess.run([str(BIN / "distgan"), "--help"], capture_output=True, text=True, timeout=patience(60))
    line = next((x for x in p.stdout.splitlines() if x.split()[:1] == ["generate"]), "")
    assert p.returncode == 0 and line.split(None, 1)[1].startswith("images, grids, latent walks and progress")
    p = subprocess.run(
        [str(BIN / "distgan"), "generate", "--help"], capture_output=True, text=True, timeout=patience(60)
    )
    assert p.returncode == 0 and "--interpolate K" in p.stdout and "--truncation" in p.stdout


# ---------------------------------------------------------------------- class-conditional generators

FREQ = [0.7, 0.1, 0.1, 0.1]  # the data's class frequencies (class_counts 140, 20, 20, 20)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A run dir as a conditional training leaves it: config.yaml (labelled shards whose manifest counts the
    classes) and a checkpoint of a tiny 4-class G whose images depend on both z and c."""
    root = tmp_path_factory.mktemp("cond")
    shards = labelled_shards(root / "shards", [140, 20, 20, 20])
    G, _ = conditional_generator(4)
    write_run(root / "run", conditional_config(4, "data.source=shards", f"data.shards={shards}"), G)
    return root / "run"


def cond_export(run):
    return run / "checkpoints" / "ckpt-000000064" / "generator.safetensors"


def as_uint8(x):
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], rounded as save_image rounds."""
    return ((x.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def rendered(run, z, c):
    G = load_generator(cond_export(run))
    with torch.no_grad():
        return G(z, torch.as_tensor(c, dtype=torch.long))


def test_class_grid_has_one_row_per_class_on_the_same_latents(cond_run, tmp_path, capsys):
    from torchvision.utils import save_image

    code, out, err = gen("--run", cond_run, "--class", "2,0", "--num", 7, "--out", tmp_path / "g.png", capsys=capsys)
    assert code == 0, err
    assert "(G_ema at 0.064 kimg, z_dim 16, 4 classes) on " in out and "classes: 2, 0 (--class)" in out
    assert "a grid of 2 classes x 3 images, one row per class (seed 0)" in out  # 7 // 2 columns
    z = generate.latents(0, 0, 3, 16)
    want = rendered(cond_run, z.repeat(2, 1), [2, 2, 2, 0, 0, 0])
    save_image(want, tmp_path / "ref.png", nrow=3, normalize=True, value_range=(-1, 1))  # as the trainer's grids
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "ref.png")))

    def tile(r, col):
        return grid[2 + 34 * r : 2 + 34 * r + 32, 2 + 34 * col : 2 + 34 * col + 32]

    for col in range(3):  # row r, column j: latent j of class --class[r]
        assert np.array_equal(tile(0, col), as_uint8(rendered(cond_run, z[col : col + 1], [2]))[0])
        assert np.array_equal(tile(1, col), as_uint8(rendered(cond_run, z[col : col + 1], [0]))[0])
        assert not np.array_equal(tile(0, col), tile(1, col))  # control: the class changes the image
    assert not np.array_equal(tile(0, 0), tile(0, 1))  # and so does the latent

    # One class: a grid of --num images of it, ceil(sqrt(N)) columns as for an unconditional G.
    assert gen("--run", cond_run, "--class", 3, "--num", 4, "--out", tmp_path / "one.png")[0] == 0
    save_image(rendered(cond_run, generate.latents(0, 0, 4, 16), [3] * 4), tmp_path / "ref1.png", nrow=2,
               normalize=True, value_range=(-1, 1))  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(Image.open(tmp_path / "ref1.png")))


def test_class_files_cycle_through_the_classes(cond_run, tmp_path):
    assert gen("--run", cond_run, "--class", "1,3", "--num", 5, "--batch", 2, "--out", tmp_path / "d")[0] == 0
    want = as_uint8(rendered(cond_run, generate.latents(0, 0, 5, 16), [1, 3, 1, 3, 1]))
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "d" / f"{i:06d}.png")), want[i]), i


def test_without_class_the_classes_are_drawn_like_the_data(cond_run, tmp_path, capsys):
    from torchvision.utils import save_image

    n = 40
    code, out, err = gen("--run", cond_run, "--num", n, "--batch", 16, "--out", tmp_path / "d", capsys=capsys)
    assert code == 0, err
    assert "classes: drawn like the data (its class frequencies)" in out
    # The documented rule: class i is entry i % 256 of a block drawn from (seed, labels, i // 256) by the data's
    # class frequencies; 70% of the data is class 0, so most images are.
    c = rng.block_labels(range(n), 4, 0, block=generate.BLOCK, probs=FREQ)
    assert torch.equal(generate.labels(0, 0, n, 4, FREQ), c)
    assert 0.5 < (c == 0).float().mean() < 0.9
    z = generate.latents(0, 0, n, 16)
    want = as_uint8(rendered(cond_run, z, c))
    files = [np.asarray(Image.open(tmp_path / "d" / f"{i:06d}.png")) for i in range(n)]
    assert all(np.array_equal(files[i], want[i]) for i in range(n))
    # Control: uniform classes (what a G with no run config to read draws) are other images.
    uniform = rng.block_labels(range(n), 4, 0, block=generate.BLOCK)
    assert (uniform == 0).float().mean() < 0.5
    other = as_uint8(rendered(cond_run, z, uniform))
    assert sum(not np.array_equal(files[i], other[i]) for i in range(n)) > n // 4

    # A --num grid draws the same classes; the checkpoint's own export finds its run's config too.
    export = cond_export(cond_run)
    assert gen("--checkpoint", export, "--num", 5, "--out", tmp_path / "g.png")[0] == 0
    save_image(rendered(cond_run, z[:5], c[:5]), tmp_path / "ref.png", nrow=3, normalize=True, value_range=(-1, 1))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "ref.png")))

    # The export alone, outside its run: no config to say the data's frequencies, so uniformly.
    alone = tmp_path / "generator.safetensors"
    alone.write_bytes(export.read_bytes())
    code, out, err = gen("--checkpoint", alone, "--num", n, "--out", tmp_path / "u", capsys=capsys)
    assert code == 0 and "classes: drawn uniformly (no run config" in out, out + err
    assert all(np.array_equal(np.asarray(Image.open(tmp_path / "u" / f"{i:06d}.png")), other[i]) for i in range(n))


def test_class_walks_stay_within_their_class(cond_run, tmp_path, monkeypatch):
    argv = ("--run", cond_run, "--class", "1,3", "--num", 4, "--interpolate", 2, "--frames", 2)
    assert gen(*argv, "--out", tmp_path / "w.gif")[0] == 0
    gif = Image.open(tmp_path / "w.gif")
    assert (gif.n_frames, gif.size) == (4, (2 * 34 + 2, 2 * 34 + 2))  # 2 classes x 2 walks
    # The frames exactly, before a GIF's palette rounds them: caught on their way to the writer.
    frames = []
    monkeypatch.setattr(generate, "write_animation", lambda fr, out, fps: frames.extend(np.asarray(f) for f in fr))
    assert gen(*argv, "--batch", 3, "--out", tmp_path / "w2.gif")[0] == 0
    assert len(frames) == 4
    keys = generate.latents(0, 0, 2 * 2, 16).view(2, 2, 16)  # [K, walks, z]: walk j's keys, the same in every row
    mid = generate.slerp(keys[0], keys[1], 0.5)  # frame 1: halfway from the first keys to the second
    for f, z in ((0, keys[0]), (1, mid), (2, keys[1])):
        want = generate.to_frame(rendered(cond_run, z[[0, 1, 0, 1]], [1, 1, 3, 3]), 2).numpy()  # rows: class 1, 3
        assert np.array_equal(frames[f], want), f
        swapped = generate.to_frame(rendered(cond_run, z[[0, 1, 0, 1]], [3, 3, 1, 1]), 2).numpy()
        assert not np.array_equal(frames[f], swapped)  # control: the rows' classes matter


def test_a_class_the_generator_lacks_is_one_line(cond_run, tmp_path, capsys):
    code, out, err = gen("--run", cond_run, "--class", "0,4", "--out", tmp_path / "x.png", capsys=capsys)
    lines = err.splitlines()
    assert code == 2 and lines == ["distgan generate: error: --class 0,4: the generator has 4 classes (0..3)"]
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------- StyleGAN2: truncation and style mixing


@pytest.fixture(scope="module")
def style_run(tmp_path_factory):
    from support import TINY

    run = tmp_path_factory.mktemp("style") / "run"
    tr = make_trainer(*TINY["stylegan2"], "train.total_kimg=0.032", run_dir=run)
    with torch.no_grad():  # w_avg away from zero and weights large enough that styles change the image
        tr.G_ema.module.mapping.w_avg.normal_()
        for p in tr.G_ema.module.synthesis.parameters():
            p.mul_(3)
    tr.fit()
    return run


def _png(path):
    return np.asarray(Image.open(path))


def test_psi_zero_draws_the_average_style_for_every_latent(style_run, tmp_path, capsys):
    code, out, err = gen("--run", style_run, "--out", tmp_path / "psi0.png", "--num", "4", "--psi", "0", capsys=capsys)
    assert code == 0, err
    psi0 = _png(tmp_path / "psi0.png")
    cells = [psi0[2 + i * 34 : 34 + i * 34, 2:34] for i in range(2)]  # a 2x2 grid of 32x32 with 2-pixel padding
    assert np.array_equal(cells[0], cells[1])
    # Control: without truncation the latents differ, and so do the images; and the same seed repeats exactly.
    assert gen("--run", style_run, "--out", tmp_path / "a.png", "--num", "4", capsys=capsys)[0] == 0
    assert gen("--run", style_run, "--out", tmp_path / "b.png", "--num", "4", capsys=capsys)[0] == 0
    a = _png(tmp_path / "a.png")
    assert not np.array_equal(a[2:34, 2:34], a[36:68, 2:34]) and np.array_equal(a, _png(tmp_path / "b.png"))


def test_style_mix_grid_cells_take_coarse_styles_from_the_top_row(style_run, tmp_path, capsys):
    n, cut = 3, 2
    code, out, err = gen("--run", style_run, "--out", tmp_path / "mix.png", "--num", n, "--style-mix", cut,
                         capsys=capsys)  # fmt: skip
    assert code == 0 and "style-mixing grid" in out, err
    G = load_generator(style_run / "checkpoints" / "ckpt-000000032" / "generator.safetensors")
    z = generate.latents(0, 0, 2 * n, G.z_dim)
    with torch.no_grad():
        ws = G.mapping(z, None)
        mixed = torch.cat([ws[n + 1 : n + 2, :cut], ws[2:3, cut:]], dim=1)  # row 2's image with column 1's coarse
        want = generate.to_uint8(G.synthesis(mixed, noise_mode="const")[0]).numpy()
        row2 = generate.to_uint8(G.synthesis(ws[2:3], noise_mode="const")[0]).numpy()
    grid = _png(tmp_path / "mix.png")  # (n+1) x (n+1) cells of 32 + 2 padding
    cell = lambda r, c: grid[2 + r * 34 : 34 + r * 34, 2 + c * 34 : 34 + c * 34]  # noqa: E731
    assert np.abs(cell(3, 2).astype(int) - want.astype(int)).max() <= 1  # grid row 3 = source row 2, col 2 = src 1
    assert np.abs(cell(3, 0).astype(int) - row2.astype(int)).max() <= 1  # the left column: the row sources
    assert not np.array_equal(cell(3, 2), cell(3, 0))  # the mix is not the row source itself


def test_style_options_are_refused_for_a_generator_without_styles(run_dir, tmp_path, capsys):
    code, _, err = gen("--run", run_dir, "--out", tmp_path / "x.png", "--psi", "0.5", capsys=capsys)
    assert code == 2 and "--psi needs a generator with a style mapping" in err
