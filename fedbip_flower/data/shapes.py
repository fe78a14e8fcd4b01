"""FedBiP-Shapes: a seeded, procedurally rendered multi-domain image benchmark.

Ten object classes (geometric shapes) are drawn with a random position, scale, rotation and
colour per sample. A *style* (a domain) is one value of each of four independent rendering
factors (``FACTORS``): the palette, the background texture, how the shape is drawn, and a
degradation. ``STYLE_FACTORS`` names 41 combinations:

- 36 named pretraining styles (``PRETRAIN_STYLES``); every factor value but the control's
  occurs in several of them. The bundled LDM is trained on them and on 788 unnamed
  combinations (``PRETRAIN_COMBOS``, captioned by their factor words), so it learns how the
  factors compose;
- 4 client styles (``HELDOUT_STYLES``: medical, satellite, thermal, chalkboard): each a
  combination of values that all occur in pretraining, each pair of them together but never
  three, under a name no pretraining caption uses; this is FedBiP's premise (the LDM can draw what the client needs
  but does not know the client's domain);
- 1 out-of-reach control (``CONTROL_STYLES``: ultraviolet) with a palette no pretraining
  style has, to show where personalization stops.

``describe(style)`` gives a style's factor words ("grayscale vignette glowing speckled").
Every sample is a pure function of ``(seed, style, class, index)`` (``render_combo``: of the
factor values instead of a style), so any subset can be
regenerated in any order and the same call always yields the same pixels.
"""

from __future__ import annotations

import itertools
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
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        return [(np.array(pts, float), True)]
    if name == "ring":
        return [(_regular(64), True), (_regular(64) * 0.55, False)]
    if name == "arrow":
        pts = [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)]
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


#: Object framing: the range of a shape's size (its outer radius, a fraction of the image side).
#: Every pretraining image is ``"standard"``; ``"close-up"`` draws larger shapes than any
#: pretraining image (0.40-0.46 never occurs there), a layout no prompt asks for: a site that
#: frames its objects closer hands that layout to the server only through its latents.
FRAMINGS: dict[str, tuple[float, float]] = {"standard": (0.24, 0.40), "close-up": (0.34, 0.46)}


def _framing_range(framing: str) -> tuple[float, float]:
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; known: {', '.join(FRAMINGS)}")
    return FRAMINGS[framing]


def _render_mask(
    name: str, res: int, rng: np.random.Generator, scale_range: tuple[float, float] = FRAMINGS["standard"]
) -> tuple[np.ndarray, ...]:
    """Anti-aliased fill mask and outline mask in [0, 1], plus the light direction."""
    big = res * _SUPERSAMPLE
    scale = rng.uniform(*scale_range) * big
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
        x = sum(k[i] * np.take(xp, range(i, i + x.shape[axis]), axis=axis) for i in range(len(k)))
    return x if img.ndim == 3 else x[..., 0]


def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    h, sat, val = rng.random(), rng.uniform(*s), rng.uniform(*v)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i], np.float32)


def _mix(bg: np.ndarray, fg: np.ndarray, m: np.ndarray) -> np.ndarray:
    return bg * (1 - m[..., None]) + fg * m[..., None]


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:res, 0:res].astype(np.float32) / res
    return x, y


# ----------------------------------------------------------------------------- factors
# A style is one value of each of four independent rendering factors. Each factor value has
# a one-word description; pretraining captions use either the style's name or these words.
PALETTES: tuple[str, ...] = ("colorful", "grayscale", "inferno", "earthy", "emerald", "sepia", "violet")
BACKGROUNDS: tuple[str, ...] = ("plain", "cloudy", "patchwork", "vignette", "grid", "stripes")
DRAWINGS: tuple[str, ...] = ("filled", "outlined", "glowing", "hatched", "shadowed")
DEGRADATIONS: tuple[str, ...] = ("crisp", "speckled", "blurry", "pixelated", "grainy")
FACTORS: dict[str, tuple[str, ...]] = {
    "palette": PALETTES,
    "background": BACKGROUNDS,
    "drawing": DRAWINGS,
    "degradation": DEGRADATIONS,
}
#: Factor values the pretraining styles never use: a style with one is out of the LDM's reach.
UNSEEN_VALUES: frozenset[str] = frozenset({"violet"})


def _background(name: str, rng: np.random.Generator, res: int) -> np.ndarray:
    """A scalar background field in [0, 1]."""
    x, y = _grid(res)
    if name == "plain":
        return 0.5 + 0.04 * _smooth_noise(rng, res, 8)[..., 0]
    if name == "cloudy":
        return _smooth_noise(rng, res, 4)[..., 0]
    if name == "patchwork":
        fields = (_smooth_noise(rng, res, 5)[..., 0] > 0.5).astype(np.float32)
        return 0.2 + 0.6 * fields + 0.15 * rng.random((res, res)).astype(np.float32)
    if name == "vignette":
        v = np.clip(1.0 - 1.4 * np.hypot(x - 0.5, y - 0.5), 0, 1)
        return 0.75 * v + 0.25 * _smooth_noise(rng, res, 6)[..., 0]
    if name == "grid":
        step = 8 / res
        off = rng.integers(0, 8) / res
        lines = (np.mod(x + off, step) < 1.0 / res) | (np.mod(y + off, step) < 1.0 / res)
        return 0.2 + 0.75 * lines.astype(np.float32)
    if name == "stripes":
        warp = 0.6 * _smooth_noise(rng, res, 4)[..., 0]
        return 0.5 + 0.45 * np.sin(2 * math.pi * (y * rng.uniform(5, 7) + warp))
    raise ValueError(f"unknown background {name!r}")


def _drawing(name, rng, m, e, light, res):
    """How the shape is drawn: ink coverage a, ink intensity f (both [0, 1]), cast shadow."""
    x, y = _grid(res)
    zero = np.zeros_like(m)
    if name == "filled":
        lx, ly = light + rng.uniform(-0.2, 0.2, 2)
        shade = np.clip(1.15 - 1.2 * np.hypot(x - lx + 0.15, y - ly + 0.15), 0.4, 1.0)
        return m, shade, zero
    if name == "outlined":
        return e, np.ones_like(m), zero
    if name == "glowing":
        return np.clip(_blur(m, res / 18) * 1.25, 0, 1), np.ones_like(m), zero
    if name == "hatched":
        period = rng.uniform(0.11, 0.15)
        ang = rng.uniform(0, math.pi)
        lines = np.sin(2 * math.pi * (x * math.cos(ang) + y * math.sin(ang)) / period) > 0.2
        return np.clip(m * lines + e, 0, 1), np.ones_like(m), zero
    if name == "shadowed":
        d = res // 12 + 1
        shadow = np.roll(_blur(m, res / 40), (d, d), (0, 1)) * (1 - m)
        return m, 0.85 + 0.15 * _smooth_noise(rng, res, 12)[..., 0], shadow
    raise ValueError(f"unknown drawing {name!r}")


def _colormap(stops: list[tuple[float, ...]], t: np.ndarray) -> np.ndarray:
    c = np.asarray(stops, np.float32)
    pos = np.clip(t, 0, 1) * (len(c) - 1)
    i = np.minimum(pos.astype(int), len(c) - 2)
    w = (pos - i)[..., None]
    return c[i] * (1 - w) + c[i + 1] * w


_INFERNO = [(0.0, 0.0, 0.02), (0.34, 0.06, 0.43), (0.73, 0.21, 0.33), (0.98, 0.55, 0.04), (0.99, 1.0, 0.64)]
_VIOLET = [(0.05, 0.0, 0.12), (0.35, 0.05, 0.6), (0.75, 0.2, 0.9), (0.3, 0.95, 0.95)]


def _palette(name, rng, b, a, f, shadow, res):
    """Map background field, ink coverage/intensity and shadow to RGB in [0, 1]."""
    lb = b * (1 - 0.55 * shadow)
    if name in ("grayscale", "inferno", "violet"):
        lum = (0.06 + 0.34 * lb) * (1 - a) + a * (0.55 + 0.45 * f) * rng.uniform(0.85, 1.0)
        if name == "grayscale":
            return np.repeat(lum[..., None], 3, -1)
        return _colormap(_INFERNO if name == "inferno" else _VIOLET, lum)
    if name == "colorful":
        bg = _hsv(rng, (0.1, 0.35), (0.6, 0.9)) * (0.7 + 0.3 * lb[..., None])
        fg = _hsv(rng, (0.7, 1.0), (0.75, 1.0)) * (0.7 + 0.3 * f[..., None])
    elif name == "earthy":
        green, brown = np.array([0.25, 0.4, 0.18], np.float32), np.array([0.5, 0.38, 0.22], np.float32)
        bg = _mix(np.broadcast_to(green, (res, res, 3)), brown, b) * (1 - 0.55 * shadow[..., None])
        fg = np.array([0.66, 0.66, 0.63], np.float32) * rng.uniform(0.85, 1.1) * (0.8 + 0.2 * f[..., None])
    elif name == "emerald":
        bg = np.array([0.1, 0.24, 0.16], np.float32) * rng.uniform(0.85, 1.15) * (0.7 + 0.6 * lb[..., None])
        fg = np.array([0.92, 0.94, 0.9], np.float32) * (0.85 + 0.15 * f[..., None])
    elif name == "sepia":
        bg = np.array([0.93, 0.86, 0.7], np.float32) * rng.uniform(0.92, 1.03) * (0.85 + 0.15 * lb[..., None])
        fg = np.array([0.22, 0.13, 0.07], np.float32) * (1.3 - 0.3 * f[..., None])
    else:
        raise ValueError(f"unknown palette {name!r}")
    return _mix(bg, fg, a)


def _cells(a: np.ndarray, k: int) -> np.ndarray:
    """Repeat every value of ``a`` over a k x k pixel cell."""
    return np.repeat(np.repeat(a, k, 0), k, 1)


def _degrade(name: str, rng: np.random.Generator, img: np.ndarray, res: int) -> np.ndarray:
    if name == "crisp":
        return img
    # Noise textures live on k x k pixel cells, the scale of one latent cell of the bundled VAE
    # (it halves the resolution): per-pixel noise cannot pass a latent, so no LDM could draw it.
    k = max(2, res // 16)
    if name == "speckled":
        n = _cells(rng.standard_normal((res // k, res // k, 1)).astype(np.float32), k)
        return img * (1 + 0.2 * n)
    if name == "blurry":
        return _blur(img, res / 32)
    if name == "pixelated":
        return _cells(img.reshape(res // k, k, res // k, k, 3).mean((1, 3)), k)
    if name == "grainy":
        drop = _cells(rng.random((res // k, res // k, 1)) < 0.3, k)
        return np.where(drop, img * 0.55 + 0.1, img)
    raise ValueError(f"unknown degradation {name!r}")


# ----------------------------------------------------------------------------- styles
#: Named styles: (palette, background, drawing, degradation).
STYLE_FACTORS: dict[str, tuple[str, str, str, str]] = {
    # pretraining styles (the bundled LDM's captions use these names and factor words)
    "photo": ("colorful", "cloudy", "outlined", "blurry"),
    "cartoon": ("colorful", "plain", "filled", "pixelated"),
    "neon": ("colorful", "plain", "glowing", "pixelated"),
    "poster": ("colorful", "stripes", "hatched", "crisp"),
    "watercolor": ("colorful", "vignette", "glowing", "blurry"),
    "painting": ("earthy", "cloudy", "shadowed", "blurry"),
    "mosaic": ("earthy", "grid", "filled", "pixelated"),
    "tapestry": ("earthy", "grid", "shadowed", "speckled"),
    "fresco": ("earthy", "patchwork", "glowing", "blurry"),
    "embroidery": ("earthy", "patchwork", "outlined", "grainy"),
    "woodcut": ("earthy", "stripes", "hatched", "pixelated"),
    "ceramic": ("earthy", "vignette", "shadowed", "speckled"),
    "lantern": ("emerald", "cloudy", "glowing", "speckled"),
    "stencil": ("emerald", "cloudy", "shadowed", "pixelated"),
    "circuit": ("emerald", "patchwork", "outlined", "pixelated"),
    "felt": ("emerald", "patchwork", "shadowed", "grainy"),
    "engraving": ("emerald", "stripes", "hatched", "grainy"),
    "etching": ("emerald", "vignette", "outlined", "speckled"),
    "velvet": ("emerald", "vignette", "shadowed", "grainy"),
    "charcoal": ("grayscale", "cloudy", "glowing", "grainy"),
    "newsprint": ("grayscale", "patchwork", "glowing", "pixelated"),
    "photocopy": ("grayscale", "patchwork", "shadowed", "speckled"),
    "pencil": ("grayscale", "plain", "outlined", "speckled"),
    "silver print": ("grayscale", "vignette", "outlined", "grainy"),
    "film noir": ("grayscale", "vignette", "shadowed", "pixelated"),
    "lava": ("inferno", "cloudy", "hatched", "grainy"),
    "arcade": ("inferno", "cloudy", "outlined", "pixelated"),
    "plasma": ("inferno", "grid", "glowing", "speckled"),
    "sunset": ("inferno", "plain", "hatched", "blurry"),
    "ember": ("inferno", "stripes", "filled", "blurry"),
    "firework": ("inferno", "vignette", "glowing", "crisp"),
    "blueprint": ("sepia", "grid", "filled", "crisp"),
    "map": ("sepia", "grid", "glowing", "grainy"),
    "sketch": ("sepia", "grid", "outlined", "crisp"),
    "ink": ("sepia", "plain", "filled", "crisp"),
    "linocut": ("sepia", "stripes", "filled", "crisp"),
    # client styles: combinations of pretraining factor values never seen together
    "medical": ("grayscale", "vignette", "glowing", "speckled"),
    "satellite": ("earthy", "patchwork", "shadowed", "pixelated"),
    "thermal": ("inferno", "cloudy", "glowing", "blurry"),
    "chalkboard": ("emerald", "cloudy", "outlined", "grainy"),
    # out-of-reach control: a palette no pretraining style uses
    "ultraviolet": ("violet", "cloudy", "filled", "crisp"),
}
HELDOUT_STYLES: tuple[str, ...] = ("medical", "satellite", "thermal", "chalkboard")
CONTROL_STYLES: tuple[str, ...] = ("ultraviolet",)
PRETRAIN_STYLES: tuple[str, ...] = tuple(
    s for s in STYLE_FACTORS if s not in HELDOUT_STYLES and s not in CONTROL_STYLES
)
STYLES: tuple[str, ...] = tuple(STYLE_FACTORS)


def _near_client_style(combo: tuple[str, ...]) -> bool:
    """True when ``combo`` shares three or more factor values with a client style."""
    return any(sum(a == b for a, b in zip(combo, STYLE_FACTORS[s], strict=True)) >= 3 for s in HELDOUT_STYLES)


#: Unnamed pretraining combinations, captioned by their factor words only: every combination
#: of seen factor values except the named styles and any that shares three or more values with
#: a client style. So the LDM learns how factors compose from hundreds of combinations, while
#: every client style stays at least two factors away from anything it saw (each pair of a
#: client style's values does occur; no triple does).
PRETRAIN_COMBOS: tuple[tuple[str, str, str, str], ...] = tuple(
    c
    for c in itertools.product(*(tuple(v for v in vals if v not in UNSEEN_VALUES) for vals in FACTORS.values()))
    if c not in set(STYLE_FACTORS.values()) and not _near_client_style(c)
)


def describe(style: str) -> str:
    """The style's factor words, e.g. ``"grayscale vignette glowing speckled"``."""
    if style not in STYLE_FACTORS:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return " ".join(STYLE_FACTORS[style])


def _render_factors(factors, rng, m, e, light, res):
    pal, bgn, drw, deg = factors
    b = _background(bgn, rng, res)
    a, f, shadow = _drawing(drw, rng, m, e, light, res)
    return _degrade(deg, rng, _palette(pal, rng, b, a, f, shadow, res), res)


# ----------------------------------------------------------------------------- API
def render_sample(style: str, cls: str, index: int, seed: int = 0, resolution: int = 32, framing: str = "standard"):
    """Render one sample as an HxWx3 uint8 array; a pure function of its arguments.

    ``framing`` (``FRAMINGS``) sets the shape's size range only: every other random draw is
    the same, so a close-up sample is its standard twin with a larger shape."""
    if style not in STYLE_FACTORS:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; known: {', '.join(CLASSES)}")
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {resolution}")
    key = [seed, STYLES.index(style), CLASSES.index(cls), index]
    rng = np.random.default_rng(key)
    m, e, light = _render_mask(cls, resolution, rng, _framing_range(framing))
    img = _render_factors(STYLE_FACTORS[style], rng, m, e, light, resolution)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _combo_code(factors: Sequence[str]) -> int:
    code = 0
    for vals, v in zip(FACTORS.values(), factors, strict=True):
        if v not in vals:
            raise ValueError(f"unknown factor value {v!r}; known: {', '.join(vals)}")
        code = code * len(vals) + vals.index(v)
    return code


def render_combo(factors: Sequence[str], cls: str, index: int, seed: int = 0, resolution: int = 32):
    """Render one sample of an unnamed factor combination ``(palette, background, drawing,
    degradation)``; a pure function of its arguments (and distinct from any named style's)."""
    if len(factors) != len(FACTORS):
        raise ValueError(f"a combination has {len(FACTORS)} factor values ({', '.join(FACTORS)}), got {factors!r}")
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; known: {', '.join(CLASSES)}")
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {resolution}")
    rng = np.random.default_rng([seed, 1000 + _combo_code(factors), CLASSES.index(cls), index])
    m, e, light = _render_mask(cls, resolution, rng)
    img = _render_factors(tuple(factors), rng, m, e, light, resolution)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_combos(
    combos: Sequence[Sequence[str]], per_class: int, seed: int = 0, resolution: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``per_class`` samples of every class in each unnamed combination.

    Returns uint8 images (N, H, W, 3), int64 labels (N,) and int64 indices into ``combos``."""
    imgs, labels, idx = [], [], []
    for k, combo in enumerate(combos):
        for c, cls in enumerate(CLASSES):
            for i in range(per_class):
                imgs.append(render_combo(combo, cls, i, seed, resolution))
                labels.append(c)
                idx.append(k)
    return np.stack(imgs), np.array(labels, np.int64), np.array(idx, np.int64)


def render_array(
    styles: Sequence[str],
    per_class: int,
    seed: int = 0,
    resolution: int = 32,
    start: int = 0,
    framing: str = "standard",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``per_class`` samples of every class in each style (``framing``: ``FRAMINGS``).

    Returns uint8 images (N, H, W, 3), int64 labels (N,) and int64 style ids (N,) (indices
    into ``STYLES``), ordered style-major, then class, then index.
    """
    imgs, labels, doms = [], [], []
    for s in styles:
        for c, cls in enumerate(CLASSES):
            for i in range(start, start + per_class):
                imgs.append(render_sample(s, cls, i, seed, resolution, framing))
                labels.append(c)
                doms.append(STYLES.index(s))
    return np.stack(imgs), np.array(labels, np.int64), np.array(doms, np.int64)


def build_dataset(
    styles: Sequence[str] = HELDOUT_STYLES,
    per_class: int = 100,
    seed: int = 0,
    resolution: int = 32,
    framing: str = "standard",
):
    """The benchmark as a Hugging Face ``datasets.Dataset`` (columns image, label, domain).

    ``label`` is a ``ClassLabel`` over ``CLASSES``; ``domain`` is the style name, so
    flwr-datasets partitioners (``NaturalIdPartitioner(partition_by="domain")``,
    ``DirichletPartitioner(partition_by="label")``) apply unchanged.
    """
    import datasets

    for s in styles:
        if s not in STYLES:
            raise ValueError(f"unknown style {s!r}; known: {', '.join(STYLES)}")
    imgs, labels, doms = render_array(styles, per_class, seed, resolution, framing=framing)
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
