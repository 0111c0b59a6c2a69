"""In-memory data (distgan/data/memory.py, shapes.py) and what the catalog (catalog.py) says about any data."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distgan.config import load_config
from distgan.data import ArrayStream, load_dataset, load_images, make_stream, resize, shapes
from distgan.data.batch import Batch
from distgan.errors import DataError


def ids(n=10):
    # Images whose single pixel value is their index: batches then show which samples they hold.
    return np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)


def take(stream, steps):
    """The images of `steps` batches, as lists of ids; a labelled stream's labels checked to be its images'."""
    out = []
    for _ in range(steps):
        batch = next(stream)
        assert isinstance(batch, Batch)
        images = batch.images.flatten().tolist()
        if stream.labels is not None:
            assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [i % 7 for i in images]
        else:
            assert batch.labels is None
        out.append(images)
    return out


def labelled_stream(*args, **kw):
    """An ArrayStream over ids() whose label is id % 7."""
    return ArrayStream(ids(), *args, labels=np.arange(10) % 7, **kw)


def test_shapes_are_deterministic_and_independent_of_batching():
    a, la = shapes.generate(50, seed=3)
    b, lb = shapes.render(3, [49, 7, 0])
    assert a.shape == (50, 3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a[[49, 7, 0]], b) and np.array_equal(la[[49, 7, 0]], lb)
    c, _ = shapes.generate(50, seed=4)
    assert not np.array_equal(a, c)


def test_shapes_labels_cover_all_classes_and_images_vary():
    images, labels = shapes.generate(400, seed=0)
    assert set(labels.tolist()) == set(range(len(shapes.CLASSES)))
    assert images.std(axis=0).mean() > 20  # position/colour/size vary across images
    # Each image: a plain background (its corner pixel is the most common colour) and a shape that differs.
    for img in images[:20]:
        flat = img.reshape(3, -1).T
        assert (np.abs(flat.astype(int) - flat[0]).sum(1) > 60).mean() > 0.03


def test_shapes_other_resolutions():
    images, _ = shapes.generate(4, seed=0, resolution=64)
    assert images.shape == (4, 3, 64, 64)


def test_stream_epoch_is_a_permutation_and_ranks_split_the_global_batch():
    one = ArrayStream(ids(), batch=4, rank=0, world_size=1, seed=1)
    r0 = labelled_stream(batch=4, rank=0, world_size=2, seed=1)  # (take() checks every label is its image's)
    r1 = labelled_stream(batch=4, rank=1, world_size=2, seed=1)
    glob, a, b = take(one, 5), take(r0, 5), take(r1, 5)
    assert [x + y for x, y in zip(a, b)] == glob  # rank 0 takes the first half of each global batch
    seen = sum(glob, [])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # two epochs
    assert seen[:10] != seen[10:20]  # a fresh order per epoch


def test_stream_resume_from_position_continues_exactly():
    full = ArrayStream(ids(), batch=4, rank=1, world_size=2, seed=5)
    expected = take(full, 7)
    first = labelled_stream(batch=4, rank=1, world_size=2, seed=5)
    got = take(first, 3)
    resumed = labelled_stream(batch=4, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(first.state_dict())
    got += take(resumed, 4)  # crosses an epoch end (10 images, batch 4)
    assert got == expected


def test_stream_seed_changes_order():
    assert take(ArrayStream(ids(), 4, 0, 1, seed=1), 2) != take(ArrayStream(ids(), 4, 0, 1, seed=2), 2)


def test_xflip_flips_about_half_deterministically():
    images = np.zeros([64, 1, 1, 2], np.uint8)
    images[..., 1] = 255  # [0, 255] -> flipped [255, 0]
    s = ArrayStream(images, 64, 0, 1, seed=0, xflip=True)
    batch = next(s).images
    flipped = (batch[..., 0] == 255).float().mean().item()
    assert 0.3 < flipped < 0.7
    s2 = ArrayStream(images, 64, 0, 1, seed=0, xflip=True)
    assert torch.equal(next(s2).images, batch)
    assert torch.equal(ArrayStream(images, 64, 0, 1, seed=0).__next__().images, torch.from_numpy(images))


def test_empty_dataset_is_an_error():
    with pytest.raises(DataError):
        ArrayStream(np.zeros([0, 1, 2, 2], np.uint8), 2, 0, 1, 0)
    with pytest.raises(ValueError, match="9 labels for 10 images"):
        ArrayStream(ids(), 2, 0, 1, 0, labels=np.arange(9))


def test_shapes_stream_carries_each_images_own_label():
    cfg = load_config(None, ["data.source=shapes", "data.num_images=40", "model.resolution=8", "train.batch=8"])
    images, labels = load_dataset(cfg)
    assert np.array_equal(labels, shapes.generate(40, seed=0, resolution=8)[1]) and labels.dtype == np.int64
    assert np.array_equal(load_images(cfg), images)
    # Which image a batch row is, found by its pixels; its label must be that image's.
    rows = {images[i].tobytes(): i for i in range(40)}
    assert len(rows) == 40
    stream = make_stream(cfg, 1, 2)  # rank 1 of 2
    for _ in range(12):  # several epochs
        batch = next(stream)
        index = [rows[im.numpy().tobytes()] for im in batch.images]
        assert batch.labels.tolist() == labels[index].tolist()


def test_resize():
    x = torch.full([3, 1, 28, 28], 200, dtype=torch.uint8)
    y = resize(x, 32)
    assert y.shape == (3, 1, 32, 32) and y.dtype == torch.uint8 and (y == 200).all()


def _write_idx(path, array):
    # The MNIST idx format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes.
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]))
        for d in array.shape:
            f.write(int(d).to_bytes(4, "big"))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_from_local_files_without_download(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, [12, 28, 28])
    _write_idx(raw / "train-images-idx3-ubyte", images)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", images[:2])
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(2))
    cfg = load_config(
        None,
        [
            "data.source=mnist",
            f"data.root={tmp_path}",
            "data.download=false",
            "model.channels=1",
            "model.resolution=32",
        ],
    )
    out, labels = load_dataset(cfg)
    assert out.shape == (12, 1, 32, 32) and out.dtype == np.uint8
    ref = resize(torch.from_numpy(images.astype(np.uint8)).unsqueeze(1), 32).numpy()
    assert np.array_equal(out, ref)
    assert labels.tolist() == (np.arange(12) % 10).tolist() and labels.dtype == np.int64
    batch = next(make_stream(cfg, 0, 1))  # train.batch of the defaults (64) over 12 images: a bit over 5 epochs
    rows = [next(i for i in range(12) if np.array_equal(out[i], im.numpy())) for im in batch.images]
    assert batch.labels.tolist() == [i % 10 for i in rows]


def test_missing_mnist_without_download_is_one_clear_error(tmp_path):
    cfg = load_config(None, ["data.source=mnist", f"data.root={tmp_path}", "data.download=false", "model.channels=1"])
    with pytest.raises(DataError, match="mnist not found under") as e:
        load_images(cfg)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# the catalog


def data(*overrides):
    return load_config(None, list(overrides)).data


def test_catalog_agrees_with_the_datasets_themselves():
    from distgan.data import catalog

    assert catalog.BY_NAME["shapes"].classes == shapes.CLASSES
    assert catalog.DATASET_CHANNELS == {"shapes": 3, "mnist": 1, "fashion_mnist": 1, "cifar10": 3}
    tv = pytest.importorskip("torchvision")
    for name in ("mnist", "fashion_mnist"):  # (CIFAR-10's names are in its downloaded files only)
        d = catalog.BY_NAME[name]
        assert list(d.classes) == getattr(tv.datasets, d.torchvision).classes
    # Uniform by construction: shapes' label is floor(4u), u uniform, so 1/4 each (a large sample agrees).
    counts = np.bincount(shapes.generate(4000, seed=1, resolution=8)[1], minlength=4) / 4000
    assert np.abs(counts - 0.25).max() < 0.03


def test_data_classes_of_the_built_in_datasets():
    from distgan.data.catalog import data_classes

    info = data_classes(data("data.source=shapes"))
    assert info.names == ("circle", "square", "triangle", "cross") and info.frequencies == (0.25,) * 4
    assert info.num_classes == 4 and info.known and info.counts is None
    for name in ("mnist", "fashion_mnist", "cifar10"):  # nothing downloaded or loaded: frequencies unknown
        info = data_classes(data(f"data.source={name}", "data.root=/nonexistent", "data.download=false"))
        assert info.num_classes == 10 and info.frequencies is None
    assert data_classes(data("data.source=cifar10")).names[0] == "airplane"


def test_data_classes_of_shards(tmp_path):
    from distgan.data import prepare
    from distgan.data.catalog import UNKNOWN, data_classes
    from support import write_shards

    def shards(spec, *more):
        return data("data.source=shards", f"data.shards={spec}", *more)

    # Prepared with classes: names and counts from the manifest, found by folder or by manifest.json.
    out = tmp_path / "shapes"
    assert prepare.main(["shapes", "--out", str(out), "--num", "30", "--size", "8", "--workers", "0"]) == 0
    labels = shapes.generate(30, seed=0, resolution=8)[1]
    for spec in (out, out / "manifest.json"):
        info = data_classes(shards(spec))
        assert info.names == shapes.CLASSES and info.counts == tuple(np.bincount(labels, minlength=4).tolist())
        assert info.frequencies == tuple(c / 30 for c in info.counts)
    # A manifest from before class_counts: classes known, frequencies unknown. No classes: None.
    write_shards(tmp_path / "old", 2, 3, label=lambda i: i % 3, num_classes=3)
    assert data_classes(shards(tmp_path / "old")) == type(info)(("class-0", "class-1", "class-2"), None, None)
    write_shards(tmp_path / "plain", 2, 3)
    assert data_classes(shards(tmp_path / "plain")) is None
    # Shard paths or URLs without a manifest: unknown (not "no classes") until their samples are read.
    brace = f"{tmp_path}/plain/shard-{{000000..000001}}.tar"
    info = data_classes(shards(brace))
    assert info is UNKNOWN and info is not None and not info.known and info.num_classes is None
    # The stream's own errors, before training: a folder without a manifest, a pipe without allow_pipe.
    with pytest.raises(DataError, match="no manifest.json in"):
        data_classes(shards(tmp_path / "nothing-here"))
    pipe = data("data.source=shards", "data.shards=pipe:cat x.tar")
    with pytest.raises(DataError, match="allow_pipe"):
        data_classes(pipe)


def test_catalog_and_the_data_package_import_no_torch():
    code = (
        "import sys\n"
        "from distgan.data.catalog import DATASET_CHANNELS, data_classes\n"
        "import distgan.data\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'torch or numpy was imported'\n"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
