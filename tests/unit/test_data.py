import numpy as np
import pytest
import torch

from distgan.config import load_config
from distgan.data import ArrayStream, load_images, resize, shapes
from distgan.errors import DataError


def ids(n=10):
    # Images whose single pixel value is their index: batches then show which samples they hold.
    return np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)


def take(stream, steps):
    return [next(stream).flatten().tolist() for _ in range(steps)]


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
    r0 = ArrayStream(ids(), batch=4, rank=0, world_size=2, seed=1)
    r1 = ArrayStream(ids(), batch=4, rank=1, world_size=2, seed=1)
    glob, a, b = take(one, 5), take(r0, 5), take(r1, 5)
    assert [x + y for x, y in zip(a, b)] == glob  # rank 0 takes the first half of each global batch
    seen = sum(glob, [])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # two epochs
    assert seen[:10] != seen[10:20]  # a fresh order per epoch


def test_stream_resume_from_position_continues_exactly():
    full = ArrayStream(ids(), batch=4, rank=1, world_size=2, seed=5)
    expected = take(full, 7)
    first = ArrayStream(ids(), batch=4, rank=1, world_size=2, seed=5)
    got = take(first, 3)
    resumed = ArrayStream(ids(), batch=4, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(first.state_dict())
    got += take(resumed, 4)  # crosses an epoch end (10 images, batch 4)
    assert got == expected


def test_stream_seed_changes_order():
    assert take(ArrayStream(ids(), 4, 0, 1, seed=1), 2) != take(ArrayStream(ids(), 4, 0, 1, seed=2), 2)


def test_xflip_flips_about_half_deterministically():
    images = np.zeros([64, 1, 1, 2], np.uint8)
    images[..., 1] = 255  # [0, 255] -> flipped [255, 0]
    s = ArrayStream(images, 64, 0, 1, seed=0, xflip=True)
    batch = next(s)
    flipped = (batch[..., 0] == 255).float().mean().item()
    assert 0.3 < flipped < 0.7
    s2 = ArrayStream(images, 64, 0, 1, seed=0, xflip=True)
    assert torch.equal(next(s2), batch)
    assert torch.equal(ArrayStream(images, 64, 0, 1, seed=0).__next__(), torch.from_numpy(images))


def test_empty_dataset_is_an_error():
    with pytest.raises(DataError):
        ArrayStream(np.zeros([0, 1, 2, 2], np.uint8), 2, 0, 1, 0)


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
    out = load_images(cfg)
    assert out.shape == (12, 1, 32, 32) and out.dtype == np.uint8
    ref = resize(torch.from_numpy(images.astype(np.uint8)).unsqueeze(1), 32).numpy()
    assert np.array_equal(out, ref)


def test_missing_mnist_without_download_is_one_clear_error(tmp_path):
    cfg = load_config(None, ["data.source=mnist", f"data.root={tmp_path}", "data.download=false", "model.channels=1"])
    with pytest.raises(DataError, match="mnist not found under") as e:
        load_images(cfg)
    assert "\n" not in str(e.value)
