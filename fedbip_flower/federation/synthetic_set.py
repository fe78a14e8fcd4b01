"""The server's synthetic training set, written site by site as it is made and read back lazily.

Each site's synthetic images go to one safetensors file in the run folder
(``synthetic/NNNN_<domain>.safetensors``, ``NNNN`` its place in the client order) as soon as
they are made: tensors ``images`` (uint8, M x 3 x H x W) and ``labels`` (int64, M), plus the
site's name in the file's metadata. The server then keeps only the labels in memory; the
classifier reads its batches through :class:`SyntheticSet`, a map-style torch ``Dataset``
whose rows come from the files (``safetensors.safe_open`` slices: a batch reads its rows and
nothing else). So the server's memory does not grow with the number of synthetic images, and
the set stays on disk after the run, readable with ``safetensors.torch.load_file`` or
:func:`read_synthetic_folder`.

Without a folder (the benchmarks, tests), a :class:`SyntheticStore` keeps the tensors in
memory; everything else is the same.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedbip_flower.federation.payload import safe_filename

SUBDIR = "synthetic"


def _file_name(position: int, name: str) -> str:
    return f"{position:04d}_{safe_filename(name)}.safetensors"


@dataclass
class Shard:
    """One site's synthetic images: a safetensors file (or tensors in memory) and its labels."""

    labels: torch.Tensor  # int64 (M,), always in memory
    shape: tuple[int, ...]  # (3, H, W) of one image
    path: Path | None = None
    _images: torch.Tensor | None = None  # in-memory store only
    _handle: object | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All of this site's images and labels (one site's worth of memory)."""
        if self._images is not None:
            return self._images, self.labels
        from safetensors.torch import load_file

        data = load_file(str(self.path))
        return data["images"], data["labels"]

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        """Images at the (any order) row indices ``idx``, uint8 (len(idx), 3, H, W)."""
        if self._images is not None:
            return self._images[torch.from_numpy(np.asarray(idx, np.int64))]
        with self._lock:  # a safe_open handle is opened once and shared by the loader
            if self._handle is None:
                from safetensors import safe_open

                self._handle = safe_open(str(self.path), framework="pt")
            images = self._handle.get_slice("images")
            return torch.cat([images[int(i) : int(i) + 1] for i in idx]) if len(idx) else torch.zeros(0, *self.shape)

    def __getstate__(self):  # DataLoader workers reopen the file themselves
        state = dict(self.__dict__)
        state["_handle"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class SyntheticStore:
    """Where :func:`~fedbip_flower.federation.server_pipeline.build_global_model` puts each
    site's synthetic images as they are made: files under ``root`` (or memory if None)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.shards: dict[Hashable, Shard] = {}

    def put(self, key: Hashable, position: int, name: str, images: torch.Tensor, labels: torch.Tensor) -> Shard:
        """Store one site's images (uint8, M x 3 x H x W) and labels; returns its shard."""
        images = images.detach().to("cpu", torch.uint8).contiguous()
        labels = labels.detach().to("cpu", torch.int64).contiguous()
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"synthetic images {tuple(images.shape)} do not match labels {tuple(labels.shape)}")
        shape = tuple(images.shape[1:])
        if self.root is None:
            shard = Shard(labels=labels, shape=shape, _images=images)
        else:
            from safetensors.torch import save_file

            path = self.root / _file_name(position, name)
            tmp = path.with_suffix(".tmp")
            save_file({"images": images, "labels": labels}, str(tmp), metadata={"site": name})
            tmp.replace(path)
            shard = Shard(labels=labels, shape=shape, path=path)
        self.shards[key] = shard
        return shard

    def drop(self, key: Hashable) -> None:
        """Forget a site's images (and delete its file): they will not be trained on."""
        shard = self.shards.pop(key, None)
        if shard is not None and shard.path is not None:
            shard.path.unlink(missing_ok=True)

    def dataset(self, keys: Sequence[Hashable]) -> SyntheticSet:
        """The training set: the shards of ``keys``, concatenated in that order."""
        return SyntheticSet([self.shards[k] for k in keys])


class SyntheticSet(torch.utils.data.Dataset):
    """Several sites' synthetic images as one map-style dataset (rows in shard order).

    ``labels`` is in memory; images are read on demand. ``set[rows]`` with a list of row
    indices (``__getitems__``, what torch's DataLoader calls with a batch sampler) returns the
    batch ``(images uint8, labels)`` with its rows in the order asked for.
    """

    def __init__(self, shards: Sequence[Shard]):
        self.shards = list(shards)
        shapes = {s.shape for s in self.shards}
        if len(shapes) > 1:
            raise ValueError(f"one training set needs one image shape, got {sorted(shapes)}")
        self.shape = next(iter(shapes)) if shapes else (3, 0, 0)
        sizes = [len(s) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.labels = torch.cat([s.labels for s in self.shards]) if self.shards else torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)})")
        out = torch.empty((len(rows), *self.shape), dtype=torch.uint8)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(which):
            at = np.flatnonzero(which == k)
            out[torch.from_numpy(at)] = self.shards[k].rows(rows[at] - self.starts[k])
        return out, self.labels[torch.from_numpy(rows)]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set in memory (tests and small benchmarks only)."""
        return self.__getitems__(range(len(self)))


def read_synthetic_folder(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A run's saved synthetic set: images, labels and each file's site, in client order."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no synthetic set (*.safetensors) in {str(folder)!r}")
    xs, ys, sites = [], [], []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            xs.append(h.get_tensor("images"))
            ys.append(h.get_tensor("labels"))
            sites.append((h.metadata() or {}).get("site", f.stem))
    return torch.cat(xs), torch.cat(ys), sites
