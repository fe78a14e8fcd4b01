"""Scale benchmark: how a federation's cost grows with its number of sites.

``python -m fedbip_flower.research.benchmark scale --sites 4,16,50,100`` runs, for each size N,
the app's own code in three processes (so each phase's peak memory is its own):

1. **sites**: every site runs the ClientApp's training logic
   (:func:`~fedbip_flower.federation.client.personalize_site`: its own data, bi-level
   personalization) and its upload is serialised as Flower sends it. Per site: data-loading
   and personalization seconds, upload bytes. Each site's upload is saved as it is made, so a
   stopped run resumes where it stopped.
2. **server**: the ServerApp's pipeline on those uploads: the intake's validation
   (:func:`~fedbip_flower.federation.payload.validate_reply`), screening, synthesis spread over
   ``model.device``, the synthetic set streamed to disk, the classifier trained from it. Peak
   RSS (``ru_maxrss``) of this process, synthesis and classifier seconds.
3. **scores**: each site scores the classifier on its private test split (the ClientApp's
   evaluation logic), giving the mean accuracy.

Sites are FedBiP-Shapes sites of the four client styles, ``data.per-class`` set so that every
site holds about the same data whatever N (``data.shots`` training and 32 test images per class
and site: 48 with the defaults), so per-site work is constant and the totals should be linear
in N. Every other setting is the app's default (``--run-config`` overrides it).
Results: ``OUT/scale.json`` and ``OUT/scale.md`` (a table; ``--figure`` draws time and memory
against N into ``OUT/scale.png`` when matplotlib is installed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedbip_flower.jsonio import write_json

log = logging.getLogger(__name__)
TEST_PER_CLASS = 32  # test images per class a site holds (with the default data.shots = 16: 48 in all)


def per_class_for(sites: int, domains: int, shots: int, max_test: int) -> int:
    """``data.per-class`` (per class and domain) that gives each of ``sites`` sites about
    ``shots + min(max_test, 32)`` images per class, whatever the number of sites."""
    return (shots + min(max_test, TEST_PER_CLASS)) * math.ceil(sites / domains)


def run_config_for(sites: int, extra: dict) -> dict:
    """The run config of one size: ``extra`` with ``data.per-class`` for that size."""
    from fedbip_flower.config import FedBiPConfig

    d = FedBiPConfig.from_run_config(extra).data
    per_class = per_class_for(sites, len(d.domains.split(",")), d.shots, d.max_test_per_class)
    return {**extra, "data.per-class": per_class, "min-clients": sites}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def phase_sites(sites: int, run_config: dict, out: Path) -> None:
    """Every site's ClientApp training logic; one saved upload per site (resumable)."""
    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.federation.client import personalize_site
    from fedbip_flower.federation.payload import UPLOAD, to_record_dict

    cfg = FedBiPConfig.from_run_config(run_config)
    folder = out / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for pid in range(sites):
        path = folder / f"site-{pid:04d}.pt"
        if path.is_file():
            continue
        payload = personalize_site(cfg, {"partition-id": pid, "num-partitions": sites}, progress=False)
        record = to_record_dict(payload)
        upload_bytes = int(record.array_records[UPLOAD].count_bytes())
        tmp = path.with_suffix(".tmp")
        torch.save({"payload": payload, "upload_bytes": upload_bytes}, tmp)
        tmp.replace(path)
        done = pid + 1
        if done % 10 == 0 or done == sites:
            log.info("sites: %d/%d personalized (%.0f s)", done, sites, time.time() - t0)
    rows = []
    for pid in range(sites):
        saved = torch.load(folder / f"site-{pid:04d}.pt", weights_only=False)
        m = saved["payload"].metrics
        rows.append(
            {
                "site": pid,
                "domain": saved["payload"].domain,
                "data_s": m.get("data-seconds", float("nan")),
                "personalize_s": m.get("client-seconds", float("nan")),
                "upload_bytes": saved["upload_bytes"],
                "latents": int(saved["payload"].labels.numel()),
            }
        )
    write_json(out / "sites.json", {"sites": rows, "peak_rss_mb": _peak_rss_mb()})


def phase_server(sites: int, run_config: dict, out: Path) -> None:
    """The ServerApp's pipeline on the saved uploads; this process's peak memory."""
    from safetensors.torch import save_file

    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.federation.payload import to_record_dict, validate_reply
    from fedbip_flower.federation.server_pipeline import build_global_model
    from fedbip_flower.federation.sites import expected_for
    from fedbip_flower.federation.synthetic_set import SyntheticStore
    from fedbip_flower.models.classifier import state_to_cpu
    from fedbip_flower.models.ldm import load_server_components

    cfg = FedBiPConfig.from_run_config(run_config)
    workers = load_server_components(cfg.model.id, cfg.model.device, cfg.model.dtype)
    rss_model = _peak_rss_mb()
    expected = expected_for(workers[0], cfg)
    t0 = time.time()
    uploads = {}
    for pid in range(sites):
        record = to_record_dict(torch.load(out / "uploads" / f"site-{pid:04d}.pt", weights_only=False)["payload"])
        uploads[pid] = validate_reply(record, expected)
    intake_s = time.time() - t0
    store = SyntheticStore(out / "synthetic")
    built = build_global_model(workers[0], uploads, cfg, workers=workers, store=store, describe=lambda k: f"site {k}")
    save_file(state_to_cpu(built.classifier), str(out / "classifier.safetensors"))
    result = {
        "devices": [str(w.device) for w in workers],
        "intake_s": intake_s,
        "synthesis_s": built.timings["synthesis"],
        "classifier_s": built.timings["classifier"],
        "num_synthetic": len(built.labels),
        "sgd_steps": built.stats["sgd-steps"],
        "flagged_sites": sum(bool(s.flagged) for s in built.screening.values()),
        "rss_after_model_mb": rss_model,
        "peak_rss_mb": _peak_rss_mb(),
    }
    write_json(out / "server.json", result)


def phase_scores(sites: int, run_config: dict, out: Path) -> None:
    """Each site scores the classifier on its own test split (the ClientApp's evaluation)."""
    from safetensors.torch import load_file

    from fedbip_flower.federation.client import run_evaluate

    state = load_file(str(out / "classifier.safetensors"))
    scores = []
    for pid in range(sites):
        reply = run_evaluate(state, run_config, {"partition-id": pid, "num-partitions": sites})
        m = reply.metric_records["metrics"]
        scores.append({"site": pid, "accuracy": float(m["accuracy"]), "num_test": int(m["num-examples"])})
    write_json(out / "scores.json", {"scores": scores})


PHASES = {
    "sites": (phase_sites, "sites.json"),
    "server": (phase_server, "server.json"),
    "scores": (phase_scores, "scores.json"),
}


def run_size(sites: int, extra: dict, out: Path, resume: bool, threads: int) -> dict:
    """The three phases for one federation size, each in its own process; returns its row."""
    folder = out / f"sites-{sites:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    run_config = run_config_for(sites, extra)
    write_json(folder / "run_config.json", run_config)
    walls = {}
    for name, (_, result) in PHASES.items():
        if resume and (folder / result).is_file():
            continue
        t0 = time.time()
        cmd = [sys.executable, "-m", "fedbip_flower.research.scale", name, str(sites), str(folder)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env)
        walls[name] = time.time() - t0
        log.info("%d sites: %s done in %.0f s", sites, name, walls[name])
    return row(sites, folder)


def row(sites: int, folder: Path) -> dict:
    s = json.loads((folder / "sites.json").read_text())["sites"]
    srv = json.loads((folder / "server.json").read_text())
    sc = json.loads((folder / "scores.json").read_text())["scores"]

    def mean(xs):
        return sum(xs) / len(xs)

    return {
        "sites": sites,
        # the median: the first site of a process also pays for imports and caches
        "data_s_median": statistics.median(r["data_s"] for r in s),
        "data_s_mean": mean([r["data_s"] for r in s]),
        "personalize_s_mean": mean([r["personalize_s"] for r in s]),
        "upload_kb_mean": mean([r["upload_bytes"] for r in s]) / 1024,
        "upload_mb_total": sum(r["upload_bytes"] for r in s) / 2**20,
        "num_synthetic": srv["num_synthetic"],
        "synthesis_s": srv["synthesis_s"],
        "classifier_s": srv["classifier_s"],
        "synthesis_ms_per_image": 1000 * srv["synthesis_s"] / srv["num_synthetic"],
        "classifier_ms_per_image": 1000 * srv["classifier_s"] / srv["num_synthetic"],
        "server_peak_rss_mb": srv["peak_rss_mb"],
        "server_rss_after_model_mb": srv["rss_after_model_mb"],
        "flagged_sites": srv["flagged_sites"],
        "mean_accuracy": mean([r["accuracy"] for r in sc]),
        "min_accuracy": min(r["accuracy"] for r in sc),
        "devices": srv["devices"],
    }


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| Sites | Data s/site (median) | Personalize s/site | Upload KB/site | Synthetic images | Synthesis s "
        "| ms/image | Classifier s | ms/image | Server peak RSS MB | Mean accuracy (min) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['sites']} | {r['data_s_median']:.2f} | {r['personalize_s_mean']:.1f} | {r['upload_kb_mean']:.0f} "
            f"| {r['num_synthetic']} | {r['synthesis_s']:.0f} | {r['synthesis_ms_per_image']:.1f} "
            f"| {r['classifier_s']:.0f} | {r['classifier_ms_per_image']:.1f} | {r['server_peak_rss_mb']:.0f} "
            f"| {r['mean_accuracy']:.3f} ({r['min_accuracy']:.3f}) |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, as measured: smallest vs largest size."""
    if len(rows) < 2:
        return []
    a, b = rows[0], rows[-1]
    return [
        f"data-loading time per site (median), {b['sites']} vs {a['sites']} sites: "
        f"{b['data_s_median'] / a['data_s_median']:.2f}x "
        f"(target within 1.2x)",
        f"server peak RSS, {b['sites']} vs {a['sites']} sites: {b['server_peak_rss_mb'] / a['server_peak_rss_mb']:.2f}x "
        f"(target within 1.5x)",
        f"synthesis ms per image: {a['synthesis_ms_per_image']:.1f} at {a['sites']} sites, "
        f"{b['synthesis_ms_per_image']:.1f} at {b['sites']}; classifier ms per image: "
        f"{a['classifier_ms_per_image']:.1f} and {b['classifier_ms_per_image']:.1f} (constant = linear in images)",
    ]


def figure(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no figure: matplotlib is not installed (pip install matplotlib)")
        return False
    n = [r["sites"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(n, [r["synthesis_s"] for r in rows], "o-", label="server synthesis")
    ax1.plot(n, [r["classifier_s"] for r in rows], "s-", label="server classifier")
    ax1.plot(n, [r["personalize_s_mean"] * r["sites"] for r in rows], "^-", label="all sites' personalization")
    ax1.set_xlabel("sites")
    ax1.set_ylabel("seconds")
    ax1.legend(fontsize=8)
    ax1.set_title("time (linear in sites)")
    ax2.plot(n, [r["server_peak_rss_mb"] for r in rows], "o-", label="server peak RSS")
    ax2.plot(n, [r["data_s_median"] * 1000 for r in rows], "s-", label="site data loading (ms, median)")
    ax2.set_xlabel("sites")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax2.set_title("server memory (MB), one site's data time (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(a, extra: dict) -> None:
    sizes = [int(s) for s in a.sites.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit("--sites needs a comma list of positive sizes, e.g. 4,16,50,100")
    rows = []
    for n in sizes:
        rows.append(run_size(n, extra, a.out, a.resume, a.threads))
        write_json(a.out / "scale.json", {"rows": rows, "run_config": extra})
    md = to_markdown(rows) + "\n\n" + "\n".join(f"- {t}" for t in targets(rows))
    (a.out / "scale.md").write_text(md + "\n")
    (a.out / "scale.json").write_text(
        json.dumps({"rows": rows, "run_config": extra, "targets": targets(rows)}, indent=2)
    )
    if a.figure:
        figure(rows, a.out / "scale.png")
    print(md)
    print(f"written to {a.out}/scale.json and scale.md")


if __name__ == "__main__":  # one phase of one size: python -m fedbip_flower.research.scale PHASE SITES FOLDER
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    phase, sites, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    PHASES[phase][0](sites, json.loads((folder / "run_config.json").read_text()), folder)
