"""Concepts as one object (init, (S, V) batches, injection) and their textual-inversion export."""

from __future__ import annotations

import json

import pytest
import torch

from fedbip_flower.config import ClientConfig
from fedbip_flower.data.loading import ClientData
from fedbip_flower.method.concepts import (
    Concepts,
    ExportError,
    Init,
    Injection,
    export_textual_inversion,
    load_textual_inversion,
    textual_inversion_tokens,
)
from fedbip_flower.method.personalize import personalize
from fedbip_flower.tools import export_concepts
from tests.helpers import layout


def _site_data() -> ClientData:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 0, 2, 2, 3, 3, 3])
    names = ["star", "ring", "big square", "Star"]  # "Star" and "star" would share a token
    return ClientData(imgs, labels, imgs[:1], labels[:1], names, "medical")


def _upload(comps, **over):
    cfg = ClientConfig(**{"steps": 2, "batch_size": 4, "n_s": 2, "n_v": 2, **over})
    return personalize(comps, _site_data(), cfg, "a [S] style of a [V]", 501, seed=0, progress=False)


def test_enums_take_config_strings():
    assert Injection("input") is Injection.INPUT and Injection("output") == "output"
    assert Init("random") is Init.RANDOM and f"{Init.WORD}" == "word" and str(Injection.OUTPUT) == "output"
    assert json.dumps({"i": Injection.INPUT}) == '{"i": "input"}'
    with pytest.raises(ValueError):
        Injection("middle")


def test_concepts_are_initial_vectors_plus_scaled_offsets(tiny_components):
    te = tiny_components.text_encoder
    lay = layout(tiny_components)
    c = Concepts.initialise(te, lay, "input", "word", torch.Generator().manual_seed(0), torch.tensor([4, 7]))
    table = te.get_input_embeddings().weight.detach()
    torch.testing.assert_close(c.v0[0, 0], table[lay.ids[0, lay.v_pos[0]]])  # word init: the word's embedding
    torch.testing.assert_close(c.scale, torch.cat([c.s0.flatten(), c.v0.flatten()]).pow(2).mean().sqrt())
    assert torch.equal(c.s, c.s0) and torch.equal(c.v, c.v0)  # offsets start at zero
    with torch.no_grad():
        c.dv[1] += 2.0
    torch.testing.assert_close(c.v[1], c.v0[1] + 2.0 * c.scale)
    assert c.rows_for(torch.tensor([7, 4, 7])).tolist() == [1, 0, 1]
    frozen = Concepts.initialise(te, lay, "input", "word", torch.Generator(), learn_domain=False)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["dv"]
    with pytest.raises(ValueError, match="does not fit"):
        Concepts(lay, c.s0[:1], c.v0, "input")


def test_random_init_has_the_scale_of_the_words(tiny_components):
    te = tiny_components.text_encoder
    lay = layout(tiny_components, 2, 2)
    word = Concepts.initialise(te, lay, "output", "word", torch.Generator().manual_seed(0))
    rand = Concepts.initialise(te, lay, "output", "random", torch.Generator().manual_seed(0))
    assert not torch.allclose(word.v0, rand.v0)
    assert 0.5 < float(rand.v0.std() / word.v0.std()) < 2.0


def test_batch_noise_is_per_image_and_drawn_even_at_zero(tiny_components):
    lay = layout(tiny_components)
    c = Concepts.initialise(tiny_components.text_encoder, lay, "input", "word", torch.Generator().manual_seed(0))
    rows = torch.tensor([1, 0, 1])
    s, v = c.batch(rows)
    assert s.shape == (3, 2, c.s0.shape[1]) and torch.equal(s[0], c.s) and torch.equal(v[0], c.v[1])
    g = torch.Generator().manual_seed(5)
    noisy, _ = c.batch(rows, 0.1, g)
    assert not torch.allclose(noisy[0], noisy[2])  # each image its own S
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    clean, _ = c.batch(rows, 0.0, g0)
    torch.randn((3, *c.s.shape), generator=g1)
    assert torch.equal(clean[1], c.s) and torch.equal(g0.get_state(), g1.get_state())


def test_output_injection_reuses_the_natural_prompt_outputs(tiny_components):
    te = tiny_components.text_encoder
    lay = layout(tiny_components)
    c = Concepts.initialise(te, lay, "output", "word", torch.Generator().manual_seed(0))
    with torch.no_grad():
        natural = te(lay.ids)[0]
        out = c(te, torch.tensor([1]))
    assert c.base(te) is c.base(te)  # computed once
    assert torch.equal(out[0, lay.v_pos], c.v[1].to(out.dtype))
    keep = torch.ones(lay.ids.shape[1], dtype=torch.bool)
    keep[lay.s_pos], keep[lay.v_pos] = False, False
    torch.testing.assert_close(out[0, keep], natural[1, keep])


def test_from_payload_holds_the_upload_as_it_is(tiny_components):
    p = _upload(tiny_components)
    c = Concepts.from_payload(p, tiny_components.tokenizer)
    assert c.ds is None and not list(c.parameters())
    assert torch.equal(c.s, p.s) and torch.equal(c.v, p.v) and torch.equal(c.classes, p.v_classes)
    assert c.injection is Injection.INPUT


def test_tokens_are_lowercase_and_distinct():
    dom, toks = textual_inversion_tokens("Site A", ["star", "Big square", "Star", "domain", "é"], [0, 1, 2, 3, 4])
    assert dom == "<site-a-domain>"
    assert toks == ["<site-a-star>", "<site-a-big-square>", "<site-a-star-2>", "<site-a-domain-3>", "<site-a-class>"]


def test_exported_concepts_load_into_a_diffusers_pipeline(tiny_model, tiny_components, tmp_path):
    from diffusers import StableDiffusionPipeline

    p = _upload(tiny_components)
    m = export_textual_inversion(p, tmp_path)
    assert m["domain_token"]["token"] == "<medical-domain>" and m["domain_token"]["num_vectors"] == 2
    assert [c["token"] for c in m["classes"]] == ["<medical-star>", "<medical-big-square>", "<medical-star-3>"]
    assert m["classes"][1]["prompt"] == "a <medical-domain> style of a <medical-big-square>"
    assert json.loads((tmp_path / "concepts.json").read_text()) == m

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    load_textual_inversion(pipe, tmp_path)
    tok, table = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight.detach()
    vocab = tok.get_vocab()
    for token, vectors in [("<medical-domain>", p.s)] + [(c["token"], p.v[k]) for k, c in enumerate(m["classes"])]:
        ids = [vocab[token]] + [vocab[f"{token}_{i}"] for i in range(1, len(vectors))]  # multi-vector token
        assert torch.equal(table[ids], vectors), token

    # The pipeline's prompt embedding is the one FedBiP synthesizes with (input injection).
    concepts = Concepts.from_payload(p, tiny_components.tokenizer)
    for k, entry in enumerate(m["classes"]):
        emb, _ = pipe.encode_prompt(entry["prompt"], torch.device("cpu"), 1, False)
        with torch.no_grad():
            ours = concepts(tiny_components.text_encoder, torch.tensor([k]))
        torch.testing.assert_close(emb, ours)

    out = pipe(
        m["classes"][0]["prompt"],
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()

    # One file on its own, with the usual call.
    other = StableDiffusionPipeline.from_pretrained(tiny_model)
    other.load_textual_inversion(str(tmp_path / m["domain_token"]["file"]), token="<mine>")
    assert torch.equal(
        other.text_encoder.get_input_embeddings().weight.detach()[other.tokenizer.get_vocab()["<mine>"]], p.s[0]
    )


def test_output_injected_concepts_are_not_exported(tiny_components, tmp_path):
    p = _upload(tiny_components, injection="output", steps=0)
    with pytest.raises(ExportError, match="output space"):
        export_textual_inversion(p, tmp_path)
    assert not list(tmp_path.iterdir())


def test_export_command(fast_run_config, tmp_path, capsys):
    rc = " ".join(f"{k}={json.dumps(v)}" for k, v in fast_run_config.items())
    export_concepts.main([str(tmp_path / "site"), "--run-config", rc, "--num-partitions", "2", "--no-progress"])
    m = json.loads((tmp_path / "site" / "concepts.json").read_text())
    assert m["domain_token"]["token"] == "<medical-domain>" and len(m["classes"]) == 10
    assert "<medical-domain>" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        export_concepts.main([str(tmp_path / "out"), "--run-config", rc + ' client.injection="output"'])
    assert err.value.code == 2 and not (tmp_path / "out").exists()
