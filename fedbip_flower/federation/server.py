"""What the ServerApp does, given a Grid: parse config, run the strategy, write the outputs.

Outputs, one folder per run under ``output-dir``: ``results.json`` (accuracy per client and
mean, upload bytes per client, time per phase, full config, rejected nodes),
``synthetic_<domain>_node<id>.png`` per client, ``classifier.safetensors`` and ``server.log``.

``results.json``: ``status`` is ``completed`` (at least one accepted site scored the
classifier), ``unscored`` (a classifier was trained and saved, but no accepted site could
score it: ``error`` says why, per node, and ``classifier_path`` where it is; the run itself
completes) or ``failed``. ``mean_accuracy`` covers accepted sites only; scores of rejected
sites that evaluated the classifier anyway are listed apart under ``rejected_scores``.

A client's domain string becomes part of a file name only through ``safe_filename`` (ASCII
letters, digits, ``.-_``; bounded), and every file is written inside the run folder.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedbip_flower import __version__
from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation.console import console_logging
from fedbip_flower.federation.payload import safe_filename, safe_text
from fedbip_flower.federation.strategy import FedBiPStrategy, RunOutcome
from fedbip_flower.federation.synthetic_set import SUBDIR as SYNTHETIC_SUBDIR
from fedbip_flower.jsonio import write_json
from fedbip_flower.models.ldm import load_server_components
from fedbip_flower.pictures import class_grid

log = logging.getLogger(__name__)


def make_run_dir(output_dir: str, run_id: int | str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(output_dir).expanduser().resolve() / f"{stamp}-run{run_id}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("fedbip_flower", "flwr"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    return handler


def results_dict(
    out: RunOutcome, cfg: FedBiPConfig, run_id: Any, status: str, error: str = "", flower: dict | None = None
) -> dict[str, Any]:
    """results.json of a run: its outcome, status and config (``flower``: the metrics of
    Flower's ``Result``)."""
    clients = [
        {
            "node_id": r.node_id,
            "name": out.names.get(r.node_id, ""),
            "domain": r.domain,
            "status": r.status,
            "reason": r.reason,
            "upload_bytes": r.upload_bytes,
            "num_images": r.num_images,
            "accuracy": r.accuracy,
            "num_test": r.num_test,
            "evaluation": r.evaluation,
            "client_metrics": r.client_metrics,
            "screening": r.screening,
        }
        for r in out.clients
    ]
    scores = out.scores
    return {
        "status": status,
        "error": error,
        "run_id": str(run_id),
        "fedbip_flower_version": __version__,
        "model": {"source": out.model_source, "fingerprint": out.model_fingerprint},
        "mean_accuracy": scores["mean"],  # accepted sites only
        "weighted_accuracy": scores["weighted"],
        "num_scored": len(scores["accepted"]),
        "rejected_scores": [
            {"node_id": r.node_id, "domain": r.domain, "accuracy": r.accuracy, "num_test": r.num_test}
            for r in scores["rejected"]
        ],
        "rejected_mean_accuracy": scores["rejected_mean"],
        "clients": clients,
        "num_synthetic": out.num_synthetic,
        "synthetic_dir": str(out.synthetic_dir or ""),
        "classifier_path": "",
        "timings_s": {k: round(v, 2) for k, v in out.timings.items()},
        "flower_metrics": flower or {},
        "config": cfg.to_run_config(),
    }


def flower_metrics(result) -> dict:
    """The metrics of Flower's ``Result`` (train and evaluate, per round) as plain numbers."""
    parts = {
        "train": getattr(result, "train_metrics_clientapp", {}),
        "evaluate": getattr(result, "evaluate_metrics_clientapp", {}),
    }
    return {kind: {str(rnd): dict(rec) for rnd, rec in (per_round or {}).items()} for kind, per_round in parts.items()}


def unscored_explanation(out: RunOutcome, classifier_path: Path | None) -> str:
    """Why a trained classifier has no score: what each accepted node answered."""
    accepted = sorted((r for r in out.clients if r.status == "accepted"), key=lambda r: r.node_id)
    why = "; ".join(f"node {r.node_id} ({r.domain or '?'}): {r.evaluation}" for r in accepted)
    where = f"it is saved at {classifier_path}" if classifier_path else "it could not be saved"
    text = (
        f"a classifier was trained on {out.num_synthetic} synthetic "
        f"images ({where}), but no accepted site could score it: {why}."
    )
    if any(r.evaluation == "no test images" for r in accepted):
        text += " A site needs more images per class than data.shots to hold a test split."
    return text


def _write_results(run_dir: Path, res: dict) -> None:
    write_json(run_dir / "results.json", res)


def run_server(grid: Grid, run_config: dict[str, Any], run_id: Any = 0, progress: bool = True) -> dict:
    """Run FedBiP on ``grid``; write and return the results. Raises on failure.

    A run whose classifier no accepted site could score returns normally with status
    ``unscored`` (explained in ``error`` and the log), not as a failure: the classifier
    exists and is saved.
    """
    cfg = FedBiPConfig.from_run_config(run_config)  # bad config: stop before any work
    with console_logging():
        return _run(grid, cfg, run_id, progress)


def _run(grid: Grid, cfg: FedBiPConfig, run_id: Any, progress: bool) -> dict:
    run_dir = make_run_dir(cfg.output_dir, run_id)
    handler = _attach_log(run_dir)
    t0 = time.time()
    log.info("FedBiP run %s: outputs in %s", run_id, run_dir)
    strategy = None
    try:
        workers = load_server_components(cfg.model.id, cfg.model.device, cfg.model.dtype)
        strategy = FedBiPStrategy(
            cfg, workers[0], progress=progress, workers=workers, synthetic_dir=run_dir / SYNTHETIC_SUBDIR
        )
        record = ConfigRecord(cfg.to_run_config())
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            num_rounds=1,
            timeout=cfg.server.round_timeout,
            train_config=record,
            evaluate_config=record,
        )
        out = strategy.outcome()
        out.timings["total"] = time.time() - t0
        classifier_path = _write_artifacts(out, run_dir)
        scored = out.scores["accepted"]
        status = "completed" if scored else "unscored"
        error = "" if scored else unscored_explanation(out, classifier_path)
        res = results_dict(out, cfg, run_id, status, error, flower_metrics(result))
        res["classifier_path"] = str(classifier_path or "")
        _write_results(run_dir, res)
        if scored:
            log.info("mean accuracy over %d accepted client(s): %.4f", len(scored), res["mean_accuracy"])
        else:
            log.error("no score for the classifier: %s", error)
        if res["rejected_scores"]:
            log.info(
                "rejected site(s) scored apart (not in the mean): mean %.4f over %d",
                res["rejected_mean_accuracy"],
                len(res["rejected_scores"]),
            )
        for c in res["clients"]:
            log.info(
                "  node %s %-12s %-9s acc=%s upload=%d B %s",
                c["node_id"],
                safe_text(c["domain"], 60),
                c["status"],
                c["accuracy"],
                c["upload_bytes"],
                c["reason"],
            )
        log.info("results written to %s", run_dir / "results.json")
        return res
    except Exception as err:
        log.error("FedBiP run failed: %s", safe_text(str(err), 4000))
        if strategy is not None:
            failed = results_dict(strategy.outcome(), cfg, run_id, "failed", f"{type(err).__name__}: {err}")
            _write_results(run_dir, failed)
        raise
    finally:
        for name in ("fedbip_flower", "flwr"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def _inside(run_dir: Path, name: str) -> Path:
    """``run_dir / name``, refusing any name that would leave the run folder."""
    path = (run_dir / name).resolve()
    if path.parent != run_dir.resolve():
        raise ValueError(f"file name {name!r} leaves the run folder")
    return path


def _write_artifacts(out: RunOutcome, run_dir: Path) -> Path | None:
    """Per-client synthetic grids (a failure skips that picture only) and the classifier;
    returns the classifier's path (None if there is none)."""
    from safetensors.torch import save_file

    from fedbip_flower.models.classifier import state_to_cpu

    for nid, shard in out.synthetic.items():
        name = safe_filename(out.client(nid).domain)
        try:
            class_grid(*shard.load()).save(_inside(run_dir, f"synthetic_{name}_node{int(nid)}.png"))
        except Exception as err:  # noqa: BLE001 - a picture is not worth the run
            log.warning("node %s: no synthetic image grid (%s: %s)", nid, type(err).__name__, safe_text(str(err)))
    if out.classifier is None:
        return None
    path = _inside(run_dir, "classifier.safetensors")
    state = {k: v for k, v in state_to_cpu(out.classifier).items()}
    save_file(state, str(path), metadata={"class_names": json.dumps(out.class_names)})
    return path
