"""Evidence of the bundled LDM's quality, and of the gap FedBiP has to close.

1. A sample grid: pretraining styles x classes, prompted "a {style} style of a {class}".
2. Generation accuracy: a judge trained on code-generated images of the pretraining styles
   labels the LDM's class-prompted samples. The judge is a small all-convolutional network
   that keeps the 32 px resolution (a ResNet-18 with its ImageNet stem shrinks a 32 px image
   to 8x8 before its first block and is a poor judge at this size; with the CIFAR stem it
   is 5x slower on CPU); its accuracy on held-out code-generated images is its ceiling.
3. The held-out gap: samples prompted with a held-out style's plain name, as a grid, and a
   style classifier's verdict (trained on code-generated images of all twelve styles):
   how often a sample is recognised as the style it was prompted with.

Usage::

    python -m fedbip_flower.ldm_report --output docs
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fedbip_flower import shapes
from fedbip_flower.classifier import evaluate, train_classifier
from fedbip_flower.config import ClassifierConfig, ServerConfig
from fedbip_flower.ldm import load_components
from fedbip_flower.pretrain import PROMPT
from fedbip_flower.synthesize import synthesize_from_prompts

log = logging.getLogger(__name__)


def judge_net(num_classes: int, width: int = 16) -> torch.nn.Module:
    """Conv-BN-ReLU x2 per stage at 32/16/8/4 px, global average pool, linear head."""
    layers, c_in = [], 3
    for i, c in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [torch.nn.MaxPool2d(2)] if i else []
        for _ in range(2):
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU(True)]
            c_in = c
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c_in, num_classes))


def _sample(comps, styles, per_pair, cfg, seed):
    prompts = [PROMPT.format(style=s, cls=c) for s in styles for c in shapes.CLASSES]
    idx = torch.arange(len(prompts)).repeat_interleave(per_pair)
    x, _ = synthesize_from_prompts(comps, prompts, idx, cfg, seed, desc="LDM samples")
    cls = idx % len(shapes.CLASSES)
    sty = torch.tensor([shapes.STYLES.index(styles[i // len(shapes.CLASSES)]) for i in idx.tolist()])
    return x, cls, sty


def _code_images(styles, per_class, seed):
    imgs, labels, doms = shapes.render_array(styles, per_class, seed=seed)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), torch.from_numpy(doms)


def _grid(x: torch.Tensor, rows: int, cols: int, per_pair: int, path: Path) -> None:
    tiles = [x[i * per_pair].permute(1, 2, 0).numpy() for i in range(rows * cols)]
    img = shapes.image_grid(tiles, rows, cols)
    img.resize((img.width * 3, img.height * 3), 0).save(path)


def report(model: str, out: Path, seed: int = 0, per_pair: int = 10, steps: int = 20,
           guidance: float = 3.0, train_per_class: int = 60, epochs: int = 12) -> dict:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    comps = load_components(model, "auto", "auto")
    cfg = ServerConfig(inference_steps=steps, guidance_scale=guidance, batch_size=80)
    pre, held = list(shapes.PRETRAIN_STYLES), list(shapes.HELDOUT_STYLES)
    xs_pre, cls_pre, sty_pre = _sample(comps, pre, per_pair, cfg, seed)
    xs_held, cls_held, sty_held = _sample(comps, held, per_pair, cfg, seed + 1)
    _grid(xs_pre, len(pre), len(shapes.CLASSES), per_pair, out / "ldm_samples.png")
    _grid(xs_held, len(held), len(shapes.CLASSES), per_pair, out / "ldm_heldout_prompts.png")
    real_held = [shapes.render_sample(s, c, 0, seed=seed + 5) for s in held for c in shapes.CLASSES]
    im = shapes.image_grid(real_held, len(held), len(shapes.CLASSES))
    im.resize((im.width * 3, im.height * 3), 0).save(out / "heldout_real.png")

    ccfg = ClassifierConfig(epochs=epochs, batch_size=64, lr=0.05)
    dev = comps.device
    x, y, _ = _code_images(pre, train_per_class, seed + 100)
    n_cls = len(shapes.CLASSES)
    cls_model, _ = train_classifier(x, y, n_cls, ccfg, seed, dev, model=judge_net(n_cls))
    xt, yt, _ = _code_images(pre, 10, seed + 200)
    acc_real = evaluate(cls_model, xt, yt, dev)
    gen_acc = evaluate(cls_model, xs_pre, cls_pre, dev)
    per_style = {
        s: evaluate(cls_model, xs_pre[sty_pre == shapes.STYLES.index(s)], cls_pre[sty_pre == shapes.STYLES.index(s)], dev)
        for s in pre
    }  # fmt: skip

    xd, _, yd = _code_images(list(shapes.STYLES), train_per_class // 2, seed + 300)
    dom_model, _ = train_classifier(xd, yd, len(shapes.STYLES), ccfg, seed, dev, model=judge_net(len(shapes.STYLES)))
    xdt, _, ydt = _code_images(list(shapes.STYLES), 4, seed + 400)
    dom_acc_real = evaluate(dom_model, xdt, ydt, dev)
    with torch.no_grad():
        pred_pre = dom_model.to(dev)(xs_pre.float().div(127.5).sub(1).to(dev)).argmax(1).cpu()
        pred_held = dom_model(xs_held.float().div(127.5).sub(1).to(dev)).argmax(1).cpu()
    verdict_held = {}
    for s in held:
        mask = sty_held == shapes.STYLES.index(s)
        counts = np.bincount(pred_held[mask].numpy(), minlength=len(shapes.STYLES))
        verdict_held[s] = {
            "recognised_as_prompted_style": float((pred_held[mask] == shapes.STYLES.index(s)).float().mean()),
            "most_common_verdict": shapes.STYLES[int(counts.argmax())],
            "share_judged_pretraining_style": float(counts[: len(pre)].sum() / mask.sum()),
        }
    res = {
        "model": model,
        "fingerprint": comps.fingerprint,
        "settings": {"seed": seed, "samples_per_prompt": per_pair, "ddim_steps": steps, "guidance": guidance},
        "generation_accuracy": gen_acc,
        "generation_accuracy_per_style": per_style,
        "class_classifier_accuracy_on_code_images": acc_real,
        "style_classifier_accuracy_on_code_images": dom_acc_real,
        "pretraining_prompts_recognised_as_prompted_style": float(
            (pred_pre == sty_pre).float().mean()
        ),
        "heldout_prompts": verdict_held,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "ldm_report.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--output", type=Path, default=Path("docs"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-prompt", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = report(a.model, a.output, a.seed, a.samples_per_prompt, a.steps, a.guidance)
    print(f"generation accuracy (class-prompted samples, pretraining styles): {r['generation_accuracy']:.3f}")
    for s, v in r["generation_accuracy_per_style"].items():
        print(f"  {s:<10} {v:.3f}")
    print(f"reference classifier on code-generated test images: {r['class_classifier_accuracy_on_code_images']:.3f}")
    print(f"style classifier on code images: {r['style_classifier_accuracy_on_code_images']:.3f}; "
          f"pretraining-style prompts recognised as their style: "
          f"{r['pretraining_prompts_recognised_as_prompted_style']:.3f}")  # fmt: skip
    for s, v in r["heldout_prompts"].items():
        print(f"  prompt '{s}': recognised as {s} {v['recognised_as_prompted_style']:.3f}, "
              f"most often judged '{v['most_common_verdict']}', judged a pretraining style "
              f"{v['share_judged_pretraining_style']:.3f}")  # fmt: skip
    print(f"written to {a.output}/ldm_report.json ({r['seconds']} s)")


if __name__ == "__main__":
    main()
