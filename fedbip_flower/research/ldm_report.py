"""Evidence of the bundled LDM's quality, and of how far FedBiP's concepts reach.

1. A sample grid: pretraining styles x classes, prompted "a {style} style of a {class}".
2. Generation accuracy: a class judge trained on code-rendered images labels the LDM's
   class-prompted samples of the pretraining styles. The judges are small all-convolutional
   networks that keep the 32 px resolution (a ResNet-18 with its ImageNet stem shrinks a
   32 px image to 8x8 before its first block); their accuracy on held-out code-rendered
   images is their ceiling.
3. Concept recovery: for every client style (and the out-of-reach control), one client's 16
   shots per class learn S and V with the default client settings; their concept-only
   samples (fresh noise, no uploaded latents) are judged by a style judge over all styles and
   by the class judge, beside samples prompted with the style's plain name (which the LDM
   never saw) and with its true factor words (the oracle a site cannot write down), and the
   client's own images after a round trip through the VAE (what any sample can keep). Four
   factor judges say which factor (palette, background, drawing, degradation) samples miss.
4. What each level brings: the same client's samples drawn as the app draws them, from the
   learned concepts alone (fresh noise), from its uploaded z(T) alone (natural-word
   concepts), and from both (FedBiP), judged the same way.

Usage::

    python -m fedbip_flower.research.ldm_report --output docs
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fedbip_flower.config import ClassifierConfig, ClientConfig, DataConfig, ServerConfig
from fedbip_flower.data import shapes
from fedbip_flower.jsonio import write_json
from fedbip_flower.method.personalize import encode_images
from fedbip_flower.method.synthesize import synthesize_from_prompts
from fedbip_flower.models.classifier import evaluate, train_classifier
from fedbip_flower.models.ldm import load_components
from fedbip_flower.pictures import image_grid
from fedbip_flower.research.pretrain import PROMPT

log = logging.getLogger(__name__)


BI_LEVEL = ("concepts_only", "latents_only", "both")


def judge_net(num_classes: int, width: int = 16) -> torch.nn.Module:
    """Conv-BN-ReLU x2 per stage at 32/16/8/4 px, global average pool, linear head."""
    layers, c_in = [], 3
    for i, c in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [torch.nn.MaxPool2d(2)] if i else []
        for _ in range(2):
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU(True)]
            c_in = c
    return torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c_in, num_classes)
    )


def _sample(comps, styles, per_pair, cfg, seed, words: bool = False):
    """Class-prompted samples of each style, by name or (``words``) by its factor words."""
    prompts = [PROMPT.format(style=shapes.describe(s) if words else s, cls=c) for s in styles for c in shapes.CLASSES]
    idx = torch.arange(len(prompts)).repeat_interleave(per_pair)
    x, _ = synthesize_from_prompts(comps, prompts, idx, cfg, seed, desc="LDM samples", progress=False)
    cls = idx % len(shapes.CLASSES)
    sty = torch.tensor([shapes.STYLES.index(styles[i // len(shapes.CLASSES)]) for i in idx.tolist()])
    return x, cls, sty


OTHER = "unnamed combination"


def _judge_combos(seed: int, n_random: int = 50) -> list[tuple[str, ...]]:
    """Unnamed factor combinations the style judge must tell apart from the named styles: every
    near miss of a client or control style (three of its four values) and ``n_random`` others."""
    named = set(shapes.STYLE_FACTORS.values())
    targets = [shapes.STYLE_FACTORS[s] for s in shapes.HELDOUT_STYLES + shapes.CONTROL_STYLES]
    every = [c for c in itertools.product(*shapes.FACTORS.values()) if c not in named]
    near = [c for c in every if any(sum(a == b for a, b in zip(c, t, strict=True)) == 3 for t in targets)]
    rest = [c for c in every if c not in set(near)]
    pick = np.random.default_rng([seed, 11]).choice(len(rest), size=min(n_random, len(rest)), replace=False)
    return near + [rest[i] for i in sorted(pick)]


def _code_images(styles, per_class, seed, combos=(), framing="standard"):
    """Code-rendered images of named styles (style id = index in ``shapes.STYLES``) and of
    unnamed ``combos`` (style id = ``len(shapes.STYLES)``: the judge's extra class).
    Pretraining styles are drawn at the standard framing, client and control styles at
    ``framing`` (the sites' images)."""
    pre = [s for s in styles if s in shapes.PRETRAIN_STYLES]
    sites = [s for s in styles if s not in shapes.PRETRAIN_STYLES]
    parts = [
        shapes.render_array(g, per_class, seed=seed, framing=f) for g, f in ((pre, "standard"), (sites, framing)) if g
    ]
    imgs, labels, doms = (np.concatenate(a) for a in zip(*parts, strict=True))
    if combos:
        ci, cl, _ = shapes.render_combos(combos, max(1, per_class // 24), seed=seed)
        imgs, labels = np.concatenate([imgs, ci]), np.concatenate([labels, cl])
        doms = np.concatenate([doms, np.full(len(cl), len(shapes.STYLES), np.int64)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), torch.from_numpy(doms)


def _grid(x: torch.Tensor, rows: int, cols: int, per_pair: int, path: Path) -> None:
    tiles = [x[i * per_pair].permute(1, 2, 0).numpy() for i in range(rows * cols)]
    img = image_grid(tiles, rows, cols)
    img.resize((img.width * 3, img.height * 3), 0).save(path)


@dataclass
class Judges:
    """A class judge and a style judge, trained on code-rendered images of every style."""

    cls: torch.nn.Module
    style: torch.nn.Module
    class_ceiling: float
    style_ceiling: float
    device: torch.device
    #: one judge per rendering factor (``shapes.FACTORS``), to say which factor a sample misses
    factors: dict[str, torch.nn.Module] = field(default_factory=dict)
    factor_ceilings: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def _predict(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        model.to(self.device).eval()
        out = [
            model(x[i : i + 512].float().div(127.5).sub(1).to(self.device)).argmax(1).cpu()
            for i in range(0, len(x), 512)
        ]
        return torch.cat(out)

    def styles_of(self, x: torch.Tensor) -> torch.Tensor:
        return self._predict(self.style, x)

    def verdict(self, x: torch.Tensor, cls: torch.Tensor, style: str) -> dict:
        """Share of samples recognised as ``style``, class accuracy, most common verdict, and
        per factor the share of samples whose factor value is the style's."""
        pred = self.styles_of(x)
        counts = np.bincount(pred.numpy(), minlength=len(shapes.STYLES) + 1)
        target = dict(zip(shapes.FACTORS, shapes.STYLE_FACTORS[style], strict=True))
        return {
            "recognised_as_target_style": float((pred == shapes.STYLES.index(style)).float().mean()),
            "class_accuracy": evaluate(self.cls, x, cls, self.device),
            "most_common_verdict": (*shapes.STYLES, OTHER)[int(counts.argmax())],
            "share_judged_pretraining_style": float(counts[: len(shapes.PRETRAIN_STYLES)].sum() / len(x)),
            "factor_matches": {
                f: float((self._predict(m, x) == shapes.FACTORS[f].index(target[f])).float().mean())
                for f, m in self.factors.items()
            },
        }


def train_judges(seed: int, device, per_class: int = 24, epochs: int = 10, framing: str = "standard") -> Judges:
    """Judges of class and of style over every named style (pretraining, client, control) plus
    one class for unnamed combinations, near misses of the client styles included, so a
    sample is recognised as a client style only if all four of its factors match."""
    ccfg = ClassifierConfig(epochs=epochs, batch_size=64, lr=0.05)
    combos = _judge_combos(seed)
    x, y, d = _code_images(list(shapes.STYLES), per_class, seed + 100, combos, framing)
    n_cls, n_sty = len(shapes.CLASSES), len(shapes.STYLES) + 1
    cls_model, _ = train_classifier(x, y, n_cls, ccfg, seed, device, progress=False, model=judge_net(n_cls))
    sty_model, _ = train_classifier(x, d, n_sty, ccfg, seed, device, progress=False, model=judge_net(n_sty))
    xt, yt, dt = _code_images(list(shapes.STYLES), 8, seed + 200, combos, framing)
    factors, factor_ceilings = train_factor_judges(seed, device, max(10, per_class * 12), epochs)
    return Judges(
        cls_model,
        sty_model,
        evaluate(cls_model, xt, yt, device),
        evaluate(sty_model, xt, dt, device),
        device,
        factors,
        factor_ceilings,
    )


def train_factor_judges(seed: int, device, n_combos: int = 300, epochs: int = 10):
    """One judge per rendering factor, trained on ``n_combos`` random factor combinations (one
    image per class each; unseen values included); returns the judges and their accuracy on
    fresh combinations."""
    every = list(itertools.product(*shapes.FACTORS.values()))

    def data(offset: int, n: int):
        rng = np.random.default_rng([seed, offset])
        combos = [every[i] for i in rng.choice(len(every), size=min(n, len(every)), replace=False)]
        imgs, _, idx = shapes.render_combos(combos, 1, seed=seed + offset)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        return x, [[combos[i][k] for i in idx] for k in range(len(shapes.FACTORS))]

    x, vals = data(300, n_combos)
    xt, vals_t = data(400, max(10, n_combos // 4))
    ccfg = ClassifierConfig(epochs=epochs, batch_size=64, lr=0.05)
    judges, ceilings = {}, {}
    for k, (f, values) in enumerate(shapes.FACTORS.items()):
        y = torch.tensor([values.index(v) for v in vals[k]])
        judges[f], _ = train_classifier(
            x, y, len(values), ccfg, seed, device, progress=False, model=judge_net(len(values))
        )
        ceilings[f] = evaluate(judges[f], xt, torch.tensor([values.index(v) for v in vals_t[k]]), device)
    return judges, ceilings


@torch.no_grad()
def _vae_round_trip(comps, images: torch.Tensor) -> torch.Tensor:
    """The client's own images encoded and decoded by the LDM's VAE: what any sample drawn
    through this autoencoder can keep of the style (the ceiling of every column)."""
    z = encode_images(comps, images) / comps.latent_scale
    out = [
        comps.vae.decode(z[i : i + 64].to(comps.device, comps.dtype)).sample.float().cpu() for i in range(0, len(z), 64)
    ]
    return ((torch.cat(out).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def concept_recovery(
    comps,
    styles,
    judges: Judges,
    client: ClientConfig,
    sample_cfg: ServerConfig,
    seed: int = 0,
    shots: int = 16,
    grid: Path | None = None,
    app_cfg: ServerConfig | None = None,
    framing: str = DataConfig().framing,
) -> dict:
    """How far learned concepts reach: one client per style with ``shots`` images per class
    learns S and V (``client`` settings), and its concept-only samples are judged beside
    plain-name prompts and the oracle prompt of the style's true factor words.

    ``bi_level`` judges what each level brings to the samples the server trains on, drawn as
    the app draws them (``app_cfg``, default: the app's synthesis settings): the learned
    concepts from fresh noise (concept level only), the client's uploaded z(T) with the
    natural-word concepts S and V start from (instance level only), and both (FedBiP).
    The same z(T) and seeds serve both columns that use them."""
    from fedbip_flower.data.loading import ClientData
    from fedbip_flower.method.embeddings import DEFAULT_TEMPLATE
    from fedbip_flower.method.personalize import first_inference_timestep, personalize
    from fedbip_flower.method.synthesize import synthesize_client

    res, tiles = {}, []
    app_cfg = app_cfg or ServerConfig()
    client = replace(client, upload_latents=True)
    t_app = client.timestep or first_inference_timestep(comps.scheduler, app_cfg.inference_steps)
    for k, style in enumerate(styles):
        t0 = time.time()
        imgs, labels, _ = shapes.render_array([style], shots, seed=seed + 500, framing=framing)
        empty = torch.zeros((0, 3, *imgs.shape[1:3]), dtype=torch.uint8)
        data = ClientData(
            torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels),
            empty,
            torch.zeros(0, dtype=torch.int64),
            list(shapes.CLASSES),
            style,
        )
        # the latents' noise is drawn after the concepts are learned: same S and V as without them
        payload = personalize(comps, data, client, DEFAULT_TEMPLATE, t_app, seed + k, progress=False)
        concepts_only = replace(payload, latents=payload.latents[:0])
        x, y = synthesize_client(comps, concepts_only, sample_cfg, seed + k, progress=False)
        words = personalize(comps, data, replace(client, steps=0), DEFAULT_TEMPLATE, t_app, seed + k, progress=False)
        bi_level = {}
        for kind, p in (
            ("concepts_only", concepts_only),
            ("latents_only", replace(payload, s=words.s, v=words.v)),
            ("both", payload),
        ):
            xb, yb = synthesize_client(comps, p, app_cfg, seed + k, progress=False)
            bi_level[kind] = judges.verdict(xb, yb, style)
        xv = _vae_round_trip(comps, data.train_images)
        xn, yn, _ = _sample(comps, [style], shots, sample_cfg, seed + k)
        xo, yo, _ = _sample(comps, [style], shots, sample_cfg, seed + k, words=True)
        res[style] = {
            "factors": dict(zip(shapes.FACTORS, shapes.STYLE_FACTORS[style], strict=True)),
            "out_of_reach": bool(set(shapes.STYLE_FACTORS[style]) & shapes.UNSEEN_VALUES),
            "learned_concepts": judges.verdict(x, y, style),
            "plain_name_prompt": judges.verdict(xn, yn, style),
            "factor_words_prompt": judges.verdict(xo, yo, style),
            "vae_round_trip": judges.verdict(xv, data.train_labels, style),
            "bi_level": bi_level,
            "seconds": round(time.time() - t0, 1),
        }
        log.info("recovery %s: %s (%.0f s)", style, res[style]["learned_concepts"], time.time() - t0)
        order = torch.argsort(y, stable=True)
        tiles += [x[order][i * shots].permute(1, 2, 0).numpy() for i in range(len(shapes.CLASSES))]
    if grid is not None and tiles:
        img = image_grid(tiles, len(styles), len(shapes.CLASSES))
        img.resize((img.width * 3, img.height * 3), 0).save(grid)
    reach = [v for v in res.values() if not v["out_of_reach"]]
    if reach:
        res["mean_over_client_styles"] = {
            kind: {
                m: float(np.mean([v[kind][m] for v in reach])) for m in ("recognised_as_target_style", "class_accuracy")
            }
            for kind in ("learned_concepts", "plain_name_prompt", "factor_words_prompt", "vae_round_trip")
        }
        res["mean_over_client_styles"]["bi_level"] = {
            kind: {
                m: float(np.mean([v["bi_level"][kind][m] for v in reach]))
                for m in ("recognised_as_target_style", "class_accuracy")
            }
            for kind in BI_LEVEL
        }
    return res


def report(
    model: str,
    out: Path,
    seed: int = 0,
    per_pair: int = 5,
    steps: int = 20,
    guidance: float = 3.0,
    client: ClientConfig | None = None,
    framing: str = DataConfig().framing,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    comps = load_components(model, "auto", "auto")
    cfg = ServerConfig(inference_steps=steps, guidance_scale=guidance, batch_size=80, multiplier=1)
    pre, held = list(shapes.PRETRAIN_STYLES), list(shapes.HELDOUT_STYLES) + list(shapes.CONTROL_STYLES)
    xs_pre, cls_pre, sty_pre = _sample(comps, pre, per_pair, cfg, seed)
    xs_held, cls_held, sty_held = _sample(comps, held, per_pair, cfg, seed + 1)
    _grid(xs_pre, len(pre), len(shapes.CLASSES), per_pair, out / "ldm_samples.png")
    _grid(xs_held, len(held), len(shapes.CLASSES), per_pair, out / "ldm_heldout_prompts.png")
    real_held = [shapes.render_sample(s, c, 0, seed=seed + 5, framing=framing) for s in held for c in shapes.CLASSES]
    im = image_grid(real_held, len(held), len(shapes.CLASSES))
    im.resize((im.width * 3, im.height * 3), 0).save(out / "heldout_real.png")
    log.info("samples drawn (%.0f s); training the judges", time.time() - t0)

    judges = train_judges(seed, comps.device, framing=framing)
    gen_acc = evaluate(judges.cls, xs_pre, cls_pre, judges.device)
    per_style = {
        s: evaluate(
            judges.cls,
            xs_pre[sty_pre == shapes.STYLES.index(s)],
            cls_pre[sty_pre == shapes.STYLES.index(s)],
            judges.device,
        )
        for s in pre
    }
    pred_pre = judges.styles_of(xs_pre)
    log.info("judges trained (%.0f s); concept recovery", time.time() - t0)
    recovery = concept_recovery(
        comps, held, judges, client or ClientConfig(), cfg, seed, grid=out / "ldm_concept_recovery.png", framing=framing
    )
    res = {
        "model": model,
        "fingerprint": comps.fingerprint,
        "settings": {
            "seed": seed,
            "samples_per_prompt": per_pair,
            "ddim_steps": steps,
            "guidance": guidance,
            "framing": framing,
            "client": asdict(client or ClientConfig()),
            "bi_level_synthesis": asdict(ServerConfig()),
        },
        "generation_accuracy": gen_acc,
        "generation_accuracy_per_style": per_style,
        "class_judge_accuracy_on_code_images": judges.class_ceiling,
        "style_judge_accuracy_on_code_images": judges.style_ceiling,
        "factor_judge_accuracy_on_code_images": judges.factor_ceilings,
        "pretraining_prompts_recognised_as_prompted_style": float((pred_pre == sty_pre).float().mean()),
        "concept_recovery": recovery,
        "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "ldm_report.json", res)
    return res


def client_config(run_config: str) -> ClientConfig:
    """The client settings of concept recovery: the app's defaults with ``client.*`` overrides in
    ``flwr run --run-config`` syntax (e.g. ``"client.n-s=4 client.lr=0.05"``); other keys are
    refused, as are unknown or out-of-range ones (the app's own validation)."""
    from flwr.common.config import parse_config_args

    from fedbip_flower.config import ConfigError, FedBiPConfig

    overrides = dict(parse_config_args([run_config])) if run_config else {}
    other = sorted(k for k in overrides if not k.startswith("client."))
    if other:
        raise ConfigError(f"--run-config takes client.* keys only, not {', '.join(other)}")
    return FedBiPConfig.from_run_config(overrides).client


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--output", type=Path, default=Path("docs"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-prompt", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument(
        "--run-config", default="", help='client settings of concept recovery, e.g. "client.n-s=4 client.lr=0.05"'
    )
    p.add_argument(
        "--framing",
        default=DataConfig().framing,
        choices=tuple(shapes.FRAMINGS),
        help="object size of the client and control styles' images (the app's data.framing)",
    )
    a = p.parse_args(argv)
    client = client_config(a.run_config)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = report(a.model, a.output, a.seed, a.samples_per_prompt, a.steps, a.guidance, client, a.framing)
    print(f"generation accuracy (class-prompted samples, pretraining styles): {r['generation_accuracy']:.3f}")
    for s, v in r["generation_accuracy_per_style"].items():
        print(f"  {s:<12} {v:.3f}")
    print(
        f"class judge on code-rendered test images: {r['class_judge_accuracy_on_code_images']:.3f}; "
        f"style judge: {r['style_judge_accuracy_on_code_images']:.3f}; pretraining-style prompts "
        f"recognised as their style: {r['pretraining_prompts_recognised_as_prompted_style']:.3f}"
    )
    print("concept recovery (share recognised as the target style / class accuracy):")
    print(f"  {'style':<12} {'learned S, V':>14} {'plain name':>14} {'factor words':>14} {'VAE round trip':>14}")
    for s, v in r["concept_recovery"].items():
        if s == "mean_over_client_styles":
            continue
        cells = [
            f"{v[k]['recognised_as_target_style']:.2f} / {v[k]['class_accuracy']:.2f}"
            for k in ("learned_concepts", "plain_name_prompt", "factor_words_prompt", "vae_round_trip")
        ]
        tag = " (out of reach)" if v["out_of_reach"] else ""
        print(f"  {s:<12} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {cells[3]:>14}{tag}")
    m = r["concept_recovery"].get("mean_over_client_styles")
    if m:
        cells = [
            f"{m[k]['recognised_as_target_style']:.2f} / {m[k]['class_accuracy']:.2f}"
            for k in ("learned_concepts", "plain_name_prompt", "factor_words_prompt", "vae_round_trip")
        ]
        print(f"  {'mean':<12} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {cells[3]:>14}  (client styles)")
    print(
        "what each level brings, samples drawn as the app draws them "
        "(share recognised as the target style / class accuracy):"
    )
    print(f"  {'style':<12} {'concepts only':>14} {'latents only':>14} {'both (FedBiP)':>14}")
    for s, v in r["concept_recovery"].items():
        b = v["bi_level"]
        cells = [f"{b[k]['recognised_as_target_style']:.2f} / {b[k]['class_accuracy']:.2f}" for k in BI_LEVEL]
        name = "mean" if s == "mean_over_client_styles" else s
        tag = " (out of reach)" if v.get("out_of_reach") else ""
        print(f"  {name:<12} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}{tag}")
    print(
        "factor judges on code-rendered test images: "
        + ", ".join(f"{f} {v:.3f}" for f, v in r["factor_judge_accuracy_on_code_images"].items())
    )
    print(f"share of samples with each factor of the target style ({' / '.join(shapes.FACTORS)}):")
    print(f"  {'style':<12} {'learned S, V':>24} {'factor words':>24} {'VAE round trip':>24}")
    for s, v in r["concept_recovery"].items():
        if s != "mean_over_client_styles":
            cells = [
                " / ".join(f"{x:.2f}" for x in v[k]["factor_matches"].values())
                for k in ("learned_concepts", "factor_words_prompt", "vae_round_trip")
            ]
            print(f"  {s:<12} {cells[0]:>24} {cells[1]:>24} {cells[2]:>24}")
    print(f"written to {a.output}/ldm_report.json ({r['seconds']} s)")


if __name__ == "__main__":
    main()
