"""Picture helpers shared by every layer (the dataset generator, the server, the reports)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def image_grid(images: Sequence[np.ndarray], rows: int, cols: int, pad: int = 2) -> Image.Image:
    """Tile HxWx3 uint8 arrays row-major into one PIL image."""
    h, w = images[0].shape[:2]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images[: rows * cols]):
        r, c = divmod(k, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return Image.fromarray(canvas)


def class_grid(images, labels, per_class: int = 8) -> Image.Image:
    """Up to ``per_class`` images of each class present, one row per class (uint8 tensors
    N x 3 x H x W; a row with fewer images is padded white)."""
    tiles = []
    classes = labels.unique().tolist()
    for c in classes:
        idx = (labels == c).nonzero().flatten()[:per_class]
        tiles += [images[i].permute(1, 2, 0).numpy() for i in idx]
        tiles += [images[0].permute(1, 2, 0).numpy() * 0 + 255] * (per_class - len(idx))
    return image_grid(tiles, len(classes), per_class)
