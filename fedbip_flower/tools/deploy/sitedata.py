"""A site's data folder, written from the bundled FedBiP-Shapes benchmark, and how its images
split into training and test images with the app's ``data.shots``."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from fedbip_flower.config import DataConfig
from fedbip_flower.data import shapes
from fedbip_flower.tools.deploy.common import DeployError

SITE_STYLES = shapes.HELDOUT_STYLES  # site N gets SITE_STYLES[(N - 1) % 4] by default
# The app's default data.shots training images per class, plus 8 test images per class: a site
# folder made with the defaults splits into both with the app's defaults.
APP_SHOTS = DataConfig().shots
SITE_TEST_PER_CLASS = 8
SITE_PER_CLASS = APP_SHOTS + SITE_TEST_PER_CLASS


def site_style(site: int) -> str:
    """Default held-out style (domain) of site ``site`` (1-based): medical, satellite, ..."""
    return SITE_STYLES[(site - 1) % len(SITE_STYLES)]


def write_site(
    out_dir: str | Path,
    style: str,
    per_class: int = SITE_PER_CLASS,
    seed: int = 0,
    resolution: int = 32,
    force: bool = False,
    framing: str = DataConfig().framing,
) -> Path:
    """Write one site's data folder from the bundled benchmark; returns its absolute path.

    The default ``per_class`` (24) is the app's default ``data.shots`` (16) plus 8 test
    images per class; a site needs more images per class than ``data.shots`` to keep a test
    split (see :func:`split_note`).

    Layout (what ``data-dir`` in a node config must name; see ``fedbip_flower.data.loading``)::

        <out_dir>/classes.txt                  class names, one per line (label = line index)
        <out_dir>/train/metadata.csv           file_name,label,domain
        <out_dir>/train/<class>/<style>_<i>.png

    ``label`` is the class id (index into ``shapes.CLASSES``), ``domain`` the style name.
    An existing ``train/`` folder is kept unless ``force``.
    """
    if style not in shapes.STYLES:
        raise DeployError(f"unknown style {style!r}; known: {', '.join(shapes.STYLES)}")
    if per_class < 1:
        raise DeployError(f"per_class must be >= 1, got {per_class}")
    out = Path(out_dir).expanduser().resolve()
    train = out / "train"
    if (train / "metadata.csv").exists():
        if not force:
            raise DeployError(f"{train / 'metadata.csv'} already exists (use force / --force to rewrite)")
        shutil.rmtree(train)
    from PIL import Image

    images, labels, _ = shapes.render_array([style], per_class, seed, resolution, framing=framing)
    slug = style.replace(" ", "-")
    rows = []
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        cls = shapes.CLASSES[int(label)]
        rel = f"{cls}/{slug}_{k:05d}.png"
        (train / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(train / rel)
        rows.append((rel, int(label), style))
    with open(train / "metadata.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "label", "domain"])
        writer.writerows(rows)
    (out / "classes.txt").write_text("\n".join(shapes.CLASSES) + "\n")
    return out


def split_note(per_class: int, shots: int = APP_SHOTS) -> str:
    """How ``per_class`` images per class split with ``data.shots=shots``; a warning if no
    test image would be left."""
    if per_class > shots:
        return f"with data.shots={shots}: {shots} training + {per_class - shots} test image(s) per class"
    fix = f"use --per-class {shots + SITE_TEST_PER_CLASS} or more"
    if per_class >= 2:
        fix += f', or run with --run-config "data.shots={per_class // 2}"'
    return (
        f"WARNING: with data.shots={shots} (the app's default) all {per_class} image(s) per class go "
        f"to training and the site has no test split: its ClientApp will refuse to take part; {fix}"
    )
