"""FedBiP-Shapes: a seeded, procedurally rendered multi-domain image benchmark.

Ten object classes (geometric shapes) are drawn with a random position, scale, rotation
and colour per sample, in twelve rendering styles ("domains"). Eight styles are used to
pretrain the bundled latent diffusion model; four are held out as the client domains the
model has never seen (among them a medical-imaging-like and a satellite-like style).

Every sample is a pure function of ``(seed, domain, class, index)``, so any subset can be
regenerated in any order and the same call always yields the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "arrow",
    "crescent",
    "hexagon",
    "heart",
)
PRETRAIN_STYLES: tuple[str, ...] = (
    "photo",
    "cartoon",
    "sketch",
    "painting",
    "neon",
    "blueprint",
    "pixel art",
    "woodcut",
)
HELDOUT_STYLES: tuple[str, ...] = ("medical", "satellite", "thermal", "chalkboard")
STYLES: tuple[str, ...] = PRETRAIN_STYLES + HELDOUT_STYLES
SUPPORTED_RESOLUTIONS = (32, 64)
_SUPERSAMPLE = 4


# ----------------------------------------------------------------------------- shapes
def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _shape_polygons(name: str) -> list[tuple[np.ndarray, bool]]:
    """Unit-size polygons (x, y in [-1, 1]); the flag says "fill" (True) or "cut out"."""
    if name == "circle":
        return [(_regular(64), True)]
    if name == "square":
        return [(_regular(4, math.pi / 4) * 1.2, True)]
    if name == "triangle":
        return [(_regular(3, -math.pi / 2) * 1.1 + [0, 0.15], True)]
    if name == "star":
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.42)
        return [(_regular(10, -math.pi / 2) * r[:, None], True)]
    if name == "cross":
        a, b = 0.32, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
               (-a, a), (-b, a), (-b, -a), (-a, -a)]  # fmt: skip
        return [(np.array(pts, float), True)]
    if name == "ring":
        return [(_regular(64), True), (_regular(64) * 0.55, False)]
    if name == "arrow":
        pts = [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25),
               (-1, 0.25)]  # fmt: skip
        return [(np.array(pts, float), True)]
    if name == "crescent":
        return [(_regular(64), True), (_regular(64) * 0.85 + [0.45, -0.1], False)]
    if name == "hexagon":
        return [(_regular(6), True)]
    if name == "heart":
        t = np.linspace(0, 2 * math.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], 1) / 16.5, True)]
    raise ValueError(f"unknown shape {name!r}")


def _render_mask(name: str, res: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Anti-aliased fill mask and outline mask in [0, 1], plus the light direction."""
    big = res * _SUPERSAMPLE
    scale = rng.uniform(0.24, 0.40) * big
    angle = rng.uniform(0, 2 * math.pi)
    margin = scale * 1.05
    cx, cy = rng.uniform(margin, big - margin, size=2)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    fill = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(fill)
    for poly, positive in _shape_polygons(name):
        pts = [tuple(p) for p in (poly @ rot.T) * scale + [cx, cy]]
        draw.polygon(pts, fill=255 if positive else 0)
    # The outline is the boundary of the final filled shape (cut-outs included).
    k = 2 * max(1, big // 56) + 1
    line = ImageChops.subtract(fill.filter(ImageFilter.MaxFilter(k)), fill.filter(ImageFilter.MinFilter(k)))
    size = (res, res)
    m = np.asarray(fill.resize(size, Image.BOX), np.float32) / 255.0
    e = np.asarray(line.resize(size, Image.BOX), np.float32) / 255.0
    return m, np.clip(e * 1.6, 0, 1), np.array([cx, cy]) / big


# ----------------------------------------------------------------------------- helpers
def _smooth_noise(rng: np.random.Generator, res: int, cells: int, ch: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1] (bicubic upsampling of a coarse random grid)."""
    out = []
    for _ in range(ch):
        g = rng.random((cells, cells)).astype(np.float32)
        out.append(np.asarray(Image.fromarray(g, "F").resize((res, res), Image.BICUBIC)))
    return np.clip(np.stack(out, -1), 0, 1)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an HxW or HxWxC float array (edge padding)."""
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = img if img.ndim == 3 else img[..., None]
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
        xp = np.pad(x, pad, mode="edge")
        x = sum(
            k[i] * np.take(xp, range(i, i + x.shape[axis]), axis=axis) for i in range(len(k))
        )
    return x if img.ndim == 3 else x[..., 0]


def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    h, sat, val = rng.random(), rng.uniform(*s), rng.uniform(*v)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val),
                     (val, p, q)][i], np.float32)  # fmt: skip


def _mix(bg: np.ndarray, fg: np.ndarray, m: np.ndarray) -> np.ndarray:
    return bg * (1 - m[..., None]) + fg * m[..., None]


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:res, 0:res].astype(np.float32) / res
    return x, y


# ----------------------------------------------------------------------------- styles
def _photo(rng, m, e, light, res):
    x, y = _grid(res)
    bg = _hsv(rng, (0.1, 0.4), (0.35, 0.8)) * (0.7 + 0.3 * _smooth_noise(rng, res, 6, 3))
    bg = bg + 0.06 * (rng.random((res, res, 1)) - 0.5)
    shadow = np.roll(_blur(m, res / 24), (res // 16, res // 16), (0, 1))
    bg = bg * (1 - 0.45 * shadow[..., None])
    lx, ly = light + rng.uniform(-0.2, 0.2, 2)
    shade = np.clip(1.15 - 1.2 * np.hypot(x - lx + 0.15, y - ly + 0.15), 0.35, 1.2)
    fg = _hsv(rng, (0.5, 0.9), (0.6, 1.0)) * shade[..., None]
    return _mix(bg, fg, m)


def _cartoon(rng, m, e, light, res):
    bg = np.broadcast_to(_hsv(rng, (0.1, 0.3), (0.85, 1.0)), (res, res, 3))
    fg = _hsv(rng, (0.7, 1.0), (0.8, 1.0))
    return _mix(_mix(bg, fg, m), np.zeros(3, np.float32), e)


def _sketch(rng, m, e, light, res):
    x, y = _grid(res)
    paper = 0.93 + 0.05 * _smooth_noise(rng, res, 8)[..., 0]
    period = rng.uniform(0.09, 0.14)
    hatch = (np.sin(2 * math.pi * (x + y) / period + rng.uniform(0, 6)) > 0.6) * 0.35
    jitter = np.clip(e * rng.uniform(0.6, 1.0, (res, res)), 0, 1)
    ink = np.clip(jitter * 0.8 + hatch * m, 0, 1)
    return np.repeat(((paper * (1 - ink)) + 0.15 * ink)[..., None], 3, -1)


def _painting(rng, m, e, light, res):
    bg = _smooth_noise(rng, res, 4, 3) * 0.3 + _hsv(rng, (0.3, 0.6), (0.25, 0.5)) * 0.7
    fg = _hsv(rng, (0.6, 1.0), (0.75, 1.0)) * (0.85 + 0.25 * _smooth_noise(rng, res, 10, 3))
    img = _mix(bg, fg, _blur(m, res / 40))
    strokes = _smooth_noise(rng, res, 16, 3) - 0.5
    return _blur(img, res / 48) + 0.08 * strokes


def _neon(rng, m, e, light, res):
    col = _hsv(rng, (0.6, 1.0), (0.95, 1.0))
    glow = _blur(e, res / 16) * 1.8
    bg = np.full((res, res, 3), 0.04, np.float32) + 0.03 * _smooth_noise(rng, res, 4, 3)
    img = bg + col * np.clip(glow, 0, 1)[..., None] * 0.8
    return _mix(img, np.clip(col * 0.4 + 0.75, 0, 1), e)


def _blueprint(rng, m, e, light, res):
    x, y = _grid(res)
    base = np.array([0.08, 0.22, 0.55], np.float32) * rng.uniform(0.8, 1.15)
    step = 8 / res
    grid = ((np.mod(x, step) < 1.0 / res) | (np.mod(y, step) < 1.0 / res)) * 0.25
    img = base + grid[..., None] * np.array([0.6, 0.7, 0.9], np.float32)
    img = img + 0.1 * m[..., None] * np.array([0.3, 0.4, 0.6], np.float32)
    return _mix(img, np.array([0.92, 0.95, 1.0], np.float32), e)


def _pixel_art(rng, m, e, light, res):
    block = max(2, res // 16)
    small = m[::block, ::block] + 0.0
    small = np.round(np.clip(small * 1.3, 0, 1))
    blocky = np.kron(small, np.ones((block, block), np.float32))[:res, :res]
    palette = [_hsv(rng, (0.8, 1.0), (0.8, 1.0)) for _ in range(2)]
    bg = np.broadcast_to(_hsv(rng, (0.4, 0.8), (0.2, 0.45)), (res, res, 3))
    checker = (np.add.outer(np.arange(res) // block, np.arange(res) // block) % 2)[..., None]
    fg = np.where(checker > 0, palette[0], palette[0] * 0.8 + palette[1] * 0.2)
    return _mix(bg, fg, blocky)


def _woodcut(rng, m, e, light, res):
    x, y = _grid(res)
    paper = np.array([0.92, 0.86, 0.72], np.float32) * rng.uniform(0.9, 1.05)
    grain = 0.05 * np.sin(2 * math.pi * (y * 9 + 0.6 * _smooth_noise(rng, res, 4)[..., 0]))
    period = rng.uniform(0.12, 0.18)
    carve = (np.sin(2 * math.pi * y / period + rng.uniform(0, 6)) > 0.55).astype(np.float32)
    ink = np.clip(m * (1 - carve * 0.85), 0, 1)
    img = paper + grain[..., None]
    return _mix(img, np.array([0.1, 0.08, 0.06], np.float32), ink)


def _medical(rng, m, e, light, res):
    x, y = _grid(res)
    vignette = np.clip(1.0 - 1.3 * np.hypot(x - 0.5, y - 0.5), 0, 1)
    base = rng.uniform(0.18, 0.3) + 0.18 * vignette + 0.06 * _smooth_noise(rng, res, 6)[..., 0]
    lesion = _blur(m, res / 40) * rng.uniform(0.22, 0.3)
    img = base + lesion
    img = img * (1 + 0.12 * rng.standard_normal((res, res))) + 0.02 * rng.standard_normal(
        (res, res)
    )
    return np.repeat(img[..., None], 3, -1)


def _satellite(rng, m, e, light, res):
    fields = _smooth_noise(rng, res, 5, 1)[..., 0]
    green = np.array([0.25, 0.4, 0.18], np.float32)
    brown = np.array([0.45, 0.36, 0.22], np.float32)
    land = _mix(np.broadcast_to(green, (res, res, 3)), brown, (fields > 0.5).astype(np.float32))
    land = land * (0.8 + 0.3 * rng.random((res, res, 1)))
    shadow = np.roll(m, (res // 24 + 1, res // 24 + 1), (0, 1)) * (1 - m)
    land = land * (1 - 0.5 * shadow[..., None])
    roof = np.array([0.62, 0.62, 0.6], np.float32) * rng.uniform(0.8, 1.1)
    roof = roof * (0.9 + 0.15 * _smooth_noise(rng, res, 12, 1))
    return _mix(land, roof, m)


def _thermal(rng, m, e, light, res):
    heat = 0.25 * _smooth_noise(rng, res, 4)[..., 0] + 0.75 * _blur(m, res / 14) * rng.uniform(
        0.8, 1.0
    )
    heat = np.clip(heat + 0.03 * rng.standard_normal((res, res)), 0, 1)
    # inferno-like colormap: black -> purple -> orange -> yellow
    r = np.clip(1.6 * heat, 0, 1)
    g = np.clip(1.8 * heat - 0.7, 0, 1)
    b = np.clip(0.7 * np.sin(math.pi * heat * 1.2) + 0.1, 0, 1) * (1 - g * 0.5)
    return np.stack([r, g, b], -1)


def _chalkboard(rng, m, e, light, res):
    board = np.array([0.12, 0.25, 0.18], np.float32) * rng.uniform(0.85, 1.15)
    smudge = 0.08 * _smooth_noise(rng, res, 6, 1)
    chalk = np.clip(e * (0.55 + 0.45 * rng.random((res, res))), 0, 1)
    img = board + smudge + 0.04 * m[..., None]
    return _mix(img, np.array([0.9, 0.92, 0.88], np.float32), chalk)


_STYLE_FNS = {
    "photo": _photo,
    "cartoon": _cartoon,
    "sketch": _sketch,
    "painting": _painting,
    "neon": _neon,
    "blueprint": _blueprint,
    "pixel art": _pixel_art,
    "woodcut": _woodcut,
    "medical": _medical,
    "satellite": _satellite,
    "thermal": _thermal,
    "chalkboard": _chalkboard,
}
assert set(_STYLE_FNS) == set(STYLES)


# ----------------------------------------------------------------------------- API
def render_sample(style: str, cls: str, index: int, seed: int = 0, resolution: int = 32):
    """Render one sample as an HxWx3 uint8 array; a pure function of its arguments."""
    if style not in _STYLE_FNS:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; known: {', '.join(CLASSES)}")
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {resolution}")
    key = [seed, STYLES.index(style), CLASSES.index(cls), index]
    rng = np.random.default_rng(key)
    m, e, light = _render_mask(cls, resolution, rng)
    img = _STYLE_FNS[style](rng, m, e, light, resolution)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_array(
    styles: Sequence[str], per_class: int, seed: int = 0, resolution: int = 32, start: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``per_class`` samples of every class in each style.

    Returns uint8 images (N, H, W, 3), int64 labels (N,) and int64 style ids (N,) (indices
    into ``STYLES``), ordered style-major, then class, then index.
    """
    imgs, labels, doms = [], [], []
    for s in styles:
        for c, cls in enumerate(CLASSES):
            for i in range(start, start + per_class):
                imgs.append(render_sample(s, cls, i, seed, resolution))
                labels.append(c)
                doms.append(STYLES.index(s))
    return np.stack(imgs), np.array(labels, np.int64), np.array(doms, np.int64)


def build_dataset(
    styles: Sequence[str] = HELDOUT_STYLES, per_class: int = 100, seed: int = 0,
    resolution: int = 32,
):  # fmt: skip
    """The benchmark as a Hugging Face ``datasets.Dataset`` (columns image, label, domain).

    ``label`` is a ``ClassLabel`` over ``CLASSES``; ``domain`` is the style name, so
    flwr-datasets partitioners (``NaturalIdPartitioner(partition_by="domain")``,
    ``DirichletPartitioner(partition_by="label")``) apply unchanged.
    """
    import datasets

    for s in styles:
        if s not in STYLES:
            raise ValueError(f"unknown style {s!r}; known: {', '.join(STYLES)}")
    imgs, labels, doms = render_array(styles, per_class, seed, resolution)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASSES)),
            "domain": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(a) for a in imgs],
            "label": labels.tolist(),
            "domain": [STYLES[d] for d in doms],
        },
        features=features,
    )


def image_grid(images: Sequence[np.ndarray], rows: int, cols: int, pad: int = 2) -> Image.Image:
    """Tile HxWx3 uint8 arrays row-major into one PIL image."""
    h, w = images[0].shape[:2]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images[: rows * cols]):
        r, c = divmod(k, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad
               + c * (w + pad) + w] = im  # fmt: skip
    return Image.fromarray(canvas)
