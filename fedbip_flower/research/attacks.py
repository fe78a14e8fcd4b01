"""Attack benchmark: one site of the federation sends a valid but malicious upload.

Each (setting, seed) personalizes every site once, as the benchmark's FedBiP row does; then,
for each attack, site 0's upload is replaced by the attacker's and the ServerApp's server side
runs on the uploads (:func:`~fedbip_flower.research.benchmark.fedbip_server`: serialized,
validated, screened, synthesized, classifier trained), once with the defence off and once on:

- ``off``: ``server.defence = off``, no quota (``server.site-quota`` = ``server.max-images``),
  no share bound (``server.max-site-share = 1``): the server as it trusted every valid upload;
- ``on``: the defaults (quota ``data.shots`` per class, share bound 0.5, the default policy);
- ``exclude``, ``replace``, ``down-weight``, ``report``: each policy, for choosing the default.

Reported per run: every site's accuracy, the honest sites' mean (all but the attacker), the
server's seconds and images synthesized, and which sites were flagged (with the checks).
``none`` is the clean run (no attacker; its honest mean is over the same sites).

    python -m fedbip_flower.research.benchmark attacks --settings shapes-feature,shapes-label-0.5 --seeds 0,1,2
    python -m fedbip_flower.research.benchmark attacks --settings shapes-label-0.01 --attacks none --seeds 0,1,2

Results go to ``<out>/attacks.json`` (written after every run; ``--resume`` keeps finished
runs) and ``<out>/attacks.md``. ``--screen-only`` personalizes the sites and prints what each
check measured on their clean uploads (the honest margins of the thresholds), without
training any classifier: ``<out>/screening.json`` and ``screening.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedbip_flower.config import FedBiPConfig, load_experiment
from fedbip_flower.data.loading import NodeConfig, load_client_data
from fedbip_flower.federation.client import client_seed, template_for
from fedbip_flower.federation.trust import _word_anchors
from fedbip_flower.jsonio import write_json
from fedbip_flower.method.personalize import first_inference_timestep, personalize
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.classifier import evaluate
from fedbip_flower.models.ldm import load_server_components

log = logging.getLogger(__name__)
ATTACKER = 0  # the partition that attacks
DEFENCES: dict[str, dict] = {
    "off": {"server.defence": "off", "server.site-quota": -1, "server.max-site-share": 1.0},
    "on": {},
    "exclude": {"server.defence": "exclude"},
    "replace": {"server.defence": "replace"},
    "down-weight": {"server.defence": "down-weight"},
    "report": {"server.defence": "report"},
}


@dataclasses.dataclass
class Context:
    comps: object
    cfg: FedBiPConfig
    datas: list
    t: int
    seed: int


def _permute(ps, a, ctx):
    p = ps[a]
    return dataclasses.replace(p, v=p.v.roll(1, 0))


def _swap_two(ps, a, ctx):
    p = ps[a]
    v = p.v.clone()
    v[[0, 1]] = v[[1, 0]]
    return dataclasses.replace(p, v=v)


def _scale(ps, a, ctx):
    p = ps[a]
    return dataclasses.replace(p, s=p.s * 50, v=p.v * 50)


def _noise(ps, a, ctx):
    p = ps[a]
    g = torch.Generator().manual_seed(ctx.seed)

    def like(x):
        n = torch.randn(x.shape, generator=g)
        return n / n.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True)

    return dataclasses.replace(p, s=like(p.s), v=like(p.v))


def _relabel(ps, a, ctx):
    p = ps[a]
    held = sorted(p.v_classes.tolist())
    nxt = {c: held[(i + 1) % len(held)] for i, c in enumerate(held)}
    return dataclasses.replace(p, labels=torch.tensor([nxt[int(y)] for y in p.labels]))


def _inflate(times: int):
    def attack(ps, a, ctx):
        p = ps[a]
        reps = -(-times // len(p.labels))
        idx = torch.arange(len(p.labels)).repeat(reps)[:times]
        return dataclasses.replace(p, latents=p.latents[idx], labels=p.labels[idx])

    return attack


def _copy(ps, a, ctx):
    return ps[(a + 1) % len(ps)]


def _zero_shot(ps, a, ctx):
    p = ps[a]
    s0, v0 = _word_anchors(ctx.comps, p)
    return dataclasses.replace(p, s=s0, v=v0[p.v_classes])


def _poisoned_training(ps, a, ctx):
    """The site personalizes honestly on its own images with their labels rotated by one."""
    d = ctx.datas[a]
    k = len(d.class_names)
    bad = dataclasses.replace(d, train_labels=(d.train_labels + 1) % k)
    n = len(ctx.datas)
    return personalize(
        ctx.comps, bad, ctx.cfg.client, template_for(ctx.cfg), ctx.t, client_seed(ctx.cfg, NodeConfig(a, n)), False
    )


ATTACKS: dict[str, Callable | None] = {
    "none": None,
    "absent": None,  # the reference: the attacker's site sends nothing (its data is lost to the others)
    "permute-concepts": _permute,
    "swap-two-concepts": _swap_two,
    "scale-concepts-x50": _scale,
    "noise-concepts": _noise,
    "relabel-latents": _relabel,
    "inflate-x10": _inflate(0),  # times set from the upload size below
    "copy-other-site": _copy,
    "zero-shot-concepts": _zero_shot,
    "poisoned-training": _poisoned_training,
    "inflate-100k": _inflate(100_000),
}
ON_ONLY = {"inflate-100k"}  # without a quota this is hours of synthesis: run with the defence on only
OFF_ONLY = {"absent"}  # nothing to screen: the same run with the defence on


def attacked_uploads(name: str, ps: list[ClientPayload], ctx: Context) -> list[ClientPayload]:
    """The uploads with site ``ATTACKER``'s replaced by attack ``name``'s."""
    fn = ATTACKS[name]
    if name == "absent":
        return [p for k, p in enumerate(ps) if k != ATTACKER]
    if fn is None:
        return list(ps)
    if name == "inflate-x10":
        fn = _inflate(10 * len(ps[ATTACKER].labels))
    out = list(ps)
    out[ATTACKER] = fn(ps, ATTACKER, ctx)
    return out


STAT_KEYS = (
    "word-distance-ratio",
    "drift",
    "drift-min",
    "norm-ratio",
    "latent-std-min",
    "latent-std-max",
    "latent-mean-abs-max",
)


def honest_uploads(setting: str, seed: int, extra: dict) -> tuple[Context, list[ClientPayload], list[str]]:
    """Every site of (setting, seed) personalized as the benchmark's clients are."""
    cfg = FedBiPConfig.from_run_config({**load_experiment(setting), **extra, "seed": seed})
    comps = load_server_components(cfg.model.id, cfg.model.device, cfg.model.dtype)[0]
    t = cfg.client.timestep or first_inference_timestep(comps.scheduler, cfg.server.inference_steps)
    n = cfg.min_clients
    datas = [load_client_data(cfg.data, NodeConfig(k, n), seed) for k in range(n)]
    names = [d.domain if len({dd.domain for dd in datas}) == n else f"{d.domain}#{k}" for k, d in enumerate(datas)]
    c0 = time.time()
    ps = [
        personalize(comps, d, cfg.client, template_for(cfg), t, client_seed(cfg, NodeConfig(k, n)), False)
        for k, d in enumerate(datas)
    ]
    log.info("[%s seed %d] %d sites personalized in %.0f s", setting, seed, n, time.time() - c0)
    return Context(comps, cfg, datas, t, seed), ps, names


def screen_only(settings: list[str], seeds: list[int], extra: dict, out: Path) -> str:
    """What every check measured on the clean uploads of each (setting, seed), per site."""
    from fedbip_flower.federation.server_pipeline import client_order
    from fedbip_flower.federation.trust import screen_uploads

    rows = []
    for setting in settings:
        for seed in seeds:
            ctx, ps, names = honest_uploads(setting, seed, extra)
            ups = dict(enumerate(ps))
            screened = screen_uploads(ctx.comps, ups, client_order(ups), ctx.cfg)
            for k, s in screened.screening.items():
                rows.append({"setting": setting, "seed": seed, "site": names[k], "flagged": s.flagged, **s.stats})
    write_json(out / "screening.json", {"sites": rows})
    head = "| setting | seed | site | " + " | ".join(STAT_KEYS) + " | flagged |"
    lines = [head, "|---" * (len(STAT_KEYS) + 4) + "|"]
    for r in rows:
        vals = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in STAT_KEYS)
        lines.append(f"| {r['setting']} | {r['seed']} | {r['site']} | {vals} | {'yes' if r['flagged'] else 'no'} |")
    worst = {
        k: (max if k not in ("drift-min", "latent-std-min") else min)(r[k] for r in rows if k in r) for k in STAT_KEYS
    }
    lines.append(
        "| all | | worst | "
        + " | ".join(f"{worst[k]:.3f}" for k in STAT_KEYS)
        + f" | {sum(r['flagged'] for r in rows)} flagged |"
    )
    md = "\n".join(lines)
    (out / "screening.md").write_text(md + "\n")
    return md


def run_attacks(
    setting: str, seed: int, attacks: list[str], defences: list[str], extra: dict, done: dict, save
) -> None:
    """Run every (attack, defence) not in ``done`` for one (setting, seed); ``save(key, run)``."""
    from fedbip_flower.research.benchmark import fedbip_server

    ctx = ps = names = None
    for attack in attacks:
        for defence in defences:
            key = f"{setting}|{seed}|{attack}|{defence}"
            if key in done or (attack in ON_ONLY and defence == "off") or (attack in OFF_ONLY and defence != "off"):
                continue
            if ps is None:
                ctx, ps, names = honest_uploads(setting, seed, extra)
            cfg, comps, datas = ctx.cfg, ctx.comps, ctx.datas
            over = {**DEFENCES[defence]}
            if over.get("server.site-quota") == -1:
                over["server.site-quota"] = cfg.server.max_images
            rcfg = FedBiPConfig.from_run_config({**cfg.to_run_config(), **over})
            uploads = attacked_uploads(attack, ps, ctx)
            log.info("[%s seed %d] attack %s, defence %s", setting, seed, attack, defence)
            s0 = time.time()
            built, bytes_ = fedbip_server(comps, uploads, rcfg)
            server_s = time.time() - s0
            acc = {
                nm: evaluate(built.classifier, d.test_images, d.test_labels, comps.device)
                for nm, d in zip(names, datas, strict=True)
            }
            honest = [a for k, a in enumerate(acc.values()) if k != ATTACKER and a == a]
            # the sites that uploaded, in the order of ``uploads`` (an absent attacker sent nothing)
            senders = names if len(uploads) == len(names) else [nm for k, nm in enumerate(names) if k != ATTACKER]
            flags = {
                senders[k]: {
                    "checks": sorted({f.check for f in s.findings}),
                    "action": s.action,
                    "used": s.used,
                    "received": s.received,
                }
                for k, s in built.screening.items()
                if s.findings or s.notes
            }
            run = {
                "setting": setting,
                "seed": seed,
                "attack": attack,
                "defence": defence,
                "attacker": names[ATTACKER],
                "accuracy": acc,
                "honest_mean": sum(honest) / len(honest),
                "mean": sum(a for a in acc.values() if a == a) / len(acc),
                "server_seconds": server_s,
                "synthesis_seconds": built.timings["synthesis"],
                "classifier_seconds": built.timings["classifier"],
                "num_synthetic": len(built.labels),
                "upload_bytes": bytes_,
                "screening": flags,
                "flagged_honest": sorted(
                    nm for k, nm in enumerate(names) if k != ATTACKER and nm in flags and flags[nm]["checks"]
                ),
                "site_stats": {senders[k]: dict(s.stats) for k, s in built.screening.items()},
                "attacker_flagged": bool(flags.get(names[ATTACKER], {}).get("checks")),
                "config": rcfg.to_run_config(),
            }
            log.info(
                "[%s seed %d] %s / %s: honest mean %.3f, server %.0f s, flagged %s",
                setting,
                seed,
                attack,
                defence,
                run["honest_mean"],
                server_s,
                sorted(nm for nm, f in flags.items() if f["checks"]) or "none",
            )
            save(key, run)


def summarize(runs: dict) -> str:
    """Markdown: per setting and attack, the mean over seeds of the honest sites' mean accuracy
    for each defence and its cost against the clean run with the defence off (and, for the
    defence on, against the run where the attacker's site is absent), the server's seconds and
    synthetic images, and who was flagged."""
    by: dict = {}
    for r in runs.values():
        by.setdefault(r["setting"], {}).setdefault(r["attack"], {}).setdefault(r["defence"], []).append(r)
    lines = []
    for setting, attacks in by.items():
        clean = {r["seed"]: r["honest_mean"] for r in attacks.get("none", {}).get("off", [])}
        absent = {r["seed"]: r["honest_mean"] for r in attacks.get("absent", {}).get("off", [])}
        defences = [d for d in DEFENCES if any(d in v for v in attacks.values())]
        lines += [f"### {setting}", ""]
        head = "| attack | " + " | ".join(f"honest mean, {d} (cost)" for d in defences)
        head += " | on vs absent | server s (" + ", ".join(defences) + ") | images (" + ", ".join(defences) + ")"
        head += " | attacker acted on | honest sites flagged | seeds |"
        lines += [head, "|---" * (len(defences) + 7) + "|"]
        for attack, per in attacks.items():
            cells, secs, imgs = [], [], []
            for d in defences:
                rs = per.get(d, [])
                if not rs:
                    cells.append("-")
                    secs.append("-")
                    imgs.append("-")
                    continue
                m = statistics.mean(r["honest_mean"] for r in rs)
                costs = [clean[r["seed"]] - r["honest_mean"] for r in rs if r["seed"] in clean]
                cost = f" ({statistics.mean(costs):+.3f})" if costs else ""
                cells.append(f"{m:.3f}{cost}")
                secs.append(f"{statistics.mean(r['server_seconds'] for r in rs):.0f}")
                imgs.append(f"{statistics.mean(r['num_synthetic'] for r in rs):.0f}")
            on_rs = [r for r in per.get("on", []) if r["seed"] in absent]
            vs_absent = f"{statistics.mean(absent[r['seed']] - r['honest_mean'] for r in on_rs):+.3f}" if on_rs else "-"
            on = [r for d, rs in per.items() if d != "off" for r in rs]
            # acted on: a finding, or a quota / share note (inflation is handled by the quota)
            caught = sum(r["attacker"] in r["screening"] for r in on)
            att = f"{caught}/{len(on)}" if on and attack not in ("none", "absent") else "-"
            wrong = sorted({nm for r in on for nm in r["flagged_honest"]})
            seeds = sorted({r["seed"] for d in per.values() for r in d})
            lines.append(
                f"| {attack} | "
                + " | ".join(cells)
                + f" | {vs_absent} | {', '.join(secs)} | {', '.join(imgs)} | {att} | "
                f"{', '.join(wrong) if wrong else 'none'} | {','.join(map(str, seeds))} |"
            )
        lines.append("")
    lines += [
        "Honest margins: what each check measured on the clean uploads (the runs `none`, defence on), "
        "the worst site over the seeds; the thresholds are in federation/trust.py.",
        "",
    ]
    lines += ["| setting | seeds | sites | " + " | ".join(STAT_KEYS) + " |", "|---" * (len(STAT_KEYS) + 3) + "|"]
    for setting, attacks in by.items():
        rows = [st for r in attacks.get("none", {}).get("on", []) for st in r.get("site_stats", {}).values()]
        if not rows:
            continue
        seeds = sorted({r["seed"] for r in attacks["none"]["on"] if r.get("site_stats")})
        worst = [
            f"{(min if k in ('drift-min', 'latent-std-min') else max)(x[k] for x in rows if k in x):.3f}"
            if any(k in x for x in rows)
            else "-"
            for k in STAT_KEYS
        ]
        lines.append(f"| {setting} | {','.join(map(str, seeds))} | {len(rows)} | " + " | ".join(worst) + " |")
    lines.append("")
    lines.append(
        "Honest mean: mean accuracy of every site but the attacker (site 0), mean over the seeds. Attacker acted "
        "on: runs (defence not off) with a finding or a quota note on the attacker. Cost: the "
        "clean run's honest mean with the defence off minus this (positive = accuracy lost). On vs absent: the "
        "same against the run in which the attacker's site sends nothing (its data lost to the others)."
    )
    return "\n".join(lines)


def main(a, extra: dict) -> None:
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attacks.json"
    runs: dict = json.loads(path.read_text())["runs"] if (a.resume and path.is_file()) else {}
    attacks = a.attacks.split(",") if a.attacks else list(ATTACKS)
    unknown = [x for x in attacks if x not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}")
    defences = a.defences.split(",")
    bad = [d for d in defences if d not in DEFENCES]
    if bad:
        raise SystemExit(f"unknown defence(s) {bad}; known: {', '.join(DEFENCES)}")
    t0 = time.time()
    if a.screen_only:
        print(screen_only(a.settings.split(","), [int(x) for x in a.seeds.split(",")], extra, out))
        print(f"wall time {time.time() - t0:.0f} s; written to {out / 'screening.json'} and screening.md")
        return

    def save(key, run):
        runs[key] = run
        write_json(path, {"runs": runs})

    for setting in a.settings.split(","):
        for seed in a.seeds.split(","):
            run_attacks(setting, int(seed), attacks, defences, extra, runs, save)
    md = summarize(runs)
    (out / "attacks.md").write_text(md + "\n")
    print(md)
    print(f"wall time {time.time() - t0:.0f} s; written to {path} and {out / 'attacks.md'}")
