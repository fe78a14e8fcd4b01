"""Benchmark: FedBiP against one-shot peers and its own ablations, plus speed and privacy.

Every method runs through the same data pipeline (``load_client_data`` per partition, the
same seeds) and the same classifier training; the federated exchange is run in-process
(the Flower transport adds nothing to accuracy, and the apps are tested separately). The
FedBiP methods run the ServerApp's own server side on their clients' uploads: each upload
is serialized and validated as the app receives it, then
:func:`~fedbip_flower.federation.server_pipeline.build_global_model` (client order and seeds from the
uploads) trains the classifier, so the ``fedbip`` row is what the Flower app gives for the
same run config and seed.

    python -m fedbip_flower.research.benchmark accuracy --settings shapes-feature --seeds 0,1,2
    python -m fedbip_flower.research.benchmark speed
    python -m fedbip_flower.research.benchmark attacks --settings shapes-feature,shapes-label-0.5 --seeds 0,1,2
    python -m fedbip_flower.research.benchmark accuracy --smoke      # seconds; what the tests run

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (accuracy per client domain,
mean +- std over seeds, upload bytes per client, client time, server time, privacy audit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedbip_flower.config import ConfigError, FedBiPConfig, load_experiment
from fedbip_flower.data.loading import ClientData, NodeConfig, load_client_data
from fedbip_flower.federation.client import client_seed, template_for
from fedbip_flower.federation.payload import UPLOAD, to_record_dict, validate_reply
from fedbip_flower.federation.server_pipeline import GlobalModel, build_global_model
from fedbip_flower.federation.sites import expected_for
from fedbip_flower.jsonio import write_json
from fedbip_flower.method.personalize import encode_images, first_inference_timestep, personalize
from fedbip_flower.method.synthesize import synthesize_client, synthesize_from_prompts
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.classifier import build_classifier, evaluate, state_to_cpu, train_classifier
from fedbip_flower.models.ldm import load_server_components

log = logging.getLogger(__name__)
# Settings are experiment presets (fedbip_flower/experiments/*.toml, TOML run-config files);
# each site count is the preset's min-clients.
SETTINGS = ("shapes-feature", "shapes-label-0.5", "shapes-label-0.01", "pacs-feature")
# method -> (client config overrides, server config overrides, personalize kwargs)
FEDBIP_METHODS: dict[str, tuple[dict, dict, dict]] = {
    "fedbip": ({}, {"server.multiplier": 1}, {}),
    "fedbip-m": ({}, {"server.multiplier": 5}, {}),
    "fedbip-l": ({}, {"server.multiplier": 10}, {}),
    "instance-only": ({"client.steps": 0}, {}, {}),
    "concept-only": ({"client.upload-latents": False}, {}, {}),
    "output-injection": ({"client.injection": "output"}, {}, {}),
    "feddeo-like": ({"client.upload-latents": False}, {}, {"domain_word": "image", "learn_domain": False}),
}
OTHER_METHODS = ("zero-shot", "fedavg-oneshot", "ensemble", "centralized")
LOCAL_MODEL_METHODS = ("fedavg-oneshot", "ensemble")  # built from the sites' own classifiers
ALL_METHODS = tuple(FEDBIP_METHODS) + OTHER_METHODS
# Laid over every setting (experiments/benchmark.toml): every method's classifier gets the same
# number of SGD steps whatever its training-set size, so FedBiP-M's 5x synthetic set does not
# buy it more optimisation than FedBiP-S or the centralized oracle; methods synthesize 1x unless
# they say otherwise (as the main job does). --smoke lays experiments/smoke.toml instead.
# Override with --run-config "classifier.steps=N".


# ----------------------------------------------------------------------------- helpers
def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images in [0, 1] (B, C, H, W), 7x7 Gaussian window (sigma 1.5).

    Written here (15 lines) rather than adding scikit-image or torchmetrics for one metric.
    """
    k = torch.exp(-0.5 * ((torch.arange(7) - 3) / 1.5) ** 2)
    w = (k[:, None] * k[None]).div(k.sum() ** 2).expand(a.shape[1], 1, 7, 7).contiguous()

    def f(x):
        return F.conv2d(x, w, groups=a.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def fedavg(states: list[dict], weights: list[float]) -> dict:
    total = sum(weights)
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
        else:
            out[k] = v.clone()
    return out


@torch.no_grad()
def ensemble_accuracy(models: list[torch.nn.Module], images: torch.Tensor, labels: torch.Tensor) -> float:
    if len(images) == 0:
        return float("nan")
    x = images.float() / 127.5 - 1
    probs = sum(m.eval()(x).softmax(1) for m in models)
    return float((probs.argmax(1) == labels).float().mean())


# ----------------------------------------------------------------------------- privacy
def privacy_audit(comps, cfg: FedBiPConfig, data: ClientData, seed: int) -> dict:
    """Honest-but-curious server: reconstruct each training image from its upload.

    Attacks: decode z(T) directly; denoise z(T) with the client's own concepts. Reported:
    SSIM/PSNR of the best reconstruction against its source image and against the most
    similar other training image of the same class (gap near zero: the upload does not
    single out its source). Run for the configured gamma/T and with interpolation off.
    """
    out = {}
    t = cfg.client.timestep or first_inference_timestep(comps.scheduler, cfg.server.inference_steps)
    for name, interp in (("default", cfg.client.interpolate), ("no-interpolation", False)):
        ccfg = dataclasses.replace(cfg.client, interpolate=interp)
        p = personalize(comps, data, ccfg, template_for(cfg), t, seed, progress=False)
        src = _f(data.train_images)
        with torch.no_grad():
            direct = comps.vae.decode(p.latents.to(comps.device, comps.dtype) / comps.latent_scale).sample
        direct = (direct.float().cpu() / 2 + 0.5).clamp(0, 1)
        denoised, _ = synthesize_client(
            comps,
            dataclasses.replace(p),
            dataclasses.replace(cfg.server, concept_noise=0.0, multiplier=1),
            seed,
            progress=False,
        )
        res = {}
        for attack, rec in (("decode", direct), ("denoise", _f(denoised))):
            s_src, p_src = ssim(rec, src), psnr(rec, src)
            s_other, p_other = torch.zeros(len(src)), torch.zeros(len(src))
            for i in range(len(src)):
                same = torch.nonzero(data.train_labels == data.train_labels[i]).flatten()
                same = same[same != i]
                if len(same) == 0:
                    s_other[i], p_other[i] = float("nan"), float("nan")
                    continue
                s_other[i] = ssim(rec[i : i + 1].expand(len(same), -1, -1, -1), src[same]).max()
                p_other[i] = psnr(rec[i : i + 1].expand(len(same), -1, -1, -1), src[same]).max()
            ok = ~torch.isnan(s_other)
            res[attack] = {
                "ssim_source": float(s_src.mean()),
                "ssim_nearest_other": float(s_other[ok].mean()),
                "psnr_source": float(p_src.mean()),
                "psnr_nearest_other": float(p_other[ok].mean()),
                "ssim_gap": float((s_src[ok] - s_other[ok]).mean()),
                "psnr_gap": float((p_src[ok] - p_other[ok]).mean()),
            }
        best = max(res, key=lambda a: res[a]["ssim_source"])
        out[name] = {"attacks": res, "best_attack": best, "timestep": t}
    return out


# ----------------------------------------------------------------------------- methods
def fedbip_server(
    comps, payloads: list[ClientPayload], cfg: FedBiPConfig, progress: bool = False
) -> tuple[GlobalModel, list[int]]:
    """The ServerApp's server side on these uploads: each is serialized as its client sends
    it and validated as the app's intake does (same checks, same wire dtypes), then the
    shared server pipeline builds the global model. Returns it and the upload sizes in bytes.

    Every upload must pass (a benchmark client is honest): a bad one raises."""
    records = [to_record_dict(p) for p in payloads]
    expected = expected_for(comps, cfg)
    uploads = {k: validate_reply(r, expected) for k, r in enumerate(records)}
    built = build_global_model(comps, uploads, cfg, progress=progress)
    return built, [int(r.array_records[UPLOAD].count_bytes()) for r in records]


def repeat_seeds(seed: int, n: int) -> list[int]:
    """The classifier seeds of a run of ``seed`` trained ``n`` times: ``seed`` first, then
    ``seed * 1000 + j`` (never another run's seed for seeds below 1000)."""
    return [seed] + [seed * 1000 + j for j in range(1, n)]


def run_setting(
    setting: str,
    methods: list[str],
    seed: int,
    extra: dict,
    progress: bool = False,
    audit: bool = True,
    on_method=None,
    resume: dict | None = None,
    classifier_seeds: int = 1,
) -> dict:
    """Run ``methods`` on one (setting, seed); ``on_method(partial_run)`` is called after each.

    ``resume``: an earlier (possibly partial) run of the same setting, seed and config; its
    finished methods (and privacy audit) are kept, not run again. ``classifier_seeds`` > 1:
    every classifier the benchmark trains (all methods but fedavg-oneshot and ensemble, whose
    local models are their own) is trained again on the same training set with
    ``repeat_seeds(seed, classifier_seeds)[1:]``; the accuracies go to
    ``accuracy_by_classifier_seed`` ("accuracy" stays the one of ``seed``)."""
    if classifier_seeds < 1:
        raise ValueError(f"classifier_seeds must be >= 1, got {classifier_seeds}")
    cfg = FedBiPConfig.from_run_config({**load_experiment(setting), **extra, "seed": seed})
    if resume is not None and comparable(resume.get("config")) != comparable(cfg.to_run_config()):
        raise ValueError(f"cannot resume {setting} seed {seed}: the earlier run used another config")
    n = cfg.min_clients
    if cfg.data.dataset == "imagefolder" and not cfg.data.data_dir:
        raise ConfigError(f"{setting}: give the image folder with --run-config \"data.data-dir='DIR'\"")
    comps = load_server_components(cfg.model.id, cfg.model.device, cfg.model.dtype)[0]
    t = cfg.client.timestep or first_inference_timestep(comps.scheduler, cfg.server.inference_steps)
    datas = [load_client_data(cfg.data, NodeConfig(k, n), seed) for k in range(n)]
    num_classes = len(datas[0].class_names)
    results: dict[str, dict] = {}
    uploads: dict[tuple, tuple] = {}

    names = [d.domain if len({dd.domain for dd in datas}) == n else f"{d.domain}#{k}" for k, d in enumerate(datas)]

    def scores(model) -> dict[str, float]:
        return {
            nm: evaluate(model, d.test_images, d.test_labels, comps.device) for nm, d in zip(names, datas, strict=False)
        }

    def record(name, model, stats, x, y, bytes_, client_s, server_t0):
        server_s = time.time() - server_t0
        results[name] = {
            "accuracy": scores(model),
            "upload_bytes": bytes_,
            "client_seconds": client_s,
            "server_seconds": server_s,
            "num_train_images": len(y),
            "classifier_steps": int(stats["sgd-steps"]),
        }
        if classifier_seeds > 1:
            # The same training set, other classifier initialisations and batch orders: how much
            # of a difference between methods the classifier's own randomness can explain.
            runs = {str(seed): results[name]["accuracy"]}
            for s in repeat_seeds(seed, classifier_seeds)[1:]:
                log.info("[%s seed %d] %s: classifier seed %d", setting, seed, name, s)
                again, _ = train_classifier(x, y, num_classes, cfg.classifier, s, comps.device, progress)
                runs[str(s)] = scores(again)
            results[name]["accuracy_by_classifier_seed"] = runs

    def finish(name, x, y, bytes_, client_s, server_t0):
        model, stats = train_classifier(x, y, num_classes, cfg.classifier, seed, comps.device, progress)
        record(name, model, stats, x, y, bytes_, client_s, server_t0)

    for m in methods:
        kept = (resume or {}).get("methods", {}).get(m)
        repeats_done = len(kept.get("accuracy_by_classifier_seed") or {}) if kept else 0
        if kept is not None and (classifier_seeds == 1 or m in LOCAL_MODEL_METHODS or repeats_done == classifier_seeds):
            results[m] = kept
            log.info("[%s seed %d] %s: kept from the earlier run", setting, seed, m)
            continue
        log.info("[%s seed %d] %s", setting, seed, m)
        t0 = time.time()
        if m in FEDBIP_METHODS:
            cover, sover, pkw = FEDBIP_METHODS[m]
            mcfg = FedBiPConfig.from_run_config({**cfg.to_run_config(), **cover, **sover})
            # Whether latents are uploaded does not change S and V: such methods share the
            # personalization and drop the latents.
            train_cover = {k: v for k, v in cover.items() if k != "client.upload-latents"}
            tcfg = FedBiPConfig.from_run_config({**cfg.to_run_config(), **train_cover})
            key = (json.dumps(train_cover, sort_keys=True), json.dumps(pkw, sort_keys=True))
            if key not in uploads:
                ps, secs = [], []
                for k, d in enumerate(datas):
                    c0 = time.time()
                    ps.append(
                        personalize(
                            comps,
                            d,
                            tcfg.client,
                            template_for(tcfg),
                            t,
                            client_seed(tcfg, NodeConfig(k, n)),
                            progress,
                            **pkw,
                        )
                    )
                    secs.append(time.time() - c0)
                uploads[key] = (ps, secs)
            ps, secs = uploads[key]
            if not mcfg.client.upload_latents:
                ps = [dataclasses.replace(p, latents=p.latents[:0]) for p in ps]
            s0 = time.time()
            built, bytes_ = fedbip_server(comps, ps, mcfg, progress)
            record(m, built.classifier, built.stats, built.images, built.labels, bytes_, secs, s0)
        elif m == "zero-shot":
            s0 = time.time()
            labels = torch.cat([d.train_labels for d in datas]).sort().values
            prompts = [f"a {c}" for c in datas[0].class_names]
            x, y = synthesize_from_prompts(comps, prompts, labels, cfg.server, seed, progress)
            finish(m, x, y, [0] * n, [0.0] * n, s0)
        elif m == "centralized":
            s0 = time.time()
            x = torch.cat([d.train_images for d in datas])
            y = torch.cat([d.train_labels for d in datas])
            finish(m, x, y, [int(d.train_images.numel()) for d in datas], [0.0] * n, s0)
        elif m in LOCAL_MODEL_METHODS:
            key = ("local-models",)
            if key not in uploads:
                models, secs = [], []
                for d in datas:
                    c0 = time.time()
                    mod, _ = train_classifier(
                        d.train_images, d.train_labels, num_classes, cfg.classifier, seed, comps.device, progress
                    )
                    models.append(mod)
                    secs.append(time.time() - c0)
                uploads[key] = (models, secs)
            models, secs = uploads[key]
            s0 = time.time()
            nbytes = [sum(v.numel() * v.element_size() for v in state_to_cpu(mm).values()) for mm in models]
            if m == "fedavg-oneshot":
                glob = build_classifier(dataclasses.replace(cfg.classifier, pretrained=""), num_classes)
                glob.load_state_dict(fedavg([state_to_cpu(mm) for mm in models], [len(d.train_labels) for d in datas]))
                acc = {nm: evaluate(glob, d.test_images, d.test_labels) for nm, d in zip(names, datas, strict=False)}
            else:
                acc = {
                    nm: ensemble_accuracy(models, d.test_images, d.test_labels)
                    for nm, d in zip(names, datas, strict=False)
                }
            results[m] = {
                "accuracy": acc,
                "upload_bytes": nbytes,
                "client_seconds": secs,
                "server_seconds": time.time() - s0,
                "num_train_images": 0,
            }
        else:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(ALL_METHODS)}")
        results[m]["wall_seconds"] = time.time() - t0
        if on_method is not None:
            on_method(
                {
                    "setting": setting,
                    "seed": seed,
                    "methods": results,
                    "privacy": None,
                    "config": cfg.to_run_config(),
                    "complete": False,
                }
            )
    privacy = (resume or {}).get("privacy")
    if privacy is None and audit and setting.startswith("shapes"):
        privacy = privacy_audit(comps, cfg, datas[0], seed)
    return {
        "setting": setting,
        "seed": seed,
        "methods": results,
        "privacy": privacy,
        "config": cfg.to_run_config(),
        "complete": True,
    }


def comparable(config: dict | None) -> dict:
    """A run's config without the keys that cannot change its numbers: with a step budget
    (``classifier.steps`` > 0) the epoch count is unused."""
    config = dict(config or {})
    if config.get("classifier.steps", 0) > 0:
        config.pop("classifier.epochs", None)
    return config


def merge_runs(paths: list[Path]) -> list[dict]:
    """The runs of several benchmark JSON files (e.g. one process per (setting, seed)).

    Runs of the same (setting, seed) are joined method by method (a later file's method
    wins): a run stopped part-way keeps what it finished, and a second run can add methods.
    Their configurations must be equal, else the numbers would not be comparable.
    """
    merged: dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            key = (r["setting"], r["seed"])
            if key not in merged:
                merged[key] = {**r, "methods": dict(r["methods"])}
                continue
            m = merged[key]
            if comparable(m.get("config")) != comparable(r.get("config")):
                raise ValueError(f"{path}: {key} was run with another configuration; not merged")
            m["methods"].update(r["methods"])
            m["privacy"] = r.get("privacy") or m.get("privacy")
            m["complete"] = bool(m.get("complete")) or bool(r.get("complete"))
    return [merged[k] for k in sorted(merged)]


def summarize(runs: list[dict]) -> dict:
    table: dict = {}
    for r in runs:
        for m, v in r["methods"].items():
            e = table.setdefault(r["setting"], {}).setdefault(
                m, {"per_domain": {}, "means": [], "bytes": [], "client_s": [], "server_s": []}
            )
            for d, a in v["accuracy"].items():
                if a is not None and a == a:
                    e["per_domain"].setdefault(d, []).append(a)
            accs = [a for a in v["accuracy"].values() if a is not None and a == a]  # no test images: no score
            e["means"].append(sum(accs) / max(1, len(accs)))
            e["bytes"].append(statistics.mean(v["upload_bytes"]))
            e["client_s"].append(statistics.mean(v["client_seconds"]))
            e["server_s"].append(v["server_seconds"])
    return table


def to_markdown(table: dict) -> str:
    lines = []
    for setting, methods in table.items():
        domains = sorted({d for e in methods.values() for d in e["per_domain"]})
        lines += [
            f"### {setting}",
            "",
            "| method | " + " | ".join(domains) + " | mean +- std | seeds | upload/client | client s | server s |",
            "|---" * (len(domains) + 6) + "|",
        ]
        for m, e in methods.items():
            per = [f"{statistics.mean(e['per_domain'][d]):.3f}" if d in e["per_domain"] else "-" for d in domains]
            sd = statistics.stdev(e["means"]) if len(e["means"]) > 1 else 0.0
            b = statistics.mean(e["bytes"])
            size = f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"
            lines.append(
                f"| {m} | "
                + " | ".join(per)
                + f" | {statistics.mean(e['means']):.3f} +- {sd:.3f} | {len(e['means'])} | {size} | "
                f"{statistics.mean(e['client_s']):.1f} | {statistics.mean(e['server_s']):.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def privacy_markdown(runs: list[dict]) -> str:
    lines = [
        "| setting | seed | upload | best attack | SSIM source | SSIM nearest other | gap | PSNR source | PSNR other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for name, v in (r.get("privacy") or {}).items():
            a = v["attacks"][v["best_attack"]]
            lines.append(
                f"| {r['setting']} | {r['seed']} | {name} (T={v['timestep']}) | {v['best_attack']} | "
                f"{a['ssim_source']:.3f} | {a['ssim_nearest_other']:.3f} | {a['ssim_gap']:+.3f} | "
                f"{a['psnr_source']:.2f} | {a['psnr_nearest_other']:.2f} |"
            )
    return "\n".join(lines)


def repeats_markdown(runs: list[dict]) -> str:
    """Per (setting, seed, method) trained with several classifier seeds: the mean accuracy over
    the sites for each classifier seed, and their mean +- std."""
    lines = [
        "| setting | seed | method | mean accuracy per classifier seed | mean +- std |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        for m, v in r["methods"].items():
            by_seed = v.get("accuracy_by_classifier_seed")
            if not by_seed:
                continue
            means = []
            for acc in by_seed.values():
                ok = [a for a in acc.values() if a == a]
                means.append(sum(ok) / max(1, len(ok)))
            sd = statistics.stdev(means) if len(means) > 1 else 0.0
            per = ", ".join(f"{s}: {x:.3f}" for s, x in zip(by_seed, means, strict=True))
            lines.append(f"| {r['setting']} | {r['seed']} | {m} | {per} | {statistics.mean(means):.3f} +- {sd:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- speed
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(extra: dict, batch: int = 32, repeats: int = 5, images: int = 64) -> dict:
    """Client step cost vs. one UNet forward+backward; batched synthesis vs per-image pipeline."""
    from diffusers import StableDiffusionPipeline

    cfg = FedBiPConfig.from_run_config({**extra, "client.batch-size": batch, "client.steps": repeats})
    comps = load_server_components(cfg.model.id, cfg.model.device, cfg.model.dtype)[0]
    data = load_client_data(cfg.data, NodeConfig(0, 4), 0)
    z0 = encode_images(comps, data.train_images[:batch])
    # One UNet forward+backward with a gradient into the conditioning, as the client needs.
    cond = torch.randn(batch, comps.tokenizer.model_max_length, comps.hidden_size, requires_grad=True)
    t = torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(repeats + 1):
        _sync(comps.device)
        t0 = time.perf_counter()
        comps.unet(
            z0.to(comps.device, comps.dtype), t.to(comps.device), cond.to(comps.device, comps.dtype)
        ).sample.mean().backward()
        _sync(comps.device)
        times.append(time.perf_counter() - t0)
    unet_s = statistics.median(times[1:])
    tt = first_inference_timestep(comps.scheduler, cfg.server.inference_steps)
    p = personalize(comps, data, dataclasses.replace(cfg.client, steps=repeats + 1), template_for(cfg), tt, 0, False)
    step_s = p.metrics["seconds-per-step"]
    # Synthesis: our batched pipeline vs StableDiffusionPipeline called once per image.
    p.latents, p.labels = p.latents[:images], p.labels[:images]
    _sync(comps.device)
    t0 = time.perf_counter()
    synthesize_client(comps, p, cfg.server, 0, progress=False)
    _sync(comps.device)
    ours = len(p.labels) / (time.perf_counter() - t0)
    pipe = StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=comps.unet,
        scheduler=comps.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    n_single = min(images, 8)
    res = cfg.data.resolution
    t0 = time.perf_counter()
    for i in range(n_single):
        pipe(
            f"a {data.class_names[int(p.labels[i])]}",
            height=res,
            width=res,
            num_inference_steps=cfg.server.inference_steps,
            guidance_scale=cfg.server.guidance_scale,
            generator=torch.Generator().manual_seed(i),
            output_type="pt",
        )
    _sync(comps.device)
    single = n_single / (time.perf_counter() - t0)
    cuda = comps.device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(comps.device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "model": comps.source,
        "dtype": str(comps.dtype),
        "resolution": res,
        "batch": batch,
        "synthesis_batch": cfg.server.batch_size,
        "images": len(p.labels),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(comps.device) / 2**30 if cuda else None,
        "unet_fwd_bwd_s": unet_s,
        "client_step_s": step_s,
        "client_step_over_unet": step_s / unet_s,
        "synthesis_images_per_s": ours,
        "pipeline_per_image_images_per_s": single,
        "synthesis_speedup": ours / single,
        "inference_steps": cfg.server.inference_steps,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("accuracy", "speed", "merge", "attacks", "scale"))
    p.add_argument("inputs", nargs="*", type=Path, help="merge: benchmark(.partial).json files of separate runs")
    p.add_argument(
        "--settings", default="shapes-feature", help=f"comma list of {', '.join(SETTINGS)} (or TOML run-config files)"
    )
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--run-config", default="", help='extra overrides, e.g. "client.steps=60 classifier.epochs=20"')
    p.add_argument("--smoke", action="store_true", help="tiny scale (seconds), for tests")
    p.add_argument("--no-audit", action="store_true", help="skip the privacy audit")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished methods of OUT/benchmark.partial.json (attacks: the runs of OUT/attacks.json), run the rest",
    )
    p.add_argument(
        "--classifier-seeds",
        type=int,
        default=1,
        help="train each classifier this many times on the same training set (other seeds) to size its own noise",
    )
    p.add_argument(
        "--attacks", default="", help="attacks: comma list of attacks (default: all; see research/attacks.py)"
    )
    p.add_argument("--defences", default="off,on", help="attacks: comma list of off, on, down-weight, report")
    p.add_argument("--screen-only", action="store_true", help="attacks: only what the checks measure on clean uploads")
    p.add_argument("--sites", default="4,16,50,100", help="scale: comma list of federation sizes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="scale: OMP threads per phase process")
    p.add_argument("--figure", action="store_true", help="scale: draw OUT/scale.png (needs matplotlib)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--batch", type=int, default=32, help="speed: client batch size")
    p.add_argument("--images", type=int, default=64, help="speed: images to synthesize")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from flwr.common.config import parse_config_args

    extra = dict(parse_config_args([a.run_config])) if a.run_config else {}
    if a.smoke or a.mode != "scale":  # scale: the app's defaults unless --run-config says otherwise
        extra = {**load_experiment("smoke" if a.smoke else "benchmark"), **extra}
    if a.mode == "scale" and a.out == Path("outputs/benchmark"):
        a.out = Path("outputs/scale")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.mode == "scale":
        from fedbip_flower.research import scale

        scale.main(a, extra)
        return
    if a.mode == "attacks":
        from fedbip_flower.research import attacks

        attacks.main(a, extra)
        return
    if a.mode == "speed":
        r = speed(extra, a.batch, images=a.images)
        write_json(a.out / "speed.json", r)
        print(f"{r['device']}, {r['dtype']}, {r['resolution']} px, model {r['model']}")
        print(
            f"client step {r['client_step_s'] * 1000:.1f} ms vs UNet fwd+bwd {r['unet_fwd_bwd_s'] * 1000:.1f} ms "
            f"(batch {r['batch']}): {r['client_step_over_unet']:.2f}x"
        )
        print(
            f"synthesis {r['synthesis_images_per_s']:.2f} img/s batched vs {r['pipeline_per_image_images_per_s']:.2f} "
            f"img/s one image per pipeline call ({r['inference_steps']} steps): {r['synthesis_speedup']:.1f}x"
        )
        return
    t0 = time.time()
    if a.mode == "merge":
        if not a.inputs:
            p.error("merge needs the JSON files of the runs to merge")
        runs = merge_runs(a.inputs)
    else:
        runs = []
        partial = a.out / "benchmark.partial.json"
        earlier = {}
        if a.resume and partial.is_file():
            earlier = {(r["setting"], r["seed"]): r for r in json.loads(partial.read_text())["runs"]}
            wanted = {(s, int(seed)) for s in a.settings.split(",") for seed in a.seeds.split(",")}
            runs = [r for key, r in earlier.items() if key not in wanted]  # kept, never overwritten
        for s in a.settings.split(","):
            for seed in a.seeds.split(","):
                # Written after every method: a long run that is stopped keeps what it did.
                def save(run, done=tuple(runs)):
                    write_json(partial, {"runs": [*done, run]})

                before = earlier.get((s, int(seed)))
                methods = a.methods.split(",")
                runs.append(
                    run_setting(
                        s, methods, int(seed), extra, a.progress, not a.no_audit, save, before, a.classifier_seeds
                    )
                )
                save(runs[-1], tuple(runs[:-1]))
    table = summarize(runs)
    audited = any(r.get("privacy") for r in runs)
    md = to_markdown(table) + "\n" + ("Privacy audit\n\n" + privacy_markdown(runs) if audited else "")
    if any("accuracy_by_classifier_seed" in v for r in runs for v in r["methods"].values()):
        md += "\n\nClassifier seeds (same training sets)\n\n" + repeats_markdown(runs)
    write_json(a.out / "benchmark.json", {"runs": runs, "summary": table, "seconds": time.time() - t0})
    (a.out / "benchmark.md").write_text(md + "\n")
    print(md)
    print(f"wall time {time.time() - t0:.0f} s; written to {a.out}/benchmark.json and benchmark.md")


if __name__ == "__main__":
    main()
