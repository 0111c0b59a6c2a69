"""`distgan prepare`: shard layout, pixels, classes, bad input, resume, determinism, and the manifest reader."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import patience
from distgan.data import shapes
from distgan.data.manifest import read_manifest, sha256_file
from distgan.data.prepare import main, parse_bytes
from distgan.errors import DataError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def prepare(*args, workers=0) -> int:
    return main([*map(str, args), "--workers", str(workers), "--no-progress"])


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def samples(out) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all shards of a manifest, checking each key sits in one shard."""
    found = {}
    for shard in read_manifest(out)["shards"]:
        for name, data in tar_members(Path(out) / shard["name"]).items():
            key, ext = name.split(".")
            found.setdefault(key, {})[ext] = data
    return found


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def solid(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def shard_stats(out):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(Path(out).glob("shard-*.tar"))}


# ---------------------------------------------------------------------------------------------------------------
# shapes


def test_shapes_manifest_members_and_pixels(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare("shapes", "--num", 50, "--seed", 3, "--shard-samples", 20, "--out", out) == 0
    assert capsys.readouterr().out.startswith("prepared 50 samples (32x32 RGB png) in 3 shards, ")

    m = read_manifest(out)
    assert (m["format"], m["version"], m["num_samples"]) == ("distgan-shards", 1, 50)
    assert (m["resolution"], m["channels"], m["mode"], m["image_format"]) == (32, 3, "RGB", "png")
    assert m["classes"] == list(shapes.CLASSES) and m["skipped"] == [] and m["root"] == str(out)
    assert [(s["name"], s["samples"]) for s in m["shards"]] == [
        ("shard-000000.tar", 20),
        ("shard-000001.tar", 20),
        ("shard-000002.tar", 10),
    ]
    for s in m["shards"]:
        assert s["bytes"] == (out / s["name"]).stat().st_size and s["sha256"] == sha256_file(out / s["name"])
    assert m["source"]["kind"] == "shapes" and m["source"]["num"] == 50 and m["source"]["seed"] == 3
    assert m["source"]["shard_samples"] == 20 and m["source"]["shuffle"] is True
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "prepare.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]

    # Shard i holds keys [20i, 20i+20), each as exactly {key}.cls and {key}.png, in key order.
    for i, s in enumerate(m["shards"]):
        with tarfile.open(out / s["name"]) as tar:
            names = tar.getnames()
        keys = [f"{j:08d}" for j in range(20 * i, min(20 * i + 20, 50))]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("cls", "png")]

    # Key j is sample order[j] of the dataset, with order a permutation seeded by --seed: pixels equal render.
    found = samples(out)
    order = np.random.default_rng(3).permutation(50)
    images, labels = shapes.render(3, order)
    for j in range(50):
        key = f"{j:08d}"
        assert np.array_equal(pixels(found[key]["png"]), images[j].transpose(1, 2, 0))
        assert found[key]["cls"] == str(labels[j]).encode()
    assert not np.array_equal(order, np.arange(50))  # shuffled: key j is not image j
    # Samples per class, aligned with the classes: what the .cls members hold, and what shapes would render.
    assert m["class_counts"] == np.bincount([int(s["cls"]) for s in found.values()], minlength=4).tolist()
    assert m["class_counts"] == np.bincount(labels, minlength=4).tolist() and sum(m["class_counts"]) == 50
    assert min(m["class_counts"]) > 0


def test_no_shuffle_keeps_source_order_and_size_renders_directly(tmp_path):
    out = tmp_path / "out"
    assert prepare("shapes", "--num", 6, "--no-shuffle", "--size", 24, "--mode", "L", "--out", out) == 0
    m = read_manifest(out)
    assert (m["resolution"], m["channels"], m["mode"]) == (24, 1, "L")
    images, labels = shapes.render(0, np.arange(6), 24)
    found = samples(out)
    for j in range(6):
        grey = np.asarray(Image.fromarray(images[j].transpose(1, 2, 0)).convert("L"))
        got = pixels(found[f"{j:08d}"]["png"])
        assert got.shape == (24, 24) and np.array_equal(got, grey)
        assert int(found[f"{j:08d}"]["cls"]) == labels[j]


@pytest.mark.parametrize("fmt, pil_format", [("jpg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats(tmp_path, fmt, pil_format):
    out = tmp_path / "out"
    assert prepare("shapes", "--num", 5, "--format", fmt, "--quality", 90, "--out", out) == 0
    m = read_manifest(out)
    assert m["image_format"] == fmt and m["source"]["quality"] == 90
    found = samples(out)
    assert sorted(found) == [f"{j:08d}" for j in range(5)]
    images, _ = shapes.render(0, np.random.default_rng(0).permutation(5))
    for j, key in enumerate(sorted(found)):
        assert set(found[key]) == {fmt, "cls"}
        img = Image.open(io.BytesIO(found[key][fmt]))
        assert img.format == pil_format and img.size == (32, 32)
        assert np.abs(np.asarray(img.convert("RGB")).astype(int) - images[j].transpose(1, 2, 0)).mean() < 8


def test_shard_bytes_sets_samples_per_shard(tmp_path):
    counts = {}
    for size in ("40KB", "200KB"):
        out = tmp_path / size
        assert prepare("shapes", "--num", 200, "--shard-bytes", size, "--out", out) == 0
        m = read_manifest(out)
        counts[size] = len(m["shards"])
        assert m["source"]["shard_bytes"] == parse_bytes(size)
        per = m["source"]["shard_samples"]
        assert [s["samples"] for s in m["shards"]][:-1] == [per] * (len(m["shards"]) - 1)
        assert max(s["bytes"] for s in m["shards"]) < 1.3 * parse_bytes(size)
    assert counts["40KB"] > counts["200KB"] >= 1


def test_parse_bytes():
    assert parse_bytes("64MB") == 64_000_000 and parse_bytes("500KB") == 500_000 and parse_bytes("1GiB") == 2**30
    assert parse_bytes("1.5 mb") == 1_500_000 and parse_bytes("4096") == 4096
    with pytest.raises(Exception, match="not a size"):
        parse_bytes("12 parsecs")


# ---------------------------------------------------------------------------------------------------------------
# folders


def test_folder_with_classes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    solid(src / "cat" / "a.png", (40, 30), RED)
    solid(src / "cat" / "deep" / "b.JPG", (50, 50), RED)
    solid(src / "dog" / "c.png", (20, 20), BLUE)
    solid(src / "dog" / "d.webp", (64, 16), BLUE)
    solid(src / "emu" / "e.bmp", (16, 16), GREEN)
    (src / "empty").mkdir()
    (src / "dog" / "notes.txt").write_text("not an image, not listed")
    assert prepare("folder", "--src", src, "--size", 16, "--out", out) == 0
    m = read_manifest(out)
    assert m["classes"] == ["cat", "dog", "emu"] and m["num_samples"] == 5 and m["skipped"] == []
    assert m["class_counts"] == [2, 2, 1]
    assert m["source"]["src"] == str(src.resolve()) and m["source"]["size"] == 16
    colours = {0: RED, 1: BLUE, 2: GREEN}
    found = samples(out)
    assert sorted(found) == [f"{j:08d}" for j in range(5)]
    for sample in found.values():
        px = pixels(sample["png"])
        assert px.shape == (16, 16, 3)
        assert np.abs(px.astype(int) - colours[int(sample["cls"])]).max() <= 3  # jpg is close, not exact


def test_flat_folder_has_no_classes_and_infers_size_and_mode(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        solid(src / f"{i}.png", (8, 8), 40 * i, mode="L")
    solid(src / "sub" / "x.png", (8, 8), 200, mode="L")
    assert prepare("folder", "--src", src, "--no-shuffle", "--out", out) == 0
    m = read_manifest(out)
    assert (m["classes"], m["resolution"], m["mode"], m["channels"]) == ([], 8, "L", 1)
    assert m["class_counts"] == []
    found = samples(out)
    assert [set(s) for s in found.values()] == [{"png"}] * 4  # no .cls without classes
    assert [int(pixels(found[f"{j:08d}"]["png"])[0, 0]) for j in range(4)] == [0, 40, 80, 200]


def wide_red_blue(path):
    # 64x32: left half red, right half blue.
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = RED
    a[:, 32:] = BLUE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def test_crop_and_pad(tmp_path):
    src = tmp_path / "src"
    wide_red_blue(src / "wide.png")
    assert prepare("folder", "--src", src, "--size", 16, "--fit", "crop", "--out", tmp_path / "crop") == 0
    assert prepare("folder", "--src", src, "--size", 16, "--fit", "pad", "--out", tmp_path / "pad") == 0
    crop = pixels(samples(tmp_path / "crop")["00000000"]["png"]).astype(int)
    pad = pixels(samples(tmp_path / "pad")["00000000"]["png"]).astype(int)
    # crop: the centre 32x32 square, half red, half blue, filling the frame.
    assert crop.shape == (16, 16, 3)
    assert np.abs(crop[:, :6] - RED).max() <= 2 and np.abs(crop[:, 10:] - BLUE).max() <= 2
    # pad: the whole image at 16x8, centred vertically on black: red quarter, blue quarter.
    assert pad.shape == (16, 16, 3)
    assert (pad[:4] == 0).all() and (pad[12:] == 0).all()
    assert np.abs(pad[5:11, :6] - RED).max() <= 2 and np.abs(pad[5:11, 10:] - BLUE).max() <= 2


def test_mode_conversion_and_mixed_modes(tmp_path, capsys):
    src = tmp_path / "src"
    solid(src / "colour.png", (8, 8), RED)
    solid(src / "grey.png", (8, 8), 128, mode="L")
    assert prepare("folder", "--src", src, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distgan: error: ")
    assert "grey.png is L" in err and "colour.png is RGB" in err and "--mode" in err

    assert prepare("folder", "--src", src, "--mode", "L", "--no-shuffle", "--out", tmp_path / "L") == 0
    found = samples(tmp_path / "L")
    assert pixels(found["00000000"]["png"]).shape == (8, 8)  # colour.png, sorted first
    assert int(pixels(found["00000000"]["png"])[0, 0]) == round(255 * 299 / 1000)  # ITU-R 601 luma of red
    assert prepare("folder", "--src", src, "--mode", "RGB", "--no-shuffle", "--out", tmp_path / "RGB") == 0
    assert pixels(samples(tmp_path / "RGB")["00000001"]["png"])[0, 0].tolist() == [128, 128, 128]


def test_rgba_and_palette_become_rgb(tmp_path):
    src = tmp_path / "src"
    solid(src / "a.png", (8, 8), (10, 20, 30, 255), mode="RGBA")
    Image.new("RGB", (8, 8), GREEN).convert("P").save(src / "b.png")
    assert prepare("folder", "--src", src, "--no-shuffle", "--out", tmp_path / "o") == 0
    assert read_manifest(tmp_path / "o")["mode"] == "RGB"
    found = samples(tmp_path / "o")
    assert pixels(found["00000000"]["png"])[0, 0].tolist() == [10, 20, 30]
    assert pixels(found["00000001"]["png"])[0, 0].tolist() == list(GREEN)


def test_unreadable_images_are_skipped_and_listed(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        solid(src / f"ok{i}.png", (8, 8), (i, i, i))
    (src / "bad.png").write_text("this is not a png")
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    (src / "trunc.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    assert prepare("folder", "--src", src, "--shard-samples", 2, "--out", out) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("skipped 2 unreadable images: bad.png (") and "trunc.png (" in captured.err
    assert captured.out.endswith("(skipped 2)\n")
    m = read_manifest(out)
    assert m["num_samples"] == 3 and sum(s["samples"] for s in m["shards"]) == 3
    assert sorted(s["path"] for s in m["skipped"]) == ["bad.png", "trunc.png"]
    assert all(s["error"] and "\n" not in s["error"] for s in m["skipped"])
    assert m["skipped"][0]["error"] == "UnidentifiedImageError: cannot identify image file 'bad.png'"
    assert len(samples(out)) == 3

    # A re-run keeps every shard and finds the same skipped images again.
    before = shard_stats(out)
    assert prepare("folder", "--src", src, "--shard-samples", 2, "--out", out) == 0
    again = read_manifest(out)
    assert shard_stats(out) == before
    assert again["shards"] == m["shards"] and again["skipped"] == m["skipped"]


def test_class_counts_leave_out_unreadable_images_also_on_a_rerun(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        solid(src / "a" / f"{i}.png", (8, 8), RED)
    solid(src / "b" / "0.png", (8, 8), BLUE)
    (src / "b" / "bad.png").write_text("this is not a png")
    solid(src / "c" / "0.png", (8, 8), GREEN)
    solid(src / "c" / "1.png", (8, 8), GREEN)
    args = ("folder", "--src", src, "--shard-samples", 2, "--out", out)
    assert prepare(*args) == 0
    m = read_manifest(out)
    assert m["classes"] == ["a", "b", "c"] and m["class_counts"] == [3, 1, 2] and m["num_samples"] == 6
    found = samples(out)
    assert np.bincount([int(s["cls"]) for s in found.values()]).tolist() == [3, 1, 2]
    (out / "manifest.json").unlink()
    assert prepare(*args) == 0  # every shard kept: their counts read back from their .cls members
    assert "(4 kept from an earlier run)" in capsys.readouterr().out
    assert read_manifest(out)["class_counts"] == [3, 1, 2]


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
    empty, broken, src = tmp_path / "empty", tmp_path / "broken", tmp_path / "src"
    empty.mkdir()
    broken.mkdir()
    (broken / "bad.png").write_text("no")
    (broken / "worse.jpg").write_text("no")
    solid(src / "a.png", (8, 8), RED)
    solid(src / "b.png", (8, 8), RED)
    solid(src / "c.png", (9, 9), RED)
    cases = [
        (["folder", "--src", empty, "--out", tmp_path / "o"], f"no images in {empty}"),
        (["folder", "--src", tmp_path / "missing", "--out", tmp_path / "o"], "is not a directory"),
        (["folder", "--out", tmp_path / "o"], "needs --src"),
        (["folder", "--src", broken, "--size", 8, "--out", tmp_path / "o"], "none of the 2 images"),
        (["folder", "--src", broken, "--out", tmp_path / "o"], "none of the 2 images"),
        (["folder", "--src", src, "--size", 8, "--out", src / "shards"], "is inside --src"),
        (["folder", "--src", src, "--size", 8, "--out", src], "is inside --src"),
        (["folder", "--src", src, "--out", tmp_path / "o"], "differ in size (a.png is 8x8, c.png is 9x9)"),
        (["shapes", "--src", src, "--out", tmp_path / "o"], "--src is for SOURCE folder"),
    ]
    for argv, message in cases:
        assert prepare(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("distgan: error: ") and err.count("\n") == 1 and message in err, err
    assert not (src / "shards").exists()


# ---------------------------------------------------------------------------------------------------------------
# resume, overwrite, determinism


def test_resume_writes_only_missing_shards(tmp_path, capsys):
    out = tmp_path / "out"
    args = ("shapes", "--num", 50, "--shard-samples", 10, "--out", out)
    assert prepare(*args) == 0
    first = read_manifest(out)
    before = shard_stats(out)
    (out / "shard-000002.tar").unlink()
    (out / "shard-000003.tar.tmp").write_bytes(b"half a shard")
    (out / "manifest.json").unlink()  # as if the run stopped before the end
    capsys.readouterr()

    assert prepare(*args) == 0
    assert "(4 kept from an earlier run)" in capsys.readouterr().out
    after = shard_stats(out)
    assert sorted(after) == sorted(before) and not list(out.glob("*.tmp"))
    assert {k: v for k, v in after.items() if k != "shard-000002.tar"} == {
        k: v for k, v in before.items() if k != "shard-000002.tar"
    }
    assert after["shard-000002.tar"] != before["shard-000002.tar"]
    again = read_manifest(out)
    assert again["shards"] == first["shards"]  # identical bytes, so identical sha256s
    # The kept shards' classes are counted from their .cls members: the same counts as in one go.
    assert again["class_counts"] == first["class_counts"] and sum(first["class_counts"]) == 50


def test_a_different_plan_is_refused_until_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare("shapes", "--num", 20, "--out", out) == 0
    capsys.readouterr()
    assert prepare("shapes", "--num", 20, "--size", 16, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds shards from a different prepare (size: 32 then, 16 now)" in err
    assert prepare("shapes", "--num", 20, "--seed", 1, "--out", out) == 2
    assert "(seed: 0 then, 1 now)" in capsys.readouterr().err
    assert read_manifest(out)["resolution"] == 32  # untouched

    assert prepare("shapes", "--num", 8, "--size", 16, "--shard-samples", 4, "--overwrite", "--out", out) == 0
    m = read_manifest(out)
    assert m["resolution"] == 16 and m["num_samples"] == 8
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]


def test_a_folder_of_unknown_shards_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"")
    assert prepare("shapes", "--num", 4, "--out", out) == 2
    assert "unknown prepare" in capsys.readouterr().err


def test_workers_give_identical_shards(tmp_path):
    args = ("shapes", "--num", 40, "--shard-samples", 10)
    assert prepare(*args, "--out", tmp_path / "w0", workers=0) == 0
    assert prepare(*args, "--out", tmp_path / "w2", workers=2) == 0
    s0, s2 = read_manifest(tmp_path / "w0")["shards"], read_manifest(tmp_path / "w2")["shards"]
    assert len(s0) == 4 and s0 == s2


# ---------------------------------------------------------------------------------------------------------------
# torchvision


def write_mnist(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # torchvision's raw idx format; it checks only that the four files exist.
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n, h, w = images.shape
    img = (2051).to_bytes(4, "big") + b"".join(x.to_bytes(4, "big") for x in (n, h, w)) + images.tobytes()
    lab = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes()
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(img)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(lab)


def test_mnist_from_local_raw_files(tmp_path, capsys):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    images = np.repeat(np.arange(12, dtype=np.uint8)[:, None, None] * 20, 28, 1).repeat(28, 2)  # image i: 20*i
    write_mnist(tmp_path / "data", images, labels)
    out = tmp_path / "out"
    assert prepare("mnist", "--root", tmp_path / "data", "--no-download", "--shard-samples", 5, "--out", out) == 0
    m = read_manifest(out)
    assert (m["num_samples"], m["resolution"], m["channels"], m["mode"]) == (12, 28, 1, "L")
    assert len(m["classes"]) == 10 and m["classes"][0].startswith("0")
    assert m["class_counts"] == np.bincount(labels, minlength=10).tolist()  # [0, 2, 1, 2, 1, 3, 1, 0, 1, 1]
    assert [s["samples"] for s in m["shards"]] == [5, 5, 2]
    assert m["source"]["kind"] == "mnist" and m["source"]["root"] == str((tmp_path / "data").resolve())
    seen = []
    for sample in samples(out).values():
        px = pixels(sample["png"])
        i = int(px[0, 0]) // 20
        assert px.shape == (28, 28) and (px == 20 * i).all() and int(sample["cls"]) == labels[i]
        seen.append(i)
    assert sorted(seen) == list(range(12))

    assert prepare("mnist", "--root", tmp_path / "nothing", "--no-download", "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mnist not found under" in err and "--no-download" in err


# ---------------------------------------------------------------------------------------------------------------
# the manifest reader


def test_read_manifest_rejects_tampering(tmp_path):
    out = tmp_path / "out"
    assert prepare("shapes", "--num", 6, "--shard-samples", 3, "--out", out) == 0
    good = json.loads((out / "manifest.json").read_text())
    assert read_manifest(out / "manifest.json")["num_samples"] == 6

    def tampered(edit):
        m = json.loads(json.dumps(good))
        edit(m)
        (out / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DataError) as e:
            read_manifest(out)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "not a plain file name" in tampered(lambda m: m["shards"][0].update(name="../shard-000000.tar"))
    assert "not a plain file name" in tampered(lambda m: m["shards"][0].update(name="sub/shard-000000.tar"))
    assert "num_samples is 7 but the shards hold 6" in tampered(lambda m: m.update(num_samples=7))
    assert "newer than this distgan" in tampered(lambda m: m.update(version=2))
    assert "format" in tampered(lambda m: m.update(format="something-else"))
    assert "shards is not a non-empty list" in tampered(lambda m: m.update(shards=[]))
    assert "resolution" in tampered(lambda m: m.update(resolution="32"))
    assert good["class_counts"] and sum(good["class_counts"]) == 6
    one_more = [c + (i == 0) for i, c in enumerate(good["class_counts"])]
    assert "class_counts add up to 7, not num_samples 6" in tampered(lambda m: m.update(class_counts=one_more))
    assert "class_counts has 3 entries for 4 classes" in tampered(lambda m: m["class_counts"].pop())
    assert "not a list of non-negative" in tampered(lambda m: m.update(class_counts=[6, -1, 1, 0]))
    assert "not a list of non-negative" in tampered(lambda m: m.update(class_counts="6"))
    assert "2 entries for 0 classes" in tampered(lambda m: m.update(classes=[], class_counts=[1, 5]))
    # A manifest from before class_counts (still version 1) reads as it always did.
    old = {k: v for k, v in good.items() if k != "class_counts"}
    (out / "manifest.json").write_text(json.dumps(old))
    assert "class_counts" not in read_manifest(out) and read_manifest(out)["classes"] == good["classes"]
    (out / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        read_manifest(out)
    with pytest.raises(DataError, match=r"no manifest.json in .*; create one with `distgan prepare"):
        read_manifest(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------------------------
# the console script and imports


def test_console_script_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    distgan = Path(sys.executable).parent / "distgan"
    cmd = [distgan, "prepare", "folder", "--src", tmp_path / "empty", "--out", tmp_path / "o", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=patience(60))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"distgan: error: no images in {(tmp_path / 'empty').resolve()} " + "(looked for "
                                     ".png .jpg .jpeg .webp .bmp .gif .tif .tiff files, recursively)"]  # fmt: skip


def test_imports_stay_light():
    code = (
        "import sys, importlib.util\n"
        "import distgan.errors\n"
        "spec = importlib.util.spec_from_file_location('m', 'distgan/data/manifest.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, 'manifest.py imports torch or PIL'\n"
        "import distgan.data.prepare\n"
        "heavy = {'accelerate', 'wandb', 'deepspeed', 'torchvision'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
