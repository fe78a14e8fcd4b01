"""The generated benchmark: determinism, balance, Hugging Face form, flwr-datasets partitioners."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner

from fedbip_flower.config import DataConfig
from fedbip_flower.data import shapes
from fedbip_flower.data.loading import (
    NodeConfig,
    _dirichlet,
    _domain_assignment,
    _shard,
    load_client_data,
    split_few_shot,
)


def test_sample_is_a_pure_function_of_its_key():
    a = shapes.render_sample("medical", "star", 3, seed=5)
    b = shapes.render_sample("medical", "star", 3, seed=5)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, shapes.render_sample("medical", "star", 3, seed=6))
    assert not np.array_equal(a, shapes.render_sample("medical", "star", 4, seed=5))
    assert shapes.render_sample("satellite", "ring", 0, resolution=64).shape == (64, 64, 3)


def test_styles_and_classes_meet_the_spec():
    assert len(shapes.CLASSES) >= 10 and len(shapes.PRETRAIN_STYLES) >= 24
    assert set(shapes.HELDOUT_STYLES) >= {"medical", "satellite", "thermal", "chalkboard"}
    assert not set(shapes.HELDOUT_STYLES) & set(shapes.PRETRAIN_STYLES)
    assert shapes.CONTROL_STYLES and not set(shapes.CONTROL_STYLES) & set(shapes.PRETRAIN_STYLES)
    med = shapes.render_sample("medical", "circle", 0).astype(int)
    assert (med[..., 0] == med[..., 1]).all() and (med[..., 1] == med[..., 2]).all()  # grayscale


def test_styles_are_distinct_factor_combinations():
    combos = [shapes.STYLE_FACTORS[s] for s in shapes.STYLES]
    assert len(set(combos)) == len(combos)
    assert len(shapes.FACTORS) >= 4 and all(len(v) >= 3 for v in shapes.FACTORS.values())
    for combo in combos:
        assert all(val in vals for val, vals in zip(combo, shapes.FACTORS.values(), strict=True))
    seen = [set(shapes.STYLE_FACTORS[s][i] for s in shapes.PRETRAIN_STYLES) for i in range(len(shapes.FACTORS))]
    # every factor value but the unseen ones occurs in several pretraining styles
    for i, vals in enumerate(shapes.FACTORS.values()):
        for val in vals:
            n = sum(shapes.STYLE_FACTORS[s][i] == val for s in shapes.PRETRAIN_STYLES)
            assert (n == 0) == (val in shapes.UNSEEN_VALUES), (val, n)
            assert n == 0 or n >= 3, (val, n)
    pretrain = {shapes.STYLE_FACTORS[s] for s in shapes.PRETRAIN_STYLES}
    for s in shapes.HELDOUT_STYLES:  # every value seen in pretraining, never all together
        combo = shapes.STYLE_FACTORS[s]
        assert combo not in pretrain and all(v in seen[i] for i, v in enumerate(combo))
    for s in shapes.CONTROL_STYLES:  # out of reach: a value no pretraining style has
        assert any(v not in seen[i] for i, v in enumerate(shapes.STYLE_FACTORS[s]))
    assert shapes.describe("medical") == " ".join(shapes.STYLE_FACTORS["medical"])


def test_unnamed_combinations_teach_composition_but_keep_client_styles_new():
    combos = shapes.PRETRAIN_COMBOS
    assert len(set(combos)) == len(combos) >= 100
    named = set(shapes.STYLE_FACTORS.values())
    assert not set(combos) & named
    for combo in combos:
        assert not set(combo) & shapes.UNSEEN_VALUES
        assert all(val in vals for val, vals in zip(combo, shapes.FACTORS.values(), strict=True))
    pretrain = list(combos) + [shapes.STYLE_FACTORS[s] for s in shapes.PRETRAIN_STYLES]
    for s in shapes.HELDOUT_STYLES:
        target = shapes.STYLE_FACTORS[s]
        # no pretraining image shares three or more factor values with a client style ...
        assert max(sum(a == b for a, b in zip(c, target, strict=True)) for c in pretrain) <= 2, s
        # ... but every pair of its values occurs together somewhere
        for i, j in itertools.combinations(range(len(target)), 2):
            assert any(c[i] == target[i] and c[j] == target[j] for c in pretrain), (s, i, j)


def test_combination_samples_are_pure_and_checked():
    combo = shapes.PRETRAIN_COMBOS[0]
    a = shapes.render_combo(combo, "star", 1, seed=3)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, shapes.render_combo(combo, "star", 1, seed=3))
    assert not np.array_equal(a, shapes.render_combo(combo, "star", 2, seed=3))
    assert not np.array_equal(a, shapes.render_combo(shapes.PRETRAIN_COMBOS[1], "star", 1, seed=3))
    imgs, labels, idx = shapes.render_combos(shapes.PRETRAIN_COMBOS[:2], 2, seed=3)
    assert imgs.shape == (2 * 10 * 2, 32, 32, 3) and np.bincount(idx).tolist() == [20, 20]
    assert np.array_equal(imgs[labels.tolist().index(3) + 1], a)  # combo 0, class star, index 1
    with pytest.raises(ValueError, match="factor value"):
        shapes.render_combo(("colorful", "plain", "filled", "smudged"), "star", 0)
    with pytest.raises(ValueError, match="4 factor values"):
        shapes.render_combo(("colorful", "plain"), "star", 0)


@pytest.mark.slow
def test_client_style_names_never_occur_in_pretraining_captions():
    from fedbip_flower.research.pretrain import captions, pretraining_set

    imgs, labels, names, words = pretraining_set(per_class=1, combo_per_class=1, seed=0, resolution=32)
    n_named = len(shapes.PRETRAIN_STYLES) * len(shapes.CLASSES)
    assert len(imgs) == len(labels) == len(names) == n_named + len(shapes.PRETRAIN_COMBOS) * len(shapes.CLASSES)
    assert names[n_named] is None and names[0] == shapes.PRETRAIN_STYLES[0]
    caps = captions(labels, names, words, seed=0)
    assert any(shapes.describe(shapes.PRETRAIN_STYLES[0]) in c for c in caps[:n_named])  # factor words are used
    assert any(f" {shapes.PRETRAIN_STYLES[0]} style" in c for c in caps[:n_named])  # and names
    assert caps[n_named] == f"a {' '.join(shapes.PRETRAIN_COMBOS[0])} style of a {shapes.CLASSES[labels[n_named]]}"
    vocab = " ".join(caps + list(shapes.PRETRAIN_STYLES))
    for name in shapes.HELDOUT_STYLES + shapes.CONTROL_STYLES:
        assert name not in vocab
    # the control's palette never occurs in any caption either
    assert not any(v in vocab for v in shapes.UNSEEN_VALUES)


@pytest.mark.parametrize("res", [32, 64])
def test_noise_textures_live_on_latent_cells(res):
    # speckle and grain multiply a crisp image by one value per k x k cell (k = res // 16, at
    # least 2: one latent cell of the bundled VAE), so an autoencoder can carry them
    k = max(2, res // 16)
    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.8, (res, res, 3)).astype(np.float32)
    for name in ("speckled", "grainy"):
        out = shapes._degrade(name, np.random.default_rng(1), img, res)
        effect = out / img if name == "speckled" else (out != img).astype(float)
        cells = effect[..., 0].reshape(res // k, k, res // k, k).transpose(0, 2, 1, 3).reshape(res // k, res // k, -1)
        assert np.allclose(cells, cells[..., :1], atol=1e-5), name  # constant within a cell
        assert cells[..., 0].std() > 0.05, name  # and varying between cells


def test_styles_differ_from_each_other():
    # mean colour and pixel statistics separate every pair of styles
    def stats(s):
        x = shapes.render_array([s], 3)[0].astype(float) / 255
        return np.concatenate([x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0), [np.abs(np.diff(x, axis=1)).mean()]])

    vals = np.stack([stats(s) for s in shapes.STYLES])
    dists = np.linalg.norm(vals[:, None] - vals[None], axis=-1)
    assert (dists + np.eye(len(vals)) * 1e3).min() > 0.005


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
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ds["image"], again["image"], strict=False))


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


def _reference_client_data(cfg: DataConfig, node: NodeConfig, seed: int):
    """A site's data as the same partitioners cut it from the whole rendered dataset."""
    domains = cfg.domains.split(",")
    full = shapes.build_dataset(domains, cfg.per_class, seed, cfg.resolution, cfg.framing)
    if cfg.partition_by == "domain":
        nat = NaturalIdPartitioner(partition_by="domain")
        nat.dataset = full
        assert nat.num_partitions == len(domains)  # builds the id -> domain map
        ids = {v: k for k, v in nat.partition_id_to_natural_id.items()}
        domain, shard, nshards = _domain_assignment(domains, node)
        ds = _shard(nat.load_partition(ids[domain]), shard, nshards, seed)
    else:
        ds = _dirichlet(full, cfg, node, seed)
    return split_few_shot(ds, list(shapes.CLASSES), cfg, seed + 7919 * node.partition_id)


@pytest.mark.parametrize(
    ("partition_by", "pid", "num", "per_class"),
    [("domain", 0, 4, 3), ("domain", 2, 4, 3), ("domain", 5, 10, 6), ("dirichlet", 3, 6, 4)],
)
def test_a_site_renders_only_its_share_and_gets_the_same_data(partition_by, pid, num, per_class, monkeypatch):
    """A site's data equals what the partitioners cut from the whole rendered dataset (same
    rows, same pixels, same few-shot split), while it renders only the rows it keeps."""
    cfg = DataConfig(per_class=per_class, partition_by=partition_by, shots=2, max_test_per_class=2)
    want = _reference_client_data(cfg, NodeConfig(pid, num), seed=3)
    calls = []
    real = shapes.render_sample
    monkeypatch.setattr(shapes, "render_sample", lambda *a, **k: calls.append(a) or real(*a, **k))
    got = load_client_data(cfg, NodeConfig(pid, num), seed=3)
    for f in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert got.domain == want.domain and got.class_names == want.class_names
    assert len(calls) == len(got.train_labels) + len(got.test_labels)


def test_unknown_style_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown style"):
        shapes.build_dataset(["nope"], per_class=1)


def test_close_up_framing_only_enlarges_the_shape_and_reaches_the_sites():
    """data.framing draws the same sample with a larger shape: the other random draws (position
    fraction, rotation, colours, textures) are the same. The generator's own default is the
    pretraining framing (standard); the sites' default (DataConfig) is close-up."""
    std = [shapes.render_sample("thermal", c, i, seed=2) for c in shapes.CLASSES for i in range(3)]
    assert all(
        np.array_equal(a, shapes.render_sample("thermal", c, i, seed=2, framing="standard"))
        for a, (c, i) in zip(std, itertools.product(shapes.CLASSES, range(3)), strict=True)
    )
    lo_std, hi_std = shapes.FRAMINGS["standard"]
    lo_cu, hi_cu = shapes.FRAMINGS["close-up"]
    assert hi_cu > hi_std and lo_cu > lo_std  # larger than any pretraining image at the top
    # the shape's area, from the fill mask, grows for every sample with the same key
    for c in ("circle", "square", "heart"):
        for i in range(4):
            areas = []
            for f in ("standard", "close-up"):
                rng = np.random.default_rng([0, 0, shapes.CLASSES.index(c), i])
                areas.append(shapes._render_mask(c, 32, rng, shapes.FRAMINGS[f])[0].sum())
            assert areas[1] > areas[0] * 1.1, (c, i, areas)
    assert DataConfig().framing == "close-up"
    cfg = DataConfig(per_class=2, framing="close-up", shots=1, max_test_per_class=1)
    mine = load_client_data(cfg, NodeConfig(1, 4), seed=0)
    assert torch.equal(mine.train_images, _reference_client_data(cfg, NodeConfig(1, 4), seed=0).train_images)
    standard = load_client_data(dataclasses.replace(cfg, framing="standard"), NodeConfig(1, 4), seed=0)
    assert not torch.equal(mine.train_images, standard.train_images)
    with pytest.raises(ValueError, match="unknown framing"):
        shapes.render_sample("medical", "star", 0, framing="huge")
