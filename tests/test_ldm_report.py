"""Concept recovery in the LDM report: a smoke run on the tiny test model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbip_flower.config import ClientConfig, ServerConfig
from fedbip_flower.data import shapes
from fedbip_flower.research.ldm_report import OTHER, _code_images, _judge_combos, concept_recovery, train_judges


@pytest.mark.slow
def test_concept_recovery_reports_learned_plain_and_oracle_prompts(tiny_components, tmp_path):
    judges = train_judges(0, torch.device("cpu"), per_class=1, epochs=1)
    assert 0.0 <= judges.class_ceiling <= 1.0 and 0.0 <= judges.style_ceiling <= 1.0
    assert set(judges.factors) == set(judges.factor_ceilings) == set(shapes.FACTORS)
    client = ClientConfig(steps=2, batch_size=8)
    sample_cfg = ServerConfig(inference_steps=2, batch_size=32)
    grid = tmp_path / "grid.png"
    res = concept_recovery(
        tiny_components, ["medical", "ultraviolet"], judges, client, sample_cfg, seed=0, shots=2, grid=grid
    )
    assert grid.is_file()
    assert res["medical"]["out_of_reach"] is False and res["ultraviolet"]["out_of_reach"] is True
    assert res["medical"]["factors"]["palette"] == "grayscale"
    for style in ("medical", "ultraviolet"):
        for kind in ("learned_concepts", "plain_name_prompt", "factor_words_prompt", "vae_round_trip"):
            v = res[style][kind]
            assert 0.0 <= v["recognised_as_target_style"] <= 1.0 and 0.0 <= v["class_accuracy"] <= 1.0
            assert v["most_common_verdict"] in (*shapes.STYLES, OTHER)
            assert set(v["factor_matches"]) == set(shapes.FACTORS)
            assert all(0.0 <= m <= 1.0 for m in v["factor_matches"].values())
        assert set(res[style]["bi_level"]) == {"concepts_only", "latents_only", "both"}
        for v in res[style]["bi_level"].values():
            assert 0.0 <= v["recognised_as_target_style"] <= 1.0 and 0.0 <= v["class_accuracy"] <= 1.0
    # the mean covers the reachable client styles only
    mean = res["mean_over_client_styles"]["learned_concepts"]
    assert np.isclose(mean["class_accuracy"], res["medical"]["learned_concepts"]["class_accuracy"])
    both = res["mean_over_client_styles"]["bi_level"]["both"]
    assert np.isclose(both["class_accuracy"], res["medical"]["bi_level"]["both"]["class_accuracy"])


@pytest.mark.slow
def test_bi_level_columns_differ_in_what_they_start_from(tiny_components, monkeypatch):
    """concepts_only starts from fresh noise with the learned S and V, latents_only from the
    uploaded z(T) with the natural-word S and V, both from z(T) with the learned ones."""
    from fedbip_flower.method import synthesize

    seen = []
    real = synthesize.synthesize_client

    def spy(comps, payload, cfg, seed, **kw):
        seen.append((cfg.inference_steps, len(payload.latents), payload.s.clone(), payload.latents.clone()))
        return real(comps, payload, cfg, seed, **kw)

    monkeypatch.setattr(synthesize, "synthesize_client", spy)
    judges = train_judges(0, torch.device("cpu"), per_class=1, epochs=1)
    concept_recovery(
        tiny_components,
        ["medical"],
        judges,
        ClientConfig(steps=3, batch_size=8, lr=0.5),
        ServerConfig(inference_steps=2, batch_size=32),
        seed=0,
        shots=2,
        app_cfg=ServerConfig(inference_steps=3, batch_size=32),
    )
    learned, conc, lat, both = seen  # recovery column, then the three bi-level columns
    assert learned[0] == 2 and conc[0] == lat[0] == both[0] == 3
    assert conc[1] == 0 and lat[1] == both[1] == 20
    assert torch.equal(conc[2], both[2]) and not torch.equal(lat[2], both[2])
    assert torch.equal(lat[3], both[3])


def test_style_judge_knows_near_misses_of_the_client_styles():
    combos = _judge_combos(0)
    named = set(shapes.STYLE_FACTORS.values())
    assert combos and not set(combos) & named and len(set(combos)) == len(combos)
    for s in shapes.HELDOUT_STYLES + shapes.CONTROL_STYLES:
        target = shapes.STYLE_FACTORS[s]
        near = [c for c in combos if sum(a == b for a, b in zip(c, target, strict=True)) == 3]
        # every way of getting exactly one factor wrong that is not itself a named style
        n_named = sum(sum(a == b for a, b in zip(c, target, strict=True)) == 3 for c in named)
        assert len(near) == sum(len(v) - 1 for v in shapes.FACTORS.values()) - n_named, s


def test_report_client_settings_take_client_keys_only():
    from fedbip_flower.config import ConfigError
    from fedbip_flower.research.ldm_report import client_config

    assert client_config("") == ClientConfig()
    cfg = client_config("client.n-s=4 client.lr=0.05")
    assert cfg.n_s == 4 and cfg.lr == 0.05 and cfg.steps == ClientConfig().steps
    for bad, msg in (
        ("server.multiplier=3", "client.. keys only"),
        ("client.n-ss=4", "client.n-ss"),
        ("client.n-s=99", "n-s"),
    ):
        with pytest.raises(ConfigError, match=msg):
            client_config(bad)


def test_judges_see_client_styles_at_the_sites_framing():
    """With --framing close-up the judges learn the client and control styles as the sites draw
    them, and the pretraining styles as the LDM saw them."""
    x, y, d = _code_images(["woodcut", "medical", "ultraviolet"], 1, 3, framing="close-up")
    assert len(x) == 3 * len(shapes.CLASSES) and d.tolist() == sorted(d.tolist())
    for k, (style, framing) in enumerate(
        (("woodcut", "standard"), ("medical", "close-up"), ("ultraviolet", "close-up"))
    ):
        i = k * len(shapes.CLASSES) + 2
        want = shapes.render_sample(style, shapes.CLASSES[2], 0, seed=3, framing=framing)
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), want), style
        assert int(y[i]) == 2 and int(d[i]) == shapes.STYLES.index(style)
    std, _, _ = _code_images(["medical"], 1, 3)
    assert not torch.equal(std[2], x[len(shapes.CLASSES) + 2])
