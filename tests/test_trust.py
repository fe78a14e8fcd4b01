"""Trust in valid uploads: quotas, balanced shares and the screening of malicious uploads.

Every attack of the attack benchmark runs on the tiny model: the run completes, the quota or
the defence acts on the attacker, its log line names the site, and honest sites are not
flagged. Accuracy under attack is the benchmark's to measure (docs/robustness.md).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation import server_pipeline, trust
from fedbip_flower.federation.payload import to_record_dict
from fedbip_flower.research import attacks
from tests.helpers import Model, honest_payload


@pytest.fixture(scope="module")
def model(tiny_components):
    # distinct class words (names sharing their first token start from the same vector)
    return dataclasses.replace(
        Model.of(tiny_components, 32), class_names=["circle", "square", "triangle", "star", "heart"]
    )


def anchored(tiny_components, model, seed: int, domain: str, classes=(0, 1, 2, 3, 4), shots: int = 3):
    """An honest-looking upload: concepts moved a little from the words they start from."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([c for c in classes for _ in range(shots)])
    p = dataclasses.replace(honest_payload(model, seed, n=len(labels), domain=domain), labels=labels)
    p = dataclasses.replace(p, v_classes=torch.tensor(sorted(classes)), v=torch.zeros(len(classes), 1, model.hidden))
    s0, v0 = trust._word_anchors(tiny_components, p)
    v = v0[p.v_classes]
    v = v + 0.3 * v.norm(dim=-1, keepdim=True) * torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5
    s = s0 + 0.5 * s0.norm(dim=-1, keepdim=True) * torch.randn(s0.shape, generator=g) / s0.shape[-1] ** 0.5
    return dataclasses.replace(p, s=s, v=v)


@pytest.fixture
def cfg(fast_run_config):
    return FedBiPConfig.from_run_config({**fast_run_config, "data.shots": 3})


@pytest.fixture
def honest(tiny_components, model):
    return [anchored(tiny_components, model, k, d) for k, d in enumerate(("medical", "satellite", "thermal"))]


def _context(tiny_components, cfg):
    return attacks.Context(tiny_components, cfg, [], 0, 0)


def test_clean_uploads_pass_unchanged(tiny_components, cfg, honest):
    built = server_pipeline.build_global_model(tiny_components, dict(enumerate(honest)), cfg)
    assert all(not s.flagged and not s.notes and s.used == s.received for s in built.screening.values())
    off = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, defence="off"))
    plain = server_pipeline.build_global_model(tiny_components, dict(enumerate(honest)), off)
    assert torch.equal(built.images, plain.images) and torch.equal(built.labels, plain.labels)


def test_label_skewed_sites_are_not_flagged(tiny_components, model, cfg):
    """Label shift alpha 0.01: sites with one or two classes, of different sizes."""
    ups = {
        0: anchored(tiny_components, model, 0, "satellite", classes=(0,)),
        1: anchored(tiny_components, model, 1, "satellite", classes=(1, 2), shots=2),
        2: anchored(tiny_components, model, 2, "satellite", classes=(2,), shots=1),
    }
    screened = trust.screen_uploads(tiny_components, ups, server_pipeline.client_order(ups), cfg)
    assert not any(s.flagged for s in screened.screening.values())


# attack -> the check (or quota note) expected on the attacker
EXPECTED = {
    "permute-concepts": "class-concept-mismatch",
    "swap-two-concepts": "class-concept-mismatch",
    "scale-concepts-x50": "concept-norm",
    "noise-concepts": "class-concept-mismatch",
    "zero-shot-concepts": "concepts-not-learned",
    "copy-other-site": "copied-latents",
    "inflate-x10": "exact repeats",
}


@pytest.mark.parametrize("attack", sorted(EXPECTED))
def test_each_attack_is_caught_and_named(attack, tiny_components, cfg, honest, caplog):
    ups = attacks.attacked_uploads(attack, honest, _context(tiny_components, cfg))
    with caplog.at_level(logging.WARNING, logger="fedbip_flower"):
        built = server_pipeline.build_global_model(
            tiny_components, dict(enumerate(ups)), cfg, describe=lambda k: f"node {k}"
        )
    screen = built.screening[attacks.ATTACKER]
    said = [f.check for f in screen.findings] + screen.notes
    assert any(EXPECTED[attack] in x for x in said), said
    assert any(f"node {attacks.ATTACKER}" in r.getMessage() for r in caplog.records)
    # honest sites: never flagged, except the copied site, whose content is used once
    for k in (1, 2):
        checks = {f.check for f in built.screening[k].findings}
        assert checks <= ({"copied-latents"} if attack == "copy-other-site" and k == 1 else set()), (k, checks)
    assert len(built.labels) > 0 and built.stats["sgd-steps"] >= 1
    if attack in ("permute-concepts", "scale-concepts-x50", "noise-concepts", "zero-shot-concepts"):
        assert screen.action.startswith("concepts replaced") and screen.used == 15  # the default policy
    if attack == "swap-two-concepts":
        assert screen.action == "class concepts [0, 1] replaced by the other sites'" and screen.used == 15
    if attack == "inflate-x10":
        assert screen.used == screen.received // 10 == 15


def test_relabelled_latents_are_not_flagged(tiny_components, cfg, honest):
    """The class concepts redraw each latent as its label: relabelling is absorbed, not flagged."""
    ups = attacks.attacked_uploads("relabel-latents", honest, _context(tiny_components, cfg))
    built = server_pipeline.build_global_model(tiny_components, dict(enumerate(ups)), cfg)
    assert not any(s.flagged for s in built.screening.values())
    assert attacks.ATTACKER in built.order


@pytest.mark.parametrize("policy", ["report", "down-weight", "replace", "exclude"])
def test_policies(policy, tiny_components, cfg, honest):
    ups = attacks.attacked_uploads("permute-concepts", honest, _context(tiny_components, cfg))
    c = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, defence=policy, down_weight=0.34))
    screened = trust.screen_uploads(tiny_components, dict(enumerate(ups)), [0, 1, 2], c)
    screen = screened.screening[attacks.ATTACKER]
    assert screen.flagged
    assert screen.used == {"down-weight": 10, "exclude": 0}.get(policy, 15)  # ceil(0.34 * 3) of each of 5 classes
    if policy == "exclude":
        assert attacks.ATTACKER not in screened.uploads and screen.action == "excluded"
        return
    used = screened.uploads[attacks.ATTACKER]
    if policy == "replace":  # V by the median of the other two sites' V, S by the plain word
        others = torch.stack([honest[1].v, honest[2].v]).median(0).values
        assert torch.equal(used.v, others) and screen.action.startswith("concepts replaced")
        assert not torch.equal(used.s, ups[attacks.ATTACKER].s)
        assert torch.equal(used.latents, ups[attacks.ATTACKER].latents)
    else:
        assert torch.equal(used.v, ups[attacks.ATTACKER].v)


def test_replace_swaps_back_only_the_flagged_classes(tiny_components, cfg, honest):
    ups = attacks.attacked_uploads("swap-two-concepts", honest, _context(tiny_components, cfg))
    c = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, defence="replace"))
    screened = trust.screen_uploads(tiny_components, dict(enumerate(ups)), [0, 1, 2], c)
    used, bad = screened.uploads[0], ups[0]
    assert torch.equal(used.v[2:], bad.v[2:]) and torch.equal(used.s, bad.s)
    assert torch.equal(used.v[:2], torch.stack([honest[1].v[:2], honest[2].v[:2]]).median(0).values)
    assert screened.screening[0].action == "class concepts [0, 1] replaced by the other sites'"


def test_latent_statistics_flag_scaled_latents(tiny_components, cfg, honest):
    bad = dataclasses.replace(honest[0], latents=(honest[0].latents.float() * 20).half())
    ups = {0: bad, 1: honest[1], 2: honest[2]}
    screened = trust.screen_uploads(tiny_components, ups, [0, 1, 2], cfg)
    assert [f.check for f in screened.screening[0].findings] == ["latent-statistics"]
    assert 0 not in screened.uploads


def test_a_100k_latent_upload_costs_no_more_than_an_honest_one(tiny_components, cfg, honest, monkeypatch):
    p = honest[0]
    n = 100_000
    big = dataclasses.replace(
        p,
        latents=torch.randn((n, *p.latents.shape[1:]), generator=torch.Generator().manual_seed(0)).half(),
        labels=torch.arange(n) % 5,
    )
    ups = {0: big, 1: honest[1], 2: honest[2]}
    calls = []
    real = server_pipeline.synthesize_upload

    def synth(worker, payload, cfg, seed, progress=False):
        calls.append(len(payload.labels))
        return real(worker, payload, cfg, seed, progress)

    monkeypatch.setattr(server_pipeline, "synthesize_upload", synth)
    built = server_pipeline.build_global_model(tiny_components, ups, cfg)
    s = built.screening[0]
    assert s.received == n and s.used == 15 == len(honest[0].labels)
    assert max(calls) == 15 and len(built.labels) == 45
    assert any("quota of 3 per class" in note for note in s.notes)


def test_share_bound_subsamples_a_large_site(tiny_components, model, cfg):
    ups = {
        0: anchored(tiny_components, model, 0, "medical", shots=3),
        1: anchored(tiny_components, model, 1, "thermal", shots=1),
    }
    c = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, max_site_share=0.6))
    screened = trust.screen_uploads(tiny_components, ups, [0, 1], c)
    assert screened.screening[0].used == 7 and screened.screening[1].used == 5  # 7 <= 0.6 * 12
    assert sorted(screened.uploads[0].labels.tolist()) == [0, 0, 1, 1, 2, 3, 4]  # spread over the classes


def test_share_cap():
    assert trust.share_cap([160, 160, 160, 1600], 0.5) == 480
    assert trust.share_cap([10, 10], 0.5) == 10
    assert trust.share_cap([5, 100], 0.25) == 5  # below 1/N: taken as 1/N, sites equalised
    assert trust.share_cap([7, 3], 1.0) == 7


def test_per_class_cap_and_spread():
    labels = torch.tensor([2, 0, 0, 1, 0, 2, 0])
    assert trust.per_class_cap(labels, 2).tolist() == [0, 1, 2, 3, 5]
    assert trust.spread_cap(labels, 4).tolist() == [0, 1, 2, 3]


def test_the_app_reports_the_screening_per_node(fast_run_config, tmp_path, tiny_components, model, capsys):
    """Through the ServerApp: the attacker is excluded, results.json and the log say so, naming
    its node; the honest nodes' entries carry an empty screening; the launcher prints it."""
    from fedbip_flower.tools.launch import print_summary
    from tests.test_hostile import _run

    honest = {nid: anchored(tiny_components, model, nid, d) for nid, d in ((101, "satellite"), (102, "thermal"))}
    bad = attacks.attacked_uploads("permute-concepts", [anchored(tiny_components, model, 100, "medical")], None)[0]
    train = {100: to_record_dict(bad), **{k: to_record_dict(p) for k, p in honest.items()}}
    res, log, _ = _run(tmp_path, {**fast_run_config, "min-clients": 3, "data.shots": 3}, train)
    by = {c["node_id"]: c for c in res["clients"]}
    assert res["status"] == "completed"
    replaced = "concepts replaced (S by its word, V by the other sites')"
    assert by[100]["screening"]["action"] == replaced and by[100]["screening"]["used"] == 15
    assert by[100]["screening"]["findings"][0]["check"] == "class-concept-mismatch"
    assert not by[101]["screening"]["flagged"] and by[101]["screening"]["used"] == 15
    assert by[101]["screening"]["synthetic"] == 15 == by[100]["screening"]["synthetic"]
    assert "node 100 (medical) flagged, class-concept-mismatch" in log
    assert res["num_synthetic"] == 45
    print_summary(res)
    assert f"screened: node 100: {replaced} (class-concept-mismatch); 15 of 15 latents used" in capsys.readouterr().out


def test_attack_summary_reports_costs_and_flags():
    def run(seed, attack, defence, honest_mean, flagged=False):
        screening = {"medical": {"checks": ["class-concept-mismatch"]}} if flagged else {}
        return {
            "setting": "shapes-feature",
            "seed": seed,
            "attack": attack,
            "defence": defence,
            "attacker": "medical",
            "honest_mean": honest_mean,
            "server_seconds": 30.0,
            "num_synthetic": 640,
            "screening": screening,
            "flagged_honest": [],
            "site_stats": {"medical": {"word-distance-ratio": 0.7, "drift": 0.9}} if attack == "none" else {},
        }

    runs = {
        str(i): r
        for i, r in enumerate(
            [
                run(0, "none", "off", 0.9),
                run(0, "none", "on", 0.9),
                run(0, "absent", "off", 0.8),
                run(0, "permute-concepts", "off", 0.5),
                run(0, "permute-concepts", "on", 0.88, flagged=True),
            ]
        )
    }
    md = attacks.summarize(runs)
    row = next(line for line in md.splitlines() if line.startswith("| permute-concepts"))
    assert "0.500 (+0.400)" in row and "0.880 (+0.020)" in row and "-0.080" in row and "| 1/1 |" in row
    assert "| shapes-feature | 0 | 1 | 0.700 | 0.900 |" in md
