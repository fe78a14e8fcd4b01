"""A client's data: its partition of the configured dataset, split into few-shot train/test.

Sources: the bundled FedBiP-Shapes benchmark (default), a local imagefolder with
``train/metadata.csv`` (``file_name,label,domain``), or a Hugging Face dataset id through
flwr-datasets. Partitioning by domain (feature shift; a domain may be split among several
clients) or Dirichlet over labels (label shift). In deployment a site names its own folder
in its node config (``data-dir``) and that folder is all of its data.
"""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedbip_flower.config import SHAPES_DATASET, DataConfig
from fedbip_flower.data import shapes

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The configured data cannot be loaded (missing folder, bad metadata, empty split)."""


@dataclass(frozen=True)
class NodeConfig:
    """What a node's ``node_config`` says about its data."""

    partition_id: int = 0
    num_partitions: int = 1
    data_dir: str = ""

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeConfig:
        try:
            pid = int(node_config.get("partition-id", 0))
            num = int(node_config.get("num-partitions", 1))
        except (TypeError, ValueError) as err:
            raise DataError(f"node config: partition-id/num-partitions must be ints ({err})") from err
        if num < 1 or not 0 <= pid < num:
            raise DataError(f"node config: partition-id {pid} not in [0, num-partitions={num})")
        return cls(pid, num, str(node_config.get("data-dir", "") or ""))


@dataclass
class ClientData:
    """Few-shot training and held-out test images (uint8, N x 3 x H x W) with int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    domain: str


def load_client_data(cfg: DataConfig, node: NodeConfig, seed: int) -> ClientData:
    """Load this node's partition and split it into few-shot train and test sets."""
    render = None
    if node.data_dir:
        ds, names = _load_imagefolder(node.data_dir), None
    elif cfg.dataset == SHAPES_DATASET:
        ds, names = _shapes_partition(cfg, node, seed), list(shapes.CLASSES)
        render = functools.partial(_render_rows, cfg=cfg, seed=seed)
    else:
        ds, names = _federated_partition(cfg, node, seed), None
    if names is None:
        names = class_names_of(ds, cfg.data_dir or node.data_dir)
    return split_few_shot(ds, names, cfg, seed + 7919 * node.partition_id, images=render)


def _domain_assignment(domains: list[str], node: NodeConfig) -> tuple[str, int, int]:
    """Partition p gets domain p mod D; a domain shared by k clients is split in k shards."""
    d = node.partition_id % len(domains)
    sharers = [p for p in range(node.num_partitions) if p % len(domains) == d]
    return domains[d], sharers.index(node.partition_id), len(sharers)


def _shapes_index(styles: list[str], per_class: int):
    """The rows of ``shapes.build_dataset(styles, per_class, ...)`` without their pixels.

    Columns label (a ``ClassLabel``, as in the rendered dataset), domain, and the sample's
    key (style id, index); row order is the rendered dataset's. flwr-datasets' partitioners
    read only the labels, the domains and the row count, so a partition of this index holds
    exactly the rows that the same partitioner takes from the rendered dataset (a test checks
    it), and a site renders its own rows only (:func:`_render_rows`).
    """
    import datasets

    rows = [(s, c, i) for s in styles for c in range(len(shapes.CLASSES)) for i in range(per_class)]
    features = datasets.Features(
        {
            "label": datasets.ClassLabel(names=list(shapes.CLASSES)),
            "domain": datasets.Value("string"),
            "style": datasets.Value("int32"),
            "index": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "label": [c for _, c, _ in rows],
            "domain": [s for s, _, _ in rows],
            "style": [shapes.STYLES.index(s) for s, _, _ in rows],
            "index": [i for _, _, i in rows],
        },
        features=features,
    )


def _render_rows(rows, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """The pixels of index rows (:func:`_shapes_index`): each sample rendered from its key."""
    return [
        shapes.render_sample(shapes.STYLES[s], shapes.CLASSES[c], i, seed, cfg.resolution, cfg.framing)
        for s, c, i in zip(rows["style"], rows["label"], rows["index"], strict=True)
    ]


def _shapes_partition(cfg: DataConfig, node: NodeConfig, seed: int):
    """This node's rows of FedBiP-Shapes as an index (:func:`_shapes_index`): the cost is its
    own share, whatever the number of partitions."""
    domains = [d.strip() for d in cfg.domains.split(",") if d.strip()]
    for d in domains:
        if d not in shapes.STYLES:
            raise DataError(f"data.domains: unknown style {d!r}; known: {', '.join(shapes.STYLES)}")
    if cfg.partition_by == "domain":
        # Only this client's domain: NaturalIdPartitioner(partition_by="domain") selects the
        # same rows from the full dataset (a test checks the equality).
        domain, shard, nshards = _domain_assignment(domains, node)
        return _shard(_shapes_index([domain], cfg.per_class), shard, nshards, seed)
    return _dirichlet(_shapes_index(domains, cfg.per_class), cfg, node, seed)


def _shard(ds, shard: int, nshards: int, seed: int):
    if nshards == 1:
        return ds
    from flwr_datasets.partitioner import IidPartitioner

    part = IidPartitioner(num_partitions=nshards)
    part.dataset = ds.shuffle(seed=seed)
    return part.load_partition(shard)


def _dirichlet(ds, cfg: DataConfig, node: NodeConfig, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(
        num_partitions=node.num_partitions,
        partition_by="label",
        alpha=cfg.alpha,
        min_partition_size=2,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    part.dataset = ds
    return part.load_partition(node.partition_id)


def _federated_partition(cfg: DataConfig, node: NodeConfig, seed: int):
    """Imagefolder (simulation) or HF hub dataset through flwr-datasets."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    kwargs: dict[str, Any] = {}
    if cfg.dataset == "imagefolder":
        if not cfg.data_dir:
            raise DataError("data.dataset='imagefolder' needs data.data-dir (or a node data-dir)")
        _check_folder(cfg.data_dir)
        kwargs["data_dir"] = cfg.data_dir
    try:
        fds = FederatedDataset(dataset=cfg.dataset, partitioners={"train": 1}, shuffle=False, **kwargs)
        full = fds.load_split("train")
    except Exception as err:
        raise DataError(f"cannot load dataset {cfg.dataset!r}: {err}") from err
    if cfg.partition_by == "dirichlet":
        return _dirichlet(full, cfg, node, seed)
    part = NaturalIdPartitioner(partition_by="domain")
    part.dataset = full
    _ = part.num_partitions  # builds the partition id -> domain map
    id_to_domain = part.partition_id_to_natural_id
    domains = [id_to_domain[i] for i in range(len(id_to_domain))]
    domain, shard, nshards = _domain_assignment(domains, node)
    return _shard(part.load_partition(domains.index(domain)), shard, nshards, seed)


def _check_folder(data_dir: str) -> Path:
    root = Path(data_dir)
    meta = root / "train" / "metadata.csv"
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    if not meta.is_file():
        raise DataError(f"data folder {str(root)!r} has no train/metadata.csv (file_name,label,domain)")
    return root


def _load_imagefolder(data_dir: str):
    import datasets

    root = _check_folder(data_dir)
    # A local folder: no "Downloading data" / "Generating split" bars in the site's log.
    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    except Exception as err:
        raise DataError(f"cannot read data folder {str(root)!r}: {err}") from err
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    missing = {"image", "label", "domain"} - set(ds.column_names)
    if missing:
        raise DataError(f"data folder {str(root)!r}: metadata.csv lacks column(s) {sorted(missing)}")
    if len(ds) == 0:
        raise DataError(f"data folder {str(root)!r} holds no images")
    return ds


def class_names_of(ds, data_dir: str = "") -> list[str]:
    """Class names from a ClassLabel feature, ``classes.txt``, or the metadata's folders."""
    feat = ds.features.get("label")
    if getattr(feat, "names", None):
        return list(feat.names)
    if data_dir:
        txt = Path(data_dir) / "classes.txt"
        if txt.is_file():
            return [ln.strip() for ln in txt.read_text().splitlines() if ln.strip()]
        meta = Path(data_dir) / "train" / "metadata.csv"
        if meta.is_file():
            by_label: dict[int, set[str]] = {}
            with open(meta, newline="") as fh:
                for row in csv.DictReader(fh):
                    parent = Path(row["file_name"]).parent.name
                    by_label.setdefault(int(row["label"]), set()).add(parent)
            if by_label and all(len(v) == 1 for v in by_label.values()):
                n = max(by_label) + 1
                return [next(iter(by_label[i])) if i in by_label else f"class {i}" for i in range(n)]
    n = int(max(ds["label"])) + 1
    return [f"class {i}" for i in range(n)]


def _prepare(im, resolution: int) -> Image.Image:
    """The one image transform of the data pipeline: RGB, bicubic resize to the resolution."""
    im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
    im = im.convert("RGB")
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.BICUBIC)
    return im


def _to_tensor(images: list, resolution: int) -> torch.Tensor:
    arrs = [np.asarray(_prepare(im, resolution), np.uint8) for im in images]
    if not arrs:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def split_few_shot(
    ds, class_names: list[str], cfg: DataConfig, seed: int, images: Callable[[Any], list] | None = None
) -> ClientData:
    """Deterministic per-class split: ``shots`` training images, the rest (capped) for test.

    ``images(rows)`` gives the pixels of selected rows (default: their ``image`` column); only
    the selected rows are ever decoded or rendered."""
    labels = np.asarray(ds["label"], np.int64)
    if len(labels) == 0:
        raise DataError("this client's partition is empty")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataError(f"labels outside [0, {len(class_names)}) in this client's data")
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train_idx += idx[: cfg.shots].tolist()
        test_idx += idx[cfg.shots : cfg.shots + cfg.max_test_per_class].tolist()
    domains = ds["domain"] if "domain" in ds.column_names else ["unknown"]
    values, counts = np.unique(np.asarray(domains), return_counts=True)
    domain = str(values[np.argmax(counts)])
    train, test = sorted(train_idx), sorted(test_idx)
    pixels = images or (lambda rows: rows["image"])
    return ClientData(
        train_images=_to_tensor(pixels(ds.select(train)), cfg.resolution),
        train_labels=torch.from_numpy(labels[train]),
        test_images=_to_tensor(pixels(ds.select(test)), cfg.resolution),
        test_labels=torch.from_numpy(labels[test]),
        class_names=list(class_names),
        domain=domain,
    )


def shrink_imagefolder(src: str | Path, dst: str | Path, resolution: int) -> int:
    """Copy an imagefolder at the pipeline's resolution, as lossless PNG.

    The copy loads to exactly the same tensors as the original at that ``data.resolution``
    (the same transform, applied once; PNG is lossless) and is far smaller: what a benchmark
    machine needs, e.g. PACS at 32 px is ~30 MB instead of 74 MB. Returns the image count.
    """
    root, out = _check_folder(str(src)), Path(dst)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {str(out)!r} exists and is not empty")
    with open(root / "train" / "metadata.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    for row in rows:
        name = str(Path(row["file_name"]).with_suffix(".png"))
        target = out / "train" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(root / "train" / row["file_name"]) as im:
            _prepare(im, resolution).save(target)
        row["file_name"] = name
    with open(out / "train" / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if (root / "classes.txt").is_file():
        (out / "classes.txt").write_text((root / "classes.txt").read_text())
    return len(rows)
