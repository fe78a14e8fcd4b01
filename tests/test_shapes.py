"""The generated benchmark: determinism, balance, Hugging Face form, flwr-datasets partitioners."""

from __future__ import annotations

import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner

from fedbip_flower import shapes
from fedbip_flower.config import DataConfig
from fedbip_flower.data import NodeConfig, _shapes_partition


def test_sample_is_a_pure_function_of_its_key():
    a = shapes.render_sample("medical", "star", 3, seed=5)
    b = shapes.render_sample("medical", "star", 3, seed=5)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, shapes.render_sample("medical", "star", 3, seed=6))
    assert not np.array_equal(a, shapes.render_sample("medical", "star", 4, seed=5))
    assert shapes.render_sample("satellite", "ring", 0, resolution=64).shape == (64, 64, 3)


def test_styles_and_classes_meet_the_spec():
    assert len(shapes.CLASSES) >= 10 and len(shapes.STYLES) >= 10
    assert len(shapes.HELDOUT_STYLES) >= 4
    assert {"medical", "satellite"} <= set(shapes.HELDOUT_STYLES)
    assert not set(shapes.HELDOUT_STYLES) & set(shapes.PRETRAIN_STYLES)
    med = shapes.render_sample("medical", "circle", 0).astype(int)
    assert (med[..., 0] == med[..., 1]).all() and (med[..., 1] == med[..., 2]).all()  # grayscale


def test_styles_differ_from_each_other():
    means = {s: shapes.render_array([s], 3)[0].reshape(-1, 3).mean(0) for s in shapes.STYLES}
    vals = np.stack(list(means.values()))
    dists = np.linalg.norm(vals[:, None] - vals[None], axis=-1)
    assert (dists + np.eye(len(vals)) * 1e3).min() > 1.0


def test_dataset_is_balanced_and_shaped_like_real_datasets():
    ds = shapes.build_dataset(["medical", "thermal"], per_class=3, seed=0)
    assert set(ds.column_names) == {"image", "label", "domain"}
    assert ds.features["label"].names == list(shapes.CLASSES)
    assert len(ds) == 2 * 10 * 3
    labels, domains = np.array(ds["label"]), np.array(ds["domain"])
    for d in ("medical", "thermal"):
        assert np.bincount(labels[domains == d], minlength=10).tolist() == [3] * 10
    assert ds[0]["image"].size == (32, 32)
    again = shapes.build_dataset(["medical", "thermal"], per_class=3, seed=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ds["image"], again["image"]))


def test_flwr_datasets_partitioners_apply_unchanged():
    ds = shapes.build_dataset(list(shapes.HELDOUT_STYLES), per_class=4, seed=0)
    part = NaturalIdPartitioner(partition_by="domain")
    part.dataset = ds
    assert part.num_partitions == 4
    for pid, dom in part.partition_id_to_natural_id.items():
        p = part.load_partition(pid)
        assert set(p["domain"]) == {dom} and len(p) == 40
    dirichlet = DirichletPartitioner(num_partitions=5, partition_by="label", alpha=0.5, min_partition_size=1, seed=0)
    dirichlet.dataset = ds
    sizes = [len(dirichlet.load_partition(i)) for i in range(5)]
    assert sum(sizes) == len(ds)


@pytest.mark.parametrize("pid", [0, 2])
def test_client_partition_equals_natural_id_partition(pid):
    cfg = DataConfig(per_class=3)
    domains = cfg.domains.split(",")
    mine = _shapes_partition(cfg, NodeConfig(pid, 4), seed=0)
    full = shapes.build_dataset(domains, per_class=3, seed=0)
    part = NaturalIdPartitioner(partition_by="domain")
    part.dataset = full
    assert part.num_partitions == 4  # builds the id -> domain map
    nat = part.load_partition({v: k for k, v in part.partition_id_to_natural_id.items()}[domains[pid]])
    assert mine["label"] == nat["label"] and mine["domain"] == nat["domain"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine["image"], nat["image"]))


def test_unknown_style_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown style"):
        shapes.build_dataset(["nope"], per_class=1)
