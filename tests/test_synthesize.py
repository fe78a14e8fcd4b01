"""Server side: batched, seeded synthesis from uploads; the classifier."""

from __future__ import annotations

import torch

from fedbip_flower.config import ClassifierConfig, FedBiPConfig, ServerConfig
from fedbip_flower.federation.client import run_train
from fedbip_flower.federation.payload import validate_reply
from fedbip_flower.federation.sites import expected_for
from fedbip_flower.method.pipeline import FedBiPSynthesisPipeline
from fedbip_flower.method.synthesize import synthesize_client, synthesize_from_prompts
from fedbip_flower.models.classifier import batch_bounds, build_classifier, evaluate, train_classifier


def _upload(cfg_dict, tiny_components, **over):
    cfg = FedBiPConfig.from_run_config({**cfg_dict, **over})
    rd = run_train(cfg.to_run_config(), {"partition-id": 1, "num-partitions": 2}, progress=False)
    return cfg, validate_reply(rd, expected_for(tiny_components, cfg))


def test_synthesis_is_deterministic_and_multiplies(fast_run_config, tiny_components):
    cfg, p = _upload(fast_run_config, tiny_components)
    x, y = synthesize_client(tiny_components, p, cfg.server, seed=3, progress=False)
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 32, 32)
    assert torch.equal(y, p.labels)
    x2, _ = synthesize_client(tiny_components, p, cfg.server, seed=3, progress=False)
    assert torch.equal(x, x2)
    x3, _ = synthesize_client(tiny_components, p, cfg.server, seed=4, progress=False)
    assert not torch.equal(x, x3)  # the concept noise differs
    big = ServerConfig(**{**cfg.server.__dict__, "multiplier": 3})
    xm, ym = synthesize_client(tiny_components, p, big, seed=3, progress=False)
    assert len(xm) == 90 and ym.tolist() == p.labels.tolist() * 3


def test_batched_pipeline_equals_one_image_per_call(tiny_components):
    c = tiny_components
    pipe = FedBiPSynthesisPipeline(vae=c.vae, unet=c.unet, scheduler=c.scheduler)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 16, 16, generator=g)
    emb = torch.randn(3, c.tokenizer.model_max_length, c.hidden_size, generator=g)
    neg = torch.randn(1, c.tokenizer.model_max_length, c.hidden_size, generator=g)
    kw = dict(negative_prompt_embeds=neg, start_timestep=951, num_inference_steps=3, guidance_scale=2.0)
    batched = pipe(latents=z, prompt_embeds=emb, **kw).images
    single = torch.cat([pipe(latents=z[i : i + 1], prompt_embeds=emb[i : i + 1], **kw).images for i in range(3)])
    assert batched.shape == (3, 3, 32, 32)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    assert len(pipe.timesteps_from(500, 20)) == 10  # starts part-way, at T


def test_concept_only_synthesis_starts_from_fresh_noise(fast_run_config, tiny_components):
    cfg, p = _upload(fast_run_config, tiny_components, **{"client.upload-latents": False})
    assert p.latents.shape[0] == 0
    x, y = synthesize_client(tiny_components, p, cfg.server, seed=0, progress=False)
    assert x.shape == (30, 3, 32, 32) and len(y) == 30


def test_prompt_synthesis(tiny_components):
    labels = torch.tensor([0, 1, 1])
    x, y = synthesize_from_prompts(
        tiny_components, ["a star", "a ring"], labels, ServerConfig(inference_steps=2), seed=0, progress=False
    )
    assert x.shape == (3, 3, 32, 32) and torch.equal(y, labels)


def test_classifier_learns_and_trains_its_head():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(32, 3, 16, 16, dtype=torch.uint8)
    y = torch.arange(32) % 2
    x[y == 1, 0] = 255  # class 1 is red
    x = (x.int() + torch.randint(0, 40, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    cfg = ClassifierConfig(epochs=10, batch_size=8, lr=0.05)
    torch.manual_seed(0)
    init = build_classifier(cfg, 2).fc.weight.clone()
    model, stats = train_classifier(x, y, 2, cfg, seed=0, device=torch.device("cpu"), progress=False)
    assert stats["loss-last-epoch"] < stats["loss-first-epoch"]
    assert not torch.allclose(model.fc.weight, init)
    assert evaluate(model, x, y) > 0.75  # chance is 0.5


def test_short_last_batch_joins_the_one_before():
    # 194 images in batches of 64 used to end on a batch of 2, whose BatchNorm statistics
    # wrecked the eval-mode classifier; now that tail is part of the third batch.
    assert batch_bounds(194, 64) == [(0, 64), (64, 128), (128, 194)]
    assert batch_bounds(66, 64) == [(0, 66)]
    assert batch_bounds(160, 64) == [(0, 64), (64, 128), (128, 160)]  # a 32-image tail stays
    assert batch_bounds(640, 64) == [(i, i + 64) for i in range(0, 640, 64)]
    assert batch_bounds(1, 64) == [(0, 1)] and batch_bounds(0, 64) == []
    for n in range(1, 300):
        b = batch_bounds(n, 64)
        sizes = [j - i for i, j in b]
        assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:], strict=False))
        assert n <= 64 or min(sizes) >= 16, (n, sizes)


def test_classifier_step_budget_is_the_same_for_every_set_size():
    from fedbip_flower.config import ClassifierConfig
    from fedbip_flower.models.classifier import train_classifier

    cfg = ClassifierConfig(steps=7, batch_size=8, epochs=1, augment=False)
    gen = torch.Generator().manual_seed(0)
    for n in (12, 40, 100):  # 2, 5 and 13 batches per epoch
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        y = torch.arange(n) % 3
        _, stats = train_classifier(x, y, 3, cfg, 0, torch.device("cpu"), progress=False)
        assert stats["sgd-steps"] == 7
    _, stats = train_classifier(
        x, y, 3, ClassifierConfig(epochs=2, batch_size=8, augment=False), 0, torch.device("cpu"), progress=False
    )
    assert stats["sgd-steps"] == 2 * 13  # no budget: epochs x batches


def test_centre_tap_convolutions_equal_the_full_resnet():
    # The classifier's 3x3 convolutions read only their centre tap on a 1x1 map (a CPU speed-up):
    # outputs and gradients must equal torchvision's plain ResNet-18 with the same weights.
    import torchvision

    from fedbip_flower.models.classifier import CentreTapConv2d

    cfg = ClassifierConfig()
    torch.manual_seed(0)
    patched = build_classifier(cfg, 10)
    plain = torchvision.models.resnet18(weights=None, num_classes=10)
    plain.load_state_dict(patched.state_dict())  # the state dict is a plain ResNet-18's
    n_centre = sum(type(m) is CentreTapConv2d for m in patched.modules())
    assert (
        n_centre
        == sum(type(m) is torch.nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) for m in plain.modules())
        > 0
    )
    x = torch.randn(6, 3, 32, 32)  # layer4 works on 1x1 maps: the centre-tap path runs
    y = torch.arange(6) % 10
    grads = []
    for model in (patched, plain):
        model.train().zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for k, g in grads[1][1].items():
        assert torch.allclose(grads[0][1][k], g, atol=1e-5, rtol=1e-4), k
    outer = grads[0][1]["layer4.1.conv2.weight"].clone()
    outer[:, :, 1, 1] = 0
    assert outer.abs().max() == 0 and grads[0][1]["layer4.1.conv2.weight"].abs().max() > 0
    # On larger maps (64 px: layer4 at 2x2) the full convolution runs and still agrees.
    x64 = torch.randn(2, 3, 64, 64)
    assert torch.allclose(patched.eval()(x64), plain.eval()(x64), atol=1e-5)
