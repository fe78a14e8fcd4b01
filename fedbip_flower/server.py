"""What the ServerApp does, given a Grid: parse config, run the strategy, write the outputs.

Outputs, one folder per run under ``output-dir``: ``results.json`` (accuracy per client and
mean, upload bytes per client, time per phase, full config, rejected nodes),
``synthetic_<domain>.png`` per client, ``classifier.safetensors`` and ``server.log``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedbip_flower import __version__
from fedbip_flower.config import FedBiPConfig
from fedbip_flower.ldm import load_components
from fedbip_flower.shapes import image_grid
from fedbip_flower.strategy import FedBiPError, FedBiPStrategy

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


def _grid_png(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 8) -> None:
    tiles = []
    classes = labels.unique().tolist()
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        tiles += [images[i].permute(1, 2, 0).numpy() for i in idx]
        tiles += [images[0].permute(1, 2, 0).numpy() * 0 + 255] * (per_class - len(idx))
    image_grid(tiles, len(classes), per_class).save(path)


def json_safe(obj):
    """``obj`` with non-finite floats as None: results.json must be valid JSON (no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def results_dict(strategy: FedBiPStrategy, cfg: FedBiPConfig, run_id: Any, status: str,
                 error: str = "") -> dict[str, Any]:  # fmt: skip
    clients = []
    for r in sorted(strategy.clients.values(), key=lambda r: (r.domain, r.node_id)):
        clients.append({
            "node_id": r.node_id, "domain": r.domain, "status": r.status, "reason": r.reason,
            "upload_bytes": r.upload_bytes, "num_images": r.num_images,
            "accuracy": r.accuracy, "num_test": r.num_test, "client_metrics": r.client_metrics,
        })  # fmt: skip
    scored = [c["accuracy"] for c in clients if c["accuracy"] is not None]
    return {
        "status": status,
        "error": error,
        "run_id": str(run_id),
        "fedbip_flower_version": __version__,
        "model": {"source": strategy.components.source, "fingerprint": strategy.components.fingerprint},
        "mean_accuracy": sum(scored) / len(scored) if scored else None,
        "clients": clients,
        "num_synthetic": int(sum(len(v[1]) for v in strategy.synthetic.values())),
        "timings_s": {k: round(v, 2) for k, v in strategy.timings.items()},
        "config": cfg.to_run_config(),
    }


def run_server(grid: Grid, run_config: dict[str, Any], run_id: Any = 0, progress: bool = True) -> dict:
    """Run FedBiP on ``grid``; write and return the results. Raises on failure."""
    cfg = FedBiPConfig.from_run_config(run_config)  # bad config: stop before any work
    run_dir = make_run_dir(cfg.output_dir, run_id)
    handler = _attach_log(run_dir)
    t0 = time.time()
    log.info("FedBiP run %s: outputs in %s", run_id, run_dir)
    strategy = None
    try:
        comps = load_components(cfg.model.id, cfg.model.device, cfg.model.dtype)
        strategy = FedBiPStrategy(cfg, comps, progress=progress)
        record = ConfigRecord(cfg.to_run_config())
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(), num_rounds=1,
            timeout=cfg.server.round_timeout, train_config=record, evaluate_config=record,
        )  # fmt: skip
        strategy.timings["total"] = time.time() - t0
        _write_artifacts(strategy, run_dir)
        res = results_dict(strategy, cfg, run_id, "completed")
        if res["mean_accuracy"] is None:
            raise FedBiPError("no client returned an evaluation")
        (run_dir / "results.json").write_text(json.dumps(json_safe(res), indent=2, allow_nan=False))
        log.info("mean accuracy over %d client(s): %.4f", len(strategy.accepted), res["mean_accuracy"])
        for c in res["clients"]:
            log.info("  node %s %-12s %-9s acc=%s upload=%d B %s", c["node_id"], c["domain"],
                     c["status"], c["accuracy"], c["upload_bytes"], c["reason"])  # fmt: skip
        log.info("results written to %s", run_dir / "results.json")
        return res
    except Exception as err:
        log.error("FedBiP run failed: %s", err)
        if strategy is not None:
            res = results_dict(strategy, cfg, run_id, "failed", f"{type(err).__name__}: {err}")
            (run_dir / "results.json").write_text(json.dumps(json_safe(res), indent=2, allow_nan=False))
        raise
    finally:
        for name in ("fedbip_flower", "flwr"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def _write_artifacts(strategy: FedBiPStrategy, run_dir: Path) -> None:
    from safetensors.torch import save_file

    from fedbip_flower.classifier import state_to_cpu

    for nid, (x, y) in strategy.synthetic.items():
        name = strategy.clients[nid].domain.replace(" ", "-").replace("/", "-") or "client"
        _grid_png(x, y, run_dir / f"synthetic_{name}_node{nid}.png")
    if strategy.classifier is not None:
        state = {k: v for k, v in state_to_cpu(strategy.classifier).items()}
        save_file(state, str(run_dir / "classifier.safetensors"),
                  metadata={"class_names": json.dumps(strategy.class_names)})  # fmt: skip
