"""Client side: prompt layout, concept injection, instance-level latents, concept training."""

from __future__ import annotations

import torch

from fedbip_flower.config import ClientConfig
from fedbip_flower.federation.client import run_train
from fedbip_flower.method.concepts import Concepts
from fedbip_flower.method.personalize import (
    encode_images,
    first_inference_timestep,
    interpolation_partners,
    noised_latents,
    train_concepts,
)
from tests.helpers import layout


def test_layout_puts_natural_words_in_the_slots(tiny_components):
    tok = tiny_components.tokenizer
    lay = layout(tiny_components)
    assert lay.ids.shape == (2, tok.model_max_length)
    assert lay.s_pos.tolist() == [2, 3] and lay.v_pos.tolist() == [7]
    plain = tok("a medical style of a star").input_ids
    assert lay.ids[0, 2] == plain[2] and lay.ids[0, 3] == plain[2] and lay.ids[0, 7] == plain[6]
    assert lay.ids[0, 0] == tok.bos_token_id and lay.ids[0, 8] == tok.eos_token_id


def test_input_injection_only_changes_slots_and_leaves_the_encoder_frozen(tiny_components):
    te = tiny_components.text_encoder
    lay = layout(tiny_components)
    before = {k: v.clone() for k, v in te.state_dict().items()}
    c = Concepts.initialise(te, lay, "input", "word", torch.Generator().manual_seed(0))
    s, v = c.vectors()
    with torch.no_grad():
        natural = te(lay.ids)[0]
        same = c(te)
    # word initialisation of a 1-token word reproduces the natural prompt exactly
    torch.testing.assert_close(natural[1], same[1])
    s2 = (s + 1.0).requires_grad_(True)
    out = c.encode(te, s2.expand(2, -1, -1), v)
    out.sum().backward()
    assert s2.grad is not None and s2.grad.abs().sum() > 0
    assert all(p.grad is None for p in te.parameters())
    for k, val in te.state_dict().items():
        torch.testing.assert_close(val, before[k])
    assert not te.get_input_embeddings()._forward_hooks  # the hook is removed


def test_output_injection_overwrites_output_positions(tiny_components):
    te = tiny_components.text_encoder
    lay = layout(tiny_components)
    s = torch.full((2, 2, te.config.hidden_size), 3.0)
    v = torch.full((2, 1, te.config.hidden_size), -3.0)
    c = Concepts(lay, s[0], v, "output", learnable=False)
    out = c.encode(te, s, v)
    assert torch.all(out[:, lay.s_pos] == 3.0) and torch.all(out[:, lay.v_pos] == -3.0)


def test_partners_are_different_images_of_the_same_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    p = interpolation_partners(labels, torch.Generator().manual_seed(0))
    for i in range(5):
        assert labels[p[i]] == labels[i] and p[i] != i
    assert p[5] == 5  # a class with one image has no partner


def test_one_image_class_is_noised_without_interpolation():
    z0 = torch.randn(3, 4, 8, 8)
    labels = torch.tensor([0, 0, 1])
    acp = torch.linspace(0.99, 0.01, 1000)
    cfg = ClientConfig()
    out = noised_latents(z0, labels, 900, acp, cfg, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float16 and out.shape == z0.shape
    # replay the generator: partners, gamma, then eps
    g = torch.Generator().manual_seed(0)
    interpolation_partners(labels, g)
    torch.randn(3, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    expect = acp[900].sqrt() * z0[2] + (1 - acp[900]).sqrt() * eps[2]
    torch.testing.assert_close(out[2].float(), expect, atol=2e-3, rtol=1e-3)


def test_first_inference_timestep(tiny_components):
    assert first_inference_timestep(tiny_components.scheduler, 50) == 981
    assert first_inference_timestep(tiny_components.scheduler, 20) == 951


def test_concept_training_moves_only_s_and_v(tiny_components):
    comps = tiny_components
    imgs = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    z0 = encode_images(comps, imgs)
    assert z0.shape == (6, 4, 16, 16)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    lay = layout(comps, 1, 1)
    c = Concepts.initialise(
        comps.text_encoder, lay, "input", "word", torch.Generator().manual_seed(0), torch.tensor([0, 1])
    )
    s, v = c.vectors()
    unet_before = {k: t.clone() for k, t in comps.unet.state_dict().items()}
    cfg = ClientConfig(steps=3, batch_size=4, lr=0.05)
    stats = train_concepts(comps, z0, labels, c, cfg, torch.Generator().manual_seed(1), progress=False)
    s2, v2 = c.vectors()
    assert not torch.allclose(s, s2) and not torch.allclose(v, v2)
    for k, t in comps.unet.state_dict().items():
        torch.testing.assert_close(t, unet_before[k])
    assert stats["seconds-per-step"] > 0


def test_client_upload_is_deterministic_and_holds_no_images(fast_run_config):
    node = {"partition-id": 0, "num-partitions": 2}
    a = run_train(fast_run_config, node, progress=False)
    b = run_train(fast_run_config, node, progress=False)
    sa, sb = a["upload"].to_torch_state_dict(), b["upload"].to_torch_state_dict()
    assert set(sa) == {"latents", "labels", "s", "v", "v_classes"}
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert sa["latents"].dtype == torch.float16 and sa["latents"].shape[1:] == (4, 16, 16)
    assert sa["labels"].numel() == 3 * 10  # 3 shots x 10 classes
    meta = a["meta"]
    assert meta["domain"] == "medical" and meta["timestep"] == 501  # first step of a 2-step DDIM schedule
    other = run_train({**fast_run_config, "seed": 1}, node, progress=False)["upload"].to_torch_state_dict()
    assert not torch.equal(other["latents"], sa["latents"])


def test_concept_step_size_is_relative_to_the_embedding_scale(tiny_components):
    """Adam moves each coordinate by about lr per step; the step is taken in units of the
    initial vectors' RMS, so input embeddings (RMS ~0.02) are not thrown out of range."""
    comps = tiny_components
    imgs = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    z0 = encode_images(comps, imgs)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    classes = torch.tensor([0, 1])
    for injection in ("input", "output"):
        lay = layout(comps, 1, 1)
        c = Concepts.initialise(comps.text_encoder, lay, injection, "word", torch.Generator().manual_seed(0), classes)
        s, v = c.vectors()
        rms = torch.cat([s.flatten(), v.flatten()]).pow(2).mean().sqrt()
        torch.testing.assert_close(c.scale, rms)
        steps, lr = 4, 0.05
        cfg = ClientConfig(steps=steps, batch_size=4, lr=lr, injection=injection)
        train_concepts(comps, z0, labels, c, cfg, torch.Generator().manual_seed(1), progress=False)
        s2, v2 = c.vectors()
        drift = torch.cat([(s2 - s).flatten(), (v2 - v).flatten()]).abs().max()
        assert 0 < drift <= 1.05 * steps * lr * rms, (injection, float(drift), float(rms))
