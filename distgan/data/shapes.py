"""The built-in dataset: filled shapes on plain backgrounds, generated from a seed, nothing to download.

Each image shows one upright shape (circle, square, triangle or cross) in a random bright colour, size and
position on a dark uniform background, anti-aliased from its signed distance. The class label is the shape.
Image i depends only on (seed, i), so any subset can be regenerated anywhere, in any order, by any process.

It is small enough for a laptop GAN to learn in minutes, and varied enough that a person sees it learn:
early samples are blobs of colour, then edges and corners appear, then recognisable shapes.
"""

from __future__ import annotations

import math

import numpy as np

CLASSES = ("circle", "square", "triangle", "cross")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    # h, s, v: [N] in [0, 1] -> [N, 3]
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(len(h))]


# Signed distances in units of the shape's radius (negative inside). Exact along edges, which is all the
# anti-aliasing needs; the polygons use the max of their half-plane distances.
def _circle(u, v):
    return np.sqrt(u * u + v * v) - 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) - 0.7  # corners at radius 0.99: inside the frame


def _triangle(u, v):
    # Equilateral, inscribed in the unit circle, apex up (image rows grow downwards, so up is -v).
    r3, up = math.sqrt(3), -v
    return np.maximum(-up - 0.5, np.maximum((r3 * u + up - 1.0) / 2, (-r3 * u + up - 1.0) / 2))


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.3, av - 0.95), np.maximum(av - 0.3, au - 0.95))


_SHAPES = (_circle, _square, _triangle, _cross)  # in the order of CLASSES


def _params(seed: int, index: np.ndarray) -> dict[str, np.ndarray]:
    # One independent generator per image: image i is the same whatever batch it is made in.
    rows = []
    for i in index:
        rng = np.random.default_rng([seed, int(i)])
        rows.append(rng.random(10))
    r = np.array(rows).reshape(len(index), 10)
    return {
        "label": (r[:, 0] * len(CLASSES)).astype(int),
        "size": 0.25 + 0.15 * r[:, 1],  # radius as a fraction of the image side: diameters of 16-26 px at 32
        "cx": r[:, 2],
        "cy": r[:, 3],
        "fg": _hsv_to_rgb(r[:, 5], 0.55 + 0.45 * r[:, 6], 0.75 + 0.25 * r[:, 7]),
        "bg": _hsv_to_rgb(r[:, 8], 0.3 * r[:, 9], 0.08 + 0.22 * r[:, 9]),
    }


def render(seed: int, index, resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images `index` of the dataset: uint8 [N, 3, res, res] and int64 labels [N]."""
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    p = _params(seed, index)
    size = p["size"].astype(np.float32)[:, None, None]  # radius, fraction of the side: [N, 1, 1]
    # Centre so the whole shape stays inside the frame.
    cx = size + (1 - 2 * size) * p["cx"].astype(np.float32)[:, None, None]
    cy = size + (1 - 2 * size) * p["cy"].astype(np.float32)[:, None, None]
    coords = ((np.arange(resolution) + 0.5) / resolution).astype(np.float32)  # pixel centres
    x, y = coords[None, None, :] - cx, coords[None, :, None] - cy  # [N, 1, res], [N, res, 1]
    u, v = np.broadcast_arrays(x / size, y / size)  # in units of the radius: [N, res, res]

    dist = np.empty(u.shape, dtype=np.float32)
    for k, sdf in enumerate(_SHAPES):  # each image evaluates only its own shape
        sel = p["label"] == k
        if sel.any():
            dist[sel] = sdf(u[sel], v[sel])
    # Coverage of a one-pixel footprint: the distance converted to pixels, clipped ramp.
    alpha = np.clip(0.5 - dist * (size * resolution), 0.0, 1.0)[:, None]  # [N, 1, res, res]
    fg, bg = p["fg"][:, :, None, None], p["bg"][:, :, None, None]  # [N, 3, 1, 1]
    img = bg + (fg - bg) * alpha
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8), p["label"].astype(np.int64)


def generate(num_images: int, seed: int = 0, resolution: int = 32, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_images` images: uint8 [N, 3, res, res], labels [N]."""
    images, labels = [], []
    for start in range(0, num_images, chunk):
        im, lb = render(seed, np.arange(start, min(start + chunk, num_images)), resolution)
        images.append(im)
        labels.append(lb)
    return np.concatenate(images), np.concatenate(labels)
